"""The admin API's actions over real sockets: token, CORS, breaker reset,
cache purge, reload, and the /stats document (docs/operator-tools.md)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.core.config import load
from gateway.server import Gateway
from gateway.state.log import AccessLog
from tests.conftest import UpstreamFactory
from tests.gateway_process import free_port, metric_value

Start = Callable[..., Awaitable[Gateway]]
TOKEN = "s3cret-token_1"


def _hello() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def _config(port: int | None, server: str = "", extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = "127.0.0.1:0"
        access_log = "off"
        {server}

        [upstreams.app]
        targets = ["http://127.0.0.1:{port}"]

        [upstreams.flaky]
        targets = ["http://127.0.0.1:{free_port()}", "http://127.0.0.1:{free_port()}"]
        panic_threshold = 0.0
        [upstreams.flaky.breaker]
        failures = 1
        cooldown = 300.0
        max_cooldown = 300.0

        [[routes]]
        name = "all"
        path = "/"
        upstream = "app"

        [[routes]]
        name = "broken"
        path = "/broken"
        upstream = "flaky"
        {extra}
        """
    )


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """An in-process gateway from a config file (so that /reload re-reads it)."""
    started: list[Gateway] = []

    async def factory(toml: str, environ: Mapping[str, str] | None = None) -> Gateway:
        path = tmp_path / "routes.toml"
        path.write_text(toml)
        config = load(str(path))
        gateway = Gateway(config, environ=dict(environ or {}), access_log=AccessLog("off"))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield factory
    for gateway in started:
        await gateway.close()


def _admin(gateway: Gateway) -> str:
    return f"http://{gateway.admin_addresses[0]}"


def _proxy(gateway: Gateway) -> str:
    return f"http://{gateway.addresses[0]}"


async def _post(
    url: str, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, headers=dict(headers or {})) as response,
    ):
        return response.status, json.loads(await response.text()), response.headers


async def _raw_post(admin: str, path: str, header_lines: bytes) -> bytes:
    """A POST from a raw socket: header bytes no HTTP client library would send."""
    host, _, port = admin.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST "
        + path.encode()
        + b" HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n"
        + header_lines
        + b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(10):
        data = await reader.read()
    writer.close()
    return data


async def _open_breakers(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(f"{_proxy(gateway)}/broken") as response:
                assert response.status in (502, 503)
    assert gateway.box is not None
    states = [t.breaker.state for t in gateway.box.snapshot.pools["flaky"].targets]
    assert states == ["open", "open"]


# -- the admin token -------------------------------------------------------------------


async def test_admin_posts_need_the_exact_bearer_token(
    start: Start, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(
        _config(upstream.port, 'admin_token_env = "OPS_TOKEN"'), {"OPS_TOKEN": TOKEN}
    )
    url = f"{_admin(gateway)}/breakers/reset?upstream=flaky"
    hostile = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN.upper()}"},
        {"Authorization": f"Bearer{TOKEN}"},
        {"Authorization": f"Token {TOKEN}"},
    ]
    for headers in hostile:
        status, body, response_headers = await _post(url, headers)
        assert status == 401, headers
        assert body["error"] == "unauthorized"
        assert set(body) == {"error", "message", "request_id"}
        assert response_headers["WWW-Authenticate"].startswith("Bearer")
    # The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
    for scheme in ("Bearer", "bearer", "BEARER"):
        status, body, _ = await _post(url, {"Authorization": f"{scheme} {TOKEN}"})
        assert (status, body) == (200, {"reset": 0})
    # Reading stays open: the dashboard and /stats need no token.
    async with aiohttp.ClientSession() as session:
        for path in ("/", "/stats", "/status"):
            async with session.get(_admin(gateway) + path) as response:
                assert response.status == 200


