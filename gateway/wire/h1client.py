"""A lean HTTP/1.1 client for proxying to http and https targets: asyncio + httptools.

aiohttp's ClientSession does much a proxy never needs (auto headers, cookies,
redirects, per-request timeout handles, connector bookkeeping): about a third
of the gateway's CPU per small request. This client does only what a proxy
hop needs (RFC 9112):

- https targets: asyncio's own TLS on the connection (`create_connection(ssl=,
  server_hostname=)`), SNI and certificate name = the target URL's host,
  verified against the system's trust store (`ssl.create_default_context()`,
  which honours OpenSSL's SSL_CERT_FILE / SSL_CERT_DIR), one context per pool.
  Pooled per (scheme, host, port) beside plain http; never spliced.

- One head serialized by hand into one `write()`; bodies framed as the caller
  says (`Content-Length` kept, else `Transfer-Encoding: chunked`), streamed
  with write backpressure, concurrently with waiting for the response head (a
  target may answer early, e.g. 413, before it read the whole body).
- Responses parsed by llhttp (`httptools`, as uvicorn does); 1xx interim
  responses handed to the caller's `on_interim` as they arrive (100 and 101
  never: see `on_headers_complete`), else skipped; bodies handed out chunk by
  chunk, read ahead by at most one read whose size follows the reader's pace
  (`READ_AHEAD_MIN` to `READ_AHEAD_MAX`), into one reused buffer per thread.
- Keep-alive: a connection goes back to its (host, port) stack (LIFO) only if
  the response ended cleanly, both sides kept it alive and the request body
  was sent whole; anything else (cancellation included) aborts it. So does
  any byte after the end of a response, in the same read, later, or while
  idle (polled once more when the connection is taken from the pool).
- Heads and trailers are bounded as client heads are (vetting.section_limit);
  framing that cannot be relayed faithfully (a transfer coding other than
  chunked alone) is refused like a malformed head.
- One read-timeout timer per connection: each wait stores a deadline, and the
  single `call_at` handle re-arms itself lazily when it fires early. A body
  write the target does not take for as long fails the same way (nginx's
  `proxy_send_timeout`).
- A reused connection the target closed just as it was reused (its keep-alive
  timer firing) is retried once on a fresh one, when the method is idempotent,
  nothing of the response arrived and nothing of the body was asked for
  (RFC 9112 9.3.1).

Errors are this module's own (`H1Error` and subclasses): the foreign ones
(OSError, ssl.SSLError, TimeoutError) are mapped in one place, `_mapped_errors`
(as httpcore's `map_exceptions`), so the proxy translates only these.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import select
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, cast

import httptools
from cachetools import TTLCache
from multidict import CIMultiDict, istr

from gateway.core.headers import encode_head
from gateway.wire import splice
from gateway.wire.readbuffer import ThreadReadBuffer
from gateway.wire.tls import ClientTLS
from gateway.wire.vetting import MAX_HEAD_BYTES, MAX_HEADERS, MAX_REQUEST_LINE, section_limit
from gateway.wire.writeflow import WriteFlow

if TYPE_CHECKING:
    import aiohttp

# Response read-ahead (bench/slow_streams.py). The socket is read into one
# buffer per thread, at most `_read_size` bytes at a time, and body bytes wait
# here only while the reader waits for them: data that finds the reader busy
# (its client has not taken the last piece: a slow client) pauses reading at
# once, so the rest stays in the kernel's socket buffers, which TCP flow
# control bounds, rather than in this process. A reader that keeps up (it was
# waiting when data came) doubles the read size up to READ_AHEAD_MAX, which
# a fast client needs (fewer reads per byte); one that falls behind takes it
# back to READ_AHEAD_MIN. A 1 MiB read-ahead before pausing cost 1.3-1.5 MiB
# of RSS per slow download; this holds at most one read per stream. A client
# that stalls after a fast start (loopback fills a 4 MiB send buffer at once)
# leaves up to one read in its transport and one here: with a 64 KiB maximum,
# 200 `curl --limit-rate 1M` downloads cost 132-140 KiB of RSS each, with
# 32 KiB 99 (bench/slow_streams.py, the same run), for 15 % of a fast copied
# download's MB/s (1 GiB, spliced downloads do not read here).
READ_AHEAD_MIN: Final = 16 * 1024
READ_AHEAD_MAX: Final = 32 * 1024
#: The most unread response body bytes a connection holds (one read).
MAX_BUFFERED: Final = READ_AHEAD_MAX
# Below the common upstream idle timeouts (aiohttp 75 s, nginx 75 s) so we
# close an idle connection before the target does.
IDLE_TIMEOUT: Final = 60.0
_SWEEP_EVERY: Final = 5.0
# Response heads (1xx heads included) and trailer sections are bounded as
# client heads are (vetting.section_limit: 64 KiB, 128 fields; CONTRACT.md
# "a head or trailer section over 64 KiB" is a 502). llhttp has no limit of
# its own, and httptools keeps a field cut by a read boundary, growing it by
# a copy per read: an endless trailer cost 61 s of CPU and grew the process
# from 141 to 580 MiB, stalling other requests for up to 22 s. So
# bytes fed without progress (no head, body data or message end) are capped
# too, as h1server caps them, whatever one read carries.
_MAX_STALLED: Final = MAX_HEAD_BYTES + MAX_REQUEST_LINE
#: Below this size a body piece is joined with its framing (a chunk size, a
#: response head, the final chunk) into one write: one copy, one segment.
#: Larger pieces go out on their own rather than be copied. The proxy joins
#: by the same rule, so `H1Response.ready()` reports "small" by it.
JOIN_BELOW: Final = 64 * 1024
#: A tunnel's unread bytes from the target above which its socket stops
#: being read: a client that reads slowly holds the target back, and the
#: gateway's memory per tunnel stays flat.
TUNNEL_BUFFERED: Final = 256 * 1024

#: Called with (status, reason, head fields) for each interim (1xx) response
#: but 100 and 101, synchronously from the parser, before the final head.
#: It must not raise (an exception would read as the target's garbage).
OnInterim = Callable[[int, str, list[tuple[str, str]]], None]

# RFC 9110 9.2.2: the methods a client may repeat on its own (RFC 9112 9.3.1).
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# A pool key: (scheme, host, port, TLS settings tag). Connections are
# interchangeable only within one key: http and https to the same host and
# port are not, nor https with two upstreams' different TLS settings.
_Key = tuple[str, str, int, str]
_Target = tuple[str, str, int]

_IDLE: Final = 0  # no request on the connection (pooled or fresh)
_HEAD: Final = 1  # request sent, response head not in yet
_BODY: Final = 2  # head handed out, body being read
_DONE: Final = 3  # response complete
_CLOSED: Final = 4
_TUNNEL: Final = 5  # 101 Switching Protocols: raw bytes both ways (WebSocket)


class H1Error(Exception):
    """Base of every error this client raises."""


class H1ConnectError(H1Error):
    """The TCP connect failed (refused, unreachable, DNS) or timed out."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class H1TLSError(H1ConnectError):
    """The TLS handshake failed: a certificate not trusted or not for the
    target's name, or a target that does not speak TLS. A connect failure."""

    def __init__(self, message: str) -> None:
        super().__init__(message, timed_out=False)


