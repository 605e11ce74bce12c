"""A lean HTTP/1.1 client for proxying plain-http targets: asyncio + httptools.

aiohttp's ClientSession does much a proxy never needs (auto headers, cookies,
redirects, per-request timeout handles, connector bookkeeping): about a third
of the gateway's CPU per small request. This client does only what a proxy
hop needs (RFC 9112):

- One head serialized by hand into one `write()`; bodies framed as the caller
  says (`Content-Length` kept, else `Transfer-Encoding: chunked`), streamed
  with write backpressure, concurrently with waiting for the response head (a
  target may answer early, e.g. 413, before it read the whole body).
- Responses parsed by llhttp (`httptools`, as uvicorn does); 1xx interim
  responses skipped; bodies handed out chunk by chunk, reading paused above
  `MAX_BUFFERED` unread bytes.
- Keep-alive: a connection goes back to its (host, port) stack (LIFO) only if
  the response ended cleanly, both sides kept it alive and the request body
  was sent whole; anything else (cancellation included) aborts it.
- One read-timeout timer per connection: each wait stores a deadline, and the
  single `call_at` handle re-arms itself lazily when it fires early. A body
  write the target does not take for as long fails the same way (nginx's
  `proxy_send_timeout`).
- A reused connection the target closed just as it was reused (its keep-alive
  timer firing) is retried once on a fresh one, when the method is idempotent,
  nothing of the response arrived and nothing of the body was asked for
  (RFC 9112 9.3.1).

Errors are this module's own (`H1Error` and subclasses); the proxy translates
them in one place, as it does aiohttp's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Collection
from typing import Final, cast

import aiohttp
import httptools
from cachetools import TTLCache
from multidict import CIMultiDict

from . import splice
from .headers import encode_head
from .writeflow import WriteFlow

# Unread response bytes above which the socket stops being read; reading
# resumes when the reader takes them (read_chunk takes the whole buffer).
MAX_BUFFERED: Final = 1 << 20
# Below the common upstream idle timeouts (aiohttp 75 s, nginx 75 s) so we
# close an idle connection before the target does.
IDLE_TIMEOUT: Final = 60.0
_SWEEP_EVERY: Final = 5.0
# A response head larger than this is refused (aiohttp's client allowed 16 KiB
# per line and field; llhttp has no limit of its own).
MAX_HEAD_BYTES: Final = 256 * 1024
#: Below this size a body piece is joined with its framing (a chunk size, a
#: response head, the final chunk) into one write: one copy, one segment.
#: Larger pieces go out on their own rather than be copied. The proxy joins
#: by the same rule, so `H1Response.ready()` reports "small" by it.
JOIN_BELOW: Final = 64 * 1024

# RFC 9110 9.2.2: the methods a client may repeat on its own (RFC 9112 9.3.1).
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

_IDLE: Final = 0  # no request on the connection (pooled or fresh)
_HEAD: Final = 1  # request sent, response head not in yet
_BODY: Final = 2  # head handed out, body being read
_DONE: Final = 3  # response complete
_CLOSED: Final = 4


class H1Error(Exception):
    """Base of every error this client raises."""


class H1ConnectError(H1Error):
    """The TCP connect failed (refused, unreachable, DNS) or timed out."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class H1ServerDisconnected(H1Error):
    """The target closed or reset the connection before a response head."""


class H1ProtocolError(H1Error):
    """The target sent something that is not an HTTP/1.x response."""


class H1ReadError(H1Error):
    """The response body ended early (reset, EOF, garbage)."""


class H1ReadTimeout(H1Error):
    """The target was silent for longer than the read timeout."""


class H1BodyError(H1Error):
    """The request body could not be sent whole (its source failed, or its
    length differed from the declared Content-Length)."""


def _decode(raw: bytes) -> str:
    # As aiohttp's parsers do: the bytes survive to the client unchanged.
    return raw.decode("utf-8", "surrogateescape")


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


class H1Response:
    """One response: status and head at once, the body through `read_chunk()`."""

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
        return await conn.read_chunk()

    def ready(self) -> bool:
        """Whether `read_chunk()` would return at once, with a small piece.

        Small: the caller may join it with the head into one write (a copy).
        """
        conn = self._conn
        return conn is None or conn.has_news()

    def complete(self) -> bool:
        """Whether the body has been read to its clean end (nothing is left)."""
        conn = self._conn
        return conn is None or conn.drained()

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


