"""The streaming handler: one catch-all for every proxied request.

Routes that change on reload live in our own `RouteTable`, read from the
current snapshot once per request; the request then runs on that snapshot to
its end, whatever reloads happen.

Bodies move chunk by chunk in both directions: the request body is an async
generator over `request.content` handed to the upstream client (the server's
body buffer pauses the client socket when it fills, and the upstream client
drains before asking for more), and the response body is copied with
`read_chunk()` / `write()` (which drains the client socket). Content-Length
bodies of 256 KiB or more skip Python altogether (splice.py). Nothing holds
a whole body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.core.cors import is_preflight, merge_headers
from gateway.core.errors import (
    BadGateway,
    BadRequest,
    BodyTooLarge,
    ClientTimeout,
    GatewayError,
    NoHealthyTarget,
    RateLimited,
    UpstreamTimeout,
)
from gateway.core.headers import (
    client_response_headers,
    new_request_id,
    request_id,
    upstream_request_headers,
)
from gateway.core.limits import rate_limit_headers
from gateway.core.retry import backoff, may_retry
from gateway.core.routing import forward_path, has_dot_segment
from gateway.edges import upgrade
from gateway.state.log import AccessEntry, AccessLog
from gateway.state.metrics import Metrics, RequestCounter
from gateway.state.snapshot import RouteRuntime, Snapshot, SnapshotBox
from gateway.state.upstream import Target
from gateway.wire import splice
from gateway.wire.h1client import (
    JOIN_BELOW,
    DirectBody,
    H1ConnectError,
    H1Error,
    H1ReadTimeout,
    H1Response,
    H1ServerDisconnected,
)
from gateway.wire.h1messages import Reply, Request, SendTimeout, json_reply

log = logging.getLogger("gateway.proxy")

# Statuses from a target that count against its breaker and may be retried.
GATEWAY_FAILURE_STATUSES: Final = frozenset({502, 503, 504})
# nginx's code for "client closed the request before the response": logs only.
CLIENT_CLOSED: Final = 499
# What the log says of a request the gateway itself cut (drain, shutdown)
# before its response began: the status a client asking now would get.
SERVER_CUT: Final = 503
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Exchange(AccessEntry):
    """Per-request bookkeeping, filled in as the request moves along; the
    access-log line is written from it (`AccessEntry` holds what it says)."""

    __slots__ = (
        "aborted",
        "body_error",
        "body_started",
        "expect_continue",
        "request",
        "target",
        "upgrade",
    )

    def __init__(
        self, request: Request, rid: str, client: str, method: str, started_at: float
    ) -> None:
        super().__init__(rid, client, method, request.raw_path, started_at)
        self.request = request
        self.aborted = False  # the target failed after the response began
        self.expect_continue = False  # a 100 is owed before the body is read
        self.body_started = False
        self.body_error: GatewayError | None = None
        self.target: Target | None = None
        self.upgrade = False  # forwarded as a WebSocket upgrade (upgrade.py)


class _UpstreamFailed(Exception):
    """A failed attempt, before any response began; carries what retry needs."""

    def __init__(self, error: GatewayError, connect_failed: bool, no_answer: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.connect_failed = connect_failed
        # Reset, closed or timed out before the first response byte.
        self.no_answer = no_answer


def asks_about_the_server(method: str, target: str) -> bool:
    """OPTIONS * (RFC 9110 9.3.7), or its absolute-form spelling: a URI with
    an empty path and no query (RFC 9112 3.2.4)."""
    if method != "OPTIONS":
        return False
    if target == "*":
        return True
    scheme_end = target.find("://")
    if scheme_end <= 0:
        return False
    rest = target[scheme_end + 3 :]
    return "/" not in rest and "?" not in rest


def split_target(raw: str) -> tuple[str | None, str, str | None]:
    """(authority from absolute-form, raw path, raw query or None).

    An absolute-form target (`GET http://elsewhere/x`) is routed by our own
    table with its authority as the host (RFC 9112 3.2.2); it is never
    forwarded to the host it names, so the gateway is no open proxy.
    """
    authority: str | None = None
    if not raw.startswith("/"):
        scheme_end = raw.find("://")
        if scheme_end > 0:
            rest = raw[scheme_end + 3 :]
            slash = rest.find("/")
            question = rest.find("?")
            cut = min(i for i in (slash, question, len(rest)) if i >= 0)
            authority, raw = rest[:cut], rest[cut:]
            if not raw.startswith("/"):
                raw = "/" + raw
        else:  # "*": OPTIONS about the gateway itself, answered before routing
            return None, raw, None
    path, sep, query = raw.partition("?")
    return authority, path, (query if sep else None)


def _bucket_key(route: RouteRuntime, headers: CIMultiDictProxy[str], client: str) -> str:
    """The rate-limit bucket a request draws from on `route`."""
    if route.buckets is None or route.limit_by_route:
        return ""
    value = headers.get(route.limit_header) if route.limit_header else None
    # Header values are the client's to choose: prefixed, one spelled like an
    # address cannot drain (or reuse) that client's bucket.
    return f"header {value}" if value else client


class ProxyHandler:
    def __init__(
        self,
        box: SnapshotBox,
        metrics: Metrics,
        access_log: AccessLog,
        client_timeout: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._box = box
        self._metrics = metrics
        self._access_log = access_log
        self._client_timeout = client_timeout
        self._clock = clock
        # Requests that matched no route (or were refused before routing).
        self._count_unrouted = RequestCounter(metrics, "").count
        # The requests running now: a second SIGTERM logs them before exiting.
        self._live: set[_Exchange] = set()

    async def __call__(self, request: Request) -> Reply | None:
        """Answer one request through `request.writer`; always None.

        Gateway-made answers are written here too (`_send`), not returned to
        the server, so that the access-log line, written last, knows the bytes
        that really left."""
        snap = self._box.snapshot
        started = self._clock()
        # A response the client does not read may stall this long, then the
        # connection is aborted (CONTRACT.md client_timeout; nginx's send_timeout).
        request.writer.send_timeout = self._client_timeout()
        rid = request_id(request.headers.get("X-Request-ID"), new_request_id)
        peer = request.remote or ""
        headers = request.headers
        if snap.trusted.is_trusted(peer):
            client = snap.trusted.client_ip(peer, headers.getall("X-Forwarded-For", None))
            peer_trusted = True
        else:
            client, peer_trusted = peer, False
        authority, raw_path, raw_query = split_target(request.raw_path)
        host = authority if authority is not None else headers.get("Host")
        method = request.method
        ex = _Exchange(request, rid, client, method, started)
        self._live.add(ex)
        route: RouteRuntime | None = None
        error_code: str | None = None
        cors_headers: list[tuple[str, str]] = []
        limit_headers: list[tuple[str, str]] = []
        response: Reply | None
        try:
            try:
                if request.raw_path[0] != "/" and asks_about_the_server(method, request.raw_path):
                    # The gateway is that server: no route serves "*", and
                    # forwarding it would pick a target at random.
                    return self._send(ex, Reply(200, headers=CIMultiDict({"X-Request-ID": rid})))
                if has_dot_segment(raw_path):
                    # Before routing and CORS: the prefix matched would not confine it.
                    raise BadRequest("a dot-segment in the request path")
                if method == "OPTIONS" and is_preflight(method, headers):
                    preflight = self._preflight(snap, host, raw_path, headers, rid, client)
                    if preflight is not None:
                        route, answer = preflight
                        ex.route = route.name
                        return self._send(ex, answer)
                route_config = snap.table.match(method, host, raw_path, headers)
                route = snap.routes[route_config.name]
                ex.route = route.name
                if route.cors is not None:
                    cors_headers = route.cors.response_headers(headers)
                limit_headers = self._admit(request, route, client)
                response = await self._forward(
                    request,
                    snap,
                    route,
                    ex,
                    rid=rid,
                    client=client,
                    peer=peer,
                    peer_trusted=peer_trusted,
                    host=host,
                    raw_path=raw_path,
                    raw_query=raw_query,
                    extra_headers=limit_headers,
                    cors_headers=cors_headers,
                )
            except GatewayError as error:
                error_code = error.code
                response = self._error_response(request, error, rid)
            except SendTimeout:
                # The client stopped reading the response: logged as cut by
                # the client, with the status it had been sent and the reason.
                ex.error = ClientTimeout.code
                raise
            except Exception as exc:
                # The outer edge: a bug must still get the contract's JSON
                # and this request's id, unless the response had begun.
                if request.writer.started or isinstance(exc, ConnectionError):
                    raise
                log.exception("request %s failed", rid)
                internal = GatewayError("internal error")
                error_code = internal.code
                response = self._error_response(request, internal, rid)
            if error_code is not None and response is not None:
                for name, value in limit_headers:
                    # Admitted, then failed (502/503/504, 413 mid-body): every
                    # response on a limited route carries the limit headers.
                    response.headers[name] = value
                if cors_headers:
                    # Without them the browser hides the error (and its
                    # Retry-After) from the page.
                    merge_headers(response.headers, cors_headers)
            if response is not None:
                ex.error = error_code
                return self._send(ex, response)
            ex.status = request.writer.status
            if ex.aborted:
                ex.error, ex.cut = "upstream_aborted", "upstream"
            return None
        finally:
            self._live.discard(ex)
            if not ex.status:
                # Cancelled or failed before the response was whole: the
                # server aborted it (drain), or else the client went away.
                ex.cut = request.connection.cut or "client"
                ex.status = _cut_status(ex)
            duration = self._clock() - started
            status = ex.status
            if route is not None:
                route.count(method, status)
                route.duration.observe(duration)
                if ex.bytes_in:
                    route.bytes_in.inc(ex.bytes_in)
                if ex.bytes_out:
                    route.bytes_out.inc(ex.bytes_out)
            else:
                self._count_unrouted(method, status)
            self._access_log.record(ex, duration)

    @staticmethod
    def _send(ex: _Exchange, reply: Reply) -> None:
        """Write a gateway-made response now, so that its line counts the body
        bytes that really left (none after a HEAD, or if the client is gone)."""
        ex.bytes_out += ex.request.writer.send_reply(reply)
        ex.status = reply.status

    def log_in_flight(self, cut: str) -> int:
        """Write the line of every request still running, as cut by `cut`;
        returns how many. For a second SIGTERM/SIGINT, which exits at once
        without unwinding the handlers that would otherwise write them."""
        now = self._clock()
        live = list(self._live)
        self._live.clear()
        for ex in live:
            ex.cut = cut
            ex.status = _cut_status(ex)
            self._access_log.record(ex, now - ex.started_at)
        self._access_log.flush()
        return len(live)

    def _preflight(
        self,
        snap: Snapshot,
        host: str | None,
        raw_path: str,
        headers: CIMultiDictProxy[str],
        rid: str,
        client: str,
    ) -> tuple[RouteRuntime, Reply] | None:
        """Answer a CORS preflight locally, for the route of the announced request.

        The route's `methods` are ignored here: OPTIONS is rarely listed, and
        the preflight asks about the method it announces. A route without a
        CORS policy lets the OPTIONS through to its target like any request.
        """
        try:
            config = snap.table.match(None, host, raw_path, headers)
        except GatewayError:
            return None
        route = snap.routes[config.name]
        if route.cors is None:
            return None
        status, cors = route.cors.preflight(headers)
        response = Reply(status)
        for name, value in cors:
            response.headers.add(name, value)
        # A preflight is answered here and takes no token.
        for name, value in self._shown_limits(route, _bucket_key(route, headers, client)):
            response.headers[name] = value
        response.headers["X-Request-ID"] = rid
        return route, response

    def record_refusal(self, error: GatewayError, rid: str, client: str, bytes_out: int) -> None:
        """A request refused before it reached this handler (see h1server.py),
        whose JSON body of `bytes_out` bytes was sent."""
        self._count_unrouted("", error.status)
        entry = AccessEntry(rid, client, "-", "-")
        entry.status = error.status
        entry.bytes_out = bytes_out
        entry.error = error.code
        self._access_log.record(entry, 0.0)

    def _shown_limits(self, route: RouteRuntime, key: str) -> list[tuple[str, str]]:
        """The rate-limit headers of a response that takes no token: every
        response on a limited route shows the limit (CONTRACT.md "Rate limits")."""
        if route.buckets is None:
            return []
        bucket = route.buckets.peek(key)
        return rate_limit_headers(route.name, bucket, self._clock(), True)

    def _admit(self, request: Request, route: RouteRuntime, client: str) -> list[tuple[str, str]]:
        """Body-size and rate-limit checks, before any upstream work."""
        buckets = route.buckets
        key = _bucket_key(route, request.headers, client)
        limit = route.config.max_body_bytes
        length = request.content_length
        if limit and length is not None and length > limit:
            raise BodyTooLarge(
                f"request body of {length} bytes is over the {limit} byte limit",
                dict(self._shown_limits(route, key)),  # this refusal takes no token
            )
        if buckets is None:
            return []
        allowed, bucket = buckets.take(key)
        headers = rate_limit_headers(route.name, bucket, self._clock(), allowed)
        if not allowed:
            route.rate_limited.inc()
            raise RateLimited("rate limit exceeded", dict(headers))
        return headers

    def _error_response(self, request: Request, error: GatewayError, rid: str) -> Reply:
        # A body left unread (refused before upload, or cut short) may still
        # be on its way: end the connection rather than read what nobody wants.
        return json_reply(error, rid, close=not request.content.at_eof())

    async def _forward(
        self,
        request: Request,
        snap: Snapshot,
        route: RouteRuntime,
        ex: _Exchange,
        *,
        rid: str,
        client: str,
        peer: str,
        peer_trusted: bool,
        host: str | None,
        raw_path: str,
        raw_query: str | None,
        extra_headers: list[tuple[str, str]],
        cors_headers: list[tuple[str, str]],
    ) -> Reply | None:
        pool = route.pool
        has_body = request.body_exists
        ex.upgrade = upgrade.plan(request, route)  # hook: WebSocket (upgrade.py)
        if (
            has_body
            and request.version >= (1, 1)
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            # The gateway owns Expect: it invites the body only when an
            # attempt reads it (`_body`), i.e. once a target was picked and
            # connected, so an upload refused for any reason (503 included)
            # is refused before the client sends it. Upstream never sees
            # Expect, so no second 100 can reach the client (the upstream
            # client skips 1xx responses).
            ex.expect_continue = True
        scheme = "https" if request.secure else "http"
        tried: list[Target] = []
        attempt = 0
        budget = pool.budget
        budget.enter()
        # This attempt is a retry the budget counts until its verdict.
        held = False
        last_error: GatewayError | None = None
        try:
            while True:
                picked = pool.pick(client, tuple(tried))
                if picked is None:
                    if last_error is not None:
                        # A retry found no target left (the failure may just
                        # have opened the last breaker): the failed attempt's
                        # own 502/504 says more than a 503 would.
                        raise last_error
                    raise NoHealthyTarget(
                        f"no healthy target in upstream {pool.name!r}",
                        {"Retry-After": str(math.ceil(pool.retry_after()))},
                    )
                target, early = picked
                tried.append(target)
                ex.target = target
                # One breaker for the whole attempt: a reload that changes the
                # breaker settings replaces `target.breaker`, and a verdict of
                # this attempt must land on the breaker that admitted it.
                breaker = target.breaker
                if not breaker.acquire(early):
                    continue  # lost the half-open trial to another request
                # Only the trial may hand the half-open state back: a request
                # admitted before the trip must not free another's trial
                # (breaker.py, rule 4), or two trials would run at once.
                trial = breaker.state == "half_open"
                with target:
                    try:
                        try:
                            upstream = await self._attempt(
                                request,
                                route,
                                target,
                                ex,
                                rid,
                                peer,
                                peer_trusted,
                                scheme,
                                host,
                                raw_path,
                                raw_query,
                                has_body,
                            )
                        finally:
                            if held:  # the retry has its verdict (or none will come)
                                held = False
                                budget.give_back()
                    except _UpstreamFailed as failed:
                        breaker.record_failure()
                        if not self._may_retry(route, attempt, failed, None, ex):
                            raise failed.error from failed
                        held = not failed.connect_failed
                        last_error = failed.error
                    except BaseException:
                        # No verdict on the target (client silent or over the
                        # body limit, or cancelled): hand back a half-open
                        # trial so that the breaker cannot stay stuck in it.
                        if trial:
                            breaker.release()
                        raise
                    else:
                        if upstream.status not in GATEWAY_FAILURE_STATUSES:
                            target.ok_counter.inc()
                            breaker.record_success()
                            if upstream.status == 101:  # hook: WebSocket (upgrade.py)
                                await upgrade.tunnel(
                                    request,
                                    route,
                                    upstream,
                                    ex,
                                    rid,
                                    extra_headers,
                                    cors_headers,
                                    target.url,
                                )
                                return None
                            await self._relay(
                                request, route, upstream, ex, rid, extra_headers, cors_headers
                            )
                            return None
                        target.error_counter.inc()
                        breaker.record_failure()
                        if not self._may_retry(route, attempt, None, upstream.status, ex):
                            # Out of retries: the target's own 5xx is the answer.
                            await self._relay(
                                request, route, upstream, ex, rid, extra_headers, cors_headers
                            )
                            return None
                        held = True
                        upstream.close()
                        last_error = None
                # Back off outside `hold()`: the failed target is not in flight.
                await asyncio.sleep(backoff(attempt))
                attempt += 1
        finally:
            if held:  # cancelled in the backoff sleep
                budget.give_back()
            budget.leave()

    @staticmethod
    def _may_retry(
        route: RouteRuntime,
        attempt: int,
        failed: _UpstreamFailed | None,
        status: int | None,
        ex: _Exchange,
    ) -> bool:
        """Safe (contract "Retries"), within the route's count and the pool's budget.

        A refused connect spends no budget: no request reached any target, so
        its retry adds no load to protect an upstream from (the budget bounds
        load amplification), and a target's crash must not spend the budget
        the requests it held when it died need.
        """
        connect_failed = failed is not None and failed.connect_failed
        return (
            attempt < route.config.retries
            and may_retry(
                ex.method,
                connect_failed=connect_failed,
                status=status,
                body_started=ex.body_started,
                no_answer=failed is not None and failed.no_answer,
            )
            and (connect_failed or route.pool.budget.try_spend())
        )

    async def _attempt(
        self,
        request: Request,
        route: RouteRuntime,
        target: Target,
        ex: _Exchange,
        rid: str,
        peer: str,
        peer_trusted: bool,
        scheme: str,
        host: str | None,
        raw_path: str,
        raw_query: str | None,
        has_body: bool,
    ) -> H1Response:
        """Send one attempt; return once the target's response head is in."""
        ex.tried(target.url)
        config = route.config
        headers: CIMultiDict[str] = upstream_request_headers(
            request.headers,
            peer=peer,
            peer_trusted=peer_trusted,
            scheme=scheme,
            host=host,
            request_id=rid,
            preserve_host=config.preserve_host,
            target_host=target.host_header,
        )
        headers.popall("Expect", None)
        if ex.upgrade:  # hook: WebSocket (upgrade.py)
            upgrade.add_headers(headers)
        path_qs = forward_path(config, raw_path, raw_query, target.base_path)
        target_scheme, target_host, port = target.pool_key
        body: AsyncIterator[bytes] | DirectBody | None = None
        if has_body:
            # Zero-copy only to plain-http targets: TLS records are not the body.
            body = (target_scheme == "http" and self._spliced_body(request, ex)) or self._body(
                request, config.max_body_bytes, ex
            )
        try:
            upstream = await route.pool.client.request(
                request.method,
                target_host,
                port,
                path_qs,
                headers,
                body,
                request.content_length if has_body else None,
                config.connect_timeout,
                config.read_timeout,
                scheme=target_scheme,
                tls=route.pool.tls,  # hook: [upstreams.NAME.tls] (wire/tls.py)
                upgrade=ex.upgrade,
            )
        except asyncio.CancelledError:
            if isinstance(body, _SplicedUpload):
                body.discard()
            raise
        except Exception as exc:
            if isinstance(body, _SplicedUpload):
                body.discard()
            if ex.body_error is not None:
                raise ex.body_error from exc
            raise self._translate(exc, target, rid) from exc
        # A gateway-made refusal of the body (413, client silent) wins over
        # whatever the target managed to answer meanwhile.
        ex.answered(upstream.status)
        if ex.body_error is not None:
            upstream.close()
            raise ex.body_error
        return upstream

    def _translate(self, exc: BaseException, target: Target, rid: str) -> _UpstreamFailed:
        """The upstream client's errors, mapped once to the contract's 502/504.

        h1client maps every foreign exception (OSError, ssl.SSLError, ...) to
        its own H1Error types; anything else is a bug, and a 502 all the same.

        The client learns the upstream's name, never the target's URL, address
        or port (nor the exception's text, which carries them): those are
        internal topology. The log line has them all, as nginx's error log has
        "upstream: http://10.0.0.7:8080/" for the access log's 502.
        """
        # `silent`: reset, closed or timed out before the first response byte
        # (a garbled answer is an answer, and is not retried).
        if isinstance(exc, H1ConnectError):  # H1TLSError too: a failed handshake
            connect, timed_out, silent = True, exc.timed_out, False
        else:
            timed_out = isinstance(exc, H1ReadTimeout)
            connect, silent = False, timed_out or isinstance(exc, H1ServerDisconnected)
        error: GatewayError
        upstream = _shown(target)
        if timed_out:
            target.timeout_counter.inc()
            error = UpstreamTimeout(
                f"connect to {upstream} timed out"
                if connect
                else f"{upstream} did not answer in time"
            )
        else:
            target.error_counter.inc()
            error = BadGateway(
                f"cannot connect to {upstream}"
                if connect
                else f"{upstream} failed before answering"
            )
        log.warning(
            "request %s: target %s: %s (%s: %s)",
            rid,
            target.url,
            error.message,
            type(exc).__name__,
            exc,
        )
        return _UpstreamFailed(error, connect_failed=connect, no_answer=silent)

    async def _body(self, request: Request, limit: int, ex: _Exchange) -> AsyncIterator[bytes]:
        """The client's body, chunk by chunk, as it arrives.

        The per-read timeout is the slow-loris guard for bodies: a client
        silent for `client_timeout` mid-body is cut off. It only runs while we
        actually wait on the client, so upstream backpressure never counts.
        """
        content = request.content
        timeout = self._client_timeout()
        _invite_body(request, ex)
        while True:
            try:
                async with asyncio.timeout(timeout):
                    chunk = await content.readany()
            except TimeoutError:
                ex.body_error = ClientTimeout("client sent nothing for too long")
                raise ex.body_error from None
            except ConnectionError as exc:
                # The client ended (or broke) its body early: its fault, not
                # the target's, so no breaker verdict and no retry.
                ex.body_error = BadRequest(f"request body incomplete: {exc}")
                raise ex.body_error from exc
            if not chunk:
                return
            ex.bytes_in += len(chunk)
            if limit and ex.bytes_in > limit:
                ex.body_error = BodyTooLarge(f"request body is over the {limit} byte limit")
                raise ex.body_error
            ex.body_started = True
            yield chunk

    def _spliced_body(self, request: Request, ex: _Exchange) -> _SplicedUpload | None:
        """A large Content-Length body goes up zero-copy (splice.py), if it can."""
        length = request.content_length
        if not splice.AVAILABLE or length is None or length < splice.MIN_BYTES:
            return None
        # Held from here to the end of the pour: the client may vanish while
        # the target connects, and its number then be another socket's.
        source = splice.dup_socket(request.transport)
        if source is None:
            return None  # TLS, or out of descriptors: copy
        relay = splice.Relay.open()
        if relay is None:
            source.close()
            return None  # at the cap, or out of descriptors: copy
        return _SplicedUpload(request, ex, relay, source, self._client_timeout())

    async def _relay(
        self,
        request: Request,
        route: RouteRuntime,
        upstream: H1Response,
        ex: _Exchange,
        rid: str,
        extra_headers: list[tuple[str, str]],
        cors_headers: list[tuple[str, str]],
    ) -> None:
        """Copy the target's response to the client as it arrives."""
        headers = client_response_headers(upstream.headers, request_id=rid)
        for name, value in extra_headers:
            headers[name] = value
        if cors_headers:
            merge_headers(headers, cors_headers)
        writer = request.writer
        read = upstream.read_chunk
        complete = upstream.complete
        # When the body (or its first piece) is already here, the head
        # waits for it and both leave in one write: one segment and one
        # wake-up of the client instead of two. Otherwise the head goes
        # at once, so that a client of a slow stream (SSE) sees it.
        hold = upstream.ready()
        completed = False
        last_chunk = b""
        try:
            try:
                writer.start(upstream.status, upstream.reason or "", headers, hold=hold)
            except ValueError as exc:
                # A CR or LF inside a header (the writer counts them): nothing
                # was written yet, so 502 is honest. The detail (a header of
                # the target's) is for the log only.
                target = ex.target
                log.warning(
                    "request %s: target %s: response head not forwarded: %s",
                    rid,
                    target.url if target is not None else "-",
                    exc,
                )
                raise BadGateway(
                    f"the response head of {_shown(target)} cannot be forwarded"
                ) from exc
            if splice.AVAILABLE and upstream.unread() >= splice.MIN_BYTES:
                spliced = await self._splice_down(request, route, upstream, ex)
                if spliced is not None:
                    completed = spliced
                    return None
            while True:
                try:
                    chunk = await read()
                except H1Error:
                    # The target failed after the response began: the status
                    # is gone, so the only honest signal is an aborted
                    # transfer (no final chunk, short Content-Length).
                    _abort(request)
                    ex.aborted = True
                    return None
                if not chunk:
                    break
                ex.bytes_out += len(chunk)
                if len(chunk) < JOIN_BELOW and complete():
                    # The last piece: with the final chunk marker (and the
                    # head, if still held) in the same write.
                    last_chunk = chunk
                    break
                await writer.write(chunk)
            await writer.write_eof(last_chunk)
            completed = True
            return None
        finally:
            if completed:
                upstream.release()
            else:
                # Client gone, client write failed, or target broke: this
                # connection is in an unknown state and must not be pooled.
                upstream.close()

    async def _splice_down(
        self,
        request: Request,
        route: RouteRuntime,
        upstream: H1Response,
        ex: _Exchange,
    ) -> bool | None:
        """Relay the rest of a large Content-Length body zero-copy.

        None: not for this response (copy it as usual). True: relayed whole.
        False: the target failed mid-body and the client connection was
        aborted, as in the copying loop. A client gone raises ConnectionError.
        """
        # Both duplicates are taken now, before any await, and only they are
        # used: after an await either transport may have closed its socket,
        # and its number may be a new connection's (splice.py's rule).
        with contextlib.ExitStack() as held:
            client = splice.dup_socket(request.transport)
            if client is None:
                return None  # TLS, or out of descriptors: copy
            held.callback(client.close)
            source = upstream.dup_socket()
            if source is None:
                return None
            held.callback(source.close)
            relay = splice.Relay.open()
            if relay is None:
                return None  # at the cap, or out of descriptors: copy
            held.callback(relay.close)
            send_timeout = request.writer.send_timeout
            try:
                buffered, remaining = upstream.hand_over()
                if buffered:
                    ex.bytes_out += len(buffered)
                    await request.writer.write(buffered)  # with the head, if it was held
                # A client that takes nothing for client_timeout is cut, as
                # in the copying loop's drain (nginx's send_timeout).
                await splice.wait_flushed(client, send_timeout)
                await relay.run(
                    source,
                    client,
                    remaining,
                    read_timeout=route.config.read_timeout,
                    write_timeout=send_timeout,
                )
            except splice.SinkFailed as exc:
                raise ConnectionResetError(f"client connection lost: {exc}") from exc
            except splice.SinkTimeout as exc:
                raise SendTimeout(f"client took nothing for {send_timeout:g} s") from exc
            except splice.SpliceError:
                # The target closed, reset or went silent mid-body: as in the
                # copying loop, the only honest signal left is an aborted transfer.
                _abort(request)
                ex.aborted = True
                return False
            finally:
                ex.bytes_out += relay.moved
                request.writer.spliced(relay.moved)
        upstream.spliced()
        await request.writer.write_eof()  # a Content-Length body: nothing more to send
        return True


