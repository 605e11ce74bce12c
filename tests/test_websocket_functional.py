"""WebSocket tunnels (CONTRACT.md "WebSockets"): real aiohttp WebSocket servers
and clients through the real gateway, raw sockets for the hostile cases."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from gateway.core.config import parse
from gateway.wire import splice
from tests.conftest import GatewayFactory, RunningGateway, UpstreamFactory, wait_for
from tests.gateway_process import metric_value
from tests.wire import read_head, read_response

MiB = 1024 * 1024
KEY = base64.b64encode(b"0123456789abcdef").decode()
HANDSHAKE = (
    "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
).encode()


class Seen:
    """What the WebSocket target saw."""

    def __init__(self) -> None:
        self.upgrades: list[str | None] = []
        self.received = 0
        self.sent = 0
        self.digest = hashlib.sha256()
        self.closed = asyncio.Event()


def ws_app(seen: Seen) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        seen.upgrades.append(request.headers.get("Upgrade"))
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="plain")
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        seen.closed.set()
        return ws

    async def sink(request: web.Request) -> web.WebSocketResponse:
        """Hashes what it receives; on "done" answers size and digest."""
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                seen.received += len(message.data)
                seen.digest.update(message.data)
            elif message.data == "done":
                await ws.send_str(f"{seen.received} {seen.digest.hexdigest()}")
        return ws

    async def source(request: web.Request) -> web.WebSocketResponse:
        """Sends `n` MiB of a known pattern, then closes."""
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        count = int(request.query["n"])
        for index in range(count):
            await ws.send_bytes(_block(index))
            seen.sent += MiB
        await ws.close()
        return ws

    async def flood(request: web.Request) -> web.WebSocketResponse:
        """Sends for ever (bounded) to a client that may not read."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        block = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(4096):  # 256 MiB at most
                await ws.send_bytes(block)
                seen.sent += len(block)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_get("/sink", sink)
    app.router.add_get("/source", source)
    app.router.add_get("/flood", flood)
    return app


