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
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.core.breaker import CircuitBreaker
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
    interim_response_headers,
    new_request_id,
    request_id,
    upstream_request_headers,
)
from gateway.core.limits import TokenBucket, rate_limit_headers
from gateway.core.retry import backoff, may_retry
from gateway.core.routing import forward_path, has_dot_segment
from gateway.core.tracing import trace_context
from gateway.edges import upgrade
from gateway.edges.auth import AuthStep, KeysStale, RequestAuth
from gateway.edges.cache import CacheRequest, CacheStep, unconsulted
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
# Fields read or set on every request, as istr: a CIMultiDict lookup by an
# istr skips folding the name's case.
_X_REQUEST_ID: Final = istr("X-Request-ID")
_TRACEPARENT: Final = istr("traceparent")
_HOST: Final = istr("Host")
_EXPECT: Final = istr("Expect")
# No headers to add (shared: most requests have no limit or CORS headers).
_NO_HEADERS: Final[Sequence[tuple[str, str]]] = ()


class _Exchange(AccessEntry):
    """One request and its response: the per-request object of the handler.

    Set once at the start: the request, the snapshot it runs on, its id, the
    client (and the TCP peer, and whether the peer is a trusted proxy), the
    Host, the raw path and query, the scheme. Set by routing: the route
    (`runtime`; `route` is its name, for the log) and the headers every
    response on it carries (`limit_headers`, `cors_headers`). Filled in by
    the attempts: targets picked, the retry state, body progress. The
    access-log line is written from it (`AccessEntry` holds what the line
    says: status, bytes, error, cut, targets and their statuses).
    """

    __slots__ = (
        "aborted",
        "attempt",
        "auth",
        "body_error",
        "body_started",
        "breaker",
        "cache",
        "cors_headers",
        "held",
        "host",
        "last_error",
        "limit_headers",
        "peer",
        "peer_trusted",
        "picked",
        "raw_path",
        "raw_query",
        "request",
        "runtime",
        "scheme",
        "snap",
        "target",
        "trace",
        "trial",
        "upgrade",
    )

    def __init__(self, request: Request, snap: Snapshot, started_at: float) -> None:
        headers = request.headers
        peer = request.remote or ""
        trusted = snap.trusted
        if trusted.networks and trusted.is_trusted(peer):
            client = trusted.client_ip(peer, headers.getall("X-Forwarded-For", None))
            peer_trusted = True
        else:
            client, peer_trusted = peer, False
        incoming_id = headers.get(_X_REQUEST_ID)
        rid = new_request_id() if incoming_id is None else request_id(incoming_id, new_request_id)
        raw = request.raw_path
        super().__init__(rid, client, request.method, raw, started_at)
        # W3C trace context: continued or started here; its id is logged.
        self.trace = trace_context(headers.getall(_TRACEPARENT, None))
        self.trace_id = self.trace.trace_id
        self.request = request
        self.snap = snap
        self.peer = peer
        self.peer_trusted = peer_trusted
        if raw[0] == "/":  # origin-form, nearly every request: split_target's first case
            path, sep, query = raw.partition("?")
            self.raw_path, self.raw_query = path, (query if sep else None)
            self.host = headers.get(_HOST)
        else:
            authority, self.raw_path, self.raw_query = split_target(raw)
            self.host = authority if authority is not None else headers.get(_HOST)
        self.scheme = "https" if request.secure else "http"
        self.runtime: RouteRuntime | None = None
        self.limit_headers = _NO_HEADERS
        self.cors_headers = _NO_HEADERS
        # The attempts: targets picked so far (the next pick excludes them),
        # the current one and the breaker that admitted it (a reload may
        # replace `target.breaker`: the verdict goes to the admitting one).
        self.picked: tuple[Target, ...] = ()
        self.target: Target | None = None
        self.breaker: CircuitBreaker | None = None
        self.trial = False  # the attempt holds its breaker's half-open trial
        self.attempt = 0  # retries so far
        self.held = False  # a retry the pool's budget counts until its verdict
        self.last_error: GatewayError | None = None  # the failed attempt's 502/504
        self.aborted = False  # the target failed after the response began
        self.body_started = False
        self.body_error: GatewayError | None = None
        self.auth: RequestAuth | None = None  # who the client is, once auth ran
        self.upgrade = False  # forwarded as a WebSocket upgrade (upgrade.py)
        # The cache's part of the request on a caching route (edges/cache.py).
        self.cache: CacheRequest | None = None

    def finish_headers(self, headers: CIMultiDict[str]) -> None:
        """A response's head from the target or the cache, finished: what
        every response carries, then the route's response transforms (the
        same for a relayed response and one served from the cache)."""
        _finish_headers(self, headers)
        if self.auth is not None and self.runtime is not None:  # [routes.response_headers]
            AuthStep.response_headers(headers, self.runtime, self.auth)

    def settle(self, cut: str | None) -> None:
        """Decide the logged status, once, at the end (or at a second SIGTERM).

        `cut`: who ended the request before its response was whole, None if
        it went out whole. The status is what the client got if a response
        began; else 499 (client gone, as nginx) or 503 (cut by us).
        """
        if cut is not None:
            self.cut = cut
        elif self.aborted:
            self.error, self.cut = "upstream_aborted", "upstream"
        writer = self.request.writer
        self.interim = writer.interim
        if writer.started:
            self.status = writer.status
        else:
            self.status = CLIENT_CLOSED if self.cut == "client" else SERVER_CUT

    def relay_interim(self, status: int, reason: str, fields: list[tuple[str, str]]) -> None:
        """A target's interim (1xx) response, relayed to the client now.

        h1client calls this (a bound method of the exchange, no closure) from its
        parser, for every 1xx but 100 and 101, before the final head. RFC
        9110 15.2: a proxy forwards the 1xx it did not ask for. It is not the
        response: the writer's final head, the retry and breaker verdicts and
        the logged status all wait for the final one, which any attempt may
        still send (a client may get several 1xx, then one final response).
        The 1xx's fields go to the client only, never into the final head.
        """
        headers = interim_response_headers(fields, request_id=self.request_id)
        self.request.writer.send_interim(status, reason, headers)


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


