"""gateway.h1client against real aiohttp servers and raw servers misbehaving on cue."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gateway.wire.h1client import (
    MAX_BUFFERED,
    READ_AHEAD_MIN,
    ConnectionPool,
    H1BodyError,
    H1ConnectError,
    H1ProtocolError,
    H1ReadError,
    H1ReadTimeout,
    H1Response,
    H1ServerDisconnected,
    _reason,
    serialize_head,
)
from tests.conftest import UpstreamFactory, wait_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HOST = "127.0.0.1"


class RawServer:
    """An asyncio server running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # cancelled at close(): ends quietly, not as a "cancelled" task
        finally:
            self._tasks.discard(task)
            writer.close()

    async def read_head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await self._server.wait_closed()
        await asyncio.sleep(0)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    connections = ConnectionPool()
    yield connections
    await connections.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def factory(handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


async def get(
    pool: ConnectionPool,
    port: int,
    path: str = "/",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: AsyncIterator[bytes] | None = None,
    content_length: int | None = None,
    read_timeout: float = 5.0,
) -> H1Response:
    return await pool.request(
        method,
        HOST,
        port,
        path,
        headers if headers is not None else [("Host", "upstream")],
        body,
        content_length,
        5.0,
        read_timeout,
    )


async def read_all(response: H1Response) -> bytes:
    parts = []
    while chunk := await response.read_chunk():
        parts.append(chunk)
    return b"".join(parts)


async def fetch(pool: ConnectionPool, port: int, **kwargs: object) -> tuple[H1Response, bytes]:
    response = await get(pool, port, **kwargs)  # type: ignore[arg-type]
    body = await read_all(response)
    response.release()
    return response, body


async def gen(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


def answer(response: bytes, count: int = 100) -> Handler:
    """A raw handler answering `response` to each of up to `count` requests."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(count):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()

    return handler


# -- against aiohttp's server ---------------------------------------------------------


def echo_app() -> web.Application:
    transports: set[int] = set()

    async def echo(request: web.Request) -> web.StreamResponse:
        transports.add(id(request.transport))
        body = await request.read()
        return web.Response(
            body=body,
            headers={
                "X-Method": request.method,
                "X-Path": request.raw_path,
                "X-Chunked": str(request.headers.get("Transfer-Encoding") == "chunked"),
                "X-Connections": str(len(transports)),
            },
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def test_get_reuses_one_keep_alive_connection(
    pool: ConnectionPool, start_upstream: UpstreamFactory
) -> None:
    server = await start_upstream(echo_app())
    assert server.port is not None
    for _ in range(5):
        response, body = await fetch(pool, server.port, path="/a/%2F..?q=1&")
        assert response.status == 200
        assert response.reason == "OK"
        assert response.headers["X-Path"] == "/a/%2F..?q=1&"
        assert response.headers["X-Connections"] == "1"
        assert body == b""
    assert (pool.open_count, pool.idle_count) == (1, 1)


async def test_post_with_content_length_streams_the_body_as_is(
    pool: ConnectionPool, start_upstream: UpstreamFactory
) -> None:
    server = await start_upstream(echo_app())
    assert server.port is not None
    response, body = await fetch(
        pool,
        server.port,
        method="POST",
        headers=[("Host", "x"), ("Content-Length", "11")],
        body=gen(b"hello", b" ", b"world"),
        content_length=11,
    )
    assert (response.status, body, response.headers["X-Chunked"]) == (200, b"hello world", "False")
    assert pool.idle_count == 1


async def test_post_without_length_goes_chunked(
    pool: ConnectionPool, start_upstream: UpstreamFactory
) -> None:
    server = await start_upstream(echo_app())
    assert server.port is not None
    big = bytes(range(256)) * 1024  # above the one-write framing threshold
    response, body = await fetch(
        pool, server.port, method="PUT", body=gen(b"a", b"", big, b"z"), content_length=None
    )
    assert (response.status, response.headers["X-Chunked"]) == (200, "True")
    assert body == b"a" + big + b"z"


async def test_head_sends_only_the_callers_fields_and_framing(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    server: RawServer

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_head(reader)
        data = await reader.readuntil(b"0\r\n\r\n")
        server.heads.append(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await reader.read()

    server = await raw(handler)
    headers = [("Host", "api.example"), ("X-Dup", "1"), ("x-dup", "2"), ("X-Utf8", "caf\xe9")]
    response, _ = await fetch(
        pool, server.port, method="POST", path="/p?", headers=headers, body=gen(b"abc")
    )
    assert response.status == 200
    assert server.heads == [
        b"POST /p? HTTP/1.1\r\nHost: api.example\r\nX-Dup: 1\r\nx-dup: 2\r\n"
        b"X-Utf8: caf\xc3\xa9\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"3\r\nabc\r\n0\r\n\r\n",
    ]


def test_a_field_with_cr_or_lf_is_refused() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        serialize_head("GET", "/", [("X-A", "1\r\nX-Injected: 1")], False)
    with pytest.raises(ValueError, match="CR or LF"):
        serialize_head("GET", "/", [("X-A", "1\rx")], False)
    assert serialize_head("GET", "/", [], False) == b"GET / HTTP/1.1\r\n\r\n"


# -- response framing --------------------------------------------------------------


async def test_headers_keep_order_duplicates_and_bytes(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    server = await raw(
        answer(
            b"HTTP/1.1 299 Custom Thing\r\nSet-Cookie: a=1\r\nX-Name: caf\xc3\xa9\r\n"
            b"set-cookie: b=2\r\nContent-Length: 2\r\n\r\nok"
        )
    )
    response, body = await fetch(pool, server.port)
    assert (response.status, response.reason, body) == (299, "Custom Thing", b"ok")
    assert list(response.headers.items()) == [
        ("Set-Cookie", "a=1"),
        ("X-Name", "caf\xe9"),
        ("set-cookie", "b=2"),
        ("Content-Length", "2"),
    ]


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ],
)
async def test_interim_responses_are_skipped(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]], interim: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(interim)
            await writer.drain()
            await asyncio.sleep(0.01)  # the interim response arrives alone
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nend")

    server = await raw(handler)
    for _ in range(2):
        response, body = await fetch(pool, server.port)
        assert (response.status, body) == (200, b"end")
        assert "Link" not in response.headers
    assert server.connections == 1


async def test_interim_responses_but_100_reach_on_interim_in_order_before_the_final_head(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    seen: list[tuple[int, str, list[tuple[str, str]]]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            )
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"HTTP/1.1 199\r\nX-Odd: 1\r\nContent-Length: 0\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nend")

    server = await raw(handler)
    for _ in range(2):
        seen.clear()
        response = await pool.request(
            "GET", HOST, server.port, "/", [("Host", "u")], None, None, 5.0, 5.0,
            on_interim=lambda status, reason, fields: seen.append((status, reason, fields)),
        )  # fmt: skip
        assert [status for status, _, _ in seen] == [102, 103, 199]
        assert seen[1] == (103, "Early Hints", [("Link", "</a.css>; rel=preload")])
        assert seen[2] == (199, "", [("X-Odd", "1"), ("Content-Length", "0")])
        assert (response.status, await read_all(response)) == (200, b"end")
        assert "Link" not in response.headers
        assert "X-Odd" not in response.headers
        response.release()
    assert server.connections == 1


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 199 Odd\r\nContent-Length: 5\r\n\r\nHTTP/",
        b"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 099 Zero\r\n\r\n",
    ],
    ids=["199 with a body", "103 content-length", "103 chunked", "100 content-length", "099"],
)
async def test_an_interim_response_with_body_framing_or_a_bad_code_is_refused(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]], interim: bytes
) -> None:
    # RFC 9112 6.3: a 1xx ends at its empty line; llhttp reads a body after
    # the codes it does not know. The framing is ambiguous: never guessed.
    seen: list[int] = []
    server = await raw(answer(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    with pytest.raises(H1ProtocolError):
        await pool.request(
            "GET", HOST, server.port, "/", [("Host", "u")], None, None, 5.0, 5.0,
            on_interim=lambda status, reason, fields: seen.append(status),
        )  # fmt: skip
    assert seen == []
    assert pool.open_count == 0


async def test_head_response_with_content_length_has_no_body_and_reuses(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
        await reader.read()

    server = await raw(handler)
    for method in ("HEAD", "HEAD"):
        response, body = await fetch(pool, server.port, method=method)
        assert (response.status, body) == (200, b"")
        assert pool.idle_count == 1
    response, body = await fetch(pool, server.port)
    assert body == b"body"
    assert server.connections == 1


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses_end_at_the_head(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]], status: int
) -> None:
    server = await raw(answer(b'HTTP/1.1 %d X\r\nETag: "e"\r\n\r\n' % status))
    for _ in range(3):
        response, body = await fetch(pool, server.port)
        assert (response.status, body) == (status, b"")
    assert server.connections == 1


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
        # Transfer-Encoding: gzip (close-delimited per RFC 9112 6.3) is a 502
        # now: see tests/test_hostile_upstreams.py.
    ],
)
async def test_close_delimited_body_ends_at_eof_and_is_not_reused(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]], head: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + b"all of")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b" it")
        await writer.drain()

    server = await raw(handler)
    response = await get(pool, server.port)
    assert await read_all(response) == b"all of it"
    response.release()
    assert pool.open_count == 0
    _, body = await fetch(pool, server.port)
    assert body == b"all of it"
    assert server.connections == 2


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
    ],
)
async def test_a_connection_the_target_ends_is_not_reused(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]], head: bytes
) -> None:
    server = await raw(answer(head + b"ok"))
    for _ in range(2):
        _, body = await fetch(pool, server.port)
        assert body == b"ok"
        assert pool.idle_count == 0
    assert server.connections == 2


async def test_http10_keep_alive_is_reused(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    server = await raw(
        answer(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
    )
    for _ in range(2):
        _, body = await fetch(pool, server.port)
        assert body == b"ok"
    assert server.connections == 1


async def test_chunked_response_with_extensions_and_trailers(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    server = await raw(
        answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5;name=value;flag\r\nhello\r\n6;x="q;y"\r\n world\r\n0;end=1\r\n'
            b"X-Trailer: t\r\n\r\n"
        )
    )
    for _ in range(2):
        response, body = await fetch(pool, server.port)
        assert body == b"hello world"
        assert "X-Trailer" not in response.headers
    assert server.connections == 1


async def test_an_incompletely_read_response_is_not_pooled(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    size = 4 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            writer.write(b"x" * size)
            await writer.drain()

    server = await raw(handler)
    response = await get(pool, server.port)
    assert await response.read_chunk()
    response.release()  # not read to the end: closed, never pooled
    assert (pool.open_count, pool.idle_count) == (0, 0)
    response, body = await fetch(pool, server.port)
    assert len(body) == size
    assert server.connections == 2
    assert pool.idle_count == 1


async def test_unsolicited_bytes_after_a_response_end_reuse(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    server = await raw(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"))
    for _ in range(2):
        _, body = await fetch(pool, server.port)
        assert body == b"ok"
    assert server.connections == 2


async def test_a_pooled_connection_closed_by_the_target_is_replaced(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    # Keep-alive announced, then closed while idle (its own idle timeout).
    server = await raw(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", count=1))
    _, body = await fetch(pool, server.port)
    assert body == b"ok"
    await wait_for(lambda: pool.open_count == 0)
    _, body = await fetch(pool, server.port)
    assert body == b"ok"
    assert server.connections == 2


def close_on_second_request(server_ref: list[RawServer], partial: bytes = b"") -> Handler:
    """The first connection answers one request with keep-alive, then closes
    (after sending `partial`) once the next request head is in; later ones answer."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = server_ref[0]
        first = server.connections == 1
        await server.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await server.read_head(reader)
        if first:
            writer.write(partial)
            writer.close()  # the keep-alive timer fired as the request came
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()

    return handler


async def test_a_reused_connection_closed_before_any_answer_is_retried_once(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    ref: list[RawServer] = []
    ref.append(await raw(close_on_second_request(ref)))
    server = ref[0]
    for _ in range(2):
        response, body = await fetch(pool, server.port, path="/again")
        assert (response.status, body) == (200, b"ok")
    assert server.connections == 2
    assert [head.split(b"\r\n", 1)[0] for head in server.heads] == [
        b"GET /again HTTP/1.1"
    ] * 3  # once, then the retried one twice
    assert (pool.open_count, pool.idle_count) == (1, 1)


async def test_a_fresh_connection_closed_before_any_answer_is_not_retried(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    server: RawServer

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_head(reader)  # then closed, unanswered

    server = await raw(handler)
    with pytest.raises(H1ServerDisconnected):
        await get(pool, server.port)
    assert (server.connections, len(server.heads)) == (1, 1)
    assert pool.open_count == 0


async def test_a_reused_connection_closed_after_response_bytes_is_not_retried(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    ref: list[RawServer] = []
    ref.append(await raw(close_on_second_request(ref, partial=b"HTTP/1.1 200 O")))
    server = ref[0]
    await fetch(pool, server.port)
    with pytest.raises(H1ServerDisconnected):
        await get(pool, server.port)
    assert (server.connections, len(server.heads)) == (1, 2)
    assert pool.open_count == 0


async def test_a_non_idempotent_request_is_not_retried(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    """The target may have acted on it before closing (RFC 9112 9.3.1)."""
    ref: list[RawServer] = []
    ref.append(await raw(close_on_second_request(ref)))
    server = ref[0]
    await fetch(pool, server.port)
    with pytest.raises(H1ServerDisconnected):
        await get(pool, server.port, method="POST")
    assert (server.connections, len(server.heads)) == (1, 2)


@pytest.mark.parametrize("yielded", [True, False])
async def test_a_reused_connection_closed_once_the_body_was_asked_for_is_not_retried(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]], yielded: bool
) -> None:
    """A body chunk yielded cannot be sent again; a pending ask, once
    cancelled, ends the source (a retry would send an empty body)."""
    ref: list[RawServer] = []
    ref.append(await raw(close_on_second_request(ref)))
    server = ref[0]
    asked = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        asked.set()
        if yielded:
            yield b"abc"
        await asyncio.sleep(30)
        yield b"never"

    await fetch(pool, server.port)
    with pytest.raises(H1ServerDisconnected):
        await get(pool, server.port, method="PUT", body=body())
    assert asked.is_set()
    assert (server.connections, len(server.heads)) == (1, 2)
    assert pool.open_count == 0


async def test_idle_connections_close_after_the_idle_timeout(
    raw: Callable[[Handler], Awaitable[RawServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.wire.h1client._SWEEP_EVERY", 0.05)
    pool = ConnectionPool(idle_timeout=0.1)
    try:
        server = await raw(answer(b"HTTP/1.1 204 No Content\r\n\r\n"))
        await fetch(pool, server.port)
        assert pool.idle_count == 1
        await wait_for(lambda: pool.open_count == 0)
        assert pool.idle_count == 0
    finally:
        await pool.close()


# -- failures before and after the head --------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nBad\r\n\r\n"],
)
async def test_garbage_before_the_head_is_a_protocol_error(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]], garbage: bytes
) -> None:
    server = await raw(answer(garbage))
    with pytest.raises(H1ProtocolError):
        await get(pool, server.port)
    assert pool.open_count == 0


async def test_an_oversized_head_is_a_protocol_error(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(1000):
            writer.write(b"X-Filler: " + b"f" * 1000 + b"\r\n")
            await writer.drain()

    server = await raw(handler)
    with pytest.raises(H1ProtocolError, match="too large"):
        await get(pool, server.port)


@pytest.mark.parametrize("use_rst", [False, True])
async def test_reset_or_eof_before_the_head(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]], use_rst: bool
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if use_rst:
            reset(writer)
        else:
            writer.write(b"HTTP/1.1 200 O")  # half a head, then FIN

    server = await raw(handler)
    with pytest.raises(H1ServerDisconnected):
        await get(pool, server.port)
    assert pool.open_count == 0


@pytest.mark.parametrize("use_rst", [False, True])
async def test_reset_mid_body_is_a_read_error(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]], use_rst: bool
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await writer.drain()
        await asyncio.sleep(0.05)
        if use_rst:
            reset(writer)

    server = await raw(handler)
    response = await get(pool, server.port)
    assert await response.read_chunk() == b"first"
    with pytest.raises(H1ReadError):
        await response.read_chunk()
    response.release()
    assert pool.open_count == 0


async def test_a_bad_chunk_mid_body_is_a_read_error(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"zz\r\n")
        await reader.read()

    server = await raw(handler)
    response = await get(pool, server.port)
    assert await response.read_chunk() == b"ok"
    with pytest.raises(H1ReadError):
        await response.read_chunk()
    response.close()
    assert pool.open_count == 0


async def test_a_head_followed_by_garbage_in_one_packet_fails_the_request(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    # Nothing reached the client yet: better a 502 than a truncated response.
    server = await raw(
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n")
    )
    with pytest.raises(H1ReadError):
        await get(pool, server.port)
    assert pool.open_count == 0


async def test_silence_before_the_head_is_a_read_timeout(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()

    server = await raw(handler)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(H1ReadTimeout):
        await get(pool, server.port, read_timeout=0.2)
    assert 0.19 <= loop.time() - started < 2.0
    assert pool.open_count == 0


async def test_silence_between_body_pieces_is_a_read_timeout(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        for piece in (b"ab", b"cd", b"ef"):
            await asyncio.sleep(0.1)  # each gap is within the timeout
            writer.write(piece)
        await reader.read()

    server = await raw(handler)
    response = await get(pool, server.port, read_timeout=0.3)
    received = [await response.read_chunk() for _ in range(3)]
    assert received == [b"ab", b"cd", b"ef"]
    with pytest.raises(H1ReadTimeout):
        await response.read_chunk()
    response.close()


async def test_a_slow_upload_is_not_cut_by_the_read_timeout(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"0\r\n\r\n")
        await asyncio.sleep(0.1)  # within the timeout, counted from the body's end
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        await reader.read()

    async def slow() -> AsyncIterator[bytes]:
        for _ in range(10):
            await asyncio.sleep(0.05)  # 0.5 s in all, the timeout is 0.2 s
            yield b"piece"

    server = await raw(handler)
    response = await get(pool, server.port, method="POST", body=slow(), read_timeout=0.2)
    assert response.status == 201
    response.release()
    assert pool.idle_count == 1


async def test_a_target_that_stops_reading_the_body_is_a_read_timeout(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    closed = asyncio.Event()
    sent = 0
    size = 64 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)  # accepts, never reads, never answers

    async def upload() -> AsyncIterator[bytes]:
        nonlocal sent
        piece = b"u" * 65536
        try:
            while sent < size:
                sent += len(piece)
                yield piece
        finally:
            closed.set()

    server = await raw(handler)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(H1ReadTimeout, match="took none of the request body"):
        async with asyncio.timeout(5):
            await get(
                pool,
                server.port,
                method="POST",
                headers=[("Host", "x"), ("Content-Length", str(size))],
                body=upload(),
                content_length=size,
                read_timeout=0.5,
            )
    assert loop.time() - started < 2.0
    async with asyncio.timeout(5):
        await closed.wait()
    assert sent < size
    assert (pool.open_count, pool.idle_count) == (0, 0)
    assert server.connections == 1


async def test_a_target_reading_the_body_slowly_is_not_cut(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    size = 32 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        left = size
        while left:
            await asyncio.sleep(0.2)  # each stall within the timeout, 0.8 s in all
            burst = min(left, 8 * 1024 * 1024)
            left -= burst
            await reader.readexactly(burst)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await reader.read()

    async def upload() -> AsyncIterator[bytes]:
        piece = b"s" * (1024 * 1024)
        for _ in range(size // len(piece)):
            yield piece

    server = await raw(handler)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await get(
        pool, server.port, method="POST", body=upload(), content_length=size, read_timeout=0.3
    )
    assert response.status == 204
    assert loop.time() - started > 0.6  # much longer than the timeout in all
    response.release()
    assert pool.idle_count == 1


async def test_connect_refused(pool: ConnectionPool) -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(H1ConnectError) as caught:
            await get(pool, port)
    assert caught.value.timed_out is False


async def test_connect_timeout(pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def never(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(60)

    monkeypatch.setattr(loop, "create_connection", never)
    with pytest.raises(H1ConnectError) as caught:
        await pool.request("GET", HOST, 9, "/", [], None, None, 0.05, 5.0)
    assert caught.value.timed_out is True


# -- request bodies ----------------------------------------------------------------


@pytest.mark.parametrize(("declared", "chunks"), [(10, (b"12345",)), (3, (b"12", b"34"))])
async def test_a_body_that_breaks_its_content_length_aborts(
    pool: ConnectionPool,
    raw: Callable[[Handler], Awaitable[RawServer]],
    declared: int,
    chunks: tuple[bytes, ...],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()

    server = await raw(handler)
    with pytest.raises(H1BodyError, match="Content-Length"):
        await get(pool, server.port, method="POST", body=gen(*chunks), content_length=declared)
    assert pool.open_count == 0


async def test_a_failing_body_source_aborts_the_request(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()

    async def failing() -> AsyncIterator[bytes]:
        yield b"some"
        raise RuntimeError("client went silent")

    server = await raw(handler)
    with pytest.raises(H1BodyError) as caught:
        await get(pool, server.port, method="POST", body=failing())
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert pool.open_count == 0


async def test_an_early_answer_arrives_while_the_body_is_still_sent(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    closed = asyncio.Event()
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        piece = b"u" * 65536
        try:
            while True:
                sent += len(piece)
                yield piece
        finally:
            closed.set()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(1000)
        # Refuse without reading the rest (and keep the socket open).
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await writer.drain()
        await asyncio.sleep(30)

    server = await raw(handler)
    declared = 1 << 40
    response = await get(pool, server.port, method="PUT", body=endless(), content_length=declared)
    assert response.status == 413
    assert await read_all(response) == b"big!"
    response.release()  # body unfinished: the connection is not reusable
    async with asyncio.timeout(5):
        await closed.wait()
    assert pool.open_count == 0
    assert sent < 64 * 1024 * 1024  # write backpressure held the source back


async def test_download_backpressure_pauses_reading(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    size = 32 * 1024 * 1024
    written = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        piece = b"d" * 262144
        while written < size:
            writer.write(piece)
            written += len(piece)
            await writer.drain()

    server = await raw(handler)
    response = await get(pool, server.port)
    await asyncio.sleep(0.3)  # nobody reads: the socket must stop being read
    conn = response._conn
    assert conn is not None
    assert conn._buffered <= MAX_BUFFERED
    assert written < size
    total = 0
    while chunk := await response.read_chunk():
        total += len(chunk)
    assert total == size
    response.release()
    assert pool.idle_count == 1


async def test_data_and_a_due_timer_in_one_iteration_do_not_time_out(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    """asyncio runs I/O callbacks before due timers: a body piece may complete
    the waiter just before the timer runs, the reader not resumed yet."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        await reader.read()

    server = await raw(handler)
    response = await get(pool, server.port, read_timeout=5.0)
    conn = response._conn
    assert conn is not None
    task = asyncio.create_task(response.read_chunk())
    await wait_for(lambda: conn._waiter is not None)
    # One loop iteration, as the loop runs it: the data, then the due timer.
    conn.on_body(b"data")
    conn._deadline = asyncio.get_running_loop().time() - 1.0
    conn._on_timer()
    assert conn._error is None
    async with asyncio.timeout(5):
        assert await task == b"data"
    assert conn.usable()
    response.close()


# -- cancellation ------------------------------------------------------------------


async def test_cancelling_while_waiting_for_the_head_closes_the_connection(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    arrived = asyncio.Event()
    eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        assert await reader.read() == b""
        eof.set()

    server = await raw(handler)
    task = asyncio.create_task(get(pool, server.port))
    async with asyncio.timeout(5):
        await arrived.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(5):
        await eof.wait()
    assert pool.open_count == 0


async def test_cancelling_a_body_read_closes_the_connection(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        assert await reader.read() == b""
        eof.set()

    server = await raw(handler)
    response = await get(pool, server.port)
    assert await response.read_chunk() == b"ab"
    task = asyncio.create_task(response.read_chunk())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(5):
        await eof.wait()
    response.release()
    assert pool.open_count == 0


async def test_cancelling_during_an_upload_stops_the_body(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    closed = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x"
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()

    server = await raw(handler)
    task = asyncio.create_task(get(pool, server.port, method="POST", body=slow()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(5):
        await closed.wait()
    assert pool.open_count == 0


async def test_a_closed_pool_refuses_and_closes_what_is_left(
    raw: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    pool = ConnectionPool()
    server = await raw(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    busy = await get(pool, server.port)
    await fetch(pool, server.port)
    assert (pool.open_count, pool.idle_count) == (2, 1)
    await pool.close()
    assert pool.open_count == 0
    busy.release()
    with pytest.raises(H1ConnectError):
        await get(pool, server.port)


async def test_host_names_are_resolved_and_cached() -> None:
    """`localhost` goes through aiodns once, then the cache answers."""
    from gateway.wire.h1client import _CachingResolver

    resolver = _CachingResolver()
    try:
        first = await resolver.resolve("localhost", 80)
        assert "127.0.0.1" in first or "::1" in first
        assert await resolver.resolve("127.0.0.1", 80) == ("127.0.0.1",)
        assert await resolver.resolve("::1", 80) == ("::1",)
        real, resolver._resolver = resolver._resolver, None
        # A second lookup would make a new resolver; the cache answers instead.
        assert await resolver.resolve("localhost", 80) == first
        assert resolver._resolver is None
        assert real is not None
        await real.close()
    finally:
        await resolver.close()


async def test_a_target_named_by_host_name_is_reached(
    pool: ConnectionPool, start_upstream: UpstreamFactory
) -> None:
    """`localhost` resolves (to ::1 and/or 127.0.0.1); the one that answers serves."""
    server = await start_upstream(echo_app())
    assert server.port is not None
    response = await pool.request(
        "GET", "localhost", server.port, "/x", [("Host", "upstream")], None, None, 5.0, 5.0
    )
    assert response.status == 200
    assert await read_all(response) == b""
    response.release()


async def test_read_ahead_shrinks_for_a_slow_reader_and_grows_for_a_fast_one(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    size = 16 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        piece = b"d" * 262144
        written = 0
        while written < size:
            writer.write(piece)
            written += len(piece)
            await writer.drain()

    server = await raw(handler)
    response = await get(pool, server.port)
    total = 0
    slow: list[int] = []
    for _ in range(20):  # a reader busy elsewhere between reads: one small read waits
        await asyncio.sleep(0.005)
        chunk = await response.read_chunk()
        slow.append(len(chunk))
        total += len(chunk)
    assert max(slow[2:]) <= READ_AHEAD_MIN, slow
    fast = 0
    while chunk := await response.read_chunk():  # waiting for every read: it grows
        fast = max(fast, len(chunk))
        total += len(chunk)
    assert total == size
    assert READ_AHEAD_MIN < fast <= MAX_BUFFERED
    response.release()


async def test_a_plain_response_to_an_upgrade_request_is_not_pooled(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    # The request said "Connection: upgrade": a target that answered with a
    # plain keep-alive response instead is not trusted with another request.
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await server.read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
            await writer.drain()

    server = await raw(plain)
    response = await pool.request(
        "GET",
        HOST,
        server.port,
        "/",
        [("Host", "x"), ("Connection", "upgrade"), ("Upgrade", "websocket")],
        None,
        None,
        5.0,
        5.0,
        upgrade=True,
    )
    assert (response.status, await read_all(response)) == (200, b"no")
    response.release()
    assert (pool.open_count, pool.idle_count) == (0, 0)
    # The next request, a plain one, goes on a fresh connection.
    _, body = await fetch(pool, server.port)
    assert (body, server.connections) == (b"no", 2)


def test_a_reason_phrase_is_replaced_exactly_when_it_holds_a_control_byte() -> None:
    # _reason's fast path (str.isprintable) must agree with RFC 9112 4's
    # rule for every byte, alone and inside UTF-8 sequences.
    allowed = {0x09, *range(0x20, 0x7F), *range(0x80, 0x100)}
    samples = [bytes([byte]) for byte in range(256)]
    samples += ["é".encode(), "\u2028".encode(), "\u00a0".encode(), b"\xc3", b"\xff\x00"]
    for sample in samples:
        raw = b"A " + sample + b" Z"
        expected = raw.decode("utf-8", "surrogateescape")
        if not all(byte in allowed for byte in raw):
            expected = "OK"
        assert _reason(raw, 200) == expected, raw
    assert _reason(b"\x00", 299) == ""  # no standard phrase to fall back on


async def test_stray_bytes_the_loop_has_yet_to_read_end_reuse_when_the_connection_is_taken(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    # A forged response that reached the idle connection's socket since the
    # loop last read it: only the poll when it is taken from the pool can
    # tell, and the next request must not get it as its response.
    writers: list[asyncio.StreamWriter] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        for _ in range(2):
            await server.read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        await reader.read()

    server = await raw(handler)
    _, body = await fetch(pool, server.port)
    assert (body, pool.idle_count) == (b"ok", 1)
    writers[0].transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
    # Blocking on purpose: the bytes arrive, and the loop does not run to read them.
    time.sleep(0.05)  # noqa: ASYNC251
    _, body = await fetch(pool, server.port)
    assert (body, server.connections) == (b"ok", 2)


async def test_header_bytes_that_are_not_utf8_survive_as_surrogate_escapes(
    pool: ConnectionPool, raw: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    # Strict UTF-8 first, surrogateescape when it fails: either way the
    # bytes go back out unchanged (encode "utf-8", "surrogateescape").
    server = await raw(
        answer(
            b"HTTP/1.1 200 OK\r\nX-Latin: caf\xe9\r\nX-Raw: \xed\xa0\x80\r\n"
            b"X-Utf8: caf\xc3\xa9\r\nContent-Length: 2\r\n\r\nok"
        )
    )
    response, body = await fetch(pool, server.port)
    assert body == b"ok"
    fields = list(response.headers.items())
    assert fields[:3] == [
        ("X-Latin", "caf\udce9"),
        ("X-Raw", "\udced\udca0\udc80"),
        ("X-Utf8", "caf\xe9"),
    ]
    assert [
        (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        for name, value in fields[:2]
    ] == [(b"X-Latin", b"caf\xe9"), (b"X-Raw", b"\xed\xa0\x80")]
