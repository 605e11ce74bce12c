"""SIGTERM/SIGINT: the real gateway process drains, then exits."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.conftest import UpstreamFactory
from tests.gateway_process import assert_clean_exit, run_gateway, upstream_url

TIMEOUT = aiohttp.ClientTimeout(total=30)
BODY = b"x" * 100_000


class Stall:
    """An upstream whose /slow answer waits until the test sets `release`.

    With `partial`, the response head and the first part of the body go out
    at once and only the rest waits.
    """

    def __init__(self, partial: bool = False) -> None:
        self.partial = partial
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if not self.partial:
            self.arrived.set()
            await self.release.wait()
            return web.Response(text="done")
        response = web.StreamResponse()
        response.content_length = 2 * len(BODY)
        await response.prepare(request)
        await response.write(BODY)
        self.arrived.set()
        await self.release.wait()
        await response.write(BODY)
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/slow", self.handler)
        return app


def config(target: str, drain_timeout: float) -> str:
    return f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = "127.0.0.1:0"
        drain_timeout = {drain_timeout}

        [upstreams.app]
        targets = ["{target}"]

        [[routes]]
        name = "slow"
        path = "/slow"
        upstream = "app"
    """


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


async def test_sigterm_finishes_the_running_request_while_refusing_new_ones(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    stall = Stall()
    target = upstream_url(await start_upstream(stall.app()))
    try:
        async with (
            run_gateway(tmp_path, config(target, drain_timeout=20.0)) as gw,
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
        ):
            running = asyncio.create_task(fetch(session, gw.url + "/slow"))
            async with asyncio.timeout(10):
                await stall.arrived.wait()
            gw.send(signal.SIGTERM)
            assert await gw.notify.next("STOPPING=1") == "STOPPING=1\nSTATUS=draining (up to 20s)"
            # The admin listener outlives the drain; it says "not ready".
            async with session.get(gw.admin_url + "/readyz") as response:
                assert response.status == 503
            async with session.get(gw.admin_url + "/healthz") as response:
                assert response.status == 200
            # The proxy listener is closed: a new connection is refused.
            proxy = URL(gw.url)
            assert proxy.host is not None
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(proxy.host, proxy.port)
            # A reload now would race the shutdown: ignored.
            gw.send(signal.SIGHUP)
            assert not running.done()
            stall.release.set()
            assert await running == (200, b"done")
            assert await gw.wait() == 0
    finally:
        stall.release.set()
    assert [m.split("\n")[0] for m in gw.notify.states()] == ["READY=1", "STOPPING=1"]
    log = gw.stderr()
    assert "SIGTERM: draining" in log
    assert "SIGHUP ignored: draining" in log
    assert '"status":200' in log  # the drained request's access-log line
    assert_clean_exit(log)


async def test_a_request_still_running_at_drain_timeout_is_aborted_and_the_exit_is_0(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    stall = Stall(partial=True)
    target = upstream_url(await start_upstream(stall.app()))
    try:
        async with (
            run_gateway(tmp_path, config(target, drain_timeout=0.6)) as gw,
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
        ):
            running = asyncio.create_task(fetch(session, gw.url + "/slow"))
            async with asyncio.timeout(10):
                await stall.arrived.wait()
            started = time.monotonic()
            gw.send(signal.SIGTERM)
            assert await gw.wait() == 0
            elapsed = time.monotonic() - started
            # The client saw a truncated transfer, never a clean end.
            with pytest.raises(aiohttp.ClientPayloadError):
                await running
    finally:
        stall.release.set()
    # Exactly one drain_timeout: not aiohttp's shutdown_timeout twice over
    # (once for the handler, once more after cancelling only its body).
    assert 0.6 <= elapsed < 1.1
    log = gw.stderr()
    assert "drain_timeout (0.6s) passed: aborted 1 request(s) still running" in log
    assert_clean_exit(log)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_a_second_signal_during_the_drain_exits_at_once_with_128_plus_signal(
    tmp_path: Path, start_upstream: UpstreamFactory, signum: signal.Signals
) -> None:
    stall = Stall()
    target = upstream_url(await start_upstream(stall.app()))
    try:
        async with (
            run_gateway(tmp_path, config(target, drain_timeout=30.0)) as gw,
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
        ):
            running = asyncio.create_task(fetch(session, gw.url + "/slow"))
            async with asyncio.timeout(10):
                await stall.arrived.wait()
            gw.send(signum)
            await gw.notify.next("STOPPING=1")
            started = time.monotonic()
            gw.send(signum)
            assert await gw.wait() == 128 + signum
            assert time.monotonic() - started < 2.0
            with pytest.raises(aiohttp.ClientError):
                await running
    finally:
        stall.release.set()
    assert f"second {signum.name}: exiting now" in gw.stderr()


@pytest.mark.parametrize("partial", [False, True], ids=["before-response", "mid-response"])
async def test_a_second_signal_still_logs_one_line_per_request_it_cuts(
    tmp_path: Path, start_upstream: UpstreamFactory, partial: bool
) -> None:
    stall = Stall(partial)
    target = upstream_url(await start_upstream(stall.app()))
    try:
        async with (
            run_gateway(tmp_path, config(target, drain_timeout=30.0)) as gw,
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
        ):
            running = asyncio.create_task(fetch(session, gw.url + "/slow"))
            async with asyncio.timeout(10):
                await stall.arrived.wait()
            gw.send(signal.SIGTERM)
            await gw.notify.next("STOPPING=1")
            gw.send(signal.SIGTERM)
            assert await gw.wait() == 128 + signal.SIGTERM
            with pytest.raises(aiohttp.ClientError):
                await running
    finally:
        stall.release.set()
    log = gw.stderr()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(lines) == 1, log
    (line,) = lines
    assert (line["path"], line["aborted"]) == ("/slow", "shutdown")
    # What the client got if its response began; else 503 (cut by us, not by it).
    assert line["status"] == (200 if partial else 503)
    assert line["targets"] == [target]
    assert "second SIGTERM: exiting now, without finishing the drain (1 request(s) cut)" in log