class _SplicedUpload(DirectBody):
    """The client's Content-Length body, spliced from its socket to the target's.

    The server has parsed the head and may hold the first body bytes: those
    go first, then it stops reading the client socket and the relay moves
    the rest; a fresh parser then reads the next request (h1server
    `body_spliced`). The silence limit is `client_timeout` per wait, as for
    copied bodies.
    """

    def __init__(
        self,
        request: Request,
        ex: _Exchange,
        relay: splice.Relay,
        source: splice.SocketDup,
        timeout: float,
    ) -> None:
        self._request = request
        self._ex = ex
        self._relay = relay
        self._source = source
        self._timeout = timeout
        self._started = False

    def discard(self) -> None:
        """The attempt ended without pouring (it failed to connect): release the relay."""
        if not self._started:
            self._release()

    def _release(self) -> None:
        self._relay.close()
        self._source.close()

    async def pour(self, sink: splice.SocketDup, write_timeout: float) -> None:
        self._started = True
        request, ex, relay, source = self._request, self._ex, self._relay, self._source
        received = 0
        done = False
        try:
            if source.gone():
                raise ConnectionResetError("the client is gone")
            _invite_body(request, ex)
            # From here the socket's bytes belong to the relay.
            prefix, remaining = request.connection.hand_over_body(request)
            received = len(prefix)
            ex.body_started = True
            if prefix:
                if sink.transport is None or sink.gone():
                    raise splice.SinkFailed("the connection closed", 0)
                sink.transport.write(prefix)
                await splice.wait_flushed(sink, write_timeout)
            try:
                await relay.run(
                    source,
                    sink,
                    remaining,
                    read_timeout=self._timeout,
                    write_timeout=write_timeout,
                )
                done = True
            except splice.SourceTimeout:
                ex.body_error = ClientTimeout("client sent nothing for too long")
                raise ex.body_error from None
            except splice.SourceClosed as exc:
                # The server, no longer reading, cannot see the client go: end
                # the connection, which cancels this request like any other.
                _abort(request)
                raise ConnectionResetError(f"client connection lost: {exc}") from exc
        finally:
            ex.bytes_in += received + relay.moved
            self._release()
            if done:
                request.connection.body_spliced(request)


def _invite_body(request: Request, ex: _Exchange) -> None:
    """The `100 Continue` owed to an `Expect: 100-continue` client, sent once
    (whatever the retries), when an attempt is about to read the body."""
    if ex.expect_continue:
        ex.expect_continue = False
        transport = request.transport
        if transport is not None:
            transport.write(_CONTINUE)


def _shown(target: Target | None) -> str:
    """How an error body names a target: by its upstream, never by URL or address."""
    return f'upstream "{target.upstream}"' if target is not None else "the upstream"


def _cut_status(ex: _Exchange) -> int:
    """The logged status of a request cut short: what the client got if its
    response began, else 499 (client gone, as nginx) or 503 (cut by us)."""
    writer = ex.request.writer
    if writer.started:
        return writer.status
    return CLIENT_CLOSED if ex.cut == "client" else SERVER_CUT


def _abort(request: Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
