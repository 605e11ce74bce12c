"""Hostile upstreams over raw sockets: CONTRACT.md "On the wire", the target's side.

Each upstream here is a tiny asyncio (or, once, threaded) server on 127.0.0.1
writing exact bytes; the gateway is the real one, reached over raw sockets.
Three classes, several payloads each:

1. Stray bytes after the end of a response (same read, a later read, while
   idle in the pool; Content-Length, chunked, HEAD, 204/304): the connection
   is closed, never reused, and the next client gets its own response.
2. Endless or oversized heads and trailers: a head over 64 KiB or 128 fields
   is a 502; a trailer that never ends aborts the client's transfer, and the
   gateway keeps serving others meanwhile.
3. Framing the gateway cannot relay faithfully (a transfer coding other than
   chunked alone, Content-Length with Transfer-Encoding, bad or differing
   Content-Lengths): a 502, and the upstream connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from gateway.wire.h1client import ConnectionPool, H1Response
from tests.conftest import GatewayFactory, RunningGateway, UpstreamFactory, wait_for
from tests.wire import read_head

HOST = "127.0.0.1"
# A bound on what a hostile upstream writes and for how long, and the most
# it may write before the gateway cuts it: the caps are 64 KiB, but loopback
# socket buffers (autotuned up to a few MiB each way) take bytes the gateway
# never read.
STREAM_LIMIT = 32 * 1024 * 1024
STREAM_SECONDS = 20.0
CUT_BEFORE = 16 * 1024 * 1024
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"

# One connection of a hostile upstream: (reader, writer, the upstream).
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Hostile"], Awaitable[None]]


@dataclass
class Hostile:
    """A raw upstream running `script` per connection, with what it saw."""

    script: Script
    port: int = 0
    connections: int = 0
    requests: int = 0
    written: int = 0  # bytes of the endless stream the kernel took
    cut: bool = False  # the gateway closed the connection mid-stream
    closed_by_gateway: int = 0  # connections that saw EOF/reset from the gateway
    started: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> Hostile:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def next_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        return head

    async def await_close(self, reader: asyncio.StreamReader, within: float = 5.0) -> None:
        """Until the gateway closes this connection (EOF or reset), bounded."""
        async with asyncio.timeout(within):
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
        self.closed_by_gateway += 1

    async def stream(self, writer: asyncio.StreamWriter, unit: bytes) -> None:
        """Write `unit` over and over, until the gateway cuts it (bounded)."""
        deadline = time.monotonic() + STREAM_SECONDS
        try:
            while self.written < STREAM_LIMIT and time.monotonic() < deadline:
                writer.write(unit)
                await writer.drain()
                self.written += len(unit)
                if self.written >= 16384:
                    self.started.set()
        except ConnectionError:
            self.cut = True
        self.started.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await self._server.wait_closed()
        await asyncio.sleep(0)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    clean: bool  # the body ended as framed (not cut short)


async def ask(gw: RunningGateway, path: str, method: str = "GET", within: float = 15.0) -> Reply:
    """One request on a new raw connection; the reply as framed, or cut short."""
    reader, writer = await asyncio.open_connection(gw.host, gw.port, limit=1 << 20)
    try:
        async with asyncio.timeout(within):
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            for _ in range(10_000):
                status_line, headers = await read_head(reader)
                status = int(status_line.split()[1])
                if status >= 200:
                    break  # 1xx relayed ahead of it (CONTRACT.md "Interim responses") skipped
            else:
                raise AssertionError("no final response")
            body = b""
            clean = True
            try:
                if method == "HEAD" or status in (204, 304):
                    pass
                elif "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding") == "chunked":
                    body = await read_chunked(reader)
                else:
                    body = await reader.read()
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                clean = False
                if isinstance(exc, asyncio.IncompleteReadError):
                    body = exc.partial
            return Reply(status, headers, body, clean)
    finally:
        writer.transport.abort()


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    for _ in range(100000):
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    raise AssertionError("too many chunks")


def assert_bad_gateway(reply: Reply) -> None:
    assert reply.status == 502, reply
    assert json.loads(reply.body)["error"] == "bad_gateway"


@pytest.fixture
async def hostile() -> AsyncIterator[Callable[[Script], Awaitable[Hostile]]]:
    started: list[Hostile] = []

    async def factory(script: Script) -> Hostile:
        upstream = await Hostile(script).start()
        started.append(upstream)
        return upstream

    yield factory
    for upstream in started:
        await upstream.close()


async def gateway_for(
    make_gateway: GatewayFactory, upstream: Hostile, healthy_port: int = 0
) -> RunningGateway:
    healthy = (
        f"""
        [upstreams.healthy]
        targets = ["http://127.0.0.1:{healthy_port}"]

        [[routes]]
        name = "healthy"
        path = "/healthy"
        upstream = "healthy"
        """
        if healthy_port
        else ""
    )
    return await make_gateway(
        f"""
        [upstreams.hostile]
        targets = ["http://127.0.0.1:{upstream.port}"]
        {healthy}
        [[routes]]
        name = "all"
        path = "/"
        upstream = "hostile"
        read_timeout = 10.0
        """
    )


# -- 1. stray bytes after the end of a response ------------------------------------

STRAY = {
    "partial forged head": b"HTTP/1.1 302 Found\r\nLocation: http://evil.example/?",
    "partial status line": b"HTTP/1.1 30",
    "whole forged response": b"HTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\n"
    b"Content-Length: 0\r\n\r\n",
    "one garbage byte": b"X",
}
RESPONSES = {
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst", 200, b"first"),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nfi\r\n3\r\nrst\r\n0\r\n\r\n",
        200,
        b"first",
    ),
    "chunked with trailers": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\nX-T: 1\r\n\r\n",
        200,
        b"first",
    ),
    "204": (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
    "304": (b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n', 304, b""),
}


def stray_script(first: bytes, stray: bytes, idle: bool) -> Script:
    """The first request overall gets `first` and `stray` (in one write, or
    later, once the gateway has pooled the connection); every other one an
    honest `SECOND`."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        for _ in range(10):
            await upstream.next_request(reader)
            if upstream.requests > 1:
                writer.write(SECOND)
                await writer.drain()
                continue
            if idle:
                writer.write(first)
                await writer.drain()
                await asyncio.sleep(0.1)  # the gateway has relayed it and pooled us
                writer.write(stray)
            else:
                writer.write(first + stray)
            await writer.drain()
            upstream.started.set()

    return script