class H1ServerDisconnected(H1Error):
    """The target closed or reset the connection before a response head."""


class H1ProtocolError(H1Error):
    """The target sent something that is not an HTTP/1.x response."""


class H1ReadError(H1Error):
    """The response body ended early (reset, EOF, garbage)."""


class _Refused(Exception):
    """Raised from a parser callback to stop parsing: the response is refused."""


class _Stray(Exception):
    """Raised from a parser callback: bytes after the end of the response."""


class H1ReadTimeout(H1Error):
    """The target was silent for longer than the read timeout."""


class H1BodyError(H1Error):
    """The request body could not be sent whole (its source failed, or its
    length differed from the declared Content-Length)."""


def _decode(raw: bytes) -> str:
    # As aiohttp's parsers do: the bytes survive to the client unchanged.
    return raw.decode("utf-8", "surrogateescape")


# Looked up in every response head: as istr, multidict folds their case once
# here, not at each lookup.
_TRANSFER_ENCODING: Final = istr("Transfer-Encoding")
_CONTENT_LENGTH: Final = istr("Content-Length")

#: RFC 9112 4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ); llhttp
#: lets other control bytes (NUL, ESC, DEL, a bare CR) through.
_REASON_CTL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _reason(raw: bytes, status: int) -> str:
    """The target's reason phrase, or the standard one when it holds a
    control byte: relayed as sent, it would put that byte in the status line
    the client reads (a NUL cuts C strings; ESC reaches terminals)."""
    reason = _decode(raw)
    # A printable str holds no control character (all are category Cc, never
    # printable), and UTF-8 puts none inside a multi-byte sequence: the
    # common case is told by one C call, without the regex.
    if reason.isprintable() or _REASON_CTL.search(raw) is None:
        return reason
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def framing_problem(codings: Sequence[str], lengths: Sequence[str]) -> str | None:
    """Why a response's framing cannot be relayed faithfully, or None.

    `codings` and `lengths`: the head's Transfer-Encoding and Content-Length
    field values (`getall`), looked up once by the caller, which needs them too.

    CONTRACT.md: both Content-Length and Transfer-Encoding, or a transfer
    coding other than chunked, is a 502. llhttp refuses the first and bad or
    repeated Content-Lengths itself; it de-chunks "gzip, chunked" and would
    hand out gzip that the client, the header being hop-by-hop, never learns
    of, and it reads a body whose last coding is not chunked to EOF (RFC 9112
    6.3). RFC 9112 6.1: chunked is applied once, and last.
    """
    if codings:
        if lengths:
            return "both Content-Length and Transfer-Encoding"
        if len(codings) != 1 or codings[0].strip(" \t").lower() != "chunked":
            return f"transfer coding {', '.join(codings)!r} is not chunked alone"
    elif len(lengths) > 1:
        return "more than one Content-Length"
    elif lengths:
        length = lengths[0].strip(" \t")
        if not (length.isascii() and length.isdigit()):
            return f"invalid Content-Length {lengths[0]!r}"
    return None


def serialize_head(
    method: str,
    path_qs: str,
    headers: Collection[tuple[str, str]],
    chunked: bool,
) -> bytes:
    """The request line and header fields as one bytes object.

    Fields here passed the server's parser (llhttp): encode_head's CR/LF count
    is an assertion, not a filter.
    """
    if chunked:
        headers = [*headers, ("Transfer-Encoding", "chunked")]
    return encode_head(f"{method} {path_qs} HTTP/1.1", headers)


class DirectBody:
    """A request body that writes itself into the connection's socket.

    For a zero-copy upload (splice.py): `ConnectionPool.request` takes one in
    place of the chunk iterator. `pour` gets a duplicate of the connection's
    socket (its transport empty, the head flushed), owned by the caller and
    valid for the whole call, and must write exactly the request's
    Content-Length bytes; splice errors from the socket side are the target's
    (SinkFailed: it closed; SinkTimeout: it took nothing for `write_timeout`),
    any other exception is the body's own failure.
    """

    async def pour(self, sink: splice.SocketDup, write_timeout: float) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """Release what `pour` would have used, when it never ran; a no-op
        once it began (it then releases everything itself)."""