class _Connection(WriteFlow):
    """One TCP connection to a target and the exchange running on it."""

    def __init__(self, pool: ConnectionPool, key: tuple[str, int]) -> None:
        super().__init__()
        self._pool = pool
        self._key = key
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._made = False
        self._parser = httptools.HttpResponseParser(self)
        self._state = _IDLE
        self._error: H1Error | None = None
        # the exchange
        self._is_head = False
        self._reason = b""
        self._raw_headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._response: H1Response | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._body_received = 0
        self._content_length: int | None = None
        self._head_keep_alive = False
        self._reading_paused = False
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

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._cancel_timer()
        state = self._state
        if state == _HEAD:
            self._set_error(H1ServerDisconnected("connection closed before a response"))
        elif state == _BODY:
            if exc is None and self._error is None and self._close_delimited():
                # RFC 9112 6.3 item 8: the body ends where the connection does.
                self._state = _DONE
                self._keep_alive = False
            else:
                self._set_error(H1ReadError("connection lost before the end of the body"))
        self._wake()
        self._pool.forget(self)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state != _HEAD and state != _BODY:
            # Nothing was asked (idle in the pool, or after a complete
            # response; no pipelining): the stream is out of step.
            self._keep_alive = False
            if state == _IDLE:
                self.abort()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._state == _HEAD:
                self._set_error(H1ProtocolError(f"invalid response from the target: {exc}"))
            elif self._state == _BODY:
                self._set_error(H1ReadError(f"invalid response body: {exc}"))
            else:  # garbage after a complete response: just never reuse it
                self._keep_alive = False
            self._close_transport()
            self._wake()
            return
        if self._state == _HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._set_error(H1ProtocolError("response head too large"))
                self._close_transport()
                self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what EOF meant

    # -- httptools callbacks --------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        if self._state == _HEAD:
            self._reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        # In _BODY these are chunked trailers: dropped, as aiohttp's client does.
        if self._state == _HEAD:
            self._raw_headers.append((_decode(name), _decode(value)))

    def on_headers_complete(self) -> None:
        if self._state != _HEAD:
            self._keep_alive = False  # a second head after a HEAD's: out of step
            return
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            # 1xx: interim, skipped whole (RFC 9110 15.2); the gateway owns
            # Expect, so no 100 may reach the client. 101 never: we send no
            # Upgrade, and llhttp stops on it with an error.
            self._raw_headers = []
            self._reason = b""
            self._deadline = self._loop.time() + self._timeout  # a sign of life
            return
        headers = CIMultiDict(self._raw_headers)
        self._response = H1Response(self, status, _decode(self._reason), headers)
        self._state = _BODY
        self._body_received = 0
        # For a zero-copy hand-over. llhttp already refused a bad or second
        # Content-Length, and one with Transfer-Encoding; checked again here
        # because a wrong count would splice the next response's bytes.
        length = headers.get("Content-Length")
        self._content_length = (
            int(length)
            if length is not None and length.isdigit() and "Transfer-Encoding" not in headers
            else None
        )
        self._head_keep_alive = parser.should_keep_alive()
        if self._is_head:
            # RFC 9110 9.3.2: a response to HEAD has no body, whatever its
            # Content-Length says. httptools cannot tell llhttp so (its
            # on_headers_complete return value is reserved for Upgrade), so the
            # message ends here and a fresh parser takes the next one; any body
            # bytes the old parser still sees mark the connection out of step.
            self._keep_alive = parser.should_keep_alive()
            self._state = _DONE
            self._parser = httptools.HttpResponseParser(self)
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._state != _BODY:
            self._keep_alive = False  # a body after a HEAD response
            return
        self._chunks.append(body)
        self._buffered += len(body)
        self._body_received += len(body)
        if self._buffered > MAX_BUFFERED:
            self._pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        state = self._state
        if state == _BODY:
            self._keep_alive = self._parser.should_keep_alive()
            self._state = _DONE
            self._wake()
        # _HEAD: the end of a 1xx, the real response follows. _DONE: the old
        # parser of a HEAD response ending its (absent) body.

    # -- the exchange ---------------------------------------------------------------

    def usable(self) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing()

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
    ) -> H1Response:
        transport = self._transport
        assert transport is not None
        assert self._state == _IDLE
        self._state = _HEAD
        self._is_head = method == "HEAD"
        self._timeout = read_timeout
        self._reason = b""
        self._raw_headers = []
        self._head_bytes = 0
        self._keep_alive = False
        transport.write(head)
        self._body_done = body is None
        self._body_pulled = False
        if isinstance(body, DirectBody):
            self._body_task = self._loop.create_task(self._pour_body(body))
        elif body is not None:
            self._body_task = self._loop.create_task(self._send_body(body, content_length))
        try:
            while self._state == _HEAD and self._error is None:
                await self._wait()
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

    def has_news(self) -> bool:
        if self._chunks:
            return self._buffered < JOIN_BELOW
        return self._state != _BODY or self._error is not None

    def drained(self) -> bool:
        return self._state == _DONE and not self._chunks and self._error is None

    def unread(self) -> int:
        length = self._content_length
        if self._state != _BODY or length is None:
            return 0
        return length - self._body_received

    def dup_body_socket(self) -> splice.SocketDup | None:
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

    async def read_chunk(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._buffered = 0
                self._resume_reading()
                return data
            if self._error is not None:
                raise self._error
            state = self._state
            if state == _DONE:
                return b""
            if state != _BODY:
                raise H1ReadError("connection closed")
            await self._wait()

    async def _wait(self) -> None:
        loop = self._loop
        waiter = loop.create_future()
        self._waiter = waiter
        deadline = loop.time() + self._timeout
        self._deadline = deadline
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._on_timer)
        try:
            await waiter
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            self._waiter = None

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
        headers = response.headers
        encoding = headers.get("Transfer-Encoding")
        if encoding is not None:
            return encoding.rsplit(",", 1)[-1].strip().lower() != "chunked"
        return "Content-Length" not in headers

    # -- ending ---------------------------------------------------------------------

    def release(self) -> None:
        """Back to the pool after a clean, complete exchange; else abort."""
        if (
            self._state == _DONE
            and self._keep_alive
            and self._body_done
            and self._error is None
            and not self._chunks
            and self.usable()
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


class ConnectionPool:
    """Keep-alive connections of one upstream, per (host, port), last used first."""

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._idle_timeout = idle_timeout
        self._resolver = _CachingResolver()
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def idle_count(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    @property
    def open_count(self) -> int:
        return len(self._all)

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
    ) -> H1Response:
        """Send one request; return once the response head is in.

        Raises H1ConnectError, H1ServerDisconnected, H1ProtocolError,
        H1ReadTimeout or H1BodyError; on any of them, or on cancellation, the
        connection is closed.
        """
        if self._closed:
            raise H1ConnectError("connection pool is closed", timed_out=False)
        items = headers.items() if isinstance(headers, CIMultiDict) else headers
        head = serialize_head(method, path_qs, items, body is not None and content_length is None)
        key = (host, port)
        conn = self._take(key)
        if conn is not None:
            try:
                return await conn.send(method, head, body, content_length, read_timeout)
            except H1ServerDisconnected:
                if method not in _IDEMPOTENT or not conn.stale():
                    raise
            # The target closed the connection as we reused it: once more on
            # a fresh one (never again: a fresh connection closed is an answer).
        conn = await self._connect(key, connect_timeout)
        return await conn.send(method, head, body, content_length, read_timeout)

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        stack = self._idle.get(key)
        while stack:
            conn = stack.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.abort()  # closed by the target while idle
        return None

    async def _connect(self, key: tuple[str, int], connect_timeout: float) -> _Connection:
        host, port = key
        conn = _Connection(self, key)
        try:
            async with asyncio.timeout(connect_timeout):
                transport = await self._open(conn, host, port)
        except TimeoutError as exc:
            # asyncio.timeout's, or the kernel's ETIMEDOUT: both are a timeout.
            raise H1ConnectError(f"connect to {host}:{port} timed out", timed_out=True) from exc
        except OSError as exc:
            raise H1ConnectError(
                f"cannot connect to {host}:{port}: {exc}", timed_out=False
            ) from exc
        # uvloop may call connection_made only after create_connection returned.
        conn.connection_made(transport)
        self._all.add(conn)
        if self._closed:
            conn.abort()
            raise H1ConnectError("connection pool is closed", timed_out=False)
        return conn

    async def _open(self, conn: _Connection, host: str, port: int) -> asyncio.BaseTransport:
        """Connect to the first address of `host` that answers."""
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for address in await self._resolver.resolve(host, port):
            try:
                transport, _ = await loop.create_connection(lambda: conn, address, port)
            except OSError as exc:
                last = exc
                continue
            return transport
        raise last or OSError(f"no address for {host}")

    def put(self, conn: _Connection) -> None:
        if self._closed:
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
