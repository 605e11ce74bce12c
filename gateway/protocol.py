"""aiohttp's HTTP/1.1 server protocol, with the gateway's answers to bad clients.

Two things aiohttp does not do the way the contract wants:

* parse errors all become `400 text/plain`; we answer JSON, and tell an
  overlong request target (414) and oversized header fields (431) apart;
* there is no timeout on a request head that trickles in (slow loris):
  `keepalive_timeout` only runs between requests. A sweeper closes every
  connection that has been silent for `client_timeout` while its head is
  incomplete. Sweeping once a second costs one pass over the connections,
  instead of re-arming a timer on every `data_received`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.errors import GatewayError, json_body

log = logging.getLogger("gateway.protocol")

# Distinct limits let a LineTooLong say which part was too long: llhttp
# reports the limit it hit, not the part. nginx's defaults are 8 KiB lines.
MAX_REQUEST_LINE: Final = 8192
MAX_FIELD_SIZE: Final = 16384
MAX_HEADERS: Final = 128


class _UriTooLong(GatewayError):
    status = 414
    code = "uri_too_long"


class _HeadersTooLarge(GatewayError):
    status = 431
    code = "header_fields_too_large"


class _BadRequest(GatewayError):
    status = 400
    code = "bad_request"


def classify_parse_error(exc: BaseException | None, status: int) -> GatewayError:
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == MAX_REQUEST_LINE:
            return _UriTooLong("request target too long")
        return _HeadersTooLarge("header field too large")
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
        return _HeadersTooLarge("too many header fields")
    if status == 400 or isinstance(exc, BadHttpMessage):
        return _BadRequest("malformed request")
    return GatewayError("internal error")


class GatewayRequestHandler(RequestHandler):
    """One client connection."""

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        now = self._loop.time()
        # A head is pending from the moment the connection opens (nginx's
        # client_header_timeout covers the first request too) and again from
        # the first byte after a response.
        self.head_since: float | None = now
        self.last_rx = now

    def data_received(self, data: bytes) -> None:
        self.last_rx = now = self._loop.time()
        if self.head_since is None and not self._request_in_progress:
            self.head_since = now
        super().data_received(data)

    async def _handle_request(self, request: Any, start_time: Any, request_handler: Any) -> Any:
        self.head_since = None
        return await super()._handle_request(request, start_time, request_handler)

    def head_silent_for(self, now: float) -> float:
        if self.head_since is None or self._request_in_progress:
            return 0.0
        return now - max(self.head_since, self.last_rx)

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
        if error.status >= 500:
            log.error("error handling request from %s", request.remote, exc_info=exc)
        else:
            log.debug("refused malformed request from %s: %s", request.remote, exc)
        response = web.Response(
            status=error.status, body=json_body(error, "-"), content_type="application/json"
        )
        # Framing of anything after a bad message cannot be trusted
        # (RFC 9112 11.2, request smuggling): close.
        response.force_close()
        return response


class GatewayServer(web.Server):
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
            for handler in server.connections:
                if (
                    isinstance(handler, GatewayRequestHandler)
                    and handler.head_silent_for(now) > timeout
                ):
                    transport = handler.transport
                    if transport is not None:
                        transport.close()
