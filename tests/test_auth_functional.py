"""Identity at the edge, end to end: real tokens signed here, a real JWKS
server that rotates keys and goes down, a real target that echoes what it
received, raw sockets that try to forge identity headers and smuggle CR/LF."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization

from gateway.core.config import load
from gateway.server import Gateway
from gateway.state.log import AccessLog
from tests.auth_keys import SECRET, KeyPair, claims, jwks, make_key, sign, unsigned
from tests.conftest import GatewayFactory, RunningGateway, UpstreamFactory, wait_for

WAIT = 5.0
KEY = "k3y-for-acme-0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def keys() -> dict[str, KeyPair]:
    return {alg: make_key(alg, f"kid-{alg}") for alg in ("RS256", "PS256", "ES256", "EdDSA")}


async def _echo(request: web.Request) -> web.Response:
    body = {
        "path": request.path_qs,
        "raw_path": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
    }
    return web.json_response(body, headers={"Server": "echo/1", "X-Powered-By": "tests"})


@pytest.fixture
async def echo(start_upstream: UpstreamFactory) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return await start_upstream(app)


def _files(tmp: Path, keys: dict[str, KeyPair]) -> tuple[Path, Path]:
    jwks_path = tmp / "jwks.json"
    jwks_path.write_text(jwks(*keys.values()))
    keys_path = tmp / "api-keys.toml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    keys_path.write_text(f'[consumers.acme]\nkey_sha256 = "{digest}"\nscopes = ["orders:read"]\n')
    return jwks_path, keys_path


def _config(port: int, jwks_path: Path, keys_path: Path, extra: str = "") -> str:
    return f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = "127.0.0.1:0"

        [auth.staff]
        type = "jwt"
        algorithms = ["RS256", "PS256", "ES256", "EdDSA", "HS256"]
        jwks_file = "{jwks_path}"
        secret_env = "GW_TEST_SECRET"
        issuer = "https://id.test"
        audiences = ["orders-api"]
        leeway = 5.0
        forward_claims = {{ sub = "X-Auth-Subject", scope = "X-Auth-Scope", note = "X-Auth-Note" }}

        [auth.partners]
        type = "api_key"
        header = "X-Api-Key"
        keys_file = "{keys_path}"
        forward_consumer = "X-Auth-Consumer"

        [upstreams.app]
        targets = ["http://127.0.0.1:{port}"]

        [[routes]]
        name = "orders"
        path = "/orders"
        upstream = "app"
        auth = ["staff", "partners"]

        [[routes]]
        name = "admin"
        path = "/admin"
        upstream = "app"
        auth = "staff"
        strip_credentials = true
        [routes.access]
        scopes = ["orders:read"]
        claims = {{ role = ["admin", "ops"] }}

        [[routes]]
        name = "office"
        path = "/office"
        upstream = "app"
        [routes.access]
        allow_ips = ["10.0.0.0/8"]

        [[routes]]
        name = "public"
        path = "/public"
        upstream = "app"
        [routes.request_headers]
        set = {{ X-Client = "{{client_ip}}", X-Who = "{{consumer}}", X-Route = "{{route}}" }}
        add = {{ X-Tag = "edge" }}
        remove = ["Cookie"]
        [routes.response_headers]
        set = {{ Strict-Transport-Security = "max-age=63072000", X-Rid = "{{request_id}}" }}
        remove = ["Server", "X-Powered-By"]

        [[routes]]
        name = "noted"
        path = "/noted"
        upstream = "app"
        auth = "staff"
        [routes.request_headers]
        set = {{ X-Note = "{{claim.note}}" }}

        [[routes]]
        name = "old"
        path = "/old"
        redirect = "https://{{host}}{{path}}"
        redirect_status = 301

        [[routes]]
        name = "v1"
        path = "/v1"
        upstream = "app"
        [routes.rewrite]
        pattern = "^/v1/(.*)$"
        replace = "/api/v1/\\\\1"
        {extra}
    """


async def _start(text: str, tmp: Path) -> tuple[Gateway, str, AccessLog, Any]:
    import io

    path = tmp / "routes.toml"
    path.write_text(text)
    config = load(str(path))
    stream = io.StringIO()
    log = AccessLog(config.server.access_log, stream=stream)
    gateway = Gateway(config, environ={}, access_log=log)
    await gateway.start()
    return gateway, f"http://{gateway.addresses[0]}", log, stream