async def test_a_token_header_of_raw_non_ascii_bytes_is_refused_not_crashed(
    start: Start, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(
        _config(upstream.port, 'admin_token_env = "OPS_TOKEN"'), {"OPS_TOKEN": TOKEN}
    )
    for value in (b"Bearer \xff\xfe\x80", b"Bearer " + "s3crét".encode(), b"\xc3\xa9 x"):
        answer = await _raw_post(_admin(gateway), "/reload", b"Authorization: " + value + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:80]


@pytest.mark.parametrize("environ", [{}, {"OPS_TOKEN": ""}], ids=["unset", "empty"])
async def test_a_named_token_variable_that_is_unset_or_empty_refuses_every_post(
    start: Start, start_upstream: UpstreamFactory, environ: dict[str, str]
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(_config(upstream.port, 'admin_token_env = "OPS_TOKEN"'), environ)
    for path in ("/breakers/reset?upstream=flaky", "/reload", "/cache/purge?route=all"):
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
            status, body, _ = await _post(_admin(gateway) + path, headers)
            assert status == 403
            assert body["error"] == "admin_token_unset"
            assert "$OPS_TOKEN" in body["message"]


async def test_without_admin_token_env_posts_need_no_token(
    start: Start, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(_config(upstream.port), {"OPS_TOKEN": TOKEN})
    status, body, _ = await _post(f"{_admin(gateway)}/breakers/reset?upstream=app")
    assert (status, body) == (200, {"reset": 0})


ACTIONS = ("/breakers/reset?upstream=flaky", "/reload", "/cache/purge?route=all")


async def test_without_a_token_a_browsers_cross_site_post_is_refused(
    start: Start, start_upstream: UpstreamFactory
) -> None:
    # CSRF: with no token, any page the operator opens could POST these
    # (the arguments are all in the query string) through their browser.
    upstream = await start_upstream(_hello())
    gateway = await start(
        _config(upstream.port, 'admin_cors_origins = ["https://ops.example.com"]')
    )
    await _open_breakers(gateway)
    admin = _admin(gateway)
    own = admin  # "http://127.0.0.1:PORT", as a browser serialises it
    hostile: list[dict[str, str]] = [
        {"Origin": "null"},  # sandboxed iframes, data: URLs, file: pages
        {"Origin": ""},
        {"Origin": "http://evil.example"},
        {"Origin": own + ".evil.example"},  # a lookalike
        {"Origin": own.replace("http://", "https://")},  # another scheme
        {"Origin": _proxy(gateway)},  # the proxy listener: another port, same site
        {"Origin": own + "/"},
        {"Origin": "http://ops.example.com"},  # allowed only over https
        {"Origin": "https://ops.example.com:443"},  # not how a browser writes it
        {"Origin": f"{own} {own}"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "garbage"},
        {"Sec-Fetch-Site": ""},
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"},
    ]
    for path in ACTIONS:
        for headers in hostile:
            status, body, _ = await _post(admin + path, headers)
            assert status == 403, (path, headers)
            assert body["error"] == "cross_site"
            assert set(body) == {"error", "message", "request_id"}
    for value in (b"\xff\xfe", b"http://\xc3\xa9vil.example", b"http://x\x01y"):
        answer = await _raw_post(admin, "/reload", b"Origin: " + value + b"\r\n")
        # 403, or 400 where aiohttp's parser refuses the byte itself.
        assert answer.split(b" ")[1] in (b"403", b"400"), answer[:80]
    assert gateway.box is not None
    states = [t.breaker.state for t in gateway.box.snapshot.pools["flaky"].targets]
    assert states == ["open", "open"]  # nothing was reset by the refused POSTs
    # curl and scripts send neither header; the admin page itself sends its
    # own origin (and same-origin); a typed URL says "none"; a configured
    # CORS origin is let through.
    allowed: list[dict[str, str]] = [
        {},
        {"Origin": own, "Sec-Fetch-Site": "same-origin"},
        {"Origin": own.upper().replace("HTTP://", "http://")},
        {"Sec-Fetch-Site": "none"},
        {"Origin": "https://ops.example.com", "Sec-Fetch-Site": "cross-site"},
    ]
    for headers in allowed:
        status, body, _ = await _post(f"{admin}/breakers/reset?upstream=app", headers)
        assert (status, body) == (200, {"reset": 0}), headers
    status, body, _ = await _post(f"{admin}/breakers/reset?upstream=flaky", {"Origin": own})
    assert (status, body) == (200, {"reset": 2})


# -- CORS on the admin API -------------------------------------------------------------


async def test_admin_cors_allows_only_the_configured_origins(
    start: Start, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(
        _config(upstream.port, 'admin_cors_origins = ["https://ops.example.com"]')
    )
    admin = _admin(gateway)
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    async with aiohttp.ClientSession() as session:
        async with session.options(
            f"{admin}/reload", headers={"Origin": "https://ops.example.com", **preflight}
        ) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "https://ops.example.com"
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
            allowed = response.headers["Access-Control-Allow-Headers"].lower()
            assert "authorization" in allowed
        for hostile in (
            "https://evil.example.com",
            "https://ops.example.com.evil.example",
            "http://ops.example.com",  # another scheme is another origin
            "null",
        ):
            async with session.options(
                f"{admin}/reload", headers={"Origin": hostile, **preflight}
            ) as response:
                assert response.status == 403, hostile
                assert "Access-Control-Allow-Origin" not in response.headers
            async with session.get(f"{admin}/stats", headers={"Origin": hostile}) as response:
                assert response.status == 200
                assert "Access-Control-Allow-Origin" not in response.headers
        async with session.get(
            f"{admin}/stats", headers={"Origin": "https://ops.example.com"}
        ) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "https://ops.example.com"


async def test_without_admin_cors_origins_no_cors_headers_are_sent(
    start: Start, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(_config(upstream.port))
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{_admin(gateway)}/stats", headers={"Origin": "https://ops.example.com"}
        ) as response,
    ):
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers


# -- breaker reset ---------------------------------------------------------------------


async def test_breaker_reset_closes_one_target_or_a_whole_upstream(
    start: Start, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(_config(upstream.port))
    admin = _admin(gateway)
    await _open_breakers(gateway)
    assert gateway.box is not None
    first, second = gateway.box.snapshot.pools["flaky"].targets
    status, body, _ = await _post(f"{admin}/breakers/reset?upstream=flaky&target={first.url}")
    assert (status, body) == (200, {"reset": 1})
    assert (first.breaker.state, second.breaker.state) == ("closed", "open")
    status, body, _ = await _post(f"{admin}/breakers/reset?upstream=flaky")
    assert (status, body) == (200, {"reset": 1})  # only the one still open
    assert second.breaker.state == "closed"
    # Counted as a transition like any other.
    async with aiohttp.ClientSession() as session, session.get(f"{admin}/metrics") as response:
        text = await response.text()
    assert 'gateway_breaker_state{target="' in text


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("", 400),
        ("?upstream=", 400),
        ("?upstream=nope", 404),
        ("?upstream=flaky&target=http://127.0.0.1:1", 404),
        ("?upstream=%00%ff", 404),
        ("?target=http://x", 400),
    ],
)
async def test_breaker_reset_refuses_unknown_or_missing_names(
    start: Start, start_upstream: UpstreamFactory, query: str, status: int
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(_config(upstream.port))
    got, body, _ = await _post(f"{_admin(gateway)}/breakers/reset{query}")
    assert got == status
    assert set(body) == {"error", "message", "request_id"}


# -- cache purge -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status", "error"),
    [
        ("?route=all", 409, "no_cache"),
        ("?route=all&path=/x", 409, "no_cache"),
        ("", 400, "bad_request"),
        ("?route=all&path=x", 400, "bad_request"),
        ("?route=nope", 404, "not_found"),
    ],
)
async def test_cache_purge_without_a_cache_says_so(
    start: Start, start_upstream: UpstreamFactory, query: str, status: int, error: str
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(_config(upstream.port))
    got, body, _ = await _post(f"{_admin(gateway)}/cache/purge{query}")
    assert (got, body["error"]) == (status, error)


# -- reload ----------------------------------------------------------------------------


async def test_post_reload_applies_a_valid_file_and_reports_a_bad_one_with_its_errors(
    start: Start, start_upstream: UpstreamFactory, tmp_path: Path
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(_config(upstream.port))
    admin = _admin(gateway)
    path = tmp_path / "routes.toml"
    added = '[[routes]]\nname = "extra"\npath = "/extra"\nupstream = "app"\n'
    path.write_text(_config(upstream.port) + added)
    status, body, _ = await _post(f"{admin}/reload")
    assert status == 200
    assert body["ok"] is True
    assert body["errors"] == []
    assert "routes added: extra" in body["changes"]
    assert [r.name for r in gateway.config.routes] == ["all", "broken", "extra"]

    path.write_text(_config(upstream.port) + '[[routes]]\nname = "bad"\nupstream = "userz"\n')
    status, body, _ = await _post(f"{admin}/reload")
    assert status == 422
    assert body["ok"] is False
    assert any('unknown upstream "userz"' in e for e in body["errors"])
    # The old config keeps serving.
    assert [r.name for r in gateway.config.routes] == ["all", "broken", "extra"]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{admin}/stats") as response:
            stats = await response.json()
        async with session.get(f"{admin}/") as response:
            page = await response.text()
        async with session.get(f"{admin}/metrics") as response:
            metrics = await response.text()
    assert stats["config"]["last_reload"]["ok"] is False
    assert stats["config"]["last_reload"]["errors"] == body["errors"]
    assert "reload rejected" in page
    assert "unknown upstream &quot;userz&quot;" in page
    # Counted like a SIGHUP reload.
    assert metric_value(metrics, "gateway_config_reloads_total", result="failure") == 1
    assert metric_value(metrics, "gateway_config_reloads_total", result="success") == 1


# -- /stats ----------------------------------------------------------------------------


async def test_stats_counts_requests_errors_and_latency_per_route(
    start: Start, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_hello())
    gateway = await start(_config(upstream.port))
    gateway.admin_ops.sections["tunnels"] = lambda: {"active": 2}
    gateway.admin_ops.sections["cache"] = lambda: None  # nothing to show: left out
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.get(f"{_proxy(gateway)}/x") as response:
                assert response.status == 200
        async with session.get(f"{_proxy(gateway)}/broken") as response:
            assert response.status == 502
        async with session.get(f"{_admin(gateway)}/stats") as response:
            stats = await response.json()
    routes = stats["routes"]
    assert list(routes) == ["all", "broken"]
    assert (routes["all"]["requests"], routes["all"]["errors"]) == (5, 0)
    assert (routes["broken"]["requests"], routes["broken"]["errors"]) == (1, 1)
    assert routes["broken"]["error_rate"] == 1.0
    assert routes["all"]["rps"] > 0
    assert 0 < routes["all"]["p50_ms"] <= routes["all"]["p99_ms"]
    assert len(routes["all"]["series"]["requests"]) == 60
    assert sum(routes["all"]["series"]["requests"]) == 5
    assert stats["upstreams"]["flaky"]["targets"][0]["breaker"] == "open"
    assert stats["config"]["sha256"] == gateway.config.sha256
    assert stats["tunnels"] == {"active": 2}
    assert "cache" not in stats
