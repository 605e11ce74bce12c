"""aiohttp's HTTP/1.1 server protocol, with the gateway's answers to bad clients.

The contract: a malformed request is refused, the connection closed, and
nothing of it reaches a target. aiohttp's request parser (llhttp in strict
mode: aiohttp only relaxes it for *responses*) already refuses most framing
attacks by itself: Content-Length with Transfer-Encoding, differing or
repeated Content-Lengths, a Transfer-Encoding whose last coding is not
chunked, bad chunk sizes, obs-fold, bare CR or LF, NUL and other controls,
whitespace before the colon, a second Host, and HTTP/1.1 without Host.
What this module adds:

* **Answers.** aiohttp answers parse errors `400 text/plain`; we answer the
  contract's JSON with a fresh request id, and tell an overlong request
  target (414) and oversized header fields (431) apart.
* **Head checks llhttp leaves to the application** (`vet_head`), made before
  a request is queued for the handler, so a refused one never reaches it:
  HTTP versions other than 1.0/1.1 (llhttp parses `HTTP/2.0` and HTTP/0.9),
  CONNECT, an invalid Host value, Transfer-Encoding on HTTP/1.0 or with
  codings before chunked, userinfo or a foreign scheme in an absolute-form
  target, and an oversized header section.
* **A broken body.** When llhttp fails inside a body whose head already went
  to the handler (the head and the bad chunk arrived in different reads),
  aiohttp neither fails nor ends the body: the upload would hang until
  `client_timeout` and answer 408. We cancel the handler at once (its
  upstream request is cut, so the target sees an aborted upload, never a
  complete request) and answer 400.
* **Slow loris.** There is no timeout on a request head that trickles in:
  `keepalive_timeout` only runs between requests. A sweeper closes every
  connection whose pending head has been silent for `client_timeout` (with a
  408 when part of a head came, silently when nothing did). Sweeping a few
  times per timeout costs one pass over the connections instead of
  re-arming a timer on every `data_received`. Silence mid-body is the
  proxy's per-read timeout (408); we only skip aiohttp's lingering read
  after it, since a silent client has nothing left to drain.

After any refusal nothing more from the connection is parsed: the framing of
whatever follows cannot be trusted (RFC 9112 11.2, request smuggling), so
pipelined requests behind a malformed one are never processed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from gateway.errors import (
    BadRequest,
    ClientTimeout,
    ConnectRefused,
    GatewayError,
    HeadersTooLarge,
    NotImplementedCoding,
    UriTooLong,
    VersionNotSupported,
    json_body,
)
from gateway.headers import new_request_id, request_id

log = logging.getLogger("gateway.protocol")

# Distinct limits let a LineTooLong say which part was too long: llhttp
# reports the limit it hit, not the part. nginx's defaults are 8 KiB lines.
MAX_REQUEST_LINE: Final = 8192
MAX_FIELD_SIZE: Final = 16384
MAX_HEADERS: Final = 128
# The whole header section. Per-field and count limits alone would admit
# 128 x 16 KiB = 2 MiB of headers per request, copied to every target;
# nginx's large_client_header_buffers (4 x 8k) stops at 32 KiB.
MAX_HEAD_BYTES: Final = 65536

_HandlerFn = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# RFC 9112 3.2 / RFC 3986 3.2.2-3.2.3: Host = uri-host [ ":" port ], where a
# host is an IP-literal in brackets or a reg-name (unreserved, pct-encoded,
# sub-delims). Anything else (spaces, "/", "@", non-ASCII) is an invalid field
# value, which RFC 9112 3.2 says a server MUST answer with 400.
_HOST: Final = re.compile(
    r"(?:\[[0-9A-Za-z:._~%!$&'()*+,;=-]+\]|[0-9A-Za-z._~%!$&'()*+,;=-]*)(?::[0-9]*)?",
    re.ASCII,
)


class _Refused(Exception):
    """A head `vet_head` refused, carried through aiohttp's error path.

    It keeps the request id: the head parsed, so a sane client X-Request-ID
    is honoured, unlike for a head llhttp could not parse.
    """

    def __init__(self, error: GatewayError, rid: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = rid


def vet_head(message: RawRequestMessage) -> GatewayError | None:
    """What llhttp parsed but the gateway refuses, or None to go ahead."""
    if message.version not in (HttpVersion10, HttpVersion11):
        # llhttp accepts HTTP/0.9 (a bare "GET /") and HTTP/2.0 request lines;
        # neither can be answered in HTTP/1.x framing (RFC 9110 15.6.6).
        return VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are served here")
    if message.method == hdrs.METH_CONNECT:
        # The gateway is no forward proxy. aiohttp would hand the tunnel to
        # the handler, and aiohttp's client would open one to the target. An
        # empty Allow: the authority-form target names no resource of ours
        # (RFC 9110 10.2.1). nginx answers CONNECT with 405 too.
        return ConnectRefused(
            "CONNECT is not supported: this is a gateway, not a forward proxy", {"Allow": ""}
        )
    size = 0
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4  # ": " and CRLF
    if size > MAX_HEAD_BYTES:
        return HeadersTooLarge("header section too large")
    host = message.headers.get(hdrs.HOST)
    if host is not None and _HOST.fullmatch(host) is None:
        return BadRequest("invalid Host header")
    coding = message.headers.get(hdrs.TRANSFER_ENCODING)
    if coding is not None:
        if message.version == HttpVersion10:
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding MUST be
            # treated as having faulty framing (1.0 hops do not know chunked).
            return BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in coding.split(",")]
        if [c for c in codings if c] != ["chunked"]:
            # llhttp already refuses a last coding other than chunked (RFC
            # 9112 6.3 rule 4). Codings before it ("gzip, chunked") we cannot
            # undo, and dropping the header (hop-by-hop) would hand the target
            # a coded body as if plain: RFC 9112 6.1 says 501, as nginx does.
            return NotImplementedCoding(f"unsupported Transfer-Encoding {coding!r}")
    target = message.path
    if not target.startswith("/") and target != "*":
        # Absolute-form: routed by our own table, never sent to the host it
        # names (RFC 9112 3.2.2). aiohttp checked it has an authority.
        url = message.url
        if url.scheme.lower() not in ("http", "https"):
            return BadRequest("absolute-form target must be http or https")
        authority = url.raw_authority
        if "@" in authority:
            # RFC 9110 4.2.4: userinfo is to be treated as an error (it hides
            # the real authority), and it must not leak into X-Forwarded-Host.
            return BadRequest("userinfo in the request target")
        if _HOST.fullmatch(authority) is None:
            return BadRequest("invalid authority in the request target")
    return None


def classify_parse_error(exc: BaseException | None, status: int) -> GatewayError:
    if isinstance(exc, _Refused):
        return exc.error
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == MAX_REQUEST_LINE:
            return UriTooLong("request target too long")
        return HeadersTooLarge("header field too large")
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
        return HeadersTooLarge("too many header fields")
    if status == 400 or isinstance(exc, BadHttpMessage):
        return BadRequest("malformed request")
    return GatewayError("internal error")


def json_response(error: GatewayError, rid: str, close: bool = True) -> web.Response:
    """The contract's JSON error body, with the request id in body and header."""
    response = web.Response(
        status=error.status,
        body=json_body(error, rid),
        content_type="application/json",
        headers=error.headers,
    )
    response.headers["X-Request-ID"] = rid
    if close:
        # Framing of anything after a refused message cannot be trusted
        # (RFC 9112 11.2, request smuggling): close.
        response.force_close()
    return response