class H1Response:
    """One response: status and head at once, the body through `read_chunk()`.

    Its questions are answered from the connection's state directly (same
    module): a second call per question was measurable per request.
    """

    __slots__ = ("_conn", "headers", "reason", "status")

    def __init__(
        self, conn: _Connection, status: int, reason: str, headers: CIMultiDict[str]
    ) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.headers = headers

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its clean end."""
        conn = self._conn
        if conn is None:
            return b""
        if conn._chunks:  # here already (a small body): no second coroutine
            return conn.take_chunks()
        return await conn.read_chunk()

    def hold(self) -> None:
        """The reader is about to wait for its own client (a slow one): stop
        reading until it asks again, and ask again for little (see
        READ_AHEAD_MIN). Otherwise the socket would be read meanwhile, one
        read per stalled stream held here instead of in the kernel."""
        conn = self._conn
        if conn is not None:
            conn.hold()

    def ready(self) -> bool:
        """Whether `read_chunk()` would return at once, with a small piece.

        Small: the caller may join it with the head into one write (a copy).
        """
        conn = self._conn
        if conn is None:
            return True
        if conn._chunks:
            return conn._buffered < JOIN_BELOW
        return conn._state != _BODY or conn._error is not None

    def complete(self) -> bool:
        """Whether the body has been read to its clean end (nothing is left)."""
        conn = self._conn
        return conn is None or (conn._state == _DONE and not conn._chunks and conn._error is None)

    def unread(self) -> int:
        """Body bytes of a Content-Length response still in the socket (else 0)."""
        conn = self._conn
        return 0 if conn is None else conn.unread()

    def dup_socket(self) -> splice.SocketDup | None:
        """A duplicate of the connection's socket while a Content-Length body
        is being read, else None; the caller closes it."""
        conn = self._conn
        return None if conn is None else conn.dup_body_socket()

    def hand_over(self) -> tuple[bytes, int]:
        """Give the rest of a Content-Length body to a zero-copy relay.

        Returns the body bytes already read (to be sent first) and how many
        remain in the socket (`unread()`); reading stops until `spliced()`.
        """
        conn = self._conn
        assert conn is not None
        return conn.hand_over()

    def spliced(self) -> None:
        """The relay moved every remaining byte: the response is complete."""
        conn = self._conn
        if conn is not None:
            conn.spliced()

    def tunnel(self) -> UpstreamTunnel:
        """After a 101 to an upgrade request: the connection as a byte stream.

        It is never pooled again; the caller closes it (`UpstreamTunnel.close`)."""
        conn, self._conn = self._conn, None
        assert conn is not None
        assert conn._state == _TUNNEL
        return UpstreamTunnel(conn)

    def release(self) -> None:
        """Pool the connection if the exchange ended cleanly, else close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release()

    def close(self) -> None:
        """Abort the connection; it is never pooled."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()


# The target sockets' reads land here (see READ_AHEAD_MIN; readbuffer.py).
_READ_BUFFER: Final = ThreadReadBuffer(READ_AHEAD_MAX)


class _Connection(WriteFlow, asyncio.BufferedProtocol):
    """One TCP connection to a target and the exchange running on it."""

    # Slots: past 30 attributes CPython 3.11 gives up the instance's shared
    # key table, and every attribute read or write of the request path falls
    # back to a hashed lookup (LOAD_ATTR_WITH_HINT); a slot is an offset.
    __slots__ = (
        "_body_done",
        "_body_pulled",
        "_body_received",
        "_body_task",
        "_buffered",
        "_chunks",
        "_content_length",
        "_deadline",
        "_drain_size",
        "_error",
        "_fields",
        "_head_bytes",
        "_head_keep_alive",
        "_is_head",
        "_keep_alive",
        "_key",
        "_loop",
        "_made",
        "_on_interim",
        "_parser",
        "_poller",
        "_pool",
        "_progress",
        "_raw_headers",
        "_read_size",
        "_reading_paused",
        "_reason",
        "_response",
        "_section_size",
        "_stalled",
        "_state",
        "_timeout",
        "_timer",
        "_timer_at",
        "_tls",
        "_transport",
        "_tunnel_eof",
        "_upgrade",
        "_view",
        "_view_min",
        "_waiter",
        "idle_at",
        "reused",
        "target",
    )

    def __init__(self, pool: ConnectionPool, key: _Key) -> None:
        super().__init__()
        self._pool = pool
        self._key = key
        self.target: _Target = key[:3]  # (scheme, host, port): see ConnectionPool.retain
        # Zero-copy (splice.py) moves raw socket bytes: never on TLS, whose
        # bytes on the socket are records, not the body.
        self._tls = key[0] == "https"
        self._loop = asyncio.get_running_loop()
        # The read buffer of this thread, the loop's (a threading.local
        # lookup per read otherwise).
        self._view = _READ_BUFFER.view
        self._view_min = self._view[:READ_AHEAD_MIN]
        self._transport: asyncio.Transport | None = None
        self._made = False
        self._parser = httptools.HttpResponseParser(self)
        self._state = _IDLE
        self._error: H1Error | None = None
        # the exchange
        self._is_head = False
        self._on_interim: OnInterim | None = None
        self._reason = b""
        self._raw_headers: list[tuple[str, str]] = []
        self._head_bytes = 0  # raw bytes read while waiting for the head
        self._poller: select.poll | None = None  # see reusable()
        self._section_size = 0  # the heads so far (1xx included), or the trailers
        self._fields = 0  # fields of the head or trailer section being parsed
        self._stalled = 0  # bytes fed since the last progress (see _MAX_STALLED)
        self._progress = False
        self._response: H1Response | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._body_received = 0
        self._content_length: int | None = None
        self._head_keep_alive = False
        self._reading_paused = False
        self._read_size = READ_AHEAD_MIN
        self._keep_alive = False
        self._body_done = True
        self._body_pulled = False
        self._body_task: asyncio.Task[None] | None = None
        # waiting
        self._waiter: asyncio.Future[None] | None = None
        self._timeout = 60.0
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._drain_size = 0
        self.reused = False
        self.idle_at = 0.0
        self._upgrade = False  # the request asked to switch protocols (WebSocket)
        self._tunnel_eof = False

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._made:
            return  # already made: see ConnectionPool._connect
        self._made = True
        # uvloop's TCPTransport is no asyncio.Transport subclass, but has its API.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Small heads must not wait for Nagle (asyncio and uvloop set it
            # too; this makes sure on every loop).
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A request body's writer waits whenever anything is left unsent: a
        # slow target's backlog waits in the kernel's send buffer (autotuned),
        # not in this process (h1server's CLIENT_WRITE_HIGH, the same rule).
        # Not over TLS: asyncio's SSL transport counts bytes it has yet to
        # encrypt and flush, and a writer waiting for that to reach 0 can
        # wait for ever (an 8 MiB upload to an https target timed out).
        if not self._tls:
            with contextlib.suppress(AttributeError, ValueError):
                self._transport.set_write_buffer_limits(high=0)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._cancel_timer()
        state = self._state
        if state == _HEAD:
            self._set_error(H1ServerDisconnected("connection closed before a response"))
        elif state == _TUNNEL:
            if not self._tunnel_eof:
                self._set_error(H1ReadError("the target's tunnel connection was lost"))
        elif state == _BODY:
            if exc is None and self._error is None and self._close_delimited():
                # RFC 9112 6.3 item 8: the body ends where the connection does.
                self._state = _DONE
                self._keep_alive = False
            else:
                self._set_error(H1ReadError("connection lost before the end of the body"))
        self._wake()
        self._pool.forget(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        # libuv reads up to 32 times per readiness event: a read that comes
        # after one the reader has yet to take is sized to the room left
        # (at least READ_AHEAD_MIN), so the two hold about `_read_size`, not
        # twice it (the reader joins them into one piece it then writes).
        size = self._read_size - self._buffered
        if size <= READ_AHEAD_MIN:
            return self._view_min  # the common size, sliced once per connection
        return self._view[:size]  # at most READ_AHEAD_MAX, the buffer's size

    def buffer_updated(self, nbytes: int) -> None:
        # Every read lands here (a BufferedProtocol: no data_received), as a
        # view of the thread's one read buffer.
        data = self._view[:nbytes]
        state = self._state
        if state == _TUNNEL:
            # A copy: under uvloop `data` is a view of the one reused read buffer.
            self._tunnel_data(bytes(data))
            return
        if state != _HEAD and state != _BODY:
            # Nothing was asked (idle in the pool, or after a complete
            # response; no pipelining): the stream is out of step.
            self._stray()
            return
        if state == _HEAD:
            self._head_bytes += nbytes
        self._progress = False
        # The reader keeps up when it was waiting for this (see READ_AHEAD_MIN);
        # woken already (libuv reads up to 32 times per readiness event), it
        # merely has yet to run.
        waiter = self._waiter
        waiting = waiter is not None and not waiter.done()
        woken = waiter is not None and not waiting
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if isinstance(exc, httptools.HttpParserUpgrade) and self._state == _TUNNEL:
                # llhttp stops at the end of the 101's head: what follows in
                # this read is the target's first tunnel bytes.
                offset = exc.args[0] if exc.args else len(data)
                if offset < len(data):
                    self._tunnel_data(bytes(data[offset:]))  # a copy, as above
                return
            cause = exc.__context__
            if isinstance(cause, _Stray) or self._state not in (_HEAD, _BODY):
                # More after a complete response: its data is whole, but the
                # connection is out of step and never reused.
                self._stray()
                return
            why = str(cause) if isinstance(cause, _Refused) else str(exc)
            if self._state == _HEAD:
                self._fail(H1ProtocolError(f"invalid response from the target: {why}"))
            else:
                self._fail(H1ReadError(f"invalid response body: {why}"))
            return
        if self._chunks:
            if waiting:
                size = self._read_size * 2
                self._read_size = size if size < READ_AHEAD_MAX else READ_AHEAD_MAX
            else:
                if not woken:  # busy elsewhere: its client has not taken the last piece
                    self._read_size = READ_AHEAD_MIN
                self._pause_reading()  # until read_chunk takes what is here
        if self._progress:
            self._stalled = 0
            return
        # Bytes that completed no head, no body data, no message: a head,
        # trailers or chunk extensions, still going (see _MAX_STALLED).
        self._stalled += nbytes
        if self._stalled > _MAX_STALLED:
            if self._state == _HEAD:
                self._fail(H1ProtocolError("response head too large"))
            elif self._state == _BODY:
                self._fail(H1ReadError("response trailer section or chunk framing too large"))

    def _stray(self) -> None:
        """Bytes after the end of the response, or while idle: CONTRACT.md
        reuses a connection only after a well-framed exchange with nothing
        left over, so this one is closed. What the response had is kept."""
        self._keep_alive = False
        if self._state == _IDLE:
            self.abort()
        else:
            self._close_transport()
            self._wake()

    def eof_received(self) -> bool | None:
        if self._state == _TUNNEL:
            # The target is done sending; what it sent is still relayed, and
            # the socket stays open until the tunnel ends (flushing our side).
            self._tunnel_eof = True
            self._wake()
            return True
        return None  # close the transport; connection_lost decides what EOF meant

    def _tunnel_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > TUNNEL_BUFFERED:
            self._pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state != _HEAD:
            # A second message after the response (a HEAD's old parser, or
            # the same read): e.g. the start of a forged head that would
            # become the next request's response (CONTRACT.md: no stray bytes).
            raise _Stray

    def on_status(self, status: bytes) -> None:
        if self._state == _HEAD:
            self._reason += status  # cut by a read boundary: joined (bounded by _MAX_STALLED)

    def on_header(self, name: bytes, value: bytes) -> None:
        state = self._state
        if state != _HEAD and state != _BODY:
            return
        # A head's fields, or (in _BODY) chunked trailers: dropped, as
        # aiohttp's client does, but bounded as a head is (CONTRACT.md: a
        # trailer section over 64 KiB). The caps inline: a call per field is
        # measurable per request; the reason comes from vetting's one rule.
        fields = self._fields = self._fields + 1
        size = self._section_size = self._section_size + len(name) + len(value) + 4
        if size > MAX_HEAD_BYTES or fields > MAX_HEADERS:
            section = "response head" if state == _HEAD else "trailer section"
            raise _Refused(f"{section}: {section_limit(fields, size)}")
        if state == _HEAD:
            # Strict UTF-8 first: the same str for any valid input, and
            # bytes.decode() without arguments skips the codec lookup.
            try:
                field = (name.decode(), value.decode())
            except UnicodeDecodeError:
                field = (_decode(name), _decode(value))
            self._raw_headers.append(field)

    def on_headers_complete(self) -> None:
        if self._state != _HEAD:
            raise _Stray  # a second head after a HEAD's: out of step
        self._progress = True
        # The status line and the empty line count too, so that an endless
        # run of field-less 1xx heads meets the limit as well.
        self._section_size += len(self._reason) + 17
        if self._section_size > MAX_HEAD_BYTES:
            raise _Refused("response head: header section too large")
        self._fields = 0
        parser = self._parser
        status = parser.get_status_code()
        if status == 101 and self._upgrade:
            # RFC 9110 15.2.2: the target switched protocols as asked. The
            # head is handed out; llhttp then stops (HttpParserUpgrade) and
            # every later byte is the tunnel's, unparsed.
            self._response = H1Response(
                self, status, _reason(self._reason, status), CIMultiDict(self._raw_headers)
            )
            self._state = _TUNNEL
            self._keep_alive = False
            self._body_done = True
            self._wake()
            return
        if status < 200:
            self._interim(status)
            return
        headers = CIMultiDict(self._raw_headers)
        # Copied: the list is emptied for the next exchange, not replaced.
        self._raw_headers.clear()
        # () when absent: no list made for a field most heads lack.
        codings: Sequence[str] = headers.getall(_TRANSFER_ENCODING, ())
        lengths: Sequence[str] = headers.getall(_CONTENT_LENGTH, ())
        problem = framing_problem(codings, lengths)
        if problem is not None:
            raise _Refused(problem)
        self._section_size = 0  # from here on: the trailers'
        self._on_interim = None  # the final head: no interim may follow (nor the caller be kept)
        self._response = H1Response(self, status, _reason(self._reason, status), headers)
        self._state = _BODY
        self._body_received = 0
        # For a zero-copy hand-over. llhttp already refused a bad or second
        # Content-Length, and one with Transfer-Encoding; checked again here
        # because a wrong count would splice the next response's bytes.
        self._content_length = int(lengths[0]) if lengths else None  # see framing_problem
        # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
        # framing; the connection closes after it. Asked to switch and
        # answered with a plain response: relayed as one, but the connection,
        # which said "Connection: upgrade", is not trusted with another request.
        self._head_keep_alive = (
            parser.should_keep_alive()
            and not self._upgrade
            and not (codings and parser.get_http_version() == "1.0")
        )
        if self._is_head:
            # RFC 9110 9.3.2: a response to HEAD has no body, whatever its
            # Content-Length says. httptools cannot tell llhttp so (its
            # on_headers_complete return value is reserved for Upgrade), so the
            # message ends here and a fresh parser takes the next one; any body
            # bytes the old parser still sees mark the connection out of step.
            self._keep_alive = self._head_keep_alive
            self._state = _DONE
            self._parser = httptools.HttpResponseParser(self)
        # _wake's first half: the transport is open (it is being read).
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _interim(self, status: int) -> None:
        """A 1xx head is in: hand it to the caller, then wait for the next head.

        RFC 9110 15.2: a proxy forwards the 1xx it did not ask for itself.
        Not 100: the gateway owns Expect and never sends it upstream, so a
        100 from the target is unsolicited and must not reach the client
        beside the gateway's own. Not 101: we send no Upgrade (llhttp stops
        on it with an error). Their heads add up toward the head limit
        (CONTRACT.md "Interim responses"), checked before this.
        """
        if status < 100:
            # llhttp takes any three digits: 0xx is no status (RFC 9110 15).
            raise _Refused(f"invalid status code {status:03d}")
        fields = self._raw_headers
        for name, value in fields:
            lowered = name.lower()
            # RFC 9112 6.3: a 1xx ends at its empty line, whatever its fields
            # say; llhttp reads a body after codes it does not know (104,
            # 199) when they announce one. Where the two readings differ the
            # stream's framing is ambiguous (as with Content-Length beside
            # Transfer-Encoding): refused, never guessed. RFC 9110 8.6: no
            # Content-Length in a 1xx at all; a "0" is harmless and dropped.
            if lowered == "transfer-encoding" or (
                lowered == "content-length" and value.strip(" \t") != "0"
            ):
                raise _Refused(f"a {status} interim response with {name}: {value[:64]!r}")
        self._raw_headers = []
        reason, self._reason = self._reason, b""
        self._deadline = self._loop.time() + self._timeout  # a sign of life
        on_interim = self._on_interim
        if on_interim is not None and status != 100 and status != 101:
            on_interim(status, _reason(reason, status), fields)

    def on_body(self, body: bytes) -> None:
        if self._state != _BODY:
            raise _Stray  # a body after a HEAD response (or a 204/304)
        self._progress = True
        self._chunks.append(body)
        self._buffered += len(body)
        self._body_received += len(body)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_chunk_header(self) -> None:
        if self._state != _BODY:
            raise _Stray  # chunks after a HEAD response, whose message ended at its head

    def on_message_complete(self) -> None:
        self._progress = True
        state = self._state
        if state == _BODY:
            self._keep_alive = self._head_keep_alive and self._parser.should_keep_alive()
            self._state = _DONE
            # _wake's first half: the transport is open (it is being read).
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        # _HEAD: the end of a 1xx, the real response follows. _DONE: the old
        # parser of a HEAD response ending its (absent) body.

    # -- the exchange ---------------------------------------------------------------

    def usable(self) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing()

    def reusable(self) -> bool:
        """Whether a pooled connection may carry the next request: open, and
        its socket holds no byte (nor an EOF) the loop has yet to deliver.

        Checked when it is taken from the pool: bytes that came while it was
        idle would otherwise be read as the next request's response (urllib3
        polls before reuse for the same reason). Not polled on TLS: the
        socket may hold records without data (a TLS 1.3 session ticket);
        decrypted stray bytes still end an idle connection when they are
        read (buffer_updated)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        poller = self._poller
        if poller is None:
            if self._tls:
                return True
            sock = transport.get_extra_info("socket")
            if sock is None:
                return True
            # Made once per connection. It holds the descriptor's number, not
            # the socket: polled only while the transport is open (checked
            # above), so the number is still this socket's.
            poller = self._poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    def stale(self) -> bool:
        """Whether a failed exchange may go again on a fresh connection: this
        one was reused, and the target closed it before any response byte and
        before the body was asked for (RFC 9112 9.3.1; the keep-alive race)."""
        return self.reused and self._head_bytes == 0 and not self._body_pulled

    async def send(
        self,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | DirectBody | None,
        content_length: int | None,
        read_timeout: float,
        on_interim: OnInterim | None = None,
        upgrade: bool = False,
    ) -> H1Response:
        transport = self._transport
        assert transport is not None
        assert self._state == _IDLE
        self._state = _HEAD
        self._upgrade = upgrade
        self._is_head = method == "HEAD"
        self._on_interim = on_interim
        self._timeout = read_timeout
        self._reason = b""
        self._head_bytes = 0
        self._section_size = 0
        self._fields = 0
        self._stalled = 0
        self._keep_alive = False
        self._read_size = READ_AHEAD_MIN  # each response finds its reader's pace anew
        transport.write(head)
        self._body_done = body is None
        self._body_pulled = False
        if body is None:
            pass
        elif isinstance(body, DirectBody):
            direct = body
            self._body_task = self._loop.create_task(self._pour_body(direct))
            # `pour` may never run: the target answered (and the connection
            # was dropped, cancelling this task) while the head waited to be
            # flushed, or the task returned before it; whatever the body
            # holds (a relay's pipe, the client socket's duplicate) is
            # released when the task ends, however it ends.
            self._body_task.add_done_callback(lambda _task: direct.discard())
        else:
            self._body_task = self._loop.create_task(self._send_body(body, content_length))
        try:
            while self._state == _HEAD and self._error is None:
                try:
                    await self._waiter_armed()
                finally:
                    self._waiter = None
        except BaseException:
            # Cancelled (client gone) or timed out: the exchange is in an
            # unknown state; the connection goes, never back to the pool.
            self.abort()
            raise
        response = self._response
        if self._error is not None or response is None:
            self.abort()
            raise self._error or H1ServerDisconnected("no response")
        return response

    async def _send_body(self, body: AsyncIterator[bytes], length: int | None) -> None:
        # From the first ask on, the body is spent for a retry: cancelling a
        # pending `anext` ends an async generator, and a retry would then send
        # an empty (chunked) body.
        self._body_pulled = True
        transport = self._transport
        assert transport is not None
        chunked = length is None
        limit = -1 if length is None else length
        sent = 0
        try:
            async for chunk in body:
                if self._transport is None or self._error is not None:
                    return  # answered early and closed, or failed: stop quietly
                size = len(chunk)
                if not size:
                    continue
                sent += size
                if chunked:
                    if size < JOIN_BELOW:
                        transport.write(b"%x\r\n%b\r\n" % (size, chunk))
                    else:
                        transport.writelines((b"%x\r\n" % size, chunk, b"\r\n"))
                else:
                    if sent > limit:
                        raise H1BodyError(
                            f"request body is longer than its Content-Length {length}"
                        )
                    transport.write(chunk)
                if self._write_paused:
                    await self._drain()
            if self._transport is None or self._error is not None:
                return
            if chunked:
                transport.write(b"0\r\n\r\n")
            elif sent != limit:
                raise H1BodyError(
                    f"request body ended after {sent} of its {length} Content-Length bytes"
                )
            self._body_done = True
            # The read timeout for the head counts from here (see _on_timer).
            self._deadline = self._loop.time() + self._timeout
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._body_failed(exc)
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _pour_body(self, body: DirectBody) -> None:
        self._body_pulled = True  # spent for a retry from here on
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the target closed before the body began: the reader decides
        # Duplicated before any await, and only that duplicate is used: the
        # transport closes its descriptor when the target resets, and the
        # number may then be a new client's socket (splice.py's rule).
        sink = splice.dup_socket(transport)
        if sink is None:
            self._body_failed(H1BodyError("the connection cannot take a zero-copy body"))
            return
        try:
            await splice.wait_flushed(sink, self._timeout)
            await body.pour(sink, self._timeout)
            if self._transport is None or self._error is not None:
                return
            self._body_done = True
            self._deadline = self._loop.time() + self._timeout
        except asyncio.CancelledError:
            raise
        except splice.SinkFailed:
            return  # the target closed (maybe answering early): the reader decides
        except splice.SinkTimeout:
            self._fail(
                H1ReadTimeout(f"the target took none of the request body for {self._timeout:g} s")
            )
        except Exception as exc:
            self._body_failed(exc)
        finally:
            sink.close()

    def _body_failed(self, exc: Exception) -> None:
        """The body's own failure (its source, or a length that does not match)."""
        if not isinstance(exc, H1BodyError):
            error = H1BodyError(f"request body failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            exc = error
        self._fail(exc)

    async def _drain(self) -> None:
        transport = self._transport
        if transport is None:
            return  # closed: the body loop stops at its next check
        if self._state == _HEAD:
            # The target must take some of the body within the timeout (see _on_timer).
            self._drain_size = transport.get_write_buffer_size()
            self._deadline = self._loop.time() + self._timeout
        await self._wait_for_drain(self._loop)

    def unread(self) -> int:
        length = self._content_length
        if self._state != _BODY or length is None:
            return 0
        return length - self._body_received

    def dup_body_socket(self) -> splice.SocketDup | None:
        if self._tls:
            return None  # never spliced: the socket carries TLS records
        if self._state != _BODY or self._error is not None or self._content_length is None:
            return None
        return splice.dup_socket(self._transport)

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()

    def hold(self) -> None:
        if self._state == _BODY:
            self._read_size = READ_AHEAD_MIN
            self._pause_reading()  # until read_chunk waits again

    def hand_over(self) -> tuple[bytes, int]:
        self._pause_reading()
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        return b"".join(chunks), self.unread()

    def spliced(self) -> None:
        # llhttp still counts the body the relay moved past it: a fresh
        # parser reads the next response (as after a HEAD's).
        self._parser = httptools.HttpResponseParser(self)
        self._state = _DONE
        self._keep_alive = self._head_keep_alive
        self._resume_reading()

    def take_chunks(self) -> bytes:
        """The body bytes read so far (some are), as one piece; reading resumes."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()  # emptied for the next pieces, not replaced
        self._buffered = 0
        if self._reading_paused:
            self._resume_reading()
        return data

    async def read_chunk(self) -> bytes:
        while True:
            if self._chunks:
                return self.take_chunks()
            if self._error is not None:
                raise self._error
            state = self._state
            if state == _DONE:
                return b""
            if state != _BODY:
                raise H1ReadError("connection closed")
            self._resume_reading()  # after hold(): nothing is here, so read
            try:
                await self._waiter_armed()
            except asyncio.CancelledError:
                self.abort()
                raise
            finally:
                self._waiter = None

    def _waiter_armed(self) -> asyncio.Future[None]:
        """The future the next event (data, EOF, failure, the read timeout)
        completes, stored as `_waiter`, with the timer armed for it.

        The caller awaits it and clears `_waiter` after (a future awaited
        directly: a coroutine around it cost a frame per wait), and aborts
        the connection when cancelled."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        deadline = self._deadline = loop.time() + self._timeout
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._on_timer)
        return waiter

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            # Nobody waits, or data came in this very loop iteration (I/O
            # callbacks run before due timers) and the reader has yet to
            # resume: the next wait arms a new timer.
            return
        now = self._loop.time()
        stalled = False
        if self._state == _HEAD and not self._body_done and self._error is None:
            if self._drain_waiter is None:
                # As aiohttp's sock_read, the wait for a head starts once the
                # body is sent: an upload may take any time before the target
                # answers, as long as it takes what we write.
                self._deadline = now + self._timeout
            else:
                stalled = True
                transport = self._transport
                size = -1 if transport is None else transport.get_write_buffer_size()
                if 0 <= size < self._drain_size:  # it took some: progress
                    self._drain_size = size
                    if now + 0.001 >= self._deadline:
                        self._deadline = now + self._timeout
        deadline = self._deadline
        # The loop may run a timer up to its clock resolution early.
        if now + 0.001 >= deadline:
            if stalled:
                message = f"the target took none of the request body for {self._timeout:g} s"
            else:
                message = f"no data from the target for {self._timeout:g} s"
            self._fail(H1ReadTimeout(message))
        else:
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _close_delimited(self) -> bool:
        """Whether the body ends at EOF (RFC 9112 6.3: no length, not chunked)."""
        response = self._response
        if response is None:
            return False
        # framing_problem let through no coding but chunked alone.
        headers = response.headers
        return "Transfer-Encoding" not in headers and "Content-Length" not in headers

    # -- ending ---------------------------------------------------------------------

    def release(self) -> None:
        """Back to the pool after a clean, complete exchange; else abort."""
        if (
            self._state == _DONE
            and self._keep_alive
            and self._body_done
            and self._error is None
            and not self._chunks
            and (transport := self._transport) is not None
            and not transport.is_closing()
        ):
            self._state = _IDLE
            self._response = None
            self._body_task = None
            self._pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once: never pooled again (idempotent)."""
        self._state = _CLOSED
        self._response = None
        self._chunks = []
        self._close_transport()
        self._cancel_timer()
        self._cancel_body_task()
        self._body_task = None
        self._wake()
        self._pool.forget(self)

    def _fail(self, error: H1Error) -> None:
        self._set_error(error)
        self._close_transport()
        self._cancel_body_task()
        self._wake()

    def _cancel_body_task(self) -> None:
        """Stop the request body's sender, unless it is what is calling."""
        task = self._body_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def _set_error(self, error: H1Error) -> None:
        if self._error is None:  # the first cause wins
            self._error = error

    def _close_transport(self) -> None:
        transport = self._transport
        if transport is not None:
            self._transport = None
            transport.abort()

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._transport is None:
            self._release_drain()