@pytest.fixture
async def gw(
    echo: TestServer, keys: dict[str, KeyPair], tmp_path: Path
) -> AsyncIterator[tuple[Gateway, str, Any]]:
    os.environ["GW_TEST_SECRET"] = SECRET
    jwks_path, keys_path = _files(tmp_path, keys)
    assert echo.port is not None
    gateway, url, _, stream = await _start(_config(echo.port, jwks_path, keys_path), tmp_path)
    try:
        yield gateway, url, stream
    finally:
        await gateway.close()


async def _get(
    client: aiohttp.ClientSession, url: str, token: str | None = None, **headers: str
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with client.get(url, headers=headers, allow_redirects=False) as response:
        data = await response.read()
        body = json.loads(data) if data else {}
        return response.status, body, response


def _sent(body: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in body["headers"] if k.lower() == name.lower()]


async def test_a_valid_token_of_each_algorithm_passes_and_its_claims_reach_the_target(
    gw: tuple[Gateway, str, Any], keys: dict[str, KeyPair], client: aiohttp.ClientSession
) -> None:
    _, url, _ = gw
    for alg, pair in keys.items():
        status, body, _ = await _get(
            client, f"{url}/orders/1", pair.token(), **{"X-Auth-Subject": "mallory"}
        )
        assert status == 200, alg
        assert _sent(body, "X-Auth-Subject") == ["alice"]
        assert _sent(body, "X-Auth-Scope") == ["orders:read profile"]
    hs = sign(SECRET, "HS256", claims())
    status, body, _ = await _get(client, f"{url}/orders/1", hs)
    assert status == 200
    assert _sent(body, "X-Auth-Subject") == ["alice"]


async def test_no_credentials_get_401_with_one_challenge_per_policy(
    gw: tuple[Gateway, str, Any], client: aiohttp.ClientSession
) -> None:
    gateway, url, _ = gw
    status, body, response = await _get(client, f"{url}/orders/1")
    assert status == 401
    assert body["error"] == "unauthorized"
    assert response.headers.getall("WWW-Authenticate") == [
        'Bearer realm="gateway"',
        'ApiKey realm="gateway", header="X-Api-Key"',
    ]
    status, body, response = await _get(client, f"{url}/orders/1", "garbage.token.here")
    assert status == 401
    assert response.headers.getall("WWW-Authenticate")[0] == (
        'Bearer realm="gateway", error="invalid_token"'
    )
    text = await (await client.get(f"{_admin(gateway)}/metrics")).text()
    assert 'gateway_auth_failures_total{reason="missing",route="orders"} 1.0' in text
    assert 'gateway_auth_failures_total{reason="invalid",route="orders"} 1.0' in text


def _admin(gateway: Gateway) -> str:
    return f"http://{gateway.admin_addresses[0]}"


async def test_hostile_tokens_are_refused(
    gw: tuple[Gateway, str, Any], keys: dict[str, KeyPair], client: aiohttp.ClientSession
) -> None:
    _, url, _ = gw
    rsa = keys["RS256"]
    public_pem = rsa.public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hmac as hmac_module

    def confused() -> str:
        # An HS256 token "signed" with the RSA public key as the HMAC secret.
        import base64

        header = base64.urlsafe_b64encode(
            json.dumps({"alg": "HS256", "typ": "JWT", "kid": rsa.kid}).encode()
        ).rstrip(b"=")
        payload = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
        signing = header + b"." + payload
        mac = hmac_module.new(public_pem, signing, hashlib.sha256).digest()
        return (signing + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()

    now = int(time.time())
    hostile = {
        "alg none": unsigned(claims(), {"alg": "none", "typ": "JWT"}),
        "alg None": unsigned(claims(), {"alg": "None"}),
        "confusion": confused(),
        "expired": rsa.token(claims(exp=now - 60)),
        "no exp": rsa.token(claims(exp=None)),
        "nbf future": rsa.token(claims(nbf=now + 600)),
        "iat future": rsa.token(claims(iat=now + 600)),
        "wrong aud": rsa.token(claims(aud="other-api")),
        "wrong iss": rsa.token(claims(iss="https://evil.test")),
        "kid injection": sign(rsa.private, "RS256", claims(), kid="../../etc/passwd"),
        "kid huge": sign(rsa.private, "RS256", claims(), kid="k" * 5000),
        "kid of another key": sign(rsa.private, "RS256", claims(), kid=keys["PS256"].kid),
        "wrong alg for key": sign(rsa.private, "RS384", claims(), kid=rsa.kid),
        "ES token on RSA kid": sign(keys["ES256"].private, "ES256", claims(), kid=rsa.kid),
        "crit": sign(rsa.private, "RS256", claims(), kid=rsa.kid, crit=["x"], x=1),
        "truncated": rsa.token()[:-10],
        "two parts": "a.b",
        "binary": "\u00ff\u00fe.\u00fd.x",
        "huge": rsa.token(claims(pad="x" * 7000)),
        "sub not a string": rsa.token(claims(sub=42)),
        "unsigned with kid": unsigned(claims(), {"alg": "RS256", "kid": rsa.kid}),
    }
    for name, token in hostile.items():
        try:
            status, _, _ = await _get(client, f"{url}/orders/1", token)
        except (aiohttp.ClientError, ValueError):
            continue  # a header the client library itself refuses to send
        assert status in (401, 431), name
    status, _, _ = await _get(client, f"{url}/orders/1", hostile["expired"])
    assert status == 401


async def test_api_key_passes_and_names_the_consumer_and_a_wrong_key_does_not(
    gw: tuple[Gateway, str, Any], client: aiohttp.ClientSession
) -> None:
    _, url, stream = gw
    status, body, _ = await _get(
        client, f"{url}/orders/1", **{"X-Api-Key": KEY, "X-Auth-Consumer": "forged"}
    )
    assert status == 200
    assert _sent(body, "X-Auth-Consumer") == ["acme"]
    assert _sent(body, "X-Api-Key") == [KEY]  # strip_credentials is off here
    status, _, _ = await _get(client, f"{url}/orders/1", **{"X-Api-Key": KEY + "x"})
    assert status == 401
    assert any(
        json.loads(line).get("consumer") == "acme" for line in stream.getvalue().splitlines()
    )


async def test_scopes_and_claims_refuse_with_403_and_insufficient_scope(
    gw: tuple[Gateway, str, Any], keys: dict[str, KeyPair], client: aiohttp.ClientSession
) -> None:
    _, url, _ = gw
    rsa = keys["RS256"]
    status, body, response = await _get(client, f"{url}/admin", rsa.token(claims(role="user")))
    assert status == 403
    assert body["error"] == "forbidden"
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="gateway", error="insufficient_scope"'
    )
    status, _, _ = await _get(client, f"{url}/admin", rsa.token(claims(role="ops", scope="x")))
    assert status == 403
    status, body, _ = await _get(client, f"{url}/admin", rsa.token(claims(role=["x", "admin"])))
    assert status == 200
    assert _sent(body, "Authorization") == []  # strip_credentials
    status, _, _ = await _get(
        client, f"{url}/admin", rsa.token(claims(role="admin", scope=None, scp=["orders:read"]))
    )
    assert status == 200


async def test_an_address_outside_allow_ips_gets_403_before_auth(
    gw: tuple[Gateway, str, Any], client: aiohttp.ClientSession
) -> None:
    gateway, url, _ = gw
    status, body, _ = await _get(client, f"{url}/office")
    assert status == 403
    assert body["error"] == "forbidden"
    text = await (await client.get(f"{_admin(gateway)}/metrics")).text()
    assert 'gateway_auth_failures_total{reason="ip_denied",route="office"} 1.0' in text


async def test_header_transforms_redirects_and_rewrites(
    gw: tuple[Gateway, str, Any], client: aiohttp.ClientSession
) -> None:
    _, url, _ = gw
    status, body, response = await _get(client, f"{url}/public/x", Cookie="a=b")
    assert status == 200
    assert _sent(body, "X-Client") == ["127.0.0.1"]
    assert _sent(body, "X-Route") == ["public"]
    assert _sent(body, "X-Who") == [""]
    assert _sent(body, "X-Tag") == ["edge"]
    assert _sent(body, "Cookie") == []
    assert "Server" not in response.headers
    assert "X-Powered-By" not in response.headers
    assert response.headers["Strict-Transport-Security"] == "max-age=63072000"
    assert response.headers["X-Rid"] == response.headers["X-Request-ID"]
    status, _, response = await _get(client, f"{url}/old/a%2Fb?q=1")
    assert status == 301
    assert response.headers["Location"] == f"https://{url.removeprefix('http://')}/old/a%2Fb?q=1"
    status, body, _ = await _get(client, f"{url}/v1/users/7?x=1")
    assert status == 200
    assert body["raw_path"] == "/api/v1/users/7?x=1"


async def _raw(url: str, head: bytes) -> bytes:
    host, _, port = url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            return await reader.read(65536)
    finally:
        writer.close()


async def test_raw_socket_cannot_forge_identity_headers_on_any_route(
    gw: tuple[Gateway, str, Any],
) -> None:
    _, url, _ = gw
    for forged in (b"X-Auth-Subject", b"x-auth-subject", b"X-AUTH-CONSUMER", b"X-Auth-Scope"):
        answer = await _raw(
            url,
            b"GET /public/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            + forged
            + b": admin\r\n"
            + forged
            + b": root\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert _sent(body, forged.decode()) == []


async def test_a_token_with_bytes_beyond_ascii_is_a_401_not_a_500(
    gw: tuple[Gateway, str, Any], keys: dict[str, KeyPair]
) -> None:
    # Header values decode with surrogateescape: a lone 0xff byte became a
    # lone surrogate that PyJWT's encoder raised on (500 and a traceback).
    _, url, _ = gw
    good = keys["RS256"].token(claims()).encode()
    head, _, rest = good.partition(b".")
    for token in (
        b"eyJ\xff.a.b",
        head + b"\xff." + rest,
        good + b"\xc3\xa9",
        "\u00e9y\u00e9.\u00e9.\u00e9".encode(),
        b"\x80\x81.\x82.\x83",
    ):
        answer = await _raw(
            url,
            b"GET /orders/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token + b"\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 401"), (token, answer[:120])
        assert b'error="invalid_token"' in answer
    answer = await _raw(
        url,
        b"GET /orders/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        b"Authorization: Bearer " + good + b"\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer[:120]


async def test_crlf_in_a_claim_never_reaches_a_header(
    gw: tuple[Gateway, str, Any], keys: dict[str, KeyPair], client: aiohttp.ClientSession
) -> None:
    _, url, _ = gw
    rsa = keys["RS256"]
    for note in ("a\r\nX-Injected: 1", "a\nX-Injected: 1", "a\x00b", "a\rb"):
        token = rsa.token(claims(note=note))
        answer = await _raw(
            url,
            b"GET /noted HTTP/1.1\r\nHost: a\r\nConnection: close\r\nAuthorization: Bearer "
            + token.encode()
            + b"\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert _sent(body, "X-Injected") == []
        assert _sent(body, "X-Note") == []  # the transform's header is dropped
        assert _sent(body, "X-Auth-Note") == []  # and so is the forwarded claim
    _, body, _ = await _get(client, f"{url}/noted", rsa.token(claims(note="fine")))
    assert _sent(body, "X-Note") == ["fine"]
    assert _sent(body, "X-Auth-Note") == ["fine"]


async def test_rate_limit_keyed_on_the_consumer(
    echo: TestServer, keys: dict[str, KeyPair], tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    os.environ["GW_TEST_SECRET"] = SECRET
    jwks_path, keys_path = _files(tmp_path, keys)
    assert echo.port is not None
    extra = """
        [[routes]]
        name = "limited"
        path = "/limited"
        upstream = "app"
        auth = ["staff", "partners"]
        [routes.rate_limit]
        rate = 0.001
        burst = 1
        key = "consumer"
    """
    gateway, url, _, _ = await _start(_config(echo.port, jwks_path, keys_path, extra), tmp_path)
    try:
        rsa = keys["RS256"]
        assert (await _get(client, f"{url}/limited", rsa.token()))[0] == 200
        # Another token of the same subject draws from the same bucket.
        assert (await _get(client, f"{url}/limited", keys["ES256"].token()))[0] == 429
        # Another consumer, same address: its own bucket.
        assert (await _get(client, f"{url}/limited", **{"X-Api-Key": KEY}))[0] == 200
        bob = rsa.token(claims(sub="bob"))
        assert (await _get(client, f"{url}/limited", bob))[0] == 200
    finally:
        await gateway.close()


async def test_reload_rereads_key_files_rejects_a_bad_one_and_drops_tokens_of_removed_keys(
    echo: TestServer, keys: dict[str, KeyPair], tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    os.environ["GW_TEST_SECRET"] = SECRET
    jwks_path, keys_path = _files(tmp_path, keys)
    assert echo.port is not None
    gateway, url, _, _ = await _start(_config(echo.port, jwks_path, keys_path), tmp_path)
    try:
        assert gateway.reloader is not None
        rsa, es = keys["RS256"], keys["ES256"]
        token = rsa.token()
        assert (await _get(client, f"{url}/orders", token))[0] == 200
        cache = gateway.runtime.auth.jwt["staff"].cache
        assert len(cache) == 1
        # A broken JWKS file: the reload is rejected and the old keys serve.
        jwks_path.write_text("{not json")
        assert not await gateway.reloader.reload_once()
        assert (await _get(client, f"{url}/orders", token))[0] == 200
        # The RSA key is removed: its cached token goes at once.
        jwks_path.write_text(jwks(es))
        assert await gateway.reloader.reload_once()
        assert len(cache) == 0
        assert (await _get(client, f"{url}/orders", token))[0] == 401
        assert (await _get(client, f"{url}/orders", es.token()))[0] == 200
        # A new API-key file: the old key stops working.
        other = hashlib.sha256(b"another-key-entirely-0123456789").hexdigest()
        keys_path.write_text(f'[consumers.beta]\nkey_sha256 = "{other}"\n')
        assert await gateway.reloader.reload_once()
        assert (await _get(client, f"{url}/orders", **{"X-Api-Key": KEY}))[0] == 401
        status, body, _ = await _get(
            client, f"{url}/orders", **{"X-Api-Key": "another-key-entirely-0123456789"}
        )
        assert status == 200
        assert _sent(body, "X-Auth-Consumer") == ["beta"]
        keys_path.write_text('[consumers.beta]\nkey_sha256 = "nothex"\n')
        assert not await gateway.reloader.reload_once()
    finally:
        await gateway.close()


class _Jwks:
    """A real JWKS server: serves `keys`, or 503 while `down`."""

    def __init__(self) -> None:
        self.document = '{"keys": []}'
        self.down = False
        self.hits = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.down:
            return web.Response(status=503)
        return web.Response(text=self.document, content_type="application/json")


async def test_jwks_url_fetch_rotation_unknown_kid_floor_and_outage(
    echo: TestServer,
    keys: dict[str, KeyPair],
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    source = _Jwks()
    rsa, es = keys["RS256"], keys["ES256"]
    source.document = jwks(rsa)
    app = web.Application()
    app.router.add_get("/jwks.json", source.handle)
    server = await start_upstream(app)
    text = f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = ""
        [auth.idp]
        type = "jwt"
        algorithms = ["RS256", "ES256"]
        jwks_url = "http://127.0.0.1:{server.port}/jwks.json"
        jwks_refresh = 300
        [upstreams.app]
        targets = ["http://127.0.0.1:{echo.port}"]
        [[routes]]
        name = "r"
        path = "/"
        upstream = "app"
        auth = "idp"
    """
    gateway, url, _, _ = await _start(text, tmp_path)
    try:
        await wait_for(lambda: bool(gateway.runtime.auth.jwt["idp"].keys), WAIT)
        assert (await _get(client, f"{url}/x", rsa.token()))[0] == 200
        fetcher = gateway.runtime.auth.jwt["idp"].fetcher
        assert fetcher is not None
        # Rotation: the new kid is unknown; the first token with it refetches.
        source.document = jwks(es)
        fetcher._last_started_at -= 60  # the start-up fetch was over 30 s ago
        assert (await _get(client, f"{url}/x", es.token()))[0] == 200
        hits = source.hits
        # A second unknown kid within 30 s: refused without another fetch.
        unknown = sign(es.private, "ES256", claims(), kid="never-seen")
        assert (await _get(client, f"{url}/x", unknown))[0] == 401
        assert source.hits == hits
        # The server goes down: a failed fetch keeps the last good set.
        source.down = True
        fetcher._last_started_at -= 60
        assert (await _get(client, f"{url}/x", unknown))[0] == 401
        assert source.hits == hits + 1
        assert (await _get(client, f"{url}/x", es.token(claims(sub="other"))))[0] == 200
        # Hostile documents are never taken for a key set.
        source.down = False
        for doc in ('{"keys": "x"}', "[]", '{"keys": [{"kty": "RSA", "n": 1, "e": []}]}'):
            source.document = doc
            fetcher._last_started_at -= 60
            assert (await _get(client, f"{url}/x", unknown))[0] == 401
        assert (await _get(client, f"{url}/x", es.token(claims(sub="third"))))[0] == 200
    finally:
        await gateway.close()


async def test_many_distinct_invalid_tokens_keep_the_cache_bounded(
    gw: tuple[Gateway, str, Any], keys: dict[str, KeyPair], client: aiohttp.ClientSession
) -> None:
    gateway, url, _ = gw
    rsa = keys["RS256"]
    good = rsa.token()
    base = good[:-8]
    for i in range(300):
        status, _, _ = await _get(client, f"{url}/orders", f"{base}{i:08d}")
        assert status == 401
    assert (await _get(client, f"{url}/orders", good))[0] == 200
    assert len(gateway.runtime.auth.jwt["staff"].cache) == 1


async def test_public_routes_work_without_any_auth_configured(
    make_gateway: GatewayFactory, echo: TestServer, client: aiohttp.ClientSession
) -> None:
    gw: RunningGateway = await make_gateway(
        f"""
        [upstreams.app]
        targets = ["http://127.0.0.1:{echo.port}"]
        [[routes]]
        name = "all"
        path = "/"
        upstream = "app"
        """
    )
    status, _, _ = await _get(client, f"{gw.url}/x")
    assert status == 200


async def test_two_authorization_or_key_fields_are_never_believed(
    gw: tuple[Gateway, str, Any], keys: dict[str, KeyPair]
) -> None:
    _, url, _ = gw
    good = keys["RS256"].token().encode()
    for twice in (
        b"Authorization: Bearer " + good + b"\r\nAuthorization: Bearer forged\r\n",
        b"Authorization: Bearer forged\r\nAuthorization: Bearer " + good + b"\r\n",
        b"X-Api-Key: " + KEY.encode() + b"\r\nX-Api-Key: other\r\n",
    ):
        answer = await _raw(
            url, b"GET /orders HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + twice + b"\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 401"), answer[:60]


async def test_a_jwks_streamed_in_slow_chunks_is_read_whole_and_an_endless_one_is_cut(
    echo: TestServer,
    keys: dict[str, KeyPair],
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rsa = keys["RS256"]
    document = jwks(rsa).encode()

    async def slow(request: web.Request) -> web.StreamResponse:
        # Chunked, in five pieces with pauses: never all buffered at once.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        step = len(document) // 5 + 1
        for start in range(0, len(document), step):
            await response.write(document[start : start + step])
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    async def endless(request: web.Request) -> web.StreamResponse:
        # Past the 1 MiB cap without end: refused, not read into memory.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"keys": [')
        for _ in range(4096):  # bounded: 64 MiB at most
            await response.write(b" " * 16384)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/slow.json", slow)
    app.router.add_get("/endless.json", endless)
    server = await start_upstream(app)
    text = f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = ""
        [auth.slow]
        type = "jwt"
        algorithms = ["RS256"]
        jwks_url = "http://127.0.0.1:{server.port}/slow.json"
        [auth.endless]
        type = "jwt"
        algorithms = ["RS256"]
        jwks_url = "http://127.0.0.1:{server.port}/endless.json"
        [upstreams.app]
        targets = ["http://127.0.0.1:{echo.port}"]
        [[routes]]
        name = "slow"
        path = "/slow"
        upstream = "app"
        auth = "slow"
        [[routes]]
        name = "endless"
        path = "/endless"
        upstream = "app"
        auth = "endless"
    """
    gateway, url, _, _ = await _start(text, tmp_path)
    try:
        await wait_for(lambda: bool(gateway.runtime.auth.jwt["slow"].keys), WAIT)
        assert (await _get(client, f"{url}/slow", rsa.token()))[0] == 200
        fetcher = gateway.runtime.auth.jwt["endless"].fetcher
        assert fetcher is not None
        await wait_for(lambda: fetcher.failures >= 1, WAIT)
        assert not gateway.runtime.auth.jwt["endless"].keys
        assert (await _get(client, f"{url}/endless", rsa.token()))[0] == 401
    finally:
        await gateway.close()


# -- the caches of the hit path (a token or key sent again) ------------------


async def test_a_cached_token_is_refused_once_its_exp_and_leeway_pass(
    gw: tuple[Gateway, str, Any], keys: dict[str, KeyPair], client: aiohttp.ClientSession
) -> None:
    gateway, url, _ = gw
    # exp 3 s ago is still inside the policy's 5 s leeway: accepted and
    # cached until exp + 5, one to two seconds from now.
    exp = int(time.time()) - 3
    token = keys["RS256"].token(claims(exp=exp, iat=exp - 60))
    for _ in range(2):  # the second answer comes from the cache
        assert (await _get(client, f"{url}/orders", token))[0] == 200
    assert len(gateway.runtime.auth.jwt["staff"].cache) == 1
    await asyncio.sleep(min(WAIT, max(0.0, exp + 5.0 + 0.05 - time.time())))  # at most ~2 s
    status, body, response = await _get(client, f"{url}/orders", token)
    assert status == 401
    assert "expired" in json.dumps(body)
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert len(gateway.runtime.auth.jwt["staff"].cache) == 0


async def test_an_api_key_revoked_by_a_reload_stops_at_once_though_it_was_remembered(
    echo: TestServer, keys: dict[str, KeyPair], tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    os.environ["GW_TEST_SECRET"] = SECRET
    jwks_path, keys_path = _files(tmp_path, keys)
    assert echo.port is not None
    gateway, url, _, _ = await _start(_config(echo.port, jwks_path, keys_path), tmp_path)
    try:
        assert gateway.reloader is not None
        for _ in range(3):  # found once, then answered from what the table remembers
            status, body, _ = await _get(client, f"{url}/orders", **{"X-Api-Key": KEY})
            assert status == 200
            assert _sent(body, "X-Auth-Consumer") == ["acme"]
        other = hashlib.sha256(b"another-key-entirely-0123456789").hexdigest()
        keys_path.write_text(f'[consumers.beta]\nkey_sha256 = "{other}"\n')
        assert await gateway.reloader.reload_once()
        status, body, response = await _get(client, f"{url}/orders", **{"X-Api-Key": KEY})
        assert status == 401
        assert 'ApiKey realm="gateway", header="X-Api-Key"' in response.headers.getall(
            "WWW-Authenticate"
        )
    finally:
        await gateway.close()


async def test_a_cached_token_or_key_sent_twice_in_one_request_is_still_refused(
    gw: tuple[Gateway, str, Any], keys: dict[str, KeyPair], client: aiohttp.ClientSession
) -> None:
    _, url, _ = gw
    token = keys["RS256"].token()
    assert (await _get(client, f"{url}/orders", token))[0] == 200
    assert (await _get(client, f"{url}/orders", **{"X-Api-Key": KEY}))[0] == 200
    for twice in (
        b"Authorization: Bearer " + token.encode() + b"\r\nAuthorization: Bearer x\r\n",
        (b"Authorization: Bearer " + token.encode() + b"\r\n") * 2,
        b"X-Api-Key: " + KEY.encode() + b"\r\nX-Api-Key: " + KEY.encode() + b"\r\n",
    ):
        answer = await _raw(
            url, b"GET /orders HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + twice + b"\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 401"), answer[:60]


async def test_a_cached_identity_forwards_its_claims_every_time_and_forgeries_still_go(
    gw: tuple[Gateway, str, Any],
    keys: dict[str, KeyPair],
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, url, _ = gw
    rsa = keys["RS256"]
    token = rsa.token(claims(sub="carol", note="plain"))
    for forged in ("admin", "root"):
        status, body, _ = await _get(
            client,
            f"{url}/orders",
            token,
            **{"X-Auth-Subject": forged, "X-Auth-Note": forged, "X-Auth-Consumer": forged},
        )
        assert status == 200
        assert _sent(body, "X-Auth-Subject") == ["carol"]
        assert _sent(body, "X-Auth-Note") == ["plain"]
        assert _sent(body, "X-Auth-Consumer") == []
    for _ in range(2):
        status, body, _ = await _get(
            client, f"{url}/orders", **{"X-Api-Key": KEY, "X-Auth-Subject": "forged"}
        )
        assert status == 200
        assert _sent(body, "X-Auth-Consumer") == ["acme"]
        assert _sent(body, "X-Auth-Subject") == []
    # A claim that cannot be sent is dropped, and logged, on every request
    # that carries the token, not only the first.
    bad = rsa.token(claims(sub="dave", note="a\r\nX-Injected: 1"))
    with caplog.at_level("WARNING", logger="gateway.auth"):
        for _ in range(2):
            status, body, _ = await _get(client, f"{url}/orders", bad)
            assert status == 200
            assert _sent(body, "X-Auth-Note") == []
            assert _sent(body, "X-Injected") == []
            assert _sent(body, "X-Auth-Subject") == ["dave"]
    assert sum("not forwarded" in r.getMessage() for r in caplog.records) == 2


async def test_a_kid_unknown_to_two_jwks_urls_refetches_each_once_then_passes_or_not(
    echo: TestServer,
    keys: dict[str, KeyPair],
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    first, second = _Jwks(), _Jwks()
    rsa, es, ed = keys["RS256"], keys["ES256"], keys["EdDSA"]
    first.document = second.document = jwks(rsa)
    app = web.Application()
    app.router.add_get("/first.json", first.handle)
    app.router.add_get("/second.json", second.handle)
    server = await start_upstream(app)
    policies = "".join(
        f"""
        [auth.{name}]
        type = "jwt"
        algorithms = ["RS256", "ES256", "EdDSA"]
        jwks_url = "http://127.0.0.1:{server.port}/{name}.json"
        jwks_refresh = 300
        """
        for name in ("first", "second")
    )
    text = f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = ""
        {policies}
        [upstreams.app]
        targets = ["http://127.0.0.1:{echo.port}"]
        [[routes]]
        name = "r"
        path = "/"
        upstream = "app"
        auth = ["first", "second"]
    """
    gateway, url, _, _ = await _start(text, tmp_path)
    try:
        stores = [gateway.runtime.auth.jwt[name] for name in ("first", "second")]
        await wait_for(lambda: all(store.keys for store in stores), WAIT)
        fetchers = [store.fetcher for store in stores if store.fetcher is not None]
        assert len(fetchers) == 2
        # Only the second set gains the ES256 key: the token waits for both
        # refetches (the first policy's finds nothing) and passes the second.
        second.document = jwks(rsa, es)
        for fetcher in fetchers:
            fetcher._last_started_at -= 60
        hits = (first.hits, second.hits)
        assert (await _get(client, f"{url}/x", es.token()))[0] == 200
        assert (first.hits, second.hits) == (hits[0] + 1, hits[1] + 1)
        # A kid neither set has, with both refetches allowed: one fetch each, 401.
        for fetcher in fetchers:
            fetcher._last_started_at -= 60
        assert (await _get(client, f"{url}/x", ed.token()))[0] == 401
        assert (first.hits, second.hits) == (hits[0] + 2, hits[1] + 2)
        # Within the 30 s floor: refused at once, no fetch.
        assert (await _get(client, f"{url}/x", ed.token(claims(sub="b"))))[0] == 401
        assert (first.hits, second.hits) == (hits[0] + 2, hits[1] + 2)
        assert (await _get(client, f"{url}/x", es.token(claims(sub="c"))))[0] == 200
    finally:
        await gateway.close()