async def assert_next_client_gets_its_own_response(
    gw: RunningGateway, upstream: Hostile, method: str, status: int, body: bytes
) -> None:
    reply = await ask(gw, "/one", method)
    assert (reply.status, reply.body, reply.clean) == (status, body, True)
    async with asyncio.timeout(5):
        await upstream.started.wait()
    await asyncio.sleep(0.05)  # the stray bytes reach the gateway
    reply = await ask(gw, "/two")
    assert (reply.status, reply.body) == (200, b"second"), reply
    assert "location" not in reply.headers
    assert upstream.connections == 2  # the first connection was never reused


@pytest.mark.parametrize("stray", STRAY.values(), ids=STRAY.keys())
@pytest.mark.parametrize("response", RESPONSES.values(), ids=RESPONSES.keys())
@pytest.mark.parametrize("idle", [False, True], ids=["same-read", "idle-in-pool"])
async def test_stray_bytes_after_a_response_close_its_connection(
    make_gateway: GatewayFactory,
    hostile: Callable[[Script], Awaitable[Hostile]],
    stray: bytes,
    response: tuple[bytes, int, bytes],
    idle: bool,
) -> None:
    first, status, body = response
    upstream = await hostile(stray_script(first, stray, idle))
    gw = await gateway_for(make_gateway, upstream)
    await assert_next_client_gets_its_own_response(gw, upstream, "GET", status, body)


HEAD_RESPONSES = {
    "its content-length body": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "a chunked body": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "a last chunk alone": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "a forged head": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" + STRAY["partial forged head"],
}


@pytest.mark.parametrize("first", HEAD_RESPONSES.values(), ids=HEAD_RESPONSES.keys())
@pytest.mark.parametrize("idle", [False, True], ids=["same-read", "idle-in-pool"])
async def test_a_response_to_head_with_a_body_closes_its_connection(
    make_gateway: GatewayFactory,
    hostile: Callable[[Script], Awaitable[Hostile]],
    first: bytes,
    idle: bool,
) -> None:
    # RFC 9110 9.3.2: a response to HEAD ends at its head; anything after it
    # is stray, whatever its Content-Length or Transfer-Encoding announced.
    head, _, rest = first.partition(b"\r\n\r\n")
    upstream = await hostile(stray_script(head + b"\r\n\r\n", rest, idle))
    gw = await gateway_for(make_gateway, upstream)
    await assert_next_client_gets_its_own_response(gw, upstream, "HEAD", 200, b"")


