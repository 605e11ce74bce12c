"""What a client learns when a target fails: the upstream's name, never its address.

Targets are internal topology: an error body or header naming
`http://127.0.0.1:24101` tells any client where the backends live. The
gateway's 502/504 bodies name the upstream (`upstream "app"`); the target's
URL and the failure's own text go to the log (the warning line and the access
log's `target`), as nginx keeps "upstream: http://..." in its error log.

Each failure kind runs against a real socket on 127.0.0.1 misbehaving on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import aiohttp
import pytest
import trustme

from tests.conftest import GatewayFactory
from tests.gateway_process import free_port

Kind = Literal["refused", "reset", "silent", "garbage", "tls_garbage", "tls_untrusted"]
KINDS: tuple[Kind, ...] = ("refused", "reset", "silent", "garbage", "tls_garbage", "tls_untrusted")
RID = "hostile-request"  # a fixed id: a random one could hold the port's digits


async def _read_head(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        async with asyncio.timeout(5):
            await reader.readuntil(b"\r\n\r\n")


def _raw_handler(
    kind: Kind, stop: asyncio.Event
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if kind == "tls_garbage":
                # Not TLS at all: the handshake reads an HTTP-ish line.
                writer.write(b"HTTP/1.1 200 OK\r\n\r\n" * 4)
                await writer.drain()
            else:
                await _read_head(reader)
            if kind == "reset":
                # SO_LINGER 0: close() sends RST instead of FIN.
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if kind == "garbage":
                writer.write(b"this is no HTTP at all\r\n\r\n")
                await writer.drain()
            # "silent" (and the rest) hold the connection until the test ends.
            async with asyncio.timeout(10):
                await stop.wait()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.transport.abort()

    return handle


@contextlib.asynccontextmanager
async def failing_target(kind: Kind) -> AsyncIterator[str]:
    """The URL of a target on 127.0.0.1 that fails as `kind` says."""
    if kind == "refused":
        yield f"http://127.0.0.1:{free_port()}"
        return
    stop = asyncio.Event()
    tls: ssl.SSLContext | None = None
    if kind == "tls_untrusted":
        # A well-formed TLS server whose issuer nobody trusts.
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trustme.CA().issue_cert("127.0.0.1").configure_cert(tls)
    server = await asyncio.start_server(_raw_handler(kind, stop), "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if kind.startswith("tls") else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        stop.set()
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.wait_closed()


def toml(url: str) -> str:
    return f"""
        [upstreams.app]
        targets = ["{url}"]

        [[routes]]
        name = "r"
        path = "/"
        upstream = "app"
        read_timeout = 0.3
        connect_timeout = 2.0
    """


@pytest.mark.parametrize("kind", KINDS)
async def test_a_failing_target_is_named_by_its_upstream_and_its_address_stays_in_the_log(
    make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    kind: Kind,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.proxy")
    async with failing_target(kind) as url:
        port = url.rpartition(":")[2]
        gw = await make_gateway(toml(url))
        async with client.get(gw.url + "/x", headers={"X-Request-ID": RID}) as resp:
            body = await resp.read()
            headers = list(resp.raw_headers)
    assert resp.status == (504 if kind == "silent" else 502), body
    answer = json.loads(body)
    assert answer["error"] == ("upstream_timeout" if kind == "silent" else "bad_gateway")
    assert 'upstream "app"' in answer["message"]
    for text in [body] + [name + b": " + value for name, value in headers]:
        assert b"127.0.0.1" not in text, text
        assert port.encode() not in text, text
    # The operator still sees where it went and why.
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.proxy"]
    assert any(RID in line and url in line for line in logged), logged
    record = json.loads(gw.log_lines()[-1])
    assert record["target"] == url
    assert record["status"] == resp.status