class UpstreamTunnel:
    """The target's side of a tunnel after `101 Switching Protocols`.

    `read()` returns what the target sent (b"" once it closed its side);
    `write()` + `drain()` send with backpressure. No read timeout: the
    tunnel's idle timeout is its owner's (`tunnel_idle_timeout`).
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    async def read(self) -> bytes:
        conn = self._conn
        while True:
            if conn._chunks:
                data = b"".join(conn._chunks)
                conn._chunks = []
                conn._buffered = 0
                conn._resume_reading()
                return data
            if conn._error is not None:
                raise conn._error
            if conn._tunnel_eof or conn._state != _TUNNEL:
                return b""
            waiter = conn._loop.create_future()
            conn._waiter = waiter
            try:
                await waiter
            finally:
                conn._waiter = None

    def write(self, data: bytes) -> None:
        transport = self._conn._transport
        if transport is None or transport.is_closing():
            raise H1ReadError("the target's tunnel connection is closed")
        transport.write(data)

    async def drain(self) -> None:
        conn = self._conn
        if conn._write_paused and conn._transport is not None:
            await conn._wait_for_drain(conn._loop)
        if conn._transport is None:
            raise H1ReadError("the target's tunnel connection was lost")

    def hand_over(self) -> tuple[bytes, splice.SocketDup | None]:
        """For a zero-copy relay: stop reading; the bytes already read, and a
        duplicate of the socket (None on TLS or when none can be had)."""
        conn = self._conn
        conn._pause_reading()
        chunks, conn._chunks, conn._buffered = conn._chunks, [], 0
        dup = None if conn._tls else splice.dup_socket(conn._transport)
        return b"".join(chunks), dup

    def resume(self) -> None:
        """Back to reading through asyncio (the relay could not be had)."""
        self._conn._resume_reading()

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn._transport

    def close(self, grace: float) -> None:
        """Close once what was written has left, or abort after `grace` seconds."""
        conn = self._conn
        transport = conn._transport
        conn._state = _CLOSED
        conn._pool.forget(conn)
        if transport is None:
            return
        conn._transport = None
        if transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size():
            conn._loop.call_later(grace, transport.abort)

    def abort(self) -> None:
        self._conn.abort()


class _CachingResolver:
    """Target host names through aiodns (aiohttp's AsyncResolver), cached.

    New connections are rare with keep-alive, but a target that closes every
    connection would otherwise cost a lookup per request; 10 s matches the
    aiohttp session's `ttl_dns_cache`. IP literals skip the resolver.
    """

    TTL: Final = 10.0

    def __init__(self) -> None:
        self._resolver: aiohttp.AsyncResolver | None = None
        self._cache: TTLCache[tuple[str, int], tuple[str, ...]] = TTLCache(
            maxsize=1024, ttl=self.TTL
        )

    async def resolve(self, host: str, port: int) -> tuple[str, ...]:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return (host,)
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if self._resolver is None:
            # Imported at the first host name (IP literals never get here):
            # aiohttp costs start-up 0.15 s and ~25 MiB otherwise.
            import aiohttp

            self._resolver = aiohttp.AsyncResolver()
        found = await self._resolver.resolve(host, port, family=socket.AF_UNSPEC)
        addresses = tuple(dict.fromkeys(str(entry["host"]) for entry in found))
        if addresses:
            self._cache[key] = addresses
        return addresses

    async def close(self) -> None:
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None


@contextlib.contextmanager
def _mapped_errors(scheme: str, host: str, port: int) -> Iterator[None]:
    """Foreign exceptions of opening a connection, as this module's own.

    The one place they are mapped (as httpcore's `map_exceptions`): DNS, TCP
    connect and the TLS handshake. Once a connection is open, its failures
    reach the protocol callbacks, which raise H1 errors themselves.
    """
    where = f"{scheme}://{host}:{port}"
    try:
        yield
    except TimeoutError as exc:
        # asyncio.timeout's, or the kernel's ETIMEDOUT: both are a timeout
        # (checked first: TimeoutError is an OSError).
        raise H1ConnectError(f"connect to {where} timed out", timed_out=True) from exc
    except ssl.SSLError as exc:
        # SSLCertVerificationError included (untrusted, expired, another
        # name), and a target that answers a ClientHello in plain text.
        raise H1TLSError(f"TLS handshake with {where} failed: {exc}") from exc
    except OSError as exc:
        # Refused, unreachable, reset (during the handshake too), DNS.
        raise H1ConnectError(f"cannot connect to {where}: {exc}", timed_out=False) from exc


class ConnectionPool:
    """Keep-alive connections per (scheme, host, port), last used first.

    One TLS context for every https connection of the pool, built on the
    first one (loading the trust store costs milliseconds), unless given.
    """

    def __init__(
        self, idle_timeout: float = IDLE_TIMEOUT, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._idle_timeout = idle_timeout
        self._ssl_context = ssl_context
        self._resolver = _CachingResolver()
        self._idle: dict[_Key, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        # The keys of the configured targets (None: any). A connection to
        # another is closed once its request ends instead of pooled.
        self._live: frozenset[_Target] | None = None

    @property
    def idle_count(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    @property
    def open_count(self) -> int:
        return len(self._all)

    def _tls_context(self) -> ssl.SSLContext:
        context = self._ssl_context
        if context is None:
            # CERT_REQUIRED, check_hostname, TLS 1.2 or later, the system's
            # CAs (OpenSSL's SSL_CERT_FILE / SSL_CERT_DIR override them).
            context = self._ssl_context = ssl.create_default_context()
        return context

    async def request(
        self,
        method: str,
        host: str,
        port: int,
        path_qs: str,
        headers: Collection[tuple[str, str]] | CIMultiDict[str],
        body: AsyncIterator[bytes] | DirectBody | None,
        content_length: int | None,
        connect_timeout: float,
        read_timeout: float,
        *,
        scheme: str = "http",
        on_interim: OnInterim | None = None,
        tls: ClientTLS | None = None,
        upgrade: bool = False,
    ) -> H1Response:
        """Send one request; return once the response head is in.

        `on_interim` gets each interim response but 100 and 101 (status,
        reason, its fields as received) while the final head is awaited,
        synchronously from the parser: it must not raise or block.

        Raises H1ConnectError (H1TLSError for a failed handshake),
        H1ServerDisconnected, H1ProtocolError, H1ReadTimeout or H1BodyError;
        on any of them, or on cancellation, the connection is closed.
        """
        if scheme != "http" and scheme != "https":
            raise ValueError(f"scheme must be http or https, got {scheme!r}")
        if self._closed:
            raise H1ConnectError("connection pool is closed", timed_out=False)
        items = headers.items() if isinstance(headers, CIMultiDict) else headers
        head = serialize_head(method, path_qs, items, body is not None and content_length is None)
        key = (scheme, host, port, tls.tag if tls is not None and scheme == "https" else "")
        # A spliced upload (a large body of known length) goes on a fresh
        # connection. A pooled one had its receive window sized by the
        # target's kernel from the small exchanges it carried (Linux only
        # grows it, from what the target read per round trip early on): in
        # half the gateway processes that held 1 GiB uploads to 0.43-0.49x
        # of a direct connection, where fresh ones reached 0.57x and more
        # (bench/ab_bulk.py, docs/performance.md). One connect is nothing
        # beside such a body, and no keep-alive race can cut it either.
        conn = None if body is not None and isinstance(body, DirectBody) else self._take(key)
        if conn is not None:
            try:
                return await conn.send(
                    method, head, body, content_length, read_timeout, on_interim, upgrade
                )
            except H1ServerDisconnected:
                if method not in _IDEMPOTENT or not conn.stale():
                    raise
            # The target closed the connection as we reused it: once more on
            # a fresh one (never again: a fresh connection closed is an answer).
        conn = await self._connect(key, connect_timeout, tls)
        return await conn.send(
            method, head, body, content_length, read_timeout, on_interim, upgrade
        )

    def _take(self, key: _Key) -> _Connection | None:
        stack = self._idle.get(key)
        while stack:
            conn = stack.pop()
            if conn.reusable():
                conn.reused = True
                return conn
            conn.abort()  # closed by the target while idle, or it sent stray bytes
        return None

    async def _connect(
        self, key: _Key, connect_timeout: float, tls: ClientTLS | None = None
    ) -> _Connection:
        conn = _Connection(self, key)
        with _mapped_errors(*key[:3]):
            # The handshake counts toward the connect timeout, as in nginx
            # (proxy_connect_timeout covers the SSL handshake).
            async with asyncio.timeout(connect_timeout):
                transport = await self._open(conn, key, connect_timeout, tls)
        # uvloop may call connection_made only after create_connection returned.
        conn.connection_made(transport)
        self._all.add(conn)
        if self._closed:
            conn.abort()
            raise H1ConnectError("connection pool is closed", timed_out=False)
        return conn

    async def _open(
        self, conn: _Connection, key: _Key, connect_timeout: float, tls: ClientTLS | None = None
    ) -> asyncio.BaseTransport:
        """Connect to the first address of the host that answers (and, for
        https, complete the handshake with it)."""
        scheme, host, port, _ = key
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        handshake_timeout: float | None = None
        server_name: str | None = host
        if scheme == "https":
            if tls is not None:
                # The upstream's own settings ([upstreams.NAME.tls]): its CA,
                # client certificate, and the name to send and check.
                context = tls.context
                server_name = tls.server_name or host
            else:
                context = self._tls_context()
            # Past the caller's own deadline, so that a slow handshake is its
            # timeout (a 504), not asyncio's ConnectionAbortedError (default 60 s).
            handshake_timeout = connect_timeout + 1.0
        last: OSError | None = None
        for address in await self._resolver.resolve(host, port):
            try:
                transport, _ = await loop.create_connection(
                    lambda: conn,
                    address,
                    port,
                    ssl=context,
                    # SNI and the name the certificate must carry: the host of
                    # the target URL, not the address it resolved to (Python
                    # sends no SNI for an IP literal, RFC 6066 3, and checks
                    # the certificate's IP address entries instead).
                    server_hostname=server_name if context is not None else None,
                    ssl_handshake_timeout=handshake_timeout,
                )
            except ssl.SSLError:
                raise  # the certificate or the protocol: another address would not help
            except OSError as exc:
                last = exc
                continue
            return transport
        raise last or OSError(f"no address for {host}")

    def retain(self, keys: Collection[_Target]) -> None:
        """Keep connections to these (scheme, host, port) targets only: a
        reload removed the others. Idle ones close now, busy ones when their
        request ends (a running stream is never cut, nor a tunnel)."""
        live = self._live = frozenset(keys)
        for key in [k for k in self._idle if k[:3] not in live]:
            for conn in self._idle.pop(key):
                conn.abort()

    def put(self, conn: _Connection) -> None:
        live = self._live
        if self._closed or (live is not None and conn.target not in live):
            conn.abort()
            return
        loop = conn._loop
        conn.idle_at = loop.time()
        stack = self._idle.get(conn._key)
        if stack is None:
            stack = self._idle[conn._key] = []
        stack.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)

    def _sweep(self) -> None:
        """Close connections idle longer than the idle timeout (oldest first)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self._idle_timeout
        remaining = 0
        for key, stack in list(self._idle.items()):
            # LIFO: the stalest are at the bottom, and at most the top is busy.
            stale = 0
            while stale < len(stack) and (
                stack[stale].idle_at <= cutoff or not stack[stale].usable()
            ):
                stale += 1
            for conn in stack[:stale]:
                conn.abort()
            del stack[:stale]
            if not stack:
                del self._idle[key]
            remaining += len(stack)
        if remaining and not self._closed:
            self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)

    async def close(self) -> None:
        """Abort every connection, idle or busy; later releases close theirs."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._idle.clear()
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        await self._resolver.close()
        # transport.abort() closes the socket in a callback: let it run, so
        # nothing is left for the garbage collector to warn about.
        await asyncio.sleep(0)
