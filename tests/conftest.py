"""Shared fixtures: real upstream servers and the real gateway, on loopback."""

from __future__ import annotations

import asyncio
import io
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import hypothesis  # noqa: F401 - see below
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.core.config import parse
from gateway.server import Gateway
from gateway.state.log import AccessLog

# hypothesis is imported here, at collection, and not first by its plugin's
# end-of-session summary: pytest's assertion rewriter compiling it that late,
# after the event-loop tests, hits CPython 3.11.7's "AST constructor recursion
# depth mismatch" SystemError (gh-106905) when a file without property tests
# runs alone.

GatewayFactory = Callable[[str], Awaitable["RunningGateway"]]
UpstreamFactory = Callable[[web.Application], Awaitable[TestServer]]


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str  # http://127.0.0.1:PORT
    host: str
    port: int
    admin_url: str | None
    log: io.StringIO

    def log_lines(self) -> list[str]:
        return [line for line in self.log.getvalue().splitlines() if line]


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Start the real gateway from a TOML string on 127.0.0.1, port chosen by the OS.

    `[server]` defaults to `listen = ["127.0.0.1:0"]` and `admin = "127.0.0.1:0"`
    when the TOML does not set them.
    """
    started: list[Gateway] = []

    async def factory(toml: str) -> RunningGateway:
        text = textwrap.dedent(toml)
        if "[server]" not in text:
            text = '[server]\nlisten = ["127.0.0.1:0"]\nadmin = "127.0.0.1:0"\n' + text
        config = parse(text)
        stream = io.StringIO()
        gateway = Gateway(
            config, environ={}, access_log=AccessLog(config.server.access_log, stream=stream)
        )
        await gateway.start()
        started.append(gateway)
        address = gateway.addresses[0]
        host, _, port = address.rpartition(":")
        admin = f"http://{gateway.admin_addresses[0]}" if gateway.admin_addresses else None
        return RunningGateway(gateway, f"http://{address}", host, int(port), admin, stream)

    yield factory
    for gateway in started:
        await gateway.close()


@pytest.fixture
async def start_upstream() -> AsyncIterator[UpstreamFactory]:
    """Start an aiohttp app on 127.0.0.1; returns the TestServer (`.port`, `.close()`)."""
    servers: list[TestServer] = []

    async def factory(app: web.Application) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client: no automatic decompression, no connection reuse surprises."""
    async with aiohttp.ClientSession(
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


def one_upstream_config(port: int | None, extra_route: str = "", extra_upstream: str = "") -> str:
    """A config with one upstream `app` at 127.0.0.1:port and route `all` on "/"."""
    assert port is not None
    return f"""
        [upstreams.app]
        targets = ["http://127.0.0.1:{port}"]
        {extra_upstream}

        [[routes]]
        name = "all"
        path = "/"
        upstream = "app"
        {extra_route}
    """


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll state that has no event to wait on (counters, gauges)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - plain attributes, nothing to await
            await asyncio.sleep(0.01)
