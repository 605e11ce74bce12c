"""The request and response objects of the proxy listener's HTTP/1.1 server.

`Request` (with its `Body`) is what the proxy handler reads; `ResponseWriter`
frames what it writes back (head held to join the first body bytes, bodies
by Content-Length, chunked, or the connection's end for HTTP/1.0); `Reply` is
a whole small response the server writes for the handler. The connection
they belong to is h1server.py's `Connection`, seen here only through the
`ClientConnection` protocol, so that this module does not import the server.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.core.errors import GatewayError, json_body
from gateway.core.headers import encode_head

# Field names looked up in every request or response, as multidict `istr`s:
# a lookup by one skips folding the name's case (half the cost of a str key).
# Setting a field by one stores the same name as its str spelling would.
CONTENT_LENGTH: Final = istr("Content-Length")
TRANSFER_ENCODING: Final = istr("Transfer-Encoding")
_DATE: Final = istr("Date")
_CONNECTION: Final = istr("Connection")

# RFC 9110 10.1.1: the interim answer to `Expect: 100-continue`.
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Interim responses are not written while this much output waits for a
# client that is not reading: a target's 64 KiB of 1xx heads (h1client's cap)
# would otherwise grow into several times that here, per request.
_INTERIM_HIGH: Final = 64 * 1024
# A request body buffer above this pauses reading the client socket; the
# handler's next read (which takes the whole buffer) resumes it. Once the
# handler reads the body, data that finds it busy (sending the last piece to
# a target that does not keep up) pauses the socket at once, whatever the
# size: a slow target's uploads hold one read each here, the rest waits in
# the kernel (bench/slow_streams.py --op upload --target-rate: this alone
# cost 850-940 KiB of RSS per upload). A body nobody reads (pipelined, or
# answered unread: OPTIONS *) is parsed up to this, so that a small one
# reaches its end and the connection can go on: 512 KiB, the 256 KiB this
# was plus the one 256 KiB read that used to go past it before h1server
# sized its reads (READ_MAX), so that what ends in time stays the same. The
# request being handled holds at most _HANDLED_HIGH before its handler
# reads: what the handler reads at once, a target that does not keep up
# holds in our memory. One smallest read (h1server READ_MIN): at 64 KiB, 64
# fast uploads to a stalled target cost 140-148 KiB of RSS each (the first
# piece stays unsent in the target's transport), at 16 KiB under 128.
_BODY_HIGH: Final = 512 * 1024
#: The largest room a body has (h1server sizes its reads by it).
BODY_HIGH: Final = _BODY_HIGH
_HANDLED_HIGH: Final = 16 * 1024
#: Why a connection stopped reading (Connection.pause_reading's bits).
PAUSE_BODY: Final = 1
PAUSE_QUEUE: Final = 2
PAUSE_HANDOVER: Final = 4
PAUSE_UPGRADE: Final = 8  # a WebSocket upgrade waits for the target's answer


class ClientConnection(Protocol):
    """What the request and response objects need of their connection."""

    transport: asyncio.Transport | None
    remote: str
    #: The connection came through a TLS listener (X-Forwarded-Proto: https).
    secure: bool
    closing_after_response: bool
    last_batch: bool
    #: Why the server aborted the connection ("drain"), for the access log.
    cut: str | None

    def queued(self) -> int: ...
    def write_blocked(self) -> bool: ...
    async def drain(self, stall_timeout: float | None = None) -> None: ...
    def pause_reading(self, reason: int) -> None: ...
    def read_more(self) -> None: ...
    def read_less(self) -> None: ...
    def resume_reading(self, reason: int) -> None: ...
    def hand_over_body(self, request: Request) -> tuple[bytes, int]: ...
    def body_spliced(self, request: Request) -> None: ...
    def take_tunnel(self, request: Request) -> ClientTunnel: ...


class SendTimeout(ConnectionError):
    """The client took none of a response for `send_timeout` seconds.

    nginx's `send_timeout`: a client that stops reading holds its connection,
    the target's and their buffers; after this long without progress the
    connection is aborted like one the client reset (and the target's closed,
    never pooled).
    """


class Body:
    """A request body as it arrives, read with `readany()` (aiohttp's StreamReader API).

    Buffered bytes pause the client socket above `_BODY_HIGH`; the handler's
    reads, which take the whole buffer, resume it.
    """

    __slots__ = (
        "_chunks", "_conn", "_eof", "_exc", "_high", "_read", "_size", "_waiter", "total_bytes",
    )  # fmt: skip

    def __init__(self, conn: ClientConnection | None) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = conn is None
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._read = False  # the handler has begun reading (see _BODY_HIGH)
        self._high = _BODY_HIGH
        self.total_bytes = 0

    def feed_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.total_bytes += len(data)
        conn = self._conn
        if conn is not None:
            waiter = self._waiter
            if waiter is None:
                # Nobody waits: the handler is busy with what it read (its
                # target has not taken it), or does not read yet. The rest
                # waits in the kernel, and reads shrink (h1server READ_MIN).
                if self._read or self._size > self._high:
                    conn.read_less()
                    conn.pause_reading(PAUSE_BODY)
            elif waiter.done():
                # Woken by an earlier piece and yet to run: busy too, but
                # not slow (a read of several chunks, or libuv's next read).
                conn.pause_reading(PAUSE_BODY)
            else:
                conn.read_more()  # it was waiting for this: it keeps up
                if self._size > self._high:
                    conn.pause_reading(PAUSE_BODY)
        self._wake()

    def room(self) -> int:
        """What may still be buffered before reading pauses (`_BODY_HIGH`)."""
        return self._high - self._size

    def handled(self) -> None:
        """Its request's handler runs from now (see _HANDLED_HIGH)."""
        self._high = _HANDLED_HIGH
        if self._size > _HANDLED_HIGH and self._conn is not None:
            self._conn.pause_reading(PAUSE_BODY)

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def is_eof(self) -> bool:
        return self._eof

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def read_nowait(self) -> bytes:
        """Everything buffered, as a whole; b"" if nothing is."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        if self._conn is not None:
            self._conn.resume_reading(PAUSE_BODY)
        return data

    def discard(self) -> None:
        """Drop what is buffered unread, and let the socket be read again."""
        if self._chunks:
            self._chunks.clear()
            self._size = 0
            if self._conn is not None:
                self._conn.resume_reading(PAUSE_BODY)

    async def readany(self) -> bytes:
        """The bytes buffered now, waiting for some; b"" at the end of the body."""
        self._read = True
        while not self._chunks:
            exc = self._exc
            if exc is not None:
                # A new exception per raise: the stored one would gather this
                # frame into its traceback, a reference cycle (body, exception,
                # traceback, frame, body) that keeps the buffered chunks until
                # the collector's oldest generation runs.
                raise type(exc)(*exc.args)
            if self._eof:
                return b""
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        data = self.read_nowait()
        return data


_NO_BODY: Final = Body(None)


class Request:
    """One parsed request head and its body; what the proxy handler reads."""

    __slots__ = (
        "body_exists",
        "connection",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "remote",
        "secure",
        "transport",
        "upgrade_tail",
        "version",
        "websocket",
        "writer",
    )

    def __init__(
        self,
        conn: ClientConnection,
        method: str,
        raw_path: str,
        version: tuple[int, int],
        headers: CIMultiDict[str],
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
    ) -> None:
        self.connection = conn
        self.transport: asyncio.Transport | None = conn.transport
        self.remote = conn.remote
        self.secure = conn.secure
        #: A GET asking to switch to WebSocket (Connection: upgrade, Upgrade:
        #: websocket, HTTP/1.1): the server parses nothing after it until
        #: the handler has answered (see h1server `_upgrade_pending`).
        self.websocket = False
        #: Bytes the client sent after this request's head (tunnel data).
        self.upgrade_tail = b""
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(headers)
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.body_exists = chunked or bool(content_length)
        self.content = Body(conn) if self.body_exists else _NO_BODY
        self.writer = ResponseWriter(conn, self)


class Reply:
    """A whole small response (an error, a preflight): written by the server."""

    __slots__ = ("body", "close", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: CIMultiDict[str] | None = None,
        *,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.headers: CIMultiDict[str] = headers if headers is not None else CIMultiDict()
        self.close = close


def json_reply(error: GatewayError, rid: str, close: bool = True) -> Reply:
    """The contract's JSON error body, with the request id in body and header."""
    headers: CIMultiDict[str] = CIMultiDict(error.headers)
    for challenge in error.challenges:
        headers.add("WWW-Authenticate", challenge)
    headers["Content-Type"] = "application/json"
    headers["X-Request-ID"] = rid
    # Framing of anything after a refused message cannot be trusted
    # (RFC 9112 11.2, request smuggling): close unless told otherwise.
    return Reply(error.status, json_body(error, rid), headers, close=close)


_date_second = -1
_date_text = ""


def http_date() -> str:
    """The Date header value, formatted once per second (a plain function:
    cheaper to call than an instance's __call__)."""
    global _date_second, _date_text
    now = int(time.time())
    if now != _date_second:
        _date_text = formatdate(now, usegmt=True)
        _date_second = now
    return _date_text


class ResponseWriter:
    """Writes one response: head (held to join the first body bytes, if asked),
    body framed by Content-Length, chunked, or the connection's end (HTTP/1.0)."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_continue_done",
        "_empty",
        "_held",
        "_request",
        "eof_sent",
        "interim",
        "keep_alive",
        "output_size",
        "send_timeout",
        "started",
        "status",
    )

    def __init__(self, conn: ClientConnection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self._held: bytes | None = None
        self._chunked = False
        self._empty = False
        self._continue_done = False
        self.eof_sent = False
        self.interim = 0  # interim (1xx) heads written before this response
        self.keep_alive = request.keep_alive
        self.output_size = 0
        self.status = 0
        #: The head is framed (`status` set): an attribute, not a property
        #: computed from `status`, since the handler asks once per request.
        self.started = False
        #: How long the client may take none of the response before the
        #: connection is aborted (SendTimeout); None waits for ever. The
        #: handler sets it (`server.client_timeout`).
        self.send_timeout: float | None = None

    def start(
        self,
        status: int,
        reason: str,
        headers: CIMultiDict[str],
        *,
        hold: bool = False,
    ) -> None:
        """Frame and serialize the head; send it now unless `hold` (then the
        first `write`/`write_eof` carries it)."""
        request = self._request
        version = request.version
        conn = self._conn
        if (
            conn.closing_after_response
            or (request.body_exists and not request.content.is_eof())
            or (conn.last_batch and not conn.queued())
        ):
            # Draining, answered before the body was read whole, or the last
            # of a pipeline cut at MAX_PIPELINED: the connection ends after
            # this response; say so.
            self.keep_alive = False
        # RFC 9110 6.4.1: no body after 1xx, 204, 304 or a HEAD's response.
        empty = request.method == "HEAD" or status in (204, 304) or status < 200
        self._empty = empty
        if empty:
            if status == 204 or status < 200:
                headers.popall(CONTENT_LENGTH, None)
            headers.popall(TRANSFER_ENCODING, None)
        elif CONTENT_LENGTH in headers:
            headers.popall(TRANSFER_ENCODING, None)
        elif version >= (1, 1):
            self._chunked = True
            headers["Transfer-Encoding"] = "chunked"
        else:
            self.keep_alive = False  # HTTP/1.0: the body ends with the connection
        if _DATE not in headers:
            # RFC 9110 6.6.1: a recipient with a clock adds Date when forwarding.
            headers["Date"] = http_date()
        if not self.keep_alive:
            if version >= (1, 1):
                headers["Connection"] = "close"
            else:
                headers.popall(_CONNECTION, None)
        elif version < (1, 1):
            headers["Connection"] = "keep-alive"
        if version == (1, 1):
            status_line = f"HTTP/1.1 {status} {reason}"
        else:
            status_line = f"HTTP/{version[0]}.{version[1]} {status} {reason}"
        head = encode_head(status_line, headers.items())
        self.status = status
        self.started = True
        if hold:
            self._held = head
        else:
            self._send(head)

    def send_continue(self) -> None:
        """The `100 Continue` an HTTP/1.1 client with a body and
        `Expect: 100-continue` waits for (RFC 9110 10.1.1), at most once.

        The caller invites the body only when it is about to read it, so that
        an upload refused first (413, 429, 503) is never sent; a retry that
        reads it again must not write a second 100."""
        if self._continue_done:
            return
        self._continue_done = True
        request = self._request
        if (
            request.body_exists
            and request.version >= (1, 1)
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            transport = request.transport
            if transport is not None:
                transport.write(_CONTINUE)

    def send_interim(self, status: int, reason: str, headers: CIMultiDict[str]) -> bool:
        """Write an interim (1xx) response now, ahead of the final one; whether
        it was written. Never raises for the client's state.

        RFC 9110 15.2: not to an HTTP/1.0 client (it cannot tell the 1xx from
        the answer), so for one this writes nothing. `headers` are a 1xx's
        own, already stripped of hop-by-hop fields: no Content-Length or
        Transfer-Encoding is added (nor kept: a 1xx has no body, RFC 9112
        6.3). Also nothing once the client is gone or has
        `_INTERIM_HIGH` bytes unread (the 1xx is advice; the final response
        follows), or when a field holds a CR or LF. 100 (the writer's own,
        `send_continue`) and 101 (a protocol switch, not interim) are no
        interim responses to relay: refused like a final head already begun.
        """
        if self.status != 0 or self._held is not None:
            raise RuntimeError("an interim response after the final head")
        if not 102 <= status <= 199:
            raise ValueError(f"not an interim response to relay: {status}")
        request = self._request
        if request.version < (1, 1):
            return False
        transport = self._conn.transport
        if (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() > _INTERIM_HIGH
        ):
            return False
        headers.popall("Content-Length", None)
        headers.popall("Transfer-Encoding", None)
        try:
            head = encode_head(f"HTTP/1.1 {status} {reason}", headers.items())
        except ValueError:
            return False  # a CR or LF inside a field: not forwarded
        self.output_size += len(head)
        self.interim += 1
        transport.write(head)
        return True

    def abort(self) -> None:
        """End the connection at once, without a proper end of the body: the
        only honest signal left when a response that began cannot be finished
        (no final chunk, a short Content-Length), and the way to cancel a
        request whose socket the server no longer reads."""
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    def _send(self, data: bytes) -> None:
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        self.output_size += len(data)
        transport.write(data)

    def _flush_head(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._send(held)

    async def write(self, data: bytes, on_wait: Callable[[], None] | None = None) -> None:
        """One piece of the body; waits while the client is not reading.

        `on_wait` is called first when it will wait: the source of the body
        stops reading ahead (h1client's `hold()`) while the client is slow.
        """
        if self._empty or not data:
            self._flush_head()
            return
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        held, self._held = self._held, None
        self._send(held + data if held is not None else data)
        if on_wait is not None and self._conn.write_blocked():
            on_wait()
        await self._conn.drain(self.send_timeout)

    async def write_eof(self, data: bytes = b"") -> None:
        """The last piece (maybe none) and the end of the body."""
        if self.eof_sent:
            return
        self.eof_sent = True
        held, self._held = self._held, None
        out = held or b""
        if data and not self._empty:
            out += b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if self._chunked else data
        elif self._chunked and not self._empty:
            out += b"0\r\n\r\n"
        conn = self._conn
        if out:
            transport = conn.transport  # _send, inline: once per response
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client connection is closed")
            self.output_size += len(out)
            transport.write(out)
        if conn.write_blocked():  # drain() returns at once otherwise: no coroutine
            await conn.drain(self.send_timeout)

    def spliced(self, count: int) -> None:
        """`count` body bytes went to the client's socket behind our back."""
        self.output_size += count

    def switch_protocols(self, headers: CIMultiDict[str]) -> None:
        """Send `101 Switching Protocols` with `headers`: the response is
        whole, and the connection is the tunnel's from here to its close."""
        version = self._request.version
        status_line = f"HTTP/{version[0]}.{version[1]} 101 Switching Protocols"
        head = encode_head(status_line, headers.items())
        self.status = 101
        self.started = True
        self.keep_alive = False
        self.eof_sent = True
        self._send(head)

    def send_reply(self, reply: Reply) -> int:
        """A whole small response in one write; returns the body bytes sent
        (none after a HEAD, or with a 204 or 304)."""
        if reply.close:
            self.keep_alive = False
        headers = reply.headers
        if reply.body or CONTENT_LENGTH not in headers:
            headers["Content-Length"] = str(len(reply.body))
        self.start(reply.status, reason_phrase(reply.status), headers, hold=True)
        self.eof_sent = True
        held, self._held = self._held, None
        assert held is not None
        if reply.body and not self._empty:
            self._send(held + reply.body)
            return len(reply.body)
        self._send(held)
        return 0


class ClientTunnel:
    """The client's side of a tunnel, after the 101 went out.

    `read()` returns what the client sent (b"" once it closed its side;
    ConnectionResetError if the connection broke); `write()` + `drain()`
    send with backpressure. The socket is paused while more than
    `_BODY_HIGH` bytes wait unread, as for a request body.
    """

    __slots__ = ("_conn", "inbox")

    def __init__(self, conn: ClientConnection, inbox: Body) -> None:
        self._conn = conn
        self.inbox = inbox

    async def read(self) -> bytes:
        return await self.inbox.readany()

    def write(self, data: bytes) -> None:
        transport = self._conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        transport.write(data)

    async def drain(self) -> None:
        await self._conn.drain(None)

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    def pause(self) -> None:
        """Stop reading the socket (a zero-copy relay reads it instead)."""
        self._conn.pause_reading(PAUSE_HANDOVER)

    def resume(self) -> None:
        self._conn.resume_reading(PAUSE_HANDOVER)


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
