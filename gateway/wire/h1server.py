"""The proxy listener's HTTP/1.1 server: asyncio + httptools (llhttp), as uvicorn.

Why not aiohttp's server here: per request it builds a yarl URL, a
BaseRequest, a StreamResponse, and (on Python < 3.12) a Task of its own,
which measured ~29 µs of CPU per proxied request at one connection, more
than the rest of the proxy hop. This module does only what a proxy hop needs
and hands the handler a small `Request` and a `ResponseWriter`
(h1messages.py). The admin listener stays on aiohttp.

What it guarantees (the contract's "Malformed requests"; see vetting.py for
the head checks llhttp leaves to us):

* llhttp in strict mode parses; a parse error, a refused head or a size
  limit answers the contract's JSON (400/405/414/431/501/505) and closes the
  connection. Nothing after a refused message is parsed (RFC 9112 11.2).
* Requests pipelined on one connection are answered in order, one handler at
  a time; reading pauses while a few are queued or a body's buffer is full.
* A client that vanishes cancels its handler (and so its upstream request).
  A body that turns malformed after its head went to the handler cancels the
  handler too, which answers 400 (or aborts, if the response began).
* Keep-alive follows RFC 9112 9.3 (`should_keep_alive`); an idle connection
  closes after `KEEPALIVE_TIMEOUT`.
* Slow loris: a request head must arrive whole within `client_timeout` of
  its start, however its bytes trickle in (nginx's client_header_timeout);
  `head_pending_for()` / `cut_slow_head()` let a sweeper close the
  connections past that deadline (see server.py) with 408.
* A connection that ends with an answer while the client may still be
  sending (a refusal, a broken or unanswered body) closes lingering: write
  side first, then a bounded read-and-drop, so that no reset destroys the
  answer (RFC 9112 9.6, nginx's lingering_close).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, cast

import httptools
from multidict import CIMultiDict

from gateway.core.errors import (
    BadRequest,
    ClientTimeout,
    GatewayError,
    HeadersTooLarge,
    UriTooLong,
)
from gateway.core.headers import encode_head, new_request_id, request_id
from gateway.wire import heap
from gateway.wire.h1messages import (
    BODY_HIGH,
    CONTENT_LENGTH,
    PAUSE_BODY,
    PAUSE_HANDOVER,
    PAUSE_QUEUE,
    PAUSE_UPGRADE,
    TRANSFER_ENCODING,
    Body,
    ClientTunnel,
    Reply,
    Request,
    SendTimeout,
    http_date,
    json_reply,
    reason_phrase,
)
from gateway.wire.readbuffer import ThreadReadBuffer
from gateway.wire.vetting import (
    MAX_FIELD_SIZE,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    section_limit,
    vet_head,
)
from gateway.wire.writeflow import WriteFlow, unsent

log = logging.getLogger("gateway.server")

# nginx's keepalive_timeout default: idle client connections between requests.
KEEPALIVE_TIMEOUT: Final = 75.0
# Lingering close (RFC 9112 9.6; nginx's lingering_close): a connection that
# ends with an answer while the client may still be sending (a refusal, a
# broken or unread body) half-closes, then reads and drops what comes for at
# most this long and this many bytes before it closes. Closing at once with
# unread input makes Linux answer with a reset, and a reset makes the
# client's stack throw away the answer it had not read yet.
LINGER_SECONDS: Final = 2.0
LINGER_MAX_BYTES: Final = 4 * 1024 * 1024
# Parsed requests waiting behind the one being handled before reading pauses.
_MAX_QUEUED: Final = 8
# Reading pauses between reads, but one read (up to 256 KiB) is parsed whole:
# tiny pipelined requests could queue by the thousand. Past this many, parsing
# stops; the queued ones are answered and the connection closes, and the
# client sends the rest again (RFC 9112 9.3.2), as after any server close.
MAX_PIPELINED: Final = 64
#: The heap is trimmed (heap.py) TRIM_DELAY seconds after the open connections
#: fell to half their peak, by at least TRIM_AFTER_DROP, and at most once per
#: TRIM_EVERY seconds: a trim runs a full garbage collection (milliseconds
#: under load: the config is frozen out of its sight), which a client opening
#: and closing connections in bursts must not pace faster than that. Longer
#: (10 s) kept the memory of 1,000 reset uploads for a second drop.
TRIM_AFTER_DROP: Final = 32
TRIM_DELAY: Final = 0.5
TRIM_EVERY: Final = 1.0
#: How often a connection whose request body is paused (PAUSE_BODY) looks
#: whether its client has gone (`_watch_peer`).
PEER_WATCH_EVERY: Final = 1.0
_TCP_ESTABLISHED: Final = 1  # tcp_info's tcpi_state (include/net/tcp_states.h)


def peer_closed(transport: asyncio.BaseTransport) -> bool:
    """Whether a TCP connection left ESTABLISHED (the peer closed or reset);
    False when it cannot be told (not TCP, no TCP_INFO)."""
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except (OSError, AttributeError):
        return False
    return bool(info) and info[0] != _TCP_ESTABLISHED


#: A client transport's write high-water mark. asyncio's default (64 KiB,
#: low 16 KiB) lets a piece of a body pile up behind another that the kernel
#: did not take, a slow client's whole window of userspace memory; the
#: kernel's send buffer (autotuned, up to tcp_wmem's 4 MiB) already holds
#: what keeps a fast client busy. At 0 a writer waits whenever anything is
#: left unsent, so a stalled stream holds at most the rest of one write.
CLIENT_WRITE_HIGH: Final = 0

# Reads from a client (bench/slow_streams.py --op upload --target-rate). The
# socket is read into one buffer per thread, at most `_read_size` bytes at a
# time: what this connection may still take, not what the loop would read
# (256 KiB under uvloop). A request body (or tunnel) whose reader is busy, or
# over its high-water, pauses reading at once and takes reads back to
# READ_MIN, so the rest of a fast upload to a slow target waits in the
# kernel's socket buffers (bounded by TCP flow control), not here. A reader
# that was waiting when its data came (the client is the slow side) doubles
# the read size up to READ_MAX. A copied upload to a slow target holds one
# read in its body buffer and at most one unsent piece in the target's
# transport. Measured, 200 fast uploads to a 32 KiB/s target: 256 KiB reads
# 397-420 KiB of RSS each, READ_MAX 64 KiB 156-198, 32 KiB 74-89.
READ_MIN: Final = 16 * 1024
READ_MAX: Final = 32 * 1024


# The client sockets' reads land here (see READ_MIN; readbuffer.py).
_READ_BUFFER: Final = ThreadReadBuffer(BODY_HIGH)


# llhttp's version text for the versions served, parsed once (others are
# parsed per request, and refused by vet_head).
_VERSIONS: Final = {"1.1": (1, 1), "1.0": (1, 0)}


class _PipelineFull(Exception):
    """Raised from on_headers_complete: stop parsing, see MAX_PIPELINED."""


class Limit(Exception):
    """Raised from a parser callback: a size limit, answered with `error`."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class Connection(WriteFlow, asyncio.BufferedProtocol):
    """One client connection: parse, queue, hand each request to the handler."""

    # Slots: past 30 attributes CPython (3.11) stops sharing an instance
    # dict's keys, and every attribute access goes through a dict lookup;
    # this class has 39, read and written many times per request.
    __slots__ = (
        "_body_error", "_client_eof", "_current", "_handling", "_head_size", "_headers",
        "_last", "_linger_left", "_linger_timer", "_lingering", "_loop", "_lost", "_messages",
        "_parser", "_paused", "_peer_watch", "_progress", "_queue", "_queue_waiter",
        "_read_size", "_read_view", "_refused", "_server", "_stalled_bytes", "_task",
        "_tunnel", "_url", "_view", "closing_after_response", "cut", "head_since",
        "idle_since", "in_head", "last_batch", "last_rx", "remote", "secure", "transport",
    )  # fmt: skip

    def __init__(self, server: H1Server) -> None:
        super().__init__()
        self._server = server
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self.secure = False
        self._last: Request | None = None  # the request parsed last
        self._tunnel: Body | None = None  # a tunnel's bytes from the client
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request | tuple[GatewayError, str]] = deque()
        self._queue_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._current: Request | None = None  # the request whose body is being parsed
        self._handling: Request | None = None  # the request the handler has
        self._paused = 0
        self._read_size = READ_MIN  # see READ_MIN
        # This thread's read buffer, and its first `_read_size` bytes (what
        # get_buffer hands out on most reads): sliced once, not per read.
        self._view = _READ_BUFFER.view
        self._read_view = self._view[:READ_MIN]
        self._refused = False  # nothing more is parsed
        self._lost = False
        self._client_eof = False
        self._lingering = False
        self._linger_left = 0  # bytes still read and dropped while lingering
        self._linger_timer: asyncio.TimerHandle | None = None
        self._peer_watch: asyncio.TimerHandle | None = None
        self.closing_after_response = False
        # Why the server aborted this connection ("drain"), for the access log
        # of the request it cut; None: not aborted by the server.
        self.cut: str | None = None
        self.last_batch = False  # parsing stopped: close once the queue is answered
        self.idle_since = 0.0  # when the last response ended (keep-alive)
        self._body_error: GatewayError | None = None
        # the head being parsed
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0  # the fields' bytes, each with ": " and CRLF
        self._stalled_bytes = 0  # fed since the last head, body or message end
        self._progress = False
        # slow-loris bookkeeping (see head_pending_for)
        self.in_head = False
        self.head_since = self._loop.time()  # when the pending head's deadline began
        self.last_rx = self.head_since
        self._messages = 0

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # A TLS listener's transport (the handshake is done by now).
        self.secure = transport.get_extra_info("sslcontext") is not None
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # See CLIENT_WRITE_HIGH: unsent output waits in the kernel, not here.
        # Not over TLS (h1client's connection_made says why).
        if not self.secure:
            with contextlib.suppress(AttributeError, ValueError):
                self.transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH)
        server = self._server
        server.connections.add(self)
        server._peak = max(server._peak, len(server.connections))
        if self._server.draining:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.transport = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if self._peer_watch is not None:
            self._peer_watch.cancel()
            self._peer_watch = None
        self._server.forget(self)
        lost = ConnectionResetError("the client connection was lost")
        if self._tunnel is not None:
            self._tunnel.set_exception(lost)
        for item in self._queue:
            # Not the body-less requests' shared empty body: it must stay clean.
            if isinstance(item, Request) and item.body_exists:
                item.content.set_exception(lost)
        self._queue.clear()
        if self._handling is not None:
            # Cancelled, not failed: a body read failing first would look
            # like the target's failure to the proxy (and its breaker).
            task = self._task
            if task is not None and not task.done():
                task.cancel()  # the client is gone: so is its upstream request
        self._wake_queue()
        self._release_drain()

    def eof_received(self) -> bool:
        # The client closed its side: gone, as for nginx (499) and aiohttp.
        # Closing the transport leads to connection_lost, which cancels the
        # handler and so its upstream request (CONTRACT.md "Client gone").
        self._client_eof = True
        if self._tunnel is not None and not self._lingering:
            # The client is done sending into its tunnel: what it sent still
            # goes through, and the tunnel may still write to it.
            self._tunnel.feed_eof()
            return True
        return False

    def get_buffer(self, sizehint: int) -> memoryview:
        current = self._current
        if current is not None and current is not self._handling and self._handling is not None:
            # A body pipelined behind the request being handled: nobody reads
            # it yet, and it is read up to its room (BODY_HIGH) in as few reads
            # as the loop allows, so that a small one ends before its turn
            # (one answered unread, as OPTIONS *'s, then keeps the connection).
            room = current.content.room()
            if room > self._read_size:
                return self._view[:room]
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        # Once per read: the common case (a request's bytes to parse) inline,
        # without a call to data_received and _feed.
        data: bytes | memoryview = self._view[:nbytes]
        if self._tunnel is not None or self._lingering or self._refused:
            self.data_received(data)
            return
        self.last_rx = self._loop.time()
        self._progress = False
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
            rest = self._parse_stopped(exc, data)
            if rest is None:
                return
            data = self._feed(rest)
        if self._progress:
            self._stalled_bytes = 0
        else:
            self._check_stalled(data)

    def data_received(self, data: bytes | memoryview) -> None:
        # `data` is a view of the one reused read buffer (buffer_updated):
        # what is kept past this call is copied out of it.
        if self._tunnel is not None and not self._lingering:
            self._tunnel.feed_data(bytes(data))
            return
        if self._lingering:
            self._linger_left -= len(data)
            if self._linger_left < 0:
                self._end_linger()
            return
        if self._refused:
            return
        self.last_rx = self._loop.time()
        self._progress = False
        data = self._feed(data)
        self._check_stalled(data)

    def _feed(self, data: bytes | memoryview) -> bytes | memoryview:
        """Parse `data`, past any Upgrade llhttp stops at; returns the last
        piece fed (for `_check_stalled`), b"" when parsing stopped."""
        while data:
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
                rest = self._parse_stopped(exc, data)
                if rest is None:
                    return b""
                data = rest
                continue
            break
        return data

    def _parse_stopped(self, exc: Exception, data: bytes | memoryview) -> bytes | memoryview | None:
        """llhttp stopped in `data`: what is left to parse, or None to stop."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            # llhttp stops after an Upgrade (or CONNECT) request's head.
            # The gateway switches no protocol: the request was queued as
            # a plain one (a body with it is refused, CONNECT too), and
            # what follows is parsed as the next request.
            offset = exc.args[0] if exc.args else len(data)
            self._parser = httptools.HttpRequestParser(self)
            if self._refused:
                return None
            last = self._last
            if last is not None and last.websocket:
                self._upgrade_pending(last, bytes(data[offset:]))  # a copy
                return None
            return data[offset:]
        cause = exc.__context__
        if isinstance(cause, _PipelineFull):
            self._refused = True  # parse nothing more; answer the queue
            self.last_batch = True
            self.in_head = False
            return None
        self._parse_failed(
            cause.error if isinstance(cause, Limit) else BadRequest("malformed request")
        )
        return None

    def _check_stalled(self, data: bytes | memoryview) -> None:
        if self._progress:
            self._stalled_bytes = 0
            return
        # Bytes that completed neither a head nor a message nor any body
        # data: a head, or trailers, or chunk extensions, still going.
        # llhttp buffers nothing, but httptools keeps a partial field value
        # in memory: stop it here.
        self._stalled_bytes += len(data)
        if self._stalled_bytes > MAX_HEAD_BYTES + MAX_REQUEST_LINE:
            self._parse_failed(HeadersTooLarge("header section too large"))

    # -- httptools callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        if self._messages:
            # A later request's head is timed from its first byte; the first
            # one's from the accept, as nginx's client_header_timeout. The
            # read that holds that byte just set last_rx (every feed is
            # from a read): no clock read of its own.
            self.head_since = self.last_rx
        self._url = b""
        self._headers = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        url = self._url = self._url + url
        if len(url) > MAX_REQUEST_LINE:
            raise Limit(UriTooLong("request target too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        name_size = len(name)
        value_size = len(value)
        if name_size > MAX_FIELD_SIZE or value_size > MAX_FIELD_SIZE:
            raise Limit(HeadersTooLarge("header field too large"))
        headers = self._headers
        headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )
        # Bytes as they came, as vetting.section_limit says and h1client
        # counts (a decoded non-ASCII value is shorter in characters).
        size = self._head_size = self._head_size + name_size + value_size + 4
        # The caps inline (a call per field is measurable per request); the
        # reason, only when over them, from the one rule in vetting.py.
        if size > MAX_HEAD_BYTES or len(headers) > MAX_HEADERS:
            raise Limit(HeadersTooLarge(section_limit(len(headers), size) or "too large"))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._progress = True
        if len(self._queue) >= MAX_PIPELINED:
            raise _PipelineFull
        parser = self._parser
        method = parser.get_method().decode("ascii", "replace")
        version_text = parser.get_http_version()
        version = _VERSIONS.get(version_text)
        if version is None:
            major, _, minor = version_text.partition(".")
            version = (int(major), int(minor)) if major.isdigit() and minor.isdigit() else (0, 9)
        headers: CIMultiDict[str] = CIMultiDict(self._headers)
        raw_path = self._url.decode("utf-8", "surrogateescape")
        coding = headers.get(TRANSFER_ENCODING)
        error = vet_head(method, raw_path, version, headers, coding)
        if error is not None:
            raise Limit(error)
        length_text = headers.get(CONTENT_LENGTH)
        content_length = int(length_text) if length_text is not None else None
        chunked = coding is not None
        upgrade = parser.should_upgrade()
        if upgrade and (chunked or content_length):
            # llhttp ends an Upgrade request at its head, whatever framing it
            # announced; the gateway switches no protocol, so the body would
            # be parsed as the next request (smuggling). Refuse it.
            raise Limit(BadRequest("a request body with Upgrade"))
        request = Request(
            self,
            method,
            raw_path,
            version,
            headers,
            parser.should_keep_alive(),
            content_length,
            chunked,
        )
        if upgrade and method == "GET" and version >= (1, 1):
            # RFC 6455 4.1: a WebSocket opening handshake. Other protocols
            # (h2c above all) are never switched to: their Upgrade is
            # stripped like any hop-by-hop header and the request served as
            # HTTP/1.1 (RFC 9110 7.8 lets a server ignore it).
            tokens = headers.get("Upgrade", "").lower().split(",")
            request.websocket = any(token.strip() == "websocket" for token in tokens)
        self._current = request
        self._last = request
        queue = self._queue
        if self._task is None or len(queue) >= _MAX_QUEUED:
            self._enqueue(request)
            return
        # _enqueue's common case inline (once per request): the serving task
        # runs and the queue stays short.
        queue.append(request)
        waiter = self._queue_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._progress = True
        current = self._current
        if current is not None:
            current.content.feed_data(body)

    def on_message_complete(self) -> None:
        self._progress = True
        current = self._current
        if current is not None and current.body_exists:  # else: no Body to end
            current.content.feed_eof()
        self._current = None
        self._messages += 1

    # -- WebSocket upgrades -----------------------------------------------------------

    def _upgrade_pending(self, request: Request, tail: bytes) -> None:
        """A WebSocket upgrade was parsed: nothing after it is parsed, since
        it is the tunnel's if the target switches protocols; the socket is
        paused until the handler knows. Either way the connection ends with
        this request (its answer, or the tunnel's close)."""
        request.upgrade_tail = tail
        request.writer.keep_alive = False
        self._refused = True
        self.last_batch = True
        self.in_head = False
        self.pause_reading(PAUSE_UPGRADE)

    def take_tunnel(self, request: Request) -> ClientTunnel:
        """The 101 went out: the connection's bytes are the tunnel's now."""
        inbox = Body(self)
        if request.upgrade_tail:
            inbox.feed_data(request.upgrade_tail)
            request.upgrade_tail = b""
        if self._client_eof:
            inbox.feed_eof()
        self._tunnel = inbox
        self.resume_reading(PAUSE_UPGRADE)
        return ClientTunnel(self, inbox)

    # -- refusals -------------------------------------------------------------------

    def _parse_failed(self, error: GatewayError) -> None:
        current = self._current
        if current is not None and current is self._handling:
            # The head went to the handler; its body broke. Cancel the
            # handler (its upload is cut, the target never sees a whole
            # request), which answers 400 unless its response began.
            self._refused = True
            self._body_error = BadRequest("malformed request body")
            current.content.set_exception(ConnectionResetError("malformed request body"))
            task = self._task
            if task is not None and not task.done():
                task.cancel()
            return
        if current is not None:
            # Still queued: it never reached the handler, nor a target.
            with contextlib.suppress(ValueError):
                self._queue.remove(current)
            self._current = None
        self._refuse(error)

    def _refuse(self, error: GatewayError) -> None:
        """Answer `error` after the responses owed, then close; parse nothing more."""
        if self._refused:
            return
        self._refused = True
        self.in_head = False
        self._enqueue((error, self._refusal_id()))

    def _refusal_id(self) -> str:
        # A head that parsed far enough to be vetted keeps a sane client id.
        for name, value in self._headers:
            if name.lower() == "x-request-id":
                return request_id(value, new_request_id)
        return new_request_id()

    # -- the queue and the serving task ---------------------------------------------

    def _enqueue(self, item: Request | tuple[GatewayError, str]) -> None:
        queue = self._queue
        queue.append(item)
        if len(queue) > _MAX_QUEUED:
            self.pause_reading(PAUSE_QUEUE)
        if self._task is None:
            task = self._task = self._loop.create_task(self._serve())
            self._server.tasks.add(task)
            task.add_done_callback(self._server._task_done)
        else:
            self._wake_queue()

    def _wake_queue(self) -> None:
        waiter = self._queue_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _serve(self) -> None:
        """Answer the queue in order, one handler at a time.

        The handler is awaited here, not in a coroutine of its own per
        request: each of its resumptions would pass through that one too.
        """
        queue = self._queue
        try:
            while True:
                # The next item; the wait for one inline (once per request).
                while not queue:
                    if self._lost or self._client_eof or self._server.draining or self.last_batch:
                        return
                    waiter = self._loop.create_future()
                    self._queue_waiter = waiter
                    try:
                        await waiter
                    finally:
                        self._queue_waiter = None
                request = queue.popleft()
                if self._paused & PAUSE_QUEUE and len(queue) <= _MAX_QUEUED // 2:
                    self.resume_reading(PAUSE_QUEUE)
                if isinstance(request, tuple):
                    self._write_refusal(*request)
                    return
                # Run the handler for one request.
                self._handling = request
                if request.body_exists:
                    request.content.handled()
                writer = request.writer
                try:
                    reply = await self._server.handler(request)
                    if reply is not None:
                        writer.send_reply(reply)
                    elif not writer.eof_sent:
                        raise RuntimeError("the handler neither replied nor finished its response")
                except asyncio.CancelledError:
                    if not self._body_broke(request):
                        raise  # the client is gone, or shutdown
                    return
                except (ConnectionError, RuntimeError) as exc:
                    log.debug("response to %s not completed: %s", self.remote, exc)
                    self._abort()
                    return
                finally:
                    self._handling = None
                    if self.in_head:
                        # A pipelined head arrived meanwhile: its deadline counts
                        # from now, since the client was waiting for this response.
                        self.head_since = self._loop.time()
                if not self._answered(request):
                    return
        except asyncio.CancelledError:
            pass  # client gone or shutting down: nothing left to answer
        except Exception:
            log.exception("error serving a connection from %s", self.remote)
            self._abort()
        finally:
            self._task = None
            self._finish()

    def _body_broke(self, request: Request) -> bool:
        """The handler was cancelled: if for its body turning malformed
        (`_parse_failed`), answer that (400, or an abort if the response
        began) and return True; False for any other cancel."""
        error = self._body_error
        task = asyncio.current_task()
        if error is None or task is None or task.cancelling() > 1:
            return False
        task.uncancel()
        self._body_error = None
        writer = request.writer
        if writer.started:
            # The response began: its status cannot change; the only
            # honest signal is an aborted transfer (CONTRACT.md).
            self._abort()
            return True
        rid = request_id(request.headers.get("X-Request-ID"), new_request_id)
        writer.send_reply(json_reply(error, rid))
        self._linger()  # the rest of the broken body may still be coming
        return True

    def _answered(self, request: Request) -> bool:
        """A request's response is out: whether the connection goes on."""
        body_exists = request.body_exists
        if (
            not request.writer.keep_alive
            or self._lost
            or (body_exists and not request.content.is_eof())
        ):
            # Closing anyway, or answered before the body was read (e.g. 413):
            # the rest of that body is unframed for us now.
            self._close_after(request)
            return False
        # A whole body the handler answered without reading (a preflight,
        # OPTIONS *) is done with. Left buffered, over _BODY_HIGH it would
        # keep the socket paused, and the next request would never be read.
        if body_exists:
            request.content.discard()
        self.idle_since = self._loop.time()
        return True

    def _write_refusal(self, error: GatewayError, rid: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # The JSON reply the handler would give, framed without a request
        # (there is none to ask about HEAD or the version): whole, then close.
        reply = json_reply(error, rid)
        headers = reply.headers
        headers["Content-Length"] = str(len(reply.body))
        headers["Date"] = http_date()
        headers["Connection"] = "close"
        status_line = f"HTTP/1.1 {error.status} {reason_phrase(error.status)}"
        transport.write(encode_head(status_line, headers.items()) + reply.body)
        hook = self._server.on_refusal
        if hook is not None:
            hook(error, rid, self.remote, len(reply.body))
        self._linger()  # the refused request's body, or more, may be on its way

    def _close_after(self, request: Request) -> None:
        """Close once the response is out; linger if the body is still coming."""
        transport = self.transport
        if transport is None:
            return
        if request.content.is_eof() and not self._refused:
            transport.close()
            return
        self._linger()

    def _linger(self) -> None:
        """End the connection after the answer just written, without a reset.

        RFC 9112 9.6 and nginx's lingering_close: half-close (the client reads
        the answer, then EOF), and read and drop what it still sends until it
        closes too, LINGER_SECONDS pass or LINGER_MAX_BYTES came; only then
        close. The answer is already in the transport's buffer; write_eof
        shuts the socket's write side once that buffer is flushed.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        if self._client_eof:
            transport.close()  # nothing more can come
            return
        self._lingering = True
        self._refused = True  # nothing more is parsed
        self.in_head = False
        self._linger_left = LINGER_MAX_BYTES
        self.resume_reading(PAUSE_BODY | PAUSE_QUEUE | PAUSE_HANDOVER | PAUSE_UPGRADE)
        if transport.can_write_eof():  # not on TLS: close_notify goes at the close
            try:
                transport.write_eof()
            except OSError:
                # The peer is already gone (a tunnel's client reset, seen by
                # the relay before asyncio): nothing to linger for.
                transport.abort()
                return
        self._linger_timer = self._loop.call_later(LINGER_SECONDS, self._end_linger)

    def _end_linger(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            # The client read nothing of the answer in all this time; close()
            # would wait for the buffer to drain with no bound.
            transport.abort()
        else:
            transport.close()

    def _finish(self) -> None:
        transport = self.transport
        if transport is not None and not self._lingering and not transport.is_closing():
            transport.close()

    def _abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.abort()

    # -- keep-alive, drain, flow control ---------------------------------------------

    def idle_for(self, now: float) -> float:
        """How long a keep-alive connection has waited for its next request."""
        if self._messages == 0 or self.in_head or self.busy() or self._lingering:
            return 0.0
        return now - max(self.idle_since, self.last_rx)

    def close_idle(self) -> None:
        if not self.busy() and not self.in_head:
            self._finish()

    async def drain(self, stall_timeout: float | None = None) -> None:
        """Until the client has taken enough of what was written (the
        transport is under its low-water mark).

        Raises SendTimeout when the client took nothing at all for
        `stall_timeout` seconds: as nginx's send_timeout, it bounds the time
        between two steps of progress, not the whole response, so a slow
        client that keeps reading is never cut.
        """
        transport = self.transport
        if not self._write_paused or transport is None:
            return
        if stall_timeout is None:
            await self._wait_for_drain(self._loop)
        else:
            size = unsent(transport)
            # Each round either ends the wait or follows progress (less
            # unsent), so the rounds are bounded by the bytes written.
            while True:
                try:
                    async with asyncio.timeout(stall_timeout):
                        await self._wait_for_drain(self._loop)
                    break
                except TimeoutError:
                    if self._lost:
                        break
                    now = unsent(transport)
                    if now >= size:
                        raise SendTimeout(
                            f"the client took nothing for {stall_timeout:g} s"
                        ) from None
                    size = now
        if self._lost:
            raise ConnectionResetError("the client connection was lost")

    def read_more(self) -> None:
        """A body's (or tunnel's) reader was waiting for its data: it keeps up."""
        size = min(self._read_size * 2, READ_MAX)
        if size != self._read_size:
            self._read_size = size
            self._read_view = self._view[:size]

    def read_less(self) -> None:
        """A body's (or tunnel's) reader is busy with what it read: it does
        not keep up, and the next read is READ_MIN."""
        if self._read_size != READ_MIN:
            self._read_size = READ_MIN
            self._read_view = self._view[:READ_MIN]

    def pause_reading(self, reason: int) -> None:
        was = self._paused
        self._paused |= reason
        if not was and self.transport is not None:
            self.transport.pause_reading()
        if reason & PAUSE_BODY and self._peer_watch is None:
            self._peer_watch = self._loop.call_later(PEER_WATCH_EVERY, self._watch_peer)

    def _watch_peer(self) -> None:
        """While a request body waits unread (its target is slow), the socket
        is not read, so the client's close goes unseen: the upload would go
        on feeding the target, holding its buffers, long after the client
        left. The kernel knows (the connection left ESTABLISHED): then it
        ends as a client close read in time would (eof_received, 499)."""
        self._peer_watch = None
        transport = self.transport
        if transport is None or transport.is_closing() or not self._paused & PAUSE_BODY:
            return
        if self._tunnel is not None:
            return  # a tunnel's client may half-close and still read: not gone
        if peer_closed(transport):
            # Aborted, not closed: a close would first flush what waits for
            # a client that is gone.
            self._client_eof = True
            transport.abort()
            return
        self._peer_watch = self._loop.call_later(PEER_WATCH_EVERY, self._watch_peer)

    def resume_reading(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def queued(self) -> int:
        return len(self._queue)

    def busy(self) -> bool:
        return self._handling is not None or bool(self._queue)

    def close_when_idle(self) -> None:
        """Draining: close now if idle, else after the response in progress."""
        self.closing_after_response = True
        if not self.busy():
            self._finish()
        self._wake_queue()

    # -- zero-copy request bodies (splice.py) ------------------------------------------

    def hand_over_body(self, request: Request) -> tuple[bytes, int]:
        """Stop reading; return the body bytes buffered and the count still in the socket."""
        self.pause_reading(PAUSE_HANDOVER)
        buffered = request.content.read_nowait()
        remaining = (request.content_length or 0) - request.content.total_bytes
        return buffered, remaining

    def body_spliced(self, request: Request) -> None:
        """The relay moved the rest of the body: llhttp, which still counts it,
        is replaced, and reading goes on with the next request."""
        if self._current is request:
            self._current = None
            self._parser = httptools.HttpRequestParser(self)
            self._messages += 1
        request.content.feed_eof()
        self.resume_reading(PAUSE_HANDOVER)

    # -- slow loris -------------------------------------------------------------------

    def head_pending_for(self, now: float) -> float:
        """How long a request head has been pending (0 if none pends).

        A deadline, not a silence: bytes that arrive do not restart it, or
        one byte a second would hold the connection for ever (slow loris;
        CONTRACT.md `client_timeout`). A head is pending from the moment the
        connection opens (nginx's client_header_timeout covers the first
        request too), and from the first byte of each later one (or the end
        of the response it was pipelined behind); not while a request is
        handled or queued, nor on an idle keep-alive connection, whose wait
        is KEEPALIVE_TIMEOUT's.
        """
        if self._refused or self._lingering or self.busy():
            return 0.0
        if self.in_head or self._messages == 0:
            return now - self.head_since
        return 0.0

    def cut_slow_head(self) -> None:
        """Close for a head past its deadline: 408 if part of one came, else silently.

        A connection that sent nothing gets no 408: a client about to reuse it
        would take the 408 for the answer to the request it is sending.
        """
        self._refused = True
        if self.in_head:
            error = ClientTimeout("request head not received in time")
            self._write_refusal(error, new_request_id())
        self._finish()


Handler = Callable[[Request], Awaitable[Reply | None]]
# (error, request id, client address, body bytes sent)
RefusalHook = Callable[[GatewayError, str, str, int], None]


class H1Server:
    """The protocol factory for the proxy listeners, and their connections."""

    def __init__(self, handler: Handler, on_refusal: RefusalHook | None = None) -> None:
        self.handler = handler
        self.on_refusal = on_refusal
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # one per connection with requests
        self.draining = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        # Connections open at most since the heap was last trimmed (forget()).
        self._peak = 0
        self._trim: asyncio.TimerHandle | None = None
        self._trimmed_at = float("-inf")  # loop time of the last trim

    def __call__(self) -> Connection:
        return Connection(self)

    def pre_shutdown(self) -> None:
        """Idle connections close now, busy ones after their response."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_when_idle()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self._check_idle()
        count = len(self.connections)
        if count <= self._peak // 2 and self._peak - count >= TRIM_AFTER_DROP:
            # The load dropped: give the heap's free pages back once it has
            # settled (heap.py), not at every close.
            self._peak = count
            if self._trim is None:
                loop = asyncio.get_running_loop()
                delay = max(TRIM_DELAY, self._trimmed_at + TRIM_EVERY - loop.time())
                self._trim = loop.call_later(delay, self._trim_heap)

    def _trim_heap(self) -> None:
        self._trim = None
        self._trimmed_at = asyncio.get_running_loop().time()
        heap.trim()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.connections and not self.tasks:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    async def shutdown(self) -> None:
        """Until every connection has closed and its handler has ended."""
        if not self.connections and not self.tasks:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        await waiter

    def abort_all(self, reason: str) -> int:
        """Abort every connection; returns how many had a request running.

        `reason` ("drain") is left on each connection first, so the handler
        cancelled by the abort logs who cut its request instead of blaming
        the client.
        """
        busy = 0
        for conn in list(self.connections):
            if conn.busy():
                busy += 1
            conn.cut = reason
            conn._abort()
        return busy


async def sweep_slow_heads(
    servers: Callable[[], list[H1Server]], client_timeout: Callable[[], float]
) -> None:
    """Close connections whose request head is not in `client_timeout` after
    it began, and keep-alive connections idle past `KEEPALIVE_TIMEOUT`; runs
    until cancelled.

    Sweeping a few times per timeout (at least every second) costs one pass
    over the connections instead of arming and cancelling a timer for every
    request and read.
    """
    loop = asyncio.get_running_loop()
    while True:
        timeout = client_timeout()
        await asyncio.sleep(min(1.0, max(timeout / 4, 0.05)))
        now = loop.time()
        for server in servers():
            for conn in list(server.connections):
                if conn.head_pending_for(now) > timeout:
                    conn.cut_slow_head()
                elif conn.idle_for(now) > KEEPALIVE_TIMEOUT:
                    conn.close_idle()
