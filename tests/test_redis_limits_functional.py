"""store = "redis": shared buckets in a real redis-server, its outages and return.

Each test starts its own redis-server on a loopback port (tests/redis_server.py)
and stops it; they skip only when redis-server is not installed. Outages are
real: the server stopped (connection refused) or frozen with SIGSTOP (a Redis
that accepts and never answers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web

import gateway.state.redisstore
from tests.conftest import GatewayFactory, RunningGateway, UpstreamFactory, one_upstream_config
from tests.redis_server import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

TIMEOUT = 0.2  # [redis] timeout in these tests


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _upstream(start_upstream: UpstreamFactory) -> int:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    server = await start_upstream(app)
    assert server.port is not None
    return server.port


def _toml(
    port: int, redis_url: str, *, rate: float = 0.01, burst: int = 3, key: str = "route"
) -> str:
    return (
        one_upstream_config(
            port,
            extra_route=f"""
        [routes.rate_limit]
        rate = {rate}
        burst = {burst}
        key = "{key}"
        store = "redis"
        """,
        )
        + f"""
        [redis]
        url = "{redis_url}"
        timeout = {TIMEOUT}
    """
    )


async def _status(client: aiohttp.ClientSession, gw: RunningGateway, **headers: str) -> int:
    async with client.get(gw.url + "/x", headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_two_gateways_sharing_redis_draw_from_one_bucket(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    port = await _upstream(start_upstream)
    first = await make_gateway(_toml(port, redis_server.url))
    second = await make_gateway(_toml(port, redis_server.url))
    statuses = [await _status(client, gw) for gw in (first, second, first, second, first)]
    # burst 3 across both processes, not 3 each
    assert statuses == [200, 200, 200, 429, 429]
    async with client.get(second.url + "/x") as resp:
        assert resp.status == 429
        assert resp.headers["RateLimit"].startswith('"all";r=0;')
        assert int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json())["error"] == "rate_limited"


async def test_shared_limit_keys_by_header_value_including_hostile_ones(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    port = await _upstream(start_upstream)
    gw = await make_gateway(_toml(port, redis_server.url, burst=1, key="header:X-Api-Key"))
    hostile = [
        "a",
        "a:b",
        "*",
        "x" * 4000,
        "gateway:rl:3:all:a",
        "\u00e9".encode().decode("latin-1"),
    ]
    for value in hostile:
        assert await _status(client, gw, **{"X-Api-Key": value}) == 200
    for value in hostile:
        assert await _status(client, gw, **{"X-Api-Key": value}) == 429
    # One Redis key per bucket, nothing else written.
    assert redis_server.command("DBSIZE") == b":%d\r\n" % len(hostile)


async def test_redis_down_falls_back_to_the_local_bucket_at_once_and_comes_back(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway.state.redisstore, "RETRY_AFTER", 0.3)
    caplog.set_level(logging.INFO, logger="gateway.ratelimit")
    port = await _upstream(start_upstream)
    gw = await make_gateway(_toml(port, redis_server.url, burst=2))
    assert await _status(client, gw) == 200  # shared bucket: 1 left
    redis_server.stop()
    # The local bucket (full, burst 2) answers: the limit still holds.
    assert [await _status(client, gw) for _ in range(3)] == [200, 200, 429]
    outage = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage) == 1, "the outage is logged once"
    shared = gw.gateway.runtime.shared
    assert shared is not None
    assert shared.down
    errors = gw.gateway.metrics.ratelimit_store_errors.labels().value
    assert errors >= 1
    redis_server.start()
    await asyncio.sleep(0.35)  # RETRY_AFTER
    # Back on Redis (a new, empty one: persistence is off), whose bucket is
    # full, where the local one is empty.
    assert [await _status(client, gw) for _ in range(3)] == [200, 200, 429]
    assert redis_server.command("DBSIZE") == b":1\r\n"
    assert not shared.down
    assert any("answers again" in r.getMessage() for r in caplog.records)
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    async with client.get(gw.admin_url + "/metrics") as resp:
        assert "gateway_ratelimit_store_errors_total" in await resp.text()


async def test_a_stalled_redis_delays_a_request_by_at_most_timeout(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.ratelimit")
    port = await _upstream(start_upstream)
    gw = await make_gateway(_toml(port, redis_server.url, burst=5))
    assert await _status(client, gw) == 200  # connection to Redis open and warm
    redis_server.pause()
    try:
        started = time.monotonic()
        assert await _status(client, gw) == 200
        first = time.monotonic() - started
        started = time.monotonic()
        assert await _status(client, gw) == 200
        second = time.monotonic() - started
    finally:
        redis_server.resume()
    # The first waits out `timeout` (slack for a loaded machine); the next one
    # does not wait on Redis at all.
    assert TIMEOUT * 0.9 <= first < TIMEOUT + 1.0
    assert second < TIMEOUT
    assert any("timed out" in r.getMessage() for r in caplog.records)


async def test_reload_keeps_the_redis_store_while_its_table_is_unchanged(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    redis_server: RedisServer,
) -> None:
    from gateway.core.config import parse

    port = await _upstream(start_upstream)
    text = _toml(port, redis_server.url)
    gw = await make_gateway(text)
    runtime = gw.gateway.runtime
    before = runtime.shared
    runtime.build(
        parse('[server]\nlisten = ["127.0.0.1:0"]\n' + text.replace("burst = 3", "burst = 4"))
    )
    assert runtime.shared is before
    runtime.build(
        parse(
            '[server]\nlisten = ["127.0.0.1:0"]\n'
            + text.replace(f"timeout = {TIMEOUT}", "timeout = 0.3")
        )
    )
    assert runtime.shared is not before


async def test_concurrent_takes_are_exact_and_a_flushed_script_is_loaded_again(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    port = await _upstream(start_upstream)
    first = await make_gateway(_toml(port, redis_server.url, burst=10))
    second = await make_gateway(_toml(port, redis_server.url, burst=10))
    # Many takes in one loop iteration travel in one pipeline: still one
    # bucket, still exact.
    statuses = await asyncio.gather(*(_status(client, gw) for gw in [first, second] * 25))
    assert sorted(statuses).count(200) == 10
    # Redis forgets the script (SCRIPT FLUSH, as after a restart): the next
    # take loads it again, and no request falls back to the local bucket.
    assert redis_server.command("SCRIPT", "FLUSH") == b"+OK\r\n"
    assert redis_server.command("FLUSHALL") == b"+OK\r\n"  # and a full bucket
    assert await _status(client, first) == 200
    assert first.gateway.metrics.ratelimit_store_errors.labels().value == 0