async def test_an_http10_response_with_transfer_encoding_is_not_reused(
    make_gateway: GatewayFactory, hostile: Callable[[Script], Awaitable[Hostile]]
) -> None:
    # RFC 9112 6.1: faulty framing, so the connection closes after it, even
    # with keep-alive announced.
    first = (
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nfirst\r\n0\r\n\r\n"
    )
    upstream = await hostile(stray_script(first, b"", idle=False))
    gw = await gateway_for(make_gateway, upstream)
    await assert_next_client_gets_its_own_response(gw, upstream, "GET", 200, b"first")


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    connections = ConnectionPool()
    yield connections
    await connections.close()


async def get(pool: ConnectionPool, port: int) -> H1Response:
    return await pool.request("GET", HOST, port, "/", [("Host", "u")], None, None, 5.0, 5.0)


async def read_all(response: H1Response) -> bytes:
    parts = []
    while chunk := await response.read_chunk():
        parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("stray", STRAY.values(), ids=STRAY.keys())
async def test_stray_bytes_after_the_body_was_read_close_it_before_its_release(
    pool: ConnectionPool, hostile: Callable[[Script], Awaitable[Hostile]], stray: bytes
) -> None:
    go = asyncio.Event()

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        for _ in range(10):
            await upstream.next_request(reader)
            if upstream.requests > 1:
                writer.write(SECOND)
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            await writer.drain()
            async with asyncio.timeout(5):
                await go.wait()
            writer.write(stray)
            await writer.drain()

    upstream = await hostile(script)
    response = await get(pool, upstream.port)
    assert await read_all(response) == b"first"
    go.set()  # the stray bytes come while the response is read but not released
    await wait_for(lambda: pool.open_count == 0)  # closed at once
    response.release()
    second = await get(pool, upstream.port)
    assert (second.status, await read_all(second)) == (200, b"second")
    second.release()
    assert upstream.connections == 2


