"""The proxy listener's own HTTP/1.1 server (gateway/h1server.py) on the wire.

Framing and connection management a client relies on: HTTP/1.0 answers,
keep-alive, pipelining, half-close, lingering close, Date, header bytes.
Malformed input is pinned in test_hostile_clients.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest
from aiohttp import web

from gateway.wire import h1server
from gateway.wire.h1messages import Body
from tests.conftest import GatewayFactory, RunningGateway, UpstreamFactory, one_upstream_config
from tests.wire import read_head


def app() -> web.Application:
    async def text(request: web.Request) -> web.Response:
        return web.Response(text=f"hi {request.path}")

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in (b"one ", b"two ", b"three"):
            await response.write(piece)
        await response.write_eof()
        return response

    async def dated(request: web.Request) -> web.Response:
        return web.Response(text="d", headers={"Date": "Tue, 01 Jan 2030 00:00:00 GMT"})

    async def sink(request: web.Request) -> web.Response:
        return web.Response(text=f"{len(await request.read())}")

    application = web.Application()
    application.router.add_get("/chunked", chunked)
    application.router.add_get("/dated", dated)
    application.router.add_post("/sink", sink)
    application.router.add_get("/{tail:.*}", text)
    return application


async def connect_to_app(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, extra_route: str = ""
) -> tuple[RunningGateway, asyncio.StreamReader, asyncio.StreamWriter]:
    """A gateway in front of `app()`, and one client connection to it."""
    upstream = await start_upstream(app())
    gw = await make_gateway(one_upstream_config(upstream.port, extra_route))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    return gw, reader, writer


async def test_http10_client_gets_a_close_delimited_body_for_a_chunked_target(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    _, reader, writer = await connect_to_app(make_gateway, start_upstream)
    writer.write(b"GET /chunked HTTP/1.0\r\n\r\n")
    status, headers = await read_head(reader)
    assert status == "HTTP/1.0 200 OK"
    assert "transfer-encoding" not in headers  # HTTP/1.0 has no chunked
    assert "content-length" not in headers
    assert await reader.read() == b"one two three"  # ends with the connection
    writer.close()


async def test_http10_keep_alive_is_honoured_with_a_length(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    _, reader, writer = await connect_to_app(make_gateway, start_upstream)
    for path in (b"/a", b"/b"):
        writer.write(b"GET " + path + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers = await read_head(reader)
        assert status == "HTTP/1.0 200 OK"
        assert headers["connection"].lower() == "keep-alive"
        body = await reader.readexactly(int(headers["content-length"]))
        assert body == b"hi " + path
    writer.close()


async def test_pipelined_requests_are_answered_in_order(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    _, reader, writer = await connect_to_app(make_gateway, start_upstream)
    writer.write(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    bodies = []
    for _ in range(3):
        _, headers = await read_head(reader)
        bodies.append(await reader.readexactly(int(headers["content-length"])))
    assert bodies == [b"hi /1", b"5", b"hi /3"]
    writer.close()


async def test_a_client_that_closes_its_side_is_gone_and_its_upstream_request_cancelled(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    """As nginx (499) and aiohttp: an EOF from the client cancels the request."""
    cancelled = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="late")

    application = web.Application(handler_args={"handler_cancellation": True})
    application.router.add_get("/slow", slow)
    upstream = await start_upstream(application)
    gw = await make_gateway(one_upstream_config(upstream.port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.2)
    writer.write_eof()
    async with asyncio.timeout(5):
        await cancelled.wait()
        assert await reader.read() == b""
    writer.close()


async def test_many_pipelined_upgrade_requests_in_one_read_are_all_answered(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h1server, "MAX_PIPELINED", 5000)  # the bound is tested below
    _, reader, writer = await connect_to_app(make_gateway, start_upstream)
    count = 1500  # past the recursion limit, had each one been parsed by recursion
    one = b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    writer.write(one * count)
    async with asyncio.timeout(30):
        for _ in range(count):
            _, headers = await read_head(reader)
            assert await reader.readexactly(int(headers["content-length"])) == b"hi /u"
    writer.close()


async def test_an_endless_trailer_is_refused_before_it_grows(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    _, reader, writer = await connect_to_app(make_gateway, start_upstream)
    writer.write(
        b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Trailer: "
    )
    async with asyncio.timeout(5):
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 4 MiB of one trailer value, never ended
                writer.write(b"a" * 65536)
                await writer.drain()
        status, _ = await read_head(reader)
    assert status.startswith("HTTP/1.1 4")
    writer.transport.abort()


async def test_a_pipelined_partial_head_is_timed_from_the_end_of_the_response(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="slow")

    application = app()
    application.router.add_get("/slow-first", slow)
    upstream = await start_upstream(application)
    gw = await make_gateway(
        '[server]\nlisten = ["127.0.0.1:0"]\nadmin = ""\nclient_timeout = 0.5\n'
        + one_upstream_config(upstream.port)
    )
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    # The second head starts while the first request takes 1 s (> client_timeout).
    writer.write(b"GET /slow-first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\n")
    _, headers = await read_head(reader)
    assert await reader.readexactly(int(headers["content-length"])) == b"slow"
    await asyncio.sleep(0.2)  # well within client_timeout of the answer
    writer.write(b"Host: x\r\n\r\n")
    status, headers = await read_head(reader)
    assert status == "HTTP/1.1 200 OK"
    assert await reader.readexactly(int(headers["content-length"])) == b"hi /second"
    writer.close()


async def test_date_is_added_when_the_target_sends_none_and_kept_when_it_does(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    _, reader, writer = await connect_to_app(make_gateway, start_upstream)
    writer.write(b"GET /dated HTTP/1.1\r\nHost: x\r\n\r\n")
    _, headers = await read_head(reader)
    assert headers["date"] == "Tue, 01 Jan 2030 00:00:00 GMT"
    await reader.readexactly(int(headers["content-length"]))
    # aiohttp's test server always sends a Date: a target that sends none.
    raw = await asyncio.start_server(_dateless, "127.0.0.1", 0)
    port = raw.sockets[0].getsockname()[1]
    gw2 = await make_gateway(one_upstream_config(port))
    reader2, writer2 = await asyncio.open_connection(gw2.host, gw2.port)
    writer2.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader2.readuntil(b"\r\n\r\n")
    assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT\r\n", head)
    assert b"\r\nX-Odd: caf\xc3\xa9\r\n" in head  # UTF-8 bytes unchanged
    writer.close()
    writer2.close()
    raw.close()


async def _dateless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    # A header value that is UTF-8 ("café"): its bytes must reach the client unchanged.
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Odd: caf\xc3\xa9\r\n\r\nok")
    await writer.drain()
    await reader.read()


async def test_non_utf8_header_bytes_reach_the_client_unchanged(
    make_gateway: GatewayFactory,
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Latin1: caf\xe9\r\n\r\nok")
        await writer.drain()
        await reader.read()

    raw = await asyncio.start_server(answer, "127.0.0.1", 0)
    gw = await make_gateway(one_upstream_config(raw.sockets[0].getsockname()[1]))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"\r\nX-Latin1: caf\xe9\r\n" in head
    assert await reader.readexactly(2) == b"ok"
    writer.close()
    raw.close()


async def test_an_early_refusal_reaches_a_client_still_sending_its_body(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    _, reader, writer = await connect_to_app(make_gateway, start_upstream, "max_body_bytes = 1000")
    size = 50 * 1024 * 1024
    writer.write(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)

    async def keep_sending() -> None:
        block = b"z" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    sending = asyncio.create_task(keep_sending())
    async with asyncio.timeout(10):
        status, headers = await read_head(reader)
        assert status == "HTTP/1.1 413 Request Entity Too Large"
        assert headers["connection"] == "close"
        await reader.readexactly(int(headers["content-length"]))
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
    writer.transport.abort()


async def test_idle_keep_alive_connections_are_closed_after_the_keepalive_timeout(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(h1server, "KEEPALIVE_TIMEOUT", 0.3)
    _, reader, writer = await connect_to_app(make_gateway, start_upstream)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _, headers = await read_head(reader)
    await reader.readexactly(int(headers["content-length"]))
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()


async def test_a_flood_of_pipelined_requests_is_answered_up_to_a_bound_then_closed(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    gw, reader, writer = await connect_to_app(make_gateway, start_upstream)
    # Tiny requests, all in one read: without a bound, each would be queued.
    writer.write(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
    answered = 0
    async with asyncio.timeout(20):
        while True:
            status, headers = await read_head(reader)
            assert status == "HTTP/1.1 200 OK"
            assert await reader.readexactly(int(headers["content-length"])) == b"hi /p"
            answered += 1
            if headers.get("connection") == "close":
                break
        assert await reader.read() == b""
    assert answered == h1server.MAX_PIPELINED
    writer.close()
    # The gateway goes on serving (the client sends the rest again).
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
    _, headers = await read_head(reader)
    assert await reader.readexactly(int(headers["content-length"])) == b"hi /again"
    writer.close()


async def test_a_lost_body_raises_a_new_error_each_read_and_keeps_no_frame() -> None:
    # The stored exception must not gather readany's frame in a traceback:
    # that is a reference cycle through the body (and its buffered chunks)
    # that only the collector's oldest generation frees (gateway/wire/heap.py).
    body = Body(None)
    lost = ConnectionResetError("the client connection was lost")
    body.set_exception(lost)
    raised = []
    for _ in range(2):
        with pytest.raises(ConnectionResetError, match="was lost") as info:
            await body.readany()
        raised.append(info.value)
    assert lost.__traceback__ is None
    assert raised[0] is not raised[1]
