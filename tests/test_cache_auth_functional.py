"""The response cache on routes with `auth`, end to end: two API-key
consumers and JWT subjects on caching routes, a real target that names who
asked in its body, the real gateway from TOML, assertions on the wire (bodies,
Cache-Status) and on how many requests reached the target. Every wait is
bounded (WAIT)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.auth_keys import KeyPair, claims, jwks, make_key
from tests.conftest import GatewayFactory, RunningGateway, UpstreamFactory

WAIT = 10.0
KEY_A = "key-of-acme-0123456789abcdefghijklmnopqrstuvwxyz"
KEY_B = "key-of-globex-0123456789abcdefghijklmnopqrstuvwxyz"
# A key consumer named like a JWT subject: the two are different identities.
KEY_ALICE = "key-of-alice-0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def pair() -> KeyPair:
    return make_key("ES256", "kid-cache")


@dataclass
class Origin:
    """A target that names in its body who the gateway said asked (the
    forwarded consumer or subject), and counts the requests per path."""

    hits: dict[str, int] = field(default_factory=dict)
    seen: list[dict[str, str]] = field(default_factory=list)

    def count(self, path: str) -> int:
        return self.hits.get(path, 0)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] = n = self.hits.get(request.path, 0) + 1
        self.seen.append(dict(request.headers))
        who = (
            request.headers.get("X-Auth-Consumer")
            or request.headers.get("X-Auth-Subject")
            or "nobody"
        )
        # "/plain" paths answer without public / s-maxage: never stored on auth routes.
        cc = "max-age=60" if "/plain" in request.path else "public, max-age=60"
        return web.Response(text=f"{request.path} for {who} #{n}", headers={"Cache-Control": cc})


async def _start(
    tmp: Path, pair: KeyPair, start_upstream: UpstreamFactory, make_gateway: GatewayFactory
) -> tuple[Origin, RunningGateway]:
    origin = Origin()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", origin.handle)
    server = await start_upstream(app)
    jwks_path = tmp / "jwks.json"
    jwks_path.write_text(jwks(pair))
    keys_path = tmp / "api-keys.toml"
    blocks = []
    for name, key in (("acme", KEY_A), ("globex", KEY_B), ("alice", KEY_ALICE)):
        digest = hashlib.sha256(key.encode()).hexdigest()
        blocks.append(f'[consumers.{name}]\nkey_sha256 = "{digest}"\nscopes = ["orders:read"]\n')
    keys_path.write_text("\n".join(blocks))
    gw = await make_gateway(
        f"""
        [cache]

        [auth.staff]
        type = "jwt"
        algorithms = ["ES256"]
        jwks_file = "{jwks_path}"
        issuer = "https://id.test"
        audiences = ["orders-api"]
        forward_claims = {{ sub = "X-Auth-Subject" }}

        [auth.partners]
        type = "api_key"
        header = "X-Api-Key"
        keys_file = "{keys_path}"
        forward_consumer = "X-Auth-Consumer"

        [upstreams.app]
        targets = ["http://127.0.0.1:{server.port}"]

        [[routes]]
        name = "shared"
        path = "/shared"
        upstream = "app"
        auth = ["staff", "partners"]
        [routes.cache]
        ttl = 60.0

        [[routes]]
        name = "stripped"
        path = "/stripped"
        upstream = "app"
        auth = ["staff", "partners"]
        strip_credentials = true
        [routes.cache]

        [[routes]]
        name = "limited"
        path = "/limited"
        upstream = "app"
        auth = "partners"
        max_body_bytes = 10
        [routes.cache]
        [routes.rate_limit]
        rate = 0.001
        burst = 2
        key = "consumer"

        [[routes]]
        name = "writers"
        path = "/writers"
        upstream = "app"
        auth = "partners"
        methods = ["GET", "HEAD"]
        [routes.access]
        scopes = ["orders:write"]
        [routes.cache]

        [[routes]]
        name = "moved"
        path = "/moved"
        redirect = "https://{{host}}{{path}}"
        redirect_status = 301
        [routes.cache]

        [[routes]]
        name = "uncached"
        path = "/uncached"
        upstream = "app"
        auth = "partners"

        [[routes]]
        name = "per-consumer"
        path = "/per-consumer"
        upstream = "app"
        auth = ["staff", "partners"]
        [routes.rate_limit]
        rate = 0.001
        burst = 1
        key = "consumer"
        """
    )
    return origin, gw


async def _get(
    client: aiohttp.ClientSession, url: str, method: str = "GET", **headers: str
) -> tuple[int, CIMultiDict[str], str]:
    async with asyncio.timeout(WAIT):
        async with client.request(method, url, headers=headers) as response:
            return response.status, CIMultiDict(response.headers), (await response.read()).decode()


async def _raw(gw: RunningGateway, request: str) -> bytes:
    """Send raw bytes (latin-1), read until the server closes or WAIT ends."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        try:
            writer.write(
                request.encode("latin-1").replace(b"Host: t", b"Host: t\r\nConnection: close")
            )
            await writer.drain()
            return await reader.read(65536)
        finally:
            writer.close()