class ThreadedUpstream:
    """A blocking upstream in a thread: it can write while the loop is blocked."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(5.0)
        self.port = self.listener.getsockname()[1]
        self.go = threading.Event()
        self.sent = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sockets = []
        try:
            for index in range(2):
                conn, _ = self.listener.accept()
                sockets.append(conn)
                conn.settimeout(5.0)
                self.connections += 1
                self._recv_head(conn)
                if index == 0:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                    if not self.go.wait(5.0):
                        return
                    conn.sendall(STRAY["partial forged head"])
                    self.sent.set()
                    # If the gateway reuses this connection, answer honestly:
                    # the stray bytes alone would make it a 302.
                    conn.settimeout(0.5)
                    with contextlib.suppress(OSError):
                        if self._recv_head(conn):
                            conn.sendall(SECOND)
                else:
                    conn.sendall(SECOND)
        except OSError:
            pass
        finally:
            self.sent.set()
            for conn in sockets:
                conn.close()

    @staticmethod
    def _recv_head(conn: socket.socket) -> bytes:
        data = b""
        for _ in range(1000):
            part = conn.recv(65536)
            if not part:
                return data
            data += part
            if b"\r\n\r\n" in data:
                return data
        return data

    def close(self) -> None:
        self.go.set()
        self.listener.close()
        self.thread.join(10.0)


async def test_bytes_that_reached_an_idle_connection_unread_are_seen_before_its_reuse(
    pool: ConnectionPool,
) -> None:
    upstream = ThreadedUpstream()
    try:
        response = await get(pool, upstream.port)
        assert await read_all(response) == b"first"
        response.release()
        assert pool.idle_count == 1
        upstream.go.set()
        # Blocking on purpose: the loop does not run, so the stray bytes wait
        # in the socket, unread, when the next request takes the connection.
        assert upstream.sent.wait(5.0)
        time.sleep(0.05)  # noqa: ASYNC251 - the point of the test
        second = await get(pool, upstream.port)
        assert (second.status, await read_all(second)) == (200, b"second")
        second.release()
        assert upstream.connections == 2
    finally:
        await asyncio.to_thread(upstream.close)


# -- 2. endless and oversized heads and trailers ------------------------------------

TRAILERS = {
    "one endless value": (b"0\r\nX-Trailer: ", b"a" * 4096),
    "one endless name": (b"0\r\n", b"b" * 4096),
    "endless small fields": (b"0\r\n", b"X-T: 1\r\n" * 512),
    "endless large fields": (b"0\r\n", b"X-T: " + b"c" * 4000 + b"\r\n"),
    "an endless chunk extension": (b"1;ext=", b"e" * 4096),
}


@pytest.mark.parametrize(("prefix", "unit"), TRAILERS.values(), ids=TRAILERS.keys())
async def test_an_endless_trailer_aborts_the_transfer_and_others_are_served_meanwhile(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    hostile: Callable[[Script], Awaitable[Hostile]],
    prefix: bytes,
    unit: bytes,
) -> None:
    relayed = asyncio.Event()

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        await upstream.next_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            await relayed.wait()  # the response has begun: its status is gone
        writer.write(prefix)
        await upstream.stream(writer, unit)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    app = web.Application()
    app.router.add_get("/healthy", ok)
    healthy = await start_upstream(app)
    upstream = await hostile(script)
    assert healthy.port is not None
    gw = await gateway_for(make_gateway, upstream, healthy.port)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        async with asyncio.timeout(10):
            writer.write(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
            status_line, headers = await read_head(reader)
            assert status_line.startswith("HTTP/1.1 200")
            assert headers["transfer-encoding"] == "chunked"
            assert await reader.readuntil(b"\r\n") == b"5\r\n"
            assert await reader.readexactly(7) == b"hello\r\n"
            relayed.set()
            await upstream.started.wait()
        began = time.monotonic()
        probe = await ask(gw, "/healthy", within=5.0)
        assert (probe.status, probe.body) == (200, b"fine")
        assert time.monotonic() - began < 2.0
        async with asyncio.timeout(STREAM_SECONDS + 5):
            with contextlib.suppress(ConnectionError):
                rest = await reader.read()  # EOF or reset: never the final chunk
        assert b"0\r\n" not in rest
    finally:
        writer.transport.abort()
    assert upstream.cut, upstream.written
    assert upstream.written < CUT_BEFORE


TRAILERS_OVER = {
    "one 70 KiB value": b"X-Big: " + b"v" * 70_000 + b"\r\n",
    "66 fields of 1 KiB": b"".join(b"X-F%05d: %s\r\n" % (i, b"x" * 1011) for i in range(66)),
    "129 fields": b"X-T: 1\r\n" * 129,
}


@pytest.mark.parametrize("trailers", TRAILERS_OVER.values(), ids=TRAILERS_OVER.keys())
async def test_a_trailer_section_over_the_caps_is_never_relayed_as_a_clean_end(
    make_gateway: GatewayFactory, hostile: Callable[[Script], Awaitable[Hostile]], trailers: bytes
) -> None:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        await upstream.next_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
            + trailers
            + b"\r\n"
        )
        await writer.drain()
        await upstream.await_close(reader)

    upstream = await hostile(script)
    gw = await gateway_for(make_gateway, upstream)
    reply = await ask(gw, "/")
    # A 502 when it all came in one read (the response had not begun), else
    # an aborted transfer; never a clean end.
    if reply.status == 502:
        assert_bad_gateway(reply)
    else:
        assert (reply.status, reply.clean) == (200, False)
    await wait_for(lambda: upstream.closed_by_gateway == 1)


HEADS = {
    "endless fields": (b"HTTP/1.1 200 OK\r\n", b"X-Filler: " + b"f" * 1000 + b"\r\n"),
    "one endless value": (b"HTTP/1.1 200 OK\r\nX-Big: ", b"v" * 4096),
    "one endless name": (b"HTTP/1.1 200 OK\r\n", b"n" * 4096),
    "an endless reason phrase": (b"HTTP/1.1 200 ", b"r" * 4096),
    "endless small fields": (b"HTTP/1.1 200 OK\r\n", b"X-N: 1\r\n" * 512),
    "endless interim responses": (b"", b"HTTP/1.1 102 Processing\r\nX-P: 1\r\n\r\n" * 64),
}


@pytest.mark.parametrize(("prefix", "unit"), HEADS.values(), ids=HEADS.keys())
async def test_an_endless_head_is_a_502_and_the_target_is_cut_off(
    make_gateway: GatewayFactory,
    hostile: Callable[[Script], Awaitable[Hostile]],
    prefix: bytes,
    unit: bytes,
) -> None:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        await upstream.next_request(reader)
        writer.write(prefix)
        await upstream.stream(writer, unit)

    upstream = await hostile(script)
    gw = await gateway_for(make_gateway, upstream)
    assert_bad_gateway(await ask(gw, "/"))
    await wait_for(lambda: upstream.cut, within=STREAM_SECONDS)
    assert upstream.written < CUT_BEFORE


def fields(count: int, size: int) -> bytes:
    """`count` fields of `size` bytes each, ": " and CRLF included."""
    return b"".join(b"X-F%05d: %s\r\n" % (index, b"x" * (size - 13)) for index in range(count))


OK_LINE = b"HTTP/1.1 200 OK\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\n" + fields(40, 1024) + b"\r\n"
OVERSIZED = {
    "one 100 KiB value": OK_LINE + b"X-Big: " + b"v" * 100_000 + b"\r\n",
    "one 70 KiB name": OK_LINE + b"N" * 70_000 + b": 1\r\n",
    "66 fields of 1 KiB": OK_LINE + fields(66, 1024),
    "129 fields": OK_LINE + fields(129, 16),
    "1000 fields": OK_LINE + fields(1000, 16),
    # CONTRACT.md "Interim responses": their heads count toward the limit.
    "interim heads adding up": EARLY_HINTS * 2 + OK_LINE,
}


@pytest.mark.parametrize("head", OVERSIZED.values(), ids=OVERSIZED.keys())
@pytest.mark.parametrize("pieces", [1, 7], ids=["one-write", "in-pieces"])
async def test_a_head_over_the_caps_is_a_502_and_its_connection_closed(
    make_gateway: GatewayFactory,
    hostile: Callable[[Script], Awaitable[Hostile]],
    head: bytes,
    pieces: int,
) -> None:
    whole = head + b"Content-Length: 2\r\n\r\nok"

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        await upstream.next_request(reader)
        step = -(-len(whole) // pieces)
        try:
            for start in range(0, len(whole), step):
                writer.write(whole[start : start + step])
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            upstream.closed_by_gateway += 1  # cut off mid-head
            return
        await upstream.await_close(reader)

    upstream = await hostile(script)
    gw = await gateway_for(make_gateway, upstream)
    assert_bad_gateway(await ask(gw, "/"))
    await wait_for(lambda: upstream.closed_by_gateway == 1)


WITHIN = {
    "60 fields of 1 KiB": fields(60, 1024),
    "128 fields with the framing one": fields(127, 16),
    "one 60 KiB value": b"X-Big: " + b"v" * 60_000 + b"\r\n",
}


@pytest.mark.parametrize("extra", WITHIN.values(), ids=WITHIN.keys())
async def test_a_head_within_the_caps_is_relayed(
    make_gateway: GatewayFactory, hostile: Callable[[Script], Awaitable[Hostile]], extra: bytes
) -> None:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        for _ in range(10):
            await upstream.next_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\n"
                + extra
                + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
                + extra
                + b"\r\n"
            )
            await writer.drain()

    upstream = await hostile(script)
    gw = await gateway_for(make_gateway, upstream)
    for _ in range(2):
        reply = await ask(gw, "/")
        assert (reply.status, reply.body, reply.clean) == (200, b"ok", True)
    assert upstream.connections == 1  # heads and trailers this size are fine to reuse after


# -- 3. framing that cannot be relayed faithfully -----------------------------------

UNFAITHFUL = {
    "gzip, chunked": b"Transfer-Encoding: gzip, chunked\r\n",
    "chunked, chunked": b"Transfer-Encoding: chunked, chunked\r\n",
    "chunked twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "gzip then chunked fields": b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
    "identity": b"Transfer-Encoding: identity\r\n",
    "gzip alone": b"Transfer-Encoding: gzip\r\n",
    "chunked not last": b"Transfer-Encoding: chunked, gzip\r\n",
    "chunked with an empty element": b"Transfer-Encoding: chunked,\r\n",
    "an unknown coding": b"Transfer-Encoding: x-custom, chunked\r\n",
    "content-length and chunked": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    "chunked and content-length": b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    "differing content-lengths": b"Content-Length: 5\r\nContent-Length: 6\r\n",
    "repeated content-length": b"Content-Length: 5\r\nContent-Length: 5\r\n",
    "a content-length list": b"Content-Length: 5, 5\r\n",
    "a differing content-length list": b"Content-Length: 5, 6\r\n",
    "a signed content-length": b"Content-Length: +5\r\n",
    "a negative content-length": b"Content-Length: -1\r\n",
    "a hex content-length": b"Content-Length: 0x5\r\n",
    "an empty content-length": b"Content-Length: \r\n",
    "an overflowing content-length": b"Content-Length: 99999999999999999999999\r\n",
}


@pytest.mark.parametrize("framing", UNFAITHFUL.values(), ids=UNFAITHFUL.keys())
async def test_framing_the_gateway_cannot_relay_faithfully_is_a_502(
    make_gateway: GatewayFactory, hostile: Callable[[Script], Awaitable[Hostile]], framing: bytes
) -> None:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        await upstream.next_request(reader)
        # A gzip member, chunked: relayed de-chunked, it would reach the
        # client as raw gzip with no coding said.
        writer.write(
            b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n"
        )
        await writer.drain()
        await upstream.await_close(reader)

    upstream = await hostile(script)
    gw = await gateway_for(make_gateway, upstream)
    assert_bad_gateway(await ask(gw, "/"))
    await wait_for(lambda: upstream.closed_by_gateway == 1)  # closed, never pooled


FAITHFUL = {
    "chunked": b"Transfer-Encoding: chunked\r\n",
    "CHUNKED": b"Transfer-Encoding: CHUNKED\r\n",
    "chunked with spaces": b"Transfer-Encoding:  chunked \r\n",
    "content-length with a trailing space": b"Content-Length: 5 \r\n",
}


@pytest.mark.parametrize("framing", FAITHFUL.values(), ids=FAITHFUL.keys())
async def test_framing_the_gateway_can_relay_is_relayed_and_reused(
    make_gateway: GatewayFactory, hostile: Callable[[Script], Awaitable[Hostile]], framing: bytes
) -> None:
    body = b"hello" if b"Content-Length" in framing else b"5\r\nhello\r\n0\r\n\r\n"

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        for _ in range(10):
            await upstream.next_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n" + body)
            await writer.drain()

    upstream = await hostile(script)
    gw = await gateway_for(make_gateway, upstream)
    for _ in range(2):
        reply = await ask(gw, "/")
        assert (reply.status, reply.body, reply.clean) == (200, b"hello", True)
    assert upstream.connections == 1


# -- control bytes in a reason phrase ------------------------------------------------

# RFC 9112 4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ). llhttp lets
# these through; relayed, they would reach the client's status line.
HOSTILE_REASONS = {
    "nul": b"O\x00K",
    "escape sequence": b"\x1b[2J\x1b[31mOK",
    "del": b"OK\x7f",
    "soh": b"\x01OK",
    "vertical tab": b"O\x0bK",
}


@pytest.mark.parametrize("reason", HOSTILE_REASONS.values(), ids=HOSTILE_REASONS.keys())
async def test_a_reason_phrase_with_control_bytes_reaches_the_client_as_the_standard_one(
    make_gateway: GatewayFactory, hostile: Callable[[Script], Awaitable[Hostile]], reason: bytes
) -> None:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        for _ in range(10):
            await upstream.next_request(reader)
            writer.write(
                b"HTTP/1.1 103 " + reason + b"\r\nLink: </a.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 2\r\n\r\nok"
            )
            await writer.drain()

    upstream = await hostile(script)
    gw = await gateway_for(make_gateway, upstream)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        async with asyncio.timeout(10):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            interim = await reader.readuntil(b"\r\n\r\n")
            final = await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(2) == b"ok"
    finally:
        writer.transport.abort()
    assert interim.split(b"\r\n")[0] == b"HTTP/1.1 103 Early Hints"
    assert final.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"


async def test_a_reason_phrase_with_tab_and_obs_text_is_relayed_as_sent(
    make_gateway: GatewayFactory, hostile: Callable[[Script], Awaitable[Hostile]]
) -> None:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Hostile
    ) -> None:
        for _ in range(10):
            await upstream.next_request(reader)
            writer.write(b"HTTP/1.1 200 Tout\tva \xe9\xe9\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    upstream = await hostile(script)
    gw = await gateway_for(make_gateway, upstream)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        async with asyncio.timeout(10):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.transport.abort()
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 Tout\tva \xe9\xe9"