def _raw_response(error: GatewayError, rid: str) -> bytes:
    """A whole response for a connection without a request to answer."""
    body = json_body(error, rid)
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-ID: {rid}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GatewayRequestHandler(RequestHandler):
    """One client connection."""

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        now = self._loop.time()
        # Whether the parser holds the start of a head not yet complete. A
        # head is pending from the moment the connection opens (nginx's
        # client_header_timeout covers the first request too), and again
        # from the first byte after a message ends; not while a body is read.
        self.head_pending = True
        self.head_since = now
        self.head_bytes = False  # any byte of the pending head arrived
        self.last_rx = now
        # Once set, nothing more from this client is parsed or handled.
        self._refused = False
        # The request last given to the handler, and the task running it.
        self._in_flight: web.BaseRequest | None = None
        self._handler_task: asyncio.Task[Any] | None = None
        self._body_error: GatewayError | None = None
        self._no_linger = False
        self._rx_tail = b""  # the last bytes read, to see a CRLF CRLF split over reads

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        queued = len(self._messages)
        before = self._latest_payload()
        in_body = before is not None and not before.is_eof()
        before_bytes = before.total_bytes if before is not None else 0
        super().data_received(data)
        if len(self._messages) > queued:
            self._vet_new_messages(queued)
        if not data or self._refused:
            return
        self.last_rx = now = self._loop.time()
        pending = self._head_pending_after(
            data, len(self._messages) > queued, in_body, before_bytes
        )
        self._rx_tail = data[-3:] if len(data) >= 3 else (self._rx_tail + data)[-3:]
        if pending:
            if not (self.head_pending and self.head_bytes):
                self.head_since = now
            self.head_pending = self.head_bytes = True
        else:
            self.head_pending = self.head_bytes = False

    def _latest_payload(self) -> StreamReader | None:
        """The body the parser fed last: the newest queued or the running one."""
        if self._messages:
            return self._messages[-1][1]
        request = self._in_flight
        return request.content if request is not None else None

    def _head_pending_after(
        self, data: bytes, new_messages: bool, in_body: bool, before_bytes: int
    ) -> bool:
        """Whether this read left a partial head in the parser."""
        after = self._latest_payload()
        if after is not None and not after.is_eof():
            return False  # inside a body: the proxy's per-read timeout guards it
        if not new_messages and not in_body:
            return True  # no message ended: these were all head bytes
        # A message ended in this read; anything after it starts the next
        # head. A head or a chunked body ends in CRLF CRLF, so other last
        # bytes mean more followed. A Content-Length body ends anywhere:
        # count its bytes when it was already streaming, else assume nothing
        # followed (keepalive_timeout still bounds that connection).
        if self._length_framed():
            if new_messages or after is None:
                return False
            return len(data) > after.total_bytes - before_bytes
        return not self._ends_message(data)

    def _ends_message(self, data: bytes) -> bool:
        if len(data) >= 4:
            return data.endswith(b"\r\n\r\n")
        return (self._rx_tail + data).endswith(b"\r\n\r\n")

    def _length_framed(self) -> bool:
        """Whether the newest message has a Content-Length body."""
        if self._messages:
            message, payload = self._messages[-1]
            return (
                isinstance(message, RawRequestMessage)
                and not message.chunked
                and payload is not EMPTY_PAYLOAD
            )
        request = self._in_flight
        return request is not None and request.content_length is not None

    def _body_done(self) -> bool:
        request = self._in_flight
        return request is None or request.content.is_eof()

    def _vet_new_messages(self, first: int) -> None:
        """Refuse what `vet_head` refuses; stop at the first refusal."""
        messages = self._messages
        for index in range(first, len(messages)):
            message, _payload = messages[index]
            if isinstance(message, RawRequestMessage):
                error = vet_head(message)
                if error is None:
                    continue
                rid = request_id(message.headers.get("X-Request-ID"), new_request_id)
                refusal = _Refused(error, rid)
                messages[index] = (
                    _ErrInfo(status=error.status, exc=refusal, message=error.message),
                    EMPTY_PAYLOAD,
                )
            else:
                self._fail_broken_body(index)
            # Whatever follows a refused message is not processed.
            while len(messages) > index + 1:
                messages.pop()
            self._refused = True
            return

    def _fail_broken_body(self, error_index: int) -> None:
        """llhttp failed; if it failed inside a body, that request goes too.

        The parser reads messages in order, so only the message right before
        the error can have an unfinished body.
        """
        messages = self._messages
        if error_index > 0:
            _message, payload = messages[error_index - 1]
            if not payload.is_eof():
                # Still queued: it never reached the handler, nor a target.
                del messages[error_index - 1]
            return
        if self._body_done():
            return
        self._no_linger = True
        task = self._handler_task
        if task is not None:
            self._body_error = BadRequest("malformed request body")
            task.cancel()
        else:
            # The handler already answered; only aiohttp's lingering read of
            # the rest of the body is left, and the rest is garbage.
            self.force_close()

    async def _handle_request(
        self, request: web.BaseRequest, start_time: Any, request_handler: _HandlerFn
    ) -> tuple[web.StreamResponse, bool]:
        self._in_flight = request
        try:
            return await super()._handle_request(
                request, start_time, functools.partial(self._guarded, request_handler)
            )
        finally:
            if self.head_pending:
                # A pipelined head arrived meanwhile: its silence counts from
                # now, since the client was waiting for this response.
                self.head_since = self._loop.time()

    async def _guarded(self, handler: _HandlerFn, request: web.BaseRequest) -> web.StreamResponse:
        task = asyncio.current_task()
        self._handler_task = task
        try:
            return await handler(request)
        except asyncio.CancelledError:
            error = self._body_error
            if error is None or task is None or task.cancelling() > 1:
                raise  # not (only) ours: client gone or shutting down
            if request.writer.output_size > 0:
                # The response began: its status can no longer change, so the
                # only honest signal is an aborted transfer (CONTRACT.md).
                if self.transport is not None:
                    self.transport.abort()
                raise
            task.uncancel()
            log.debug("refused malformed body from %s", request.remote)
            rid = request_id(request.headers.get("X-Request-ID"), new_request_id)
            return json_response(error, rid)
        finally:
            self._handler_task = None

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: Any
    ) -> tuple[web.StreamResponse, bool]:
        queued = len(self._messages)
        result = await super().finish_response(request, resp, start_time)
        if len(self._messages) > queued and not self._refused:
            # After an Upgrade request that was not switched (ours never
            # are), aiohttp parses the bytes it held back here, not in
            # data_received: vet them the same way.
            self._vet_new_messages(queued)
        if self._no_linger or resp.status == 408:
            # aiohttp would now read and drop the rest of an unfinished body
            # for lingering_time (RFC 9112 9.6: so a client still sending
            # does not get a reset that destroys the response). A client
            # silent for client_timeout is not sending, and a body that
            # failed to parse has no rest: close now.
            self.force_close()
        return result

    def head_silent_for(self, now: float) -> float:
        if not self.head_pending or self._request_in_progress or self._messages:
            return 0.0
        return now - max(self.head_since, self.last_rx)

    def cut_silent_head(self) -> None:
        """Close for a stalled head: 408 if part of one came, else silently.

        A connection that sent nothing gets no 408: a client about to reuse it
        would take the 408 for the answer to the request it is sending.
        """
        self._refused = True
        transport = self.transport
        if transport is not None and not transport.is_closing() and self.head_bytes:
            error = ClientTimeout("request head not received in time")
            rid = new_request_id()
            transport.write(_raw_response(error, rid))
            self._report(error, rid)
        self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        error = classify_parse_error(exc, status)
        # Every response carries an X-Request-ID (CONTRACT.md). A head that
        # did not parse has no trustworthy one of its own: make one.
        rid = exc.request_id if isinstance(exc, _Refused) else new_request_id()
        if error.status >= 500 and not isinstance(exc, _Refused):
            log.error("error handling request %s from %s", rid, request.remote, exc_info=exc)
        else:
            log.debug("refused request %s from %s: %s", rid, request.remote, exc)
        self._report(error, rid)
        # The status line is HTTP/1.0 (aiohttp's placeholder request for a
        # parse error): RFC 9110 6.2 lets a server answer 1.0 to a client
        # suspected of not implementing HTTP correctly.
        return json_response(error, rid)

    def _report(self, error: GatewayError, rid: str) -> None:
        """Refusals the proxy handler never sees still reach the log and metrics."""
        manager = self._manager
        if isinstance(manager, GatewayServer) and manager.on_refusal is not None:
            peer = self.transport.get_extra_info("peername") if self.transport else None
            client = str(peer[0]) if isinstance(peer, tuple) else ""
            manager.on_refusal(error, rid, client)


RefusalHook = Callable[[GatewayError, str, str], None]


class GatewayServer(web.Server):
    """aiohttp's low-level server, making our connection handlers.

    `on_refusal(error, request_id, client)` hears of every request refused
    before the proxy handler ran (malformed, stalled head), for the access log
    and `gateway_requests_total`.
    """

    def __init__(self, *args: Any, on_refusal: RefusalHook | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_refusal = on_refusal

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


async def sweep_silent_heads(
    servers: Callable[[], list[web.Server]], client_timeout: Callable[[], float]
) -> None:
    """Close connections whose request head stalled; runs until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        timeout = client_timeout()
        await asyncio.sleep(min(1.0, max(timeout / 4, 0.05)))
        now = loop.time()
        for server in servers():
            for handler in list(server.connections):
                if (
                    isinstance(handler, GatewayRequestHandler)
                    and handler.head_silent_for(now) > timeout
                ):
                    handler.cut_silent_head()