def _block(index: int) -> bytes:
    seed = hashlib.sha256(index.to_bytes(4, "big")).digest()
    return seed * (MiB // len(seed))


def config(port: int, route: str = "", defaults: str = "") -> str:
    return f"""
        [defaults]
        {defaults}

        [upstreams.ws]
        targets = ["http://127.0.0.1:{port}"]

        [[routes]]
        name = "ws"
        path = "/"
        upstream = "ws"
        {route}
    """


async def start(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    route: str = "",
    defaults: str = "",
) -> tuple[RunningGateway, Seen]:
    seen = Seen()
    server = await start_upstream(ws_app(seen))
    assert server.port is not None
    gw = await make_gateway(config(server.port, route, defaults))
    return gw, seen


async def metrics(gw: RunningGateway) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{gw.admin_url}/metrics") as r:
        return await r.text()


async def test_text_and_binary_messages_echo_through_a_tunnel_and_are_counted(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    gw, seen = await start(make_gateway, start_upstream)
    async with asyncio.timeout(10), client.ws_connect(f"{gw.url}/ws") as ws:
        await ws.send_str("hello")
        assert await ws.receive_str() == "hello"
        await ws.send_bytes(b"\x00\x01" * 1000)
        assert await ws.receive_bytes() == b"\x00\x01" * 1000
        text = await metrics(gw)
        assert metric_value(text, "gateway_tunnels_active", route="ws") == 1
    assert seen.upgrades == ["websocket"]
    await wait_for(lambda: gw.gateway.box is not None and _active(gw) == 0)
    text = await metrics(gw)
    assert (
        metric_value(text, "gateway_tunnel_bytes_total", route="ws", direction="up") or 0
    ) > 2000
    assert (
        metric_value(text, "gateway_tunnel_bytes_total", route="ws", direction="down") or 0
    ) > 2000
    assert '"status": 101' in gw.log.getvalue() or '"status":101' in gw.log.getvalue()


def _active(gw: RunningGateway) -> float:
    assert gw.gateway.box is not None
    return float(gw.gateway.box.snapshot.routes["ws"].tunnels.value)


async def test_the_tunnel_gauge_exists_at_zero_from_the_load(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    gw, _ = await start(make_gateway, start_upstream)
    assert metric_value(await metrics(gw), "gateway_tunnels_active", route="ws") == 0


@pytest.mark.slow
async def test_100_mib_each_way_arrive_whole_through_a_spliced_tunnel(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    gw, _seen = await start(make_gateway, start_upstream)
    count = 100
    up = hashlib.sha256()
    async with asyncio.timeout(120):
        async with client.ws_connect(f"{gw.url}/sink", max_msg_size=0) as ws:
            if splice.AVAILABLE:
                # Both sides plain TCP: each direction is a zero-copy relay.
                assert splice.Relay.tunnels_active == 2
            for index in range(count):
                block = _block(index)
                up.update(block)
                await ws.send_bytes(block)
            await ws.send_str("done")
            assert await ws.receive_str() == f"{count * MiB} {up.hexdigest()}"
        down = hashlib.sha256()
        expected = hashlib.sha256()
        received = 0
        async with client.ws_connect(f"{gw.url}/source?n={count}", max_msg_size=0) as ws:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                down.update(message.data)
                received += len(message.data)
        for index in range(count):
            expected.update(_block(index))
    assert received == count * MiB
    assert down.hexdigest() == expected.hexdigest()
    await wait_for(lambda: splice.Relay.tunnels_active == 0)


async def test_a_client_that_stops_reading_holds_the_target_back(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    gw, seen = await start(make_gateway, start_upstream)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(HANDSHAKE.replace(b"/ws", b"/flood"))
        async with asyncio.timeout(10):
            status, _ = await read_head(reader)
        assert status.startswith("HTTP/1.1 101")
        # Never read again: the target must stall within socket buffers, not
        # fill the gateway's memory.
        async with asyncio.timeout(30):
            previous = -1
            while seen.sent != previous:
                previous = seen.sent
                await asyncio.sleep(1.0)
        assert seen.sent < 64 * MiB
    finally:
        writer.transport.abort()


async def test_a_target_that_stops_reading_holds_the_client_back(
    make_gateway: GatewayFactory,
) -> None:
    gate = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCH)
        await writer.drain()
        await gate.wait()  # reads nothing more

    server, port = await raw_target(deaf)
    async with server:
        gw = await make_gateway(config(port))
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        sent = 0
        try:
            writer.write(HANDSHAKE)
            async with asyncio.timeout(10):
                status, _ = await read_head(reader)
            assert status.startswith("HTTP/1.1 101")
            block = b"y" * 65536
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(4):
                    while sent < 256 * MiB:
                        writer.write(block)
                        await writer.drain()
                        sent += len(block)
            assert sent < 64 * MiB  # the client was held back, not buffered
        finally:
            gate.set()
            writer.transport.abort()


async def test_an_idle_tunnel_is_closed_after_tunnel_idle_timeout(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    gw, _seen = await start(make_gateway, start_upstream, defaults="tunnel_idle_timeout = 0.5")
    async with asyncio.timeout(10), client.ws_connect(f"{gw.url}/ws") as ws:
        await ws.send_str("ping")
        assert await ws.receive_str() == "ping"
        started = asyncio.get_running_loop().time()
        message = await ws.receive()
        idle = asyncio.get_running_loop().time() - started
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert 0.4 <= idle < 3.0
    await wait_for(lambda: _active(gw) == 0)


async def test_an_idle_tunnel_closes_the_target_side_too(make_gateway: GatewayFactory) -> None:
    ended = asyncio.Event()

    async def quiet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCH)
        await writer.drain()
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass
        ended.set()

    server, port = await raw_target(quiet)
    async with server:
        gw = await make_gateway(config(port, defaults="tunnel_idle_timeout = 0.3"))
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        try:
            writer.write(HANDSHAKE)
            async with asyncio.timeout(10):
                status, _ = await read_head(reader)
                assert await reader.read() == b""  # the client's side closed
                await ended.wait()  # and the target's
        finally:
            writer.close()
    assert status.startswith("HTTP/1.1 101")


async def test_a_route_with_websocket_false_strips_the_upgrade(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    gw, seen = await start(make_gateway, start_upstream, route="websocket = false")
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(HANDSHAKE)
        async with asyncio.timeout(10):
            status, headers, body = await read_response(reader)
            assert await reader.read() == b""  # and the connection ends after it
    finally:
        writer.close()
    assert status == 200
    assert body == b"plain"
    assert seen.upgrades == [None]
    assert "upgrade" not in headers


async def test_an_h2c_upgrade_is_never_forwarded(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    gw, seen = await start(make_gateway, start_upstream)
    request = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(request + request)  # served as HTTP/1.1, one after the other
        async with asyncio.timeout(10):
            for _ in range(2):
                status, _, body = await read_response(reader)
                assert (status, body) == (200, b"plain")
    finally:
        writer.close()
    assert seen.upgrades == [None, None]


@pytest.mark.parametrize(
    "fields",
    [
        b"Sec-WebSocket-Version: 13\r\n",  # no key
        b"Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n",  # 5 bytes
        b"Sec-WebSocket-Key: !!not base64!!\r\nSec-WebSocket-Version: 13\r\n",
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n".encode(),
        f"Sec-WebSocket-Key: {KEY}\r\n".encode(),  # no version
    ],
)
async def test_a_broken_handshake_is_refused_before_the_target(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, fields: bytes
) -> None:
    gw, seen = await start(make_gateway, start_upstream)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            + fields
            + b"\r\n"
        )
        async with asyncio.timeout(10):
            status, _, body = await read_response(reader)
    finally:
        writer.close()
    assert status == 400
    assert b'"bad_request"' in body
    assert seen.upgrades == []


async def test_an_upgrade_with_a_body_is_refused(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    gw, seen = await start(make_gateway, start_upstream)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(HANDSHAKE[:-2] + b"Content-Length: 5\r\n\r\nhello")
        async with asyncio.timeout(10):
            status, _, _ = await read_response(reader)
    finally:
        writer.close()
    assert status == 400
    assert seen.upgrades == []


async def test_the_rate_limit_applies_to_the_upgrade_request(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    gw, seen = await start(
        make_gateway, start_upstream, route="rate_limit = { rate = 0.001, burst = 1 }"
    )
    async with asyncio.timeout(10), client.ws_connect(f"{gw.url}/ws") as ws:
        await ws.send_str("a")
        assert await ws.receive_str() == "a"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(f"{gw.url}/ws")
    assert refused.value.status == 429
    assert seen.upgrades == ["websocket"]


RawScript = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_target(script: RawScript) -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _accept(key: str) -> str:
    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    return base64.b64encode(digest).decode()


SWITCH = (
    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    f"Sec-WebSocket-Accept: {_accept(KEY)}\r\n\r\n"
).encode()


@pytest.mark.parametrize("route", ["", "websocket = false"])
async def test_a_101_the_gateway_did_not_ask_for_is_a_502(
    make_gateway: GatewayFactory, route: str
) -> None:
    async def switch_anyway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCH + b"\x81\x02hi")
        await writer.drain()
        await asyncio.sleep(1)

    server, port = await raw_target(switch_anyway)
    async with server:
        gw = await make_gateway(config(port, route))
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        try:
            # A plain GET (nothing asked), or an upgrade on a route that strips it.
            writer.write(HANDSHAKE if route else b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                status, _, body = await read_response(reader)
        finally:
            writer.close()
    assert status == 502
    assert b'"bad_gateway"' in body


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: d3Jvbmc=\r\n\r\n",
    ],
)
async def test_a_101_that_is_not_this_websocket_switch_is_a_502(
    make_gateway: GatewayFactory, answer: bytes
) -> None:
    async def wrong_switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(1)

    server, port = await raw_target(wrong_switch)
    async with server:
        gw = await make_gateway(config(port))
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        try:
            writer.write(HANDSHAKE)
            async with asyncio.timeout(10):
                status, _, _ = await read_response(reader)
        finally:
            writer.close()
    assert status == 502


async def test_a_200_to_an_upgrade_is_relayed_as_a_response_and_the_connection_ends(
    make_gateway: GatewayFactory,
) -> None:
    heads: list[bytes] = []

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        await asyncio.sleep(1)

    server, port = await raw_target(plain)
    async with server:
        gw = await make_gateway(config(port))
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        try:
            # A second request pipelined behind the upgrade is never parsed.
            writer.write(HANDSHAKE + b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                status, headers, body = await read_response(reader)
                assert await reader.read() == b""
        finally:
            writer.close()
    assert (status, body) == (200, b"no")
    assert headers.get("connection") == "close"
    assert len(heads) == 1
    assert b"upgrade: websocket" in heads[0].lower()
    assert b"connection: upgrade" in heads[0].lower()


async def test_bytes_either_side_sends_with_its_head_go_through(
    make_gateway: GatewayFactory,
) -> None:
    got: list[bytes] = []

    async def eager(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCH + b"early")  # one write: the 101 and the first tunnel bytes
        await writer.drain()
        got.append(await reader.readexactly(5))
        writer.write(b"reply")
        await writer.drain()
        await reader.read()  # until the gateway closes

    server, port = await raw_target(eager)
    async with server:
        gw = await make_gateway(config(port))
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        try:
            writer.write(HANDSHAKE + b"first")  # the client's bytes right behind its head
            async with asyncio.timeout(10):
                status, headers = await read_head(reader)
                assert await reader.readexactly(5) == b"early"
                assert await reader.readexactly(5) == b"reply"
        finally:
            writer.close()
    assert status.startswith("HTTP/1.1 101")
    assert headers["upgrade"] == "websocket"
    assert headers["connection"].lower() == "upgrade"
    assert headers["sec-websocket-accept"] == _accept(KEY)
    assert got == [b"first"]


async def test_a_reload_leaves_an_open_tunnel_alone(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    gw, _seen = await start(make_gateway, start_upstream)
    async with asyncio.timeout(10), client.ws_connect(f"{gw.url}/ws") as ws:
        await ws.send_str("before")
        assert await ws.receive_str() == "before"
        # The route and its upstream are gone from the new config.
        other = parse(
            '[server]\nlisten = ["127.0.0.1:0"]\nadmin = ""\n'
            '[upstreams.x]\ntargets = ["http://127.0.0.1:9"]\n'
            '[[routes]]\nname = "x"\npath = "/x"\nupstream = "x"\n'
        )
        gw.gateway.apply(gw.gateway.prepare(other))
        await ws.send_str("after")
        assert await ws.receive_str() == "after"


async def test_drain_counts_a_tunnel_and_closes_it_at_drain_timeout(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    seen = Seen()
    server = await start_upstream(ws_app(seen))
    assert server.port is not None
    gw = await make_gateway(
        '[server]\nlisten = ["127.0.0.1:0"]\nadmin = ""\ndrain_timeout = 0.5\n'
        + config(server.port)
    )
    async with (
        aiohttp.ClientSession() as session,
        asyncio.timeout(15),
        session.ws_connect(f"{gw.url}/ws") as ws,
    ):
        await ws.send_str("x")
        assert await ws.receive_str() == "x"
        started = asyncio.get_running_loop().time()
        await gw.gateway.drain()
        took = asyncio.get_running_loop().time() - started
        message = await ws.receive()
    assert message.type in (
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSED,
        aiohttp.WSMsgType.ERROR,
    )
    assert 0.4 <= took < 5.0


async def test_the_tunnel_is_copied_when_no_relay_can_be_had(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(splice.Relay, "open_for_tunnel", classmethod(lambda cls: None))
    gw, _ = await start(make_gateway, start_upstream)
    payload = os.urandom(3 * MiB)
    async with asyncio.timeout(30), client.ws_connect(f"{gw.url}/ws", max_msg_size=0) as ws:
        await ws.send_bytes(payload)
        assert await ws.receive_bytes() == payload