def _bucket_key(
    route: RouteRuntime,
    headers: CIMultiDictProxy[str],
    client: str,
    who: str | None = None,
) -> str:
    """The rate-limit bucket a request draws from on `route`; `who` is the
    authenticated client (`RequestAuth.who`: policy and consumer)."""
    if route.buckets is None or route.limit_by_route:
        return ""
    if route.limit_by_consumer:
        # Prefixed so that no name can be an address.
        return f"consumer {who}" if who else client
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._box = box
        self._metrics = metrics
        self._access_log = access_log
        self._clock = clock
        # Requests that matched no route (or were refused before routing).
        self._count_unrouted = RequestCounter(metrics, "").count
        # The requests running now: a second SIGTERM logs them before exiting.
        self._live: set[_Exchange] = set()
        self._auth = AuthStep()
        self._cache = CacheStep(clock)

    async def __call__(self, request: Request) -> Reply | None:
        """Answer one request through `request.writer`; always None.

        Gateway-made answers are written here too (`_send`), not returned to
        the server, so that the access-log line, written last, knows the bytes
        that really left."""
        snap = self._box.snapshot
        started = self._clock()
        # A response the client does not read may stall this long, then the
        # connection is aborted (CONTRACT.md client_timeout; nginx's send_timeout).
        request.writer.send_timeout = snap.config.server.client_timeout
        ex = _Exchange(request, snap, started)
        self._live.add(ex)
        whole = False  # the response went out whole (or was aborted for the target)
        try:
            reply: Reply | None
            try:
                reply = await self._route(ex)
                if reply is None:
                    if ex.runtime is not None and ex.runtime.cache_config is not None:
                        # Cache hook 1: lookup, collapsed misses, stale_if_error.
                        await self._cache.run(ex, lambda: self._forward(ex))
                    else:
                        await self._forward(ex)
            except GatewayError as error:
                ex.error = error.code
                reply = self._error_reply(ex, error)
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
                log.exception("request %s failed", ex.request_id)
                internal = GatewayError("internal error")
                ex.error = internal.code
                reply = self._error_reply(ex, internal)
            if reply is not None:
                self._send(ex, reply)
            whole = True
            return None
        finally:
            self._live.discard(ex)
            # Cancelled or failed before the response was whole: the server
            # aborted it (drain), or else the client went away.
            ex.settle(None if whole else request.connection.cut or "client")
            duration = self._clock() - started
            status = ex.status
            route = ex.runtime
            if route is not None:
                route.count(ex.method, status)
                route.duration.observe(duration)
                route.stats.record(status, duration)  # the dashboard's minute (/stats)
                if ex.bytes_in:
                    route.bytes_in.inc(ex.bytes_in)
                if ex.bytes_out:
                    route.bytes_out.inc(ex.bytes_out)
            else:
                self._count_unrouted(ex.method, status)
            if self._access_log.enabled:
                self._access_log.record(ex, duration)

    async def _route(self, ex: _Exchange) -> Reply | None:
        """Route and admit the request; a Reply when the gateway answers it
        itself (OPTIONS *, a CORS preflight, a redirect route), None when it
        goes to `_forward`. Refusals (400, 401, 403, 404, 405, 413, 429) are
        raised, in the contract's order: route, method, IP access, preflight,
        auth, scopes/claims, rate limit, body size, redirect."""
        request = ex.request
        method = ex.method
        if request.raw_path[0] != "/" and asks_about_the_server(method, request.raw_path):
            # The gateway is that server: no route serves "*", and
            # forwarding it would pick a target at random.
            return Reply(200)
        if has_dot_segment(ex.raw_path):
            # Before routing and CORS: the prefix matched would not confine it.
            raise BadRequest("a dot-segment in the request path")
        headers = request.headers
        if method == "OPTIONS" and is_preflight(method, headers):
            preflight = self._preflight(ex)
            if preflight is not None:
                return preflight
        route_config = ex.snap.table.match(method, ex.host, ex.raw_path, headers)
        route = ex.snap.routes[route_config.name]
        ex.runtime = route
        ex.route = route.name
        if route.cors is not None:
            ex.cors_headers = route.cors.response_headers(headers)
        # IP access (403), credentials (401), scopes and claims (403).
        if route.config.auth:
            # Synchronous unless a token names a kid a JWKS URL may have gained.
            try:
                auth = self._auth.check(
                    ex.snap,
                    route,
                    headers,
                    client=ex.client,
                    rid=ex.request_id,
                    host=ex.host,
                    raw_path=ex.raw_path,
                )
            except KeysStale as stale:
                auth = await self._auth.check_refetched(stale)
        elif route.plain and not ex.snap.auth.forwarded:
            auth = None  # nothing to check, forward, strip or transform
        else:
            auth = self._auth.check_open(
                ex.snap,
                route,
                client=ex.client,
                rid=ex.request_id,
                host=ex.host,
                raw_path=ex.raw_path,
            )
        ex.auth = auth
        if auth is not None:
            ex.consumer = auth.consumer
        if route.shared is not None:
            ex.limit_headers = await self._admit_shared(ex)
        elif route.buckets is not None or request.content_length is not None:
            ex.limit_headers = self._admit(ex)  # (nothing to admit: no call)
        if route.config.redirect is not None:
            assert auth is not None  # a redirect route is never plain
            return self._auth.redirect(route, auth, ex.raw_path, ex.raw_query)
        return None

    def _send(self, ex: _Exchange, reply: Reply) -> None:
        """Write a gateway-made response now, so that its line counts the body
        bytes that really left (none after a HEAD, or if the client is gone)."""
        _finish_headers(ex, reply.headers)
        ex.bytes_out += ex.request.writer.send_reply(reply)

    def log_in_flight(self, cut: str) -> int:
        """Write the line of every request still running, as cut by `cut`;
        returns how many. For a second SIGTERM/SIGINT, which exits at once
        without unwinding the handlers that would otherwise write them."""
        now = self._clock()
        live = list(self._live)
        self._live.clear()
        for ex in live:
            ex.settle(cut)
            self._access_log.record(ex, now - ex.started_at)
        self._access_log.flush()
        return len(live)

    def _preflight(self, ex: _Exchange) -> Reply | None:
        """Answer a CORS preflight locally, for the route of the announced request.

        The route's `methods` are ignored here: OPTIONS is rarely listed, and
        the preflight asks about the method it announces. A route without a
        CORS policy lets the OPTIONS through to its target like any request.
        """
        headers = ex.request.headers
        try:
            config = ex.snap.table.match(None, ex.host, ex.raw_path, headers)
        except GatewayError:
            return None
        route = ex.snap.routes[config.name]
        if route.cors is None:
            return None
        ex.runtime = route
        ex.route = route.name
        self._auth.check_ip(route, ex.client)  # IP access comes before the preflight
        status, cors = route.cors.preflight(headers)
        response = Reply(status)
        for name, value in cors:
            response.headers.add(name, value)
        # A preflight is answered here and takes no token.
        for name, value in self._shown_limits(route, _bucket_key(route, headers, ex.client)):
            response.headers[name] = value
        return response

    def record_refusal(self, error: GatewayError, rid: str, client: str, bytes_out: int) -> None:
        """A request refused before it reached this handler (see h1server.py),
        whose JSON body of `bytes_out` bytes was sent."""
        self._count_unrouted("", error.status)
        entry = AccessEntry(rid, client, "-", "-")
        entry.status = error.status
        entry.bytes_out = bytes_out
        entry.error = error.code
        self._access_log.record(entry, 0.0)

    def _shown_limits(self, route: RouteRuntime, key: str) -> Sequence[tuple[str, str]]:
        """The rate-limit headers of a response that takes no token: every
        response on a limited route shows the limit (CONTRACT.md "Rate limits")."""
        if route.buckets is None:
            return _NO_HEADERS
        bucket = route.buckets.peek(key)
        return rate_limit_headers(route.name, bucket, self._clock(), True)

    def _admit(self, ex: _Exchange) -> Sequence[tuple[str, str]]:
        """Rate-limit, then body-size checks (the contract's order: a request
        over its limit is a 429 whatever its size), before any upstream work;
        the rate-limit headers every response to the request then carries."""
        route = ex.runtime
        assert route is not None
        headers: Sequence[tuple[str, str]] = _NO_HEADERS
        buckets = route.buckets
        if buckets is not None:
            # The usual key (the client's address) without `_bucket_key`'s calls.
            key = ex.client if route.limit_by_client else self._key(ex, route)
            allowed, bucket = buckets.take(key)
            headers = self._limited(route, bucket, allowed)
        if ex.request.content_length is not None:
            self._size_check(ex, route, headers)
        return headers

    async def _admit_shared(self, ex: _Exchange) -> Sequence[tuple[str, str]]:
        """`_admit` for store = "redis" (or the main process's buckets in a
        worker): one round trip, or the local bucket while the store is down."""
        route = ex.runtime
        assert route is not None
        assert route.shared is not None
        assert route.buckets is not None
        allowed, bucket = await route.shared.take(route.name, self._key(ex, route), route.buckets)
        headers = self._limited(route, bucket, allowed)
        self._size_check(ex, route, headers)
        return headers

    @staticmethod
    def _key(ex: _Exchange, route: RouteRuntime) -> str:
        who = ex.auth.who if ex.auth is not None else None
        return _bucket_key(route, ex.request.headers, ex.client, who)

    def _limited(
        self, route: RouteRuntime, bucket: TokenBucket, allowed: bool
    ) -> Sequence[tuple[str, str]]:
        headers = rate_limit_headers(route.name, bucket, self._clock(), allowed)
        if not allowed:
            route.rate_limited.inc()
            raise RateLimited("rate limit exceeded", dict(headers))
        return headers

    @staticmethod
    def _size_check(ex: _Exchange, route: RouteRuntime, headers: Sequence[tuple[str, str]]) -> None:
        limit = route.config.max_body_bytes
        length = ex.request.content_length
        if limit and length is not None and length > limit:
            raise BodyTooLarge(
                f"request body of {length} bytes is over the {limit} byte limit", dict(headers)
            )

    @staticmethod
    def _error_reply(ex: _Exchange, error: GatewayError) -> Reply:
        # A body left unread (refused before upload, or cut short) may still
        # be on its way: end the connection rather than read what nobody wants.
        return json_reply(error, ex.request_id, close=not ex.request.content.at_eof())

    async def _forward(self, ex: _Exchange) -> None:
        """Pick a target, try it, decide: relay its answer, or retry on
        another. Gives up with the last failure's 502/504, or 503 when no
        target is left to pick."""
        # The gateway owns Expect: the writer sends `100 Continue` only when
        # an attempt reads the body (`_body`), i.e. once a target was picked
        # and connected, so an upload refused for any reason (503 included)
        # is refused before the client sends it. Upstream never sees Expect,
        # so no second 100 can reach the client (the upstream client never
        # hands a target's 100 on; other 1xx go through `relay_interim`).
        route = ex.runtime
        assert route is not None
        budget = route.pool.budget
        # A WebSocket upgrade, if any (the server flagged the request's headers).
        ex.upgrade = ex.request.websocket and upgrade.plan(ex.request, route)
        budget.enter()
        try:
            while True:
                target = self._pick(ex)
                if target is None:
                    continue  # lost the half-open trial to another request
                # One request in flight on the target (least-connections and
                # the in-flight gauge read it), for the attempt and its relay.
                target.in_flight += 1
                try:
                    upstream = await self._try(ex, target)
                    if upstream is not None and self._decide(ex, target, upstream):
                        if upstream.status == 101:  # the WebSocket switch (upgrade.py)
                            await upgrade.tunnel(
                                ex.request,
                                route,
                                upstream,
                                ex,
                                ex.request_id,
                                ex.limit_headers,
                                ex.cors_headers,
                                target.url,
                            )
                            return
                        await self._relay(ex, upstream)
                        return
                finally:
                    target.in_flight -= 1
                # Back off with the failed target no longer in flight.
                await asyncio.sleep(backoff(ex.attempt))
                ex.attempt += 1
        finally:
            if ex.held:  # cancelled in the backoff sleep
                ex.held = False
                budget.give_back()
            budget.leave()

    @staticmethod
    def _pick(ex: _Exchange) -> Target | None:
        """The next target, admitted by its breaker; None if another request
        took the half-open trial it offered (pick again). Raises when nothing
        is left to pick."""
        route = ex.runtime
        assert route is not None
        pool = route.pool
        picked = pool.pick(ex.client, ex.picked)
        if picked is None:
            if ex.last_error is not None:
                # A retry found no target left (the failure may just have
                # opened the last breaker): the failed attempt's own 502/504
                # says more than a 503 would.
                raise ex.last_error
            raise NoHealthyTarget(
                f"no healthy target in upstream {pool.name!r}",
                {"Retry-After": str(math.ceil(pool.retry_after()))},
            )
        target, early = picked
        ex.picked += (target,)
        ex.target = target
        # One breaker for the whole attempt: a reload that changes the
        # breaker settings replaces `target.breaker`, and a verdict of this
        # attempt must land on the breaker that admitted it.
        breaker = target.breaker
        ex.breaker = breaker
        if breaker.closed:  # admits every request and holds no trial
            ex.trial = False
            return target
        if not breaker.acquire(early):
            return None
        # Only the trial may hand the half-open state back: a request
        # admitted before the trip must not free another's trial
        # (breaker.py, rule 4), or two trials would run at once.
        ex.trial = breaker.state == "half_open"
        return target

    async def _try(self, ex: _Exchange, target: Target) -> H1Response | None:
        """One attempt on `target`: its response head, or None when it failed
        before answering and may be retried (raises when it may not)."""
        breaker = ex.breaker
        assert breaker is not None
        try:
            try:
                return await self._attempt(ex, target)
            finally:
                if ex.held:  # the retry has its verdict (or none will come)
                    ex.held = False
                    assert ex.runtime is not None
                    ex.runtime.pool.budget.give_back()
        except _UpstreamFailed as failed:
            breaker.record_failure()
            if not self._may_retry(ex, failed, None):
                raise failed.error from failed
            ex.held = not failed.connect_failed
            ex.last_error = failed.error
            return None
        except BaseException:
            # No verdict on the target (client silent or over the body
            # limit, or cancelled): hand back a half-open trial so that the
            # breaker cannot stay stuck in it.
            if ex.trial:
                breaker.release()
            raise

    def _decide(self, ex: _Exchange, target: Target, upstream: H1Response) -> bool:
        """The verdict on a target that answered: True to relay its answer,
        False to retry (`upstream` is then closed)."""
        breaker = ex.breaker
        assert breaker is not None
        if upstream.status not in GATEWAY_FAILURE_STATUSES:
            target.ok_counter.inc()
            breaker.record_success()
            return True
        target.error_counter.inc()
        breaker.record_failure()
        if not self._may_retry(ex, None, upstream.status):
            return True  # out of retries: the target's own 5xx is the answer
        ex.held = True
        upstream.close()
        ex.last_error = None
        return False

    @staticmethod
    def _may_retry(ex: _Exchange, failed: _UpstreamFailed | None, status: int | None) -> bool:
        """Safe (contract "Retries"), within the route's count and the pool's budget.

        A refused connect spends no budget: no request reached any target, so
        its retry adds no load to protect an upstream from (the budget bounds
        load amplification), and a target's crash must not spend the budget
        the requests it held when it died need.
        """
        route = ex.runtime
        assert route is not None
        connect_failed = failed is not None and failed.connect_failed
        return (
            ex.attempt < route.config.retries
            and may_retry(
                ex.method,
                connect_failed=connect_failed,
                status=status,
                body_started=ex.body_started,
                no_answer=failed is not None and failed.no_answer,
            )
            and (connect_failed or route.pool.budget.try_spend())
        )

    async def _attempt(self, ex: _Exchange, target: Target) -> H1Response:
        """Send one attempt; return once the target's response head is in."""
        ex.tried(target.url)
        request = ex.request
        route = ex.runtime
        assert route is not None
        config = route.config
        headers: CIMultiDict[str] = upstream_request_headers(
            request.headers,
            peer=ex.peer,
            peer_trusted=ex.peer_trusted,
            scheme=ex.scheme,
            host=ex.host,
            request_id=ex.request_id,
            preserve_host=config.preserve_host,
            target_host=target.host_header,
            trace=ex.trace,
        )
        headers.popall(_EXPECT, None)
        if ex.upgrade:
            upgrade.add_headers(headers)
        if ex.auth is not None:  # identity headers, strip_credentials, transforms
            self._auth.request_headers(headers, route, ex.auth)
        if ex.cache is not None:
            ex.cache.upstream_headers(headers)  # validators of a stale entry
        path_qs = forward_path(config, ex.raw_path, ex.raw_query, target.base_path, route.rewrite)
        target_scheme, target_host, port = target.pool_key
        has_body = request.body_exists
        body: AsyncIterator[bytes] | DirectBody | None = None
        if has_body:
            # Zero-copy only to plain-http targets: TLS records are not the body.
            body = (target_scheme == "http" and self._spliced_body(ex)) or self._body(
                ex, config.max_body_bytes
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
                # RFC 9110 15.2: no 1xx to an HTTP/1.0 client, so none to build.
                on_interim=ex.relay_interim if request.version >= (1, 1) else None,
                tls=route.pool.tls,  # [upstreams.NAME.tls] (wire/tls.py)
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
            raise self._translate(exc, target, ex.request_id) from exc
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

    async def _body(self, ex: _Exchange, limit: int) -> AsyncIterator[bytes]:
        """The client's body, chunk by chunk, as it arrives.

        The per-read timeout is the slow-loris guard for bodies: a client
        silent for `client_timeout` mid-body is cut off. It only runs while we
        actually wait on the client, so upstream backpressure never counts.
        """
        request = ex.request
        content = request.content
        timeout = ex.snap.config.server.client_timeout
        request.writer.send_continue()
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

    def _spliced_body(self, ex: _Exchange) -> _SplicedUpload | None:
        """A large Content-Length body goes up zero-copy (splice.py), if it can."""
        request = ex.request
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
        return _SplicedUpload(ex, relay, source, ex.snap.config.server.client_timeout)

    async def _relay(self, ex: _Exchange, upstream: H1Response) -> None:
        """Copy the target's response to the client as it arrives."""
        cache = ex.cache
        tee = None
        if cache is not None:
            # Cache hook 3: a 304 refreshing a stale entry, or a failure a
            # stale entry stands in for, is answered from the store; else
            # the body is kept (`tee`) while it streams, if storable.
            if await cache.answered(upstream, self._clock()):
                return None
            headers = client_response_headers(upstream.headers, request_id=ex.request_id)
            tee = cache.tee(upstream.status, upstream.reason or "", headers)
        else:
            headers = client_response_headers(upstream.headers, request_id=ex.request_id)
        ex.finish_headers(headers)
        writer = ex.request.writer
        read = upstream.read_chunk
        pause_source = upstream.hold
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
                    ex.request_id,
                    target.url if target is not None else "-",
                    exc,
                )
                raise BadGateway(
                    f"the response head of {_shown(target)} cannot be forwarded"
                ) from exc
            if tee is None and splice.AVAILABLE and upstream.unread() >= splice.MIN_BYTES:
                spliced = await self._splice_down(ex, upstream)
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
                    writer.abort()
                    ex.aborted = True
                    return None
                if not chunk:
                    break
                ex.bytes_out += len(chunk)
                if tee is not None:
                    tee.add(chunk)
                if len(chunk) < JOIN_BELOW and complete():
                    # The last piece: with the final chunk marker (and the
                    # head, if still held) in the same write.
                    last_chunk = chunk
                    break
                await writer.write(chunk, pause_source)
            await writer.write_eof(last_chunk)
            completed = True
            if cache is not None:
                cache.body_done(self._clock())
            return None
        finally:
            if completed:
                upstream.release()
            else:
                # Client gone, client write failed, or target broke: this
                # connection is in an unknown state and must not be pooled.
                upstream.close()

    async def _splice_down(self, ex: _Exchange, upstream: H1Response) -> bool | None:
        """Relay the rest of a large Content-Length body zero-copy.

        None: not for this response (copy it as usual). True: relayed whole.
        False: the target failed mid-body and the client connection was
        aborted, as in the copying loop. A client gone raises ConnectionError.
        """
        # Both duplicates are taken now, before any await, and only they are
        # used: after an await either transport may have closed its socket,
        # and its number may be a new connection's (splice.py's rule).
        request = ex.request
        route = ex.runtime
        assert route is not None
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
                request.writer.abort()
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
        self, ex: _Exchange, relay: splice.Relay, source: splice.SocketDup, timeout: float
    ) -> None:
        self._request = ex.request
        self._ex = ex
        self._relay = relay
        self._source = source
        self._timeout = timeout
        self._started = False

    def discard(self) -> None:
        """The attempt ended without pouring (it failed to connect, or the
        target answered before the body began): release the relay."""
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
            request.writer.send_continue()
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
                request.writer.abort()
                raise ConnectionResetError(f"client connection lost: {exc}") from exc
        finally:
            ex.bytes_in += received + relay.moved
            self._release()
            if done:
                request.connection.body_spliced(request)


def _finish_headers(ex: _Exchange, headers: CIMultiDict[str]) -> None:
    """What every response to a request carries, gateway-made or relayed, put
    in here and nowhere else: its X-Request-ID, and on a route with limits or
    CORS the rate-limit headers (every response on a limited route shows the
    limit, errors after admission included) and the CORS headers (without
    them the browser hides the response, an error's Retry-After too, from the
    page). Via is a forwarding proxy's mark (RFC 9110 7.6.3): only relayed
    responses get it, from `client_response_headers`."""
    headers[_X_REQUEST_ID] = ex.request_id
    if ex.cache is not None and ex.cache.status:
        headers["Cache-Status"] = ex.cache.status  # RFC 9211
    elif ex.runtime is not None and ex.runtime.cache_config is not None:
        # Every response of a caching route has one (CONTRACT.md), refusals too.
        headers["Cache-Status"] = unconsulted(ex.error)
    for name, value in ex.limit_headers:
        headers[name] = value
    if ex.cors_headers:
        merge_headers(headers, ex.cors_headers)


def _shown(target: Target | None) -> str:
    """How an error body names a target: by its upstream, never by URL or address."""
    return f'upstream "{target.upstream}"' if target is not None else "the upstream"