def _bearer(pair: KeyPair, **changes: object) -> str:
    return f"Bearer {pair.token(claims(**changes))}"


async def test_a_response_stored_for_one_consumer_never_reaches_another(
    tmp_path: Path,
    pair: KeyPair,
    start_upstream: UpstreamFactory,
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    origin, gw = await _start(tmp_path, pair, start_upstream, make_gateway)
    url = gw.url + "/shared/x"
    status, headers, body = await _get(client, url, **{"X-Api-Key": KEY_A})
    assert (status, body) == (200, "/shared/x for acme #1")
    assert headers["Cache-Status"] == "gateway; fwd=miss; stored"
    # B gets its own miss, never A's stored response.
    status, headers, body = await _get(client, url, **{"X-Api-Key": KEY_B})
    assert (status, body) == (200, "/shared/x for globex #2")
    assert headers["Cache-Status"] == "gateway; fwd=miss; stored"
    # A JWT subject too.
    status, headers, body = await _get(client, url, Authorization=_bearer(pair, sub="bob"))
    assert (status, body) == (200, "/shared/x for bob #3")
    assert headers["Cache-Status"] == "gateway; fwd=miss; stored"
    # Each one's second request is a hit on its own entry.
    for who, creds, n in (
        ("acme", {"X-Api-Key": KEY_A}, 1),
        ("globex", {"X-Api-Key": KEY_B}, 2),
        ("bob", {"Authorization": _bearer(pair, sub="bob")}, 3),
    ):
        status, headers, body = await _get(client, url, **creds)
        assert (status, body) == (200, f"/shared/x for {who} #{n}")
        assert headers["Cache-Status"].startswith("gateway; hit; ttl=")
        assert "Age" in headers
    assert origin.count("/shared/x") == 3


async def test_a_jwt_subject_and_a_key_consumer_of_the_same_name_do_not_share_entries(
    tmp_path: Path,
    pair: KeyPair,
    start_upstream: UpstreamFactory,
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    # `sub` is chosen by the token's issuer, consumer names by the operator:
    # "alice" of one policy is not "alice" of another.
    origin, gw = await _start(tmp_path, pair, start_upstream, make_gateway)
    url = gw.url + "/shared/same-name"
    status, _, body = await _get(client, url, Authorization=_bearer(pair, sub="alice"))
    assert (status, body) == (200, "/shared/same-name for alice #1")
    status, headers, body = await _get(client, url, **{"X-Api-Key": KEY_ALICE})
    assert (status, body) == (200, "/shared/same-name for alice #2")
    assert headers["Cache-Status"] == "gateway; fwd=miss; stored"
    assert origin.count("/shared/same-name") == 2


async def test_a_response_without_public_or_s_maxage_is_never_stored_on_an_auth_route(
    tmp_path: Path,
    pair: KeyPair,
    start_upstream: UpstreamFactory,
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    origin, gw = await _start(tmp_path, pair, start_upstream, make_gateway)
    url = gw.url + "/shared/plain"
    # An API key (no Authorization header) and a JWT: the route's auth decides.
    for n, creds in enumerate(
        [{"X-Api-Key": KEY_A}, {"X-Api-Key": KEY_A}, {"Authorization": _bearer(pair)}], 1
    ):
        status, headers, body = await _get(client, url, **creds)
        assert status == 200
        assert body.endswith(f"#{n}")
        assert headers["Cache-Status"] == (
            "gateway; fwd=miss; fwd-status=200; detail=auth-not-public"
        )
    assert origin.count("/shared/plain") == 3


async def test_an_identity_without_a_consumer_is_never_answered_from_the_cache(
    tmp_path: Path,
    pair: KeyPair,
    start_upstream: UpstreamFactory,
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    # A token without `sub` passes auth but names nobody: the only "anonymous"
    # request an auth route lets through. It neither reads nor fills the cache.
    origin, gw = await _start(tmp_path, pair, start_upstream, make_gateway)
    url = gw.url + "/shared/anon"
    await _get(client, url, **{"X-Api-Key": KEY_A})  # stored for acme
    for n in (2, 3):
        status, headers, body = await _get(client, url, Authorization=_bearer(pair, sub=None))
        assert (status, body) == (200, f"/shared/anon for nobody #{n}")
        assert headers["Cache-Status"] == "gateway; fwd=bypass; detail=anonymous"
    assert origin.count("/shared/anon") == 3


async def test_with_strip_credentials_entries_are_still_per_consumer(
    tmp_path: Path,
    pair: KeyPair,
    start_upstream: UpstreamFactory,
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    # The target never sees the credentials (the request looks anonymous
    # upstream), yet the cache must still not mix consumers.
    origin, gw = await _start(tmp_path, pair, start_upstream, make_gateway)
    url = gw.url + "/stripped/x"
    _, _, body_a = await _get(client, url, **{"X-Api-Key": KEY_A})
    _, headers, body_b = await _get(client, url, **{"X-Api-Key": KEY_B})
    assert (body_a, body_b) == ("/stripped/x for acme #1", "/stripped/x for globex #2")
    assert headers["Cache-Status"] == "gateway; fwd=miss; stored"
    _, headers, body = await _get(client, url, **{"X-Api-Key": KEY_A})
    assert body == body_a
    assert headers["Cache-Status"].startswith("gateway; hit")
    assert all("X-Api-Key" not in seen and "Authorization" not in seen for seen in origin.seen)


async def test_a_hit_still_needs_credentials_and_takes_a_rate_limit_token(
    tmp_path: Path,
    pair: KeyPair,
    start_upstream: UpstreamFactory,
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    origin, gw = await _start(tmp_path, pair, start_upstream, make_gateway)
    url = gw.url + "/limited/x"
    status, headers, _ = await _get(client, url, **{"X-Api-Key": KEY_A})
    assert (status, headers["Cache-Status"]) == (200, "gateway; fwd=miss; stored")
    # A hit: needs the credentials like any request (401 before the lookup) ...
    for creds in ({}, {"X-Api-Key": ""}, {"X-Api-Key": KEY_A[:-1]}, {"X-Api-Key": KEY_A.upper()}):
        status, headers, body = await _get(client, url, **creds)
        assert status == 401
        assert "for acme" not in body
        assert headers["Cache-Status"] == "gateway; detail=unauthorized"
    # Hostile bytes in the key (obs-text, a doubled header) over a raw socket.
    for extra in (f"X-Api-Key: {KEY_A}\xff\r\n", f"X-Api-Key: {KEY_A}\r\nX-Api-Key: x\r\n"):
        head = await _raw(gw, f"GET /limited/x HTTP/1.1\r\nHost: t\r\n{extra}\r\n")
        assert head.split(b"\r\n", 1)[0].split(b" ")[1] in (b"400", b"401"), head
        assert b"for acme" not in head
    # ... and draws a token from A's bucket (burst 2: miss + hit).
    status, headers, _ = await _get(client, url, **{"X-Api-Key": KEY_A})
    assert status == 200
    assert headers["Cache-Status"].startswith("gateway; hit")
    status, headers, body = await _get(client, url, **{"X-Api-Key": KEY_A})
    assert status == 429
    assert "for acme" not in body
    assert headers["Cache-Status"] == "gateway; detail=rate_limited"
    assert "Retry-After" in headers
    # B's bucket is B's own.
    status, headers, body = await _get(client, url, **{"X-Api-Key": KEY_B})
    assert (status, body) == (200, "/limited/x for globex #2")
    assert origin.count("/limited/x") == 2


async def test_refusals_on_a_caching_route_carry_cache_status(
    tmp_path: Path,
    pair: KeyPair,
    start_upstream: UpstreamFactory,
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    origin, gw = await _start(tmp_path, pair, start_upstream, make_gateway)
    # 403: authenticated, but missing a scope.
    status, headers, _ = await _get(client, gw.url + "/writers/x", **{"X-Api-Key": KEY_A})
    assert (status, headers["Cache-Status"]) == (403, "gateway; detail=forbidden")
    # 413: a declared body over max_body_bytes (checked before the cache).
    async with asyncio.timeout(WAIT):
        async with client.put(
            gw.url + "/limited/x", data=b"x" * 11, headers={"X-Api-Key": KEY_B}
        ) as response:
            assert response.status == 413
            assert response.headers["Cache-Status"] == "gateway; detail=body_too_large"
    # A HEAD refusal carries it too (headers only).
    status, headers, body = await _get(client, gw.url + "/shared/x", "HEAD")
    assert (status, body) == (401, "")
    assert headers["Cache-Status"] == "gateway; detail=unauthorized"
    # A redirect the gateway makes itself: the cache was not consulted.
    async with asyncio.timeout(WAIT):
        async with client.get(gw.url + "/moved/x", allow_redirects=False) as response:
            assert response.status == 301
            assert response.headers["Cache-Status"] == "gateway; detail=local"
    # 405 and 404 belong to no route: no Cache-Status. A route without a
    # cache never has one.
    status, headers, _ = await _get(client, gw.url + "/writers/x", "DELETE")
    assert status == 405
    assert "Cache-Status" not in headers
    status, headers, _ = await _get(client, gw.url + "/nowhere")
    assert status == 404
    assert "Cache-Status" not in headers
    for creds in ({}, {"X-Api-Key": KEY_A}):
        status, headers, _ = await _get(client, gw.url + "/uncached/x", **creds)
        assert status in (200, 401)
        assert "Cache-Status" not in headers
    assert origin.count("/writers/x") == 0


async def test_head_is_answered_from_the_get_entry_and_a_head_miss_does_not_fill(
    tmp_path: Path,
    pair: KeyPair,
    start_upstream: UpstreamFactory,
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    origin, gw = await _start(tmp_path, pair, start_upstream, make_gateway)
    url = gw.url + "/shared/h"
    a = {"X-Api-Key": KEY_A}
    # A HEAD miss goes to the target and stores nothing (only GET fills).
    for n in (1, 2):
        status, headers, body = await _get(client, url, "HEAD", **a)
        assert (status, body) == (200, "")
        assert headers["Cache-Status"] == "gateway; fwd=miss; fwd-status=200; detail=method"
        assert origin.count("/shared/h") == n
    status, headers, body = await _get(client, url, **a)
    assert (body, headers["Cache-Status"]) == ("/shared/h for acme #3", "gateway; fwd=miss; stored")
    # Now a HEAD is a hit on the GET entry, with its Content-Length, no body.
    status, headers, body = await _get(client, url, "HEAD", **a)
    assert (status, body) == (200, "")
    assert headers["Cache-Status"].startswith("gateway; hit; ttl=")
    assert headers["Content-Length"] == str(len("/shared/h for acme #3"))
    assert origin.count("/shared/h") == 3
    # Another consumer's HEAD is not answered from A's entry.
    status, headers, _ = await _get(client, url, "HEAD", **{"X-Api-Key": KEY_B})
    assert headers["Cache-Status"] == "gateway; fwd=miss; fwd-status=200; detail=method"
    assert origin.count("/shared/h") == 4


async def test_a_jwt_subject_and_a_key_consumer_of_the_same_name_have_two_buckets(
    tmp_path: Path,
    pair: KeyPair,
    start_upstream: UpstreamFactory,
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    # key = "consumer" keys on who authenticated (policy and consumer), as the
    # cache does: one "alice" cannot spend the other's tokens.
    _, gw = await _start(tmp_path, pair, start_upstream, make_gateway)
    url = gw.url + "/per-consumer/x"
    jwt_alice = {"Authorization": _bearer(pair, sub="alice")}
    key_alice = {"X-Api-Key": KEY_ALICE}
    assert (await _get(client, url, **jwt_alice))[0] == 200
    assert (await _get(client, url, **key_alice))[0] == 200
    assert (await _get(client, url, **jwt_alice))[0] == 429
    assert (await _get(client, url, **key_alice))[0] == 429
