"""The cache step of the handler: lookup, collapsed misses, fills, revalidation.

The proxy calls it at three points (see proxy.py):

1. `CacheStep.run(ex, forward)` wraps `_forward` on a caching route: it
   answers hits itself, makes concurrent misses wait for one upstream
   request, serves a stale entry when the target fails (stale_if_error), and
   drops the URL's entries after a successful unsafe method.
2. `CacheRequest.upstream_headers(headers)` in `_attempt`: the request that
   fills the cache asks for the whole response (the client's own
   preconditions are removed), and a stale entry is revalidated with its
   validators (RFC 9111 4.3.1).
3. In `_relay`: `CacheRequest.answered(upstream)` (a 304 that refreshes the
   stale entry, or a failure a stale entry stands in for) and
   `CacheRequest.tee(...)`, the `BodyTee` that stores the body while it
   streams to the client.

Collapsed followers wait for the leader's response to be stored whole (as
nginx's `proxy_cache_lock`), never longer than the route's `read_timeout`,
then are answered from the store; when the leader's response turns out not
storable (known from its head), or it fails, or the wait runs out, each goes
upstream on its own. Waiting for the whole body (rather than streaming the
fill to followers, as Varnish does) keeps one slow client from pacing the
others and keeps a fill's memory to one buffer of at most max_entry_bytes.

Identity: on a route with `auth`, the cache keys on who the auth step
said the request is: the policy and its consumer (`ex.auth`), so that a JWT
`sub` and an API-key consumer of the same name (or two issuers' equal `sub`)
are different variants; a request without a consumer is never answered
from, nor stored into, the cache.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from multidict import CIMultiDict

from gateway.core import cacherules
from gateway.core.config import RouteCacheConfig
from gateway.core.errors import GatewayError
from gateway.edges.auth import RequestAuth
from gateway.state.cache import Entry, Fill, Key, ResponseCache
from gateway.state.snapshot import RouteRuntime, Snapshot
from gateway.wire.h1client import H1Response
from gateway.wire.h1messages import Request

# The client's preconditions are not forwarded by a request that fills the
# cache: it needs the whole response to store (nginx does the same).
_PRECONDITIONS: Final = (
    "If-None-Match",
    "If-Modified-Since",
    "If-Match",
    "If-Unmodified-Since",
    "If-Range",
)
# RFC 9110 15.4.5: what a 304 carries of the stored response's fields.
_NOT_MODIFIED_FIELDS: Final = frozenset(
    {
        "age",
        "cache-control",
        "content-location",
        "date",
        "etag",
        "expires",
        "last-modified",
        "vary",
        "via",
    }
)
# Failures a stale entry may stand in for (RFC 5861 4: "an error is any
# situation that would result in a 500, 502, 503, or 504").
_ERROR_STATUSES: Final = frozenset({500, 502, 503, 504})
_NAME: Final = "gateway"


class CacheExchange(Protocol):
    """What the step reads of (and sets on) the proxy's `_Exchange`."""

    request: Request
    snap: Snapshot
    runtime: RouteRuntime | None
    method: str
    scheme: str
    host: str | None
    raw_path: str
    raw_query: str | None
    bytes_out: int
    cache: CacheRequest | None
    auth: RequestAuth | None  # set by the auth step; None on a route without auth

    def finish_headers(self, headers: CIMultiDict[str]) -> None:
        """Add what every response to the request carries (X-Request-ID, ...)."""


class BodyTee:
    """Keeps a copy of a body streaming to its client, up to a size limit."""

    __slots__ = ("_chunks", "_limit", "size")

    def __init__(self, limit: int) -> None:
        self._chunks: list[bytes] | None = []
        self._limit = limit
        self.size = 0

    def add(self, chunk: bytes) -> None:
        chunks = self._chunks
        if chunks is None:
            return
        self.size += len(chunk)
        if self.size > self._limit:
            # Grown past max_entry_bytes: stop keeping it (it still streams).
            self._chunks = None
            return
        chunks.append(chunk)

    def body(self) -> bytes | None:
        chunks = self._chunks
        return None if chunks is None else b"".join(chunks)


class CacheRequest:
    """The cache's part of one request on a caching route."""

    __slots__ = (
        "_head",
        "_tee",
        "consumer",
        "epoch",
        "ex",
        "fill",
        "key",
        "passive",
        "request_wall",
        "served",
        "stale",
        "status",
        "store",
    )

    def __init__(
        self,
        ex: CacheExchange,
        store: ResponseCache,
        key: Key,
        consumer: str,
    ) -> None:
        self.ex = ex
        self.store = store
        self.key = key
        self.consumer = consumer
        # Passive: the request bypasses the cache; only its Cache-Status is ours.
        self.passive = False
        self.epoch = store.epoch(key[0])
        self.status = ""  # the Cache-Status field value (RFC 9211)
        self.stale: Entry | None = None  # the stale entry this request revalidates
        self.fill: Fill | None = None  # the fill this request leads
        self.served = ""  # the metric result when the cache answered
        self.request_wall = 0.0
        self._tee: BodyTee | None = None
        self._head: tuple[int, str, tuple[tuple[str, str], ...]] | None = None

    # -- hook 2: the upstream request ------------------------------------------

    def upstream_headers(self, headers: CIMultiDict[str]) -> None:
        """The request that may fill: the client's preconditions out, the
        stale entry's validators in (RFC 9111 4.3.1)."""
        if self.passive or self.ex.method != "GET":
            return
        for name in _PRECONDITIONS:
            headers.popall(name, None)
        stale = self.stale
        if stale is not None:
            if stale.etag is not None:
                headers["If-None-Match"] = stale.etag
            if stale.last_modified is not None:
                headers["If-Modified-Since"] = stale.last_modified
        self.request_wall = time.time()

    # -- hook 3: the response ----------------------------------------------------

    async def answered(self, upstream: H1Response, now: float) -> bool:
        """Answer from the store instead of relaying `upstream`: a 304 to our
        revalidation refreshes the stale entry; a failure lets a stale entry
        stand in (stale_if_error). True when answered (`upstream` is then
        released or closed)."""
        stale = self.stale
        if stale is None:
            return False
        if upstream.status == 304 and self.ex.method == "GET":
            entry = self._refreshed(stale, upstream, now)
            upstream.release()  # a 304 has no body: the connection is clean
            stored = self.store.store(self.key, entry, self.epoch)
            self._end_fill(stored)
            self.served = "revalidated"
            await self.serve(entry, f"{_NAME}; fwd=stale; fwd-status=304" + _stored(stored), now)
            return True
        if upstream.status in _ERROR_STATUSES and self.usable_stale(now):
            upstream.close()
            await self.serve_stale(stale, upstream.status, now)
            return True
        return False

    def tee(self, status: int, reason: str, headers: CIMultiDict[str]) -> BodyTee | None:
        """The copy of the body to store, or None when it is not stored; sets
        Cache-Status for the relayed response."""
        if self.passive:
            return None
        fwd = "stale" if self.stale is not None else "miss"
        refusal = self._refusal(status, headers)
        if refusal is not None:
            self.status = f"{_NAME}; fwd={fwd}; fwd-status={status}; detail={refusal}"
            self._end_fill(False)  # the waiters go upstream now, not after the body
            return None
        kept = tuple((n, v) for n, v in headers.items() if n.lower() != "x-request-id")
        if "Date" not in headers:
            # RFC 9110 6.6.1: the stored response needs a Date for its age.
            kept += (("Date", email.utils.formatdate(usegmt=True)),)
        self._head = (status, reason, kept)
        self._tee = BodyTee(self.store.max_entry_bytes)
        self.status = f"{_NAME}; fwd={fwd}; stored"
        return self._tee

    def _refusal(self, status: int, headers: CIMultiDict[str]) -> str | None:
        ex = self.ex
        if ex.method != "GET":
            return "method"
        length = headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.store.max_entry_bytes:
            return "too-large"
        route = ex.runtime
        assert route is not None
        return cacherules.refusal(
            status,
            cacherules.parse_cache_control(headers.getall("Cache-Control", ())),
            "Set-Cookie" in headers,
            headers.getall("Vary", ()),
            shared_only=_has_auth(route),
            authorization="Authorization" in ex.request.headers,
        )

    def body_done(self, now: float) -> None:
        """The body was relayed whole: store it."""
        tee, head = self._tee, self._head
        self._tee = None
        if tee is None or head is None:
            return
        body = tee.body()
        if body is None:
            self._end_fill(False)
            return
        status, reason, headers = head
        entry = self._entry(status, reason, headers, body, now)
        self._end_fill(self.store.store(self.key, entry, self.epoch))

    def _entry(
        self,
        status: int,
        reason: str,
        headers: tuple[tuple[str, str], ...],
        body: bytes,
        now: float,
    ) -> Entry:
        fields: CIMultiDict[str] = CIMultiDict(headers)
        directives = cacherules.parse_cache_control(fields.getall("Cache-Control", ()))
        response_wall = time.time()
        date_wall = cacherules.http_date(fields.get("Date"))
        route = self.ex.runtime
        assert route is not None
        config = route.cache_config
        assert config is not None
        request_headers = self.ex.request.headers
        vary = tuple(
            (name, cacherules.normalise_field(request_headers.getall(name, [])))
            for name in cacherules.vary_fields(fields.getall("Vary", ()))
        )
        return Entry(
            status=status,
            reason=reason,
            headers=headers,
            body=body,
            vary=vary,
            consumer=self.consumer,
            lifetime=cacherules.freshness_lifetime(
                directives, fields.get("Expires"), date_wall, response_wall, config.ttl
            ),
            initial_age=cacherules.initial_age(
                fields.get("Age"), date_wall, self.request_wall or response_wall, response_wall
            ),
            stored_at=now,
            stale_if_error=cacherules.stale_if_error_window(directives, config.stale_if_error),
            may_stale=cacherules.may_serve_stale(directives),
            etag=fields.get("ETag"),
            last_modified=fields.get("Last-Modified"),
        )

    def _refreshed(self, stale: Entry, upstream: H1Response, now: float) -> Entry:
        """RFC 9111 4.3.4: the stored response, its fields updated by the 304's."""
        fields: CIMultiDict[str] = CIMultiDict(stale.headers)
        fresh = upstream.headers
        for name in {n.lower() for n in fresh}:
            if name in cacherules.KEEP_ON_REFRESH or name in _HOP_BY_HOP:
                continue
            fields.popall(name, None)
            for value in fresh.getall(name):
                fields.add(name, value)
        return self._entry(
            stale.status,
            stale.reason,
            tuple(fields.items()),
            stale.body,
            now,
        )

    # -- the end ---------------------------------------------------------------

    def _end_fill(self, stored: bool) -> None:
        fill, self.fill = self.fill, None
        if fill is not None:
            fill.end(stored)
            if self.store.fills.get((self.key, self.consumer)) is fill:
                del self.store.fills[(self.key, self.consumer)]

    def end(self) -> None:
        """The request is over: a fill still open failed (its waiters go upstream)."""
        self._tee = None
        self._end_fill(False)

    # -- answering from the store ------------------------------------------------

    def usable_stale(self, now: float) -> bool:
        stale = self.stale
        if stale is None or not stale.may_stale:
            return False
        return stale.age(now) - stale.lifetime <= stale.stale_if_error

    async def serve_stale(self, stale: Entry, status: int, now: float) -> None:
        self.served = "stale"
        ttl = int(stale.lifetime - stale.age(now))
        await self.serve(
            stale,
            f"{_NAME}; fwd=stale; fwd-status={status}; ttl={ttl}; detail=stale-if-error",
            now,
        )

    async def serve(self, entry: Entry, status: str, now: float) -> None:
        """Write `entry` to the client: whole, or 304 when its preconditions
        say the client has it (RFC 9110 13.2.2)."""
        ex = self.ex
        self.status = status
        request = ex.request
        headers: CIMultiDict[str] = CIMultiDict(entry.headers)
        headers["Age"] = str(int(entry.age(now)))
        writer = request.writer
        request_headers = request.headers
        if cacherules.not_modified(
            request_headers.get("If-None-Match"),
            request_headers.get("If-Modified-Since"),
            entry.etag,
            entry.last_modified,
        ) and entry.status in (200, 203):
            kept: CIMultiDict[str] = CIMultiDict(
                (n, v) for n, v in headers.items() if n.lower() in _NOT_MODIFIED_FIELDS
            )
            ex.finish_headers(kept)
            writer.start(304, "Not Modified", kept, hold=True)
            await writer.write_eof()
            return
        body = entry.body
        if entry.status != 204:
            headers["Content-Length"] = str(len(body))
        ex.finish_headers(headers)
        writer.start(entry.status, entry.reason, headers, hold=True)
        if ex.method == "HEAD":
            await writer.write_eof()
            return
        ex.bytes_out += len(body)
        await writer.write_eof(body)


_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)


def unconsulted(error: str | None) -> str:
    """Cache-Status of a response on a caching route that the gateway made
    before the cache step ran: a refusal (401, 403, 413, 429: `detail` is its
    error code), a CORS preflight or a redirect (`detail=local`). RFC 9211 2:
    neither `hit` nor `fwd`, as the cache neither answered nor forwarded it."""
    return f"{_NAME}; detail={error or 'local'}"


def _stored(stored: bool) -> str:
    return "; stored" if stored else ""


def _has_auth(route: RouteRuntime) -> bool:
    return bool(route.config.auth)


class CacheStep:
    """Step 1: what the handler runs instead of `_forward` on a caching route."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    async def run(self, ex: CacheExchange, forward: Callable[[], Awaitable[None]]) -> None:
        route = ex.runtime
        store = ex.snap.cache
        assert route is not None
        config = route.cache_config
        if store is None or config is None:
            await forward()
            return
        counts = route.cache_counts
        key: Key = (
            route.name,
            ex.scheme,
            (ex.host or "").lower(),
            ex.raw_path if ex.raw_query is None else f"{ex.raw_path}?{ex.raw_query}",
        )
        request = ex.request
        method = ex.method
        if method in cacherules.UNSAFE_METHODS:
            counts["bypass"].inc()
            ex.cache = CacheRequest(ex, store, key, "")
            ex.cache.passive = True
            ex.cache.status = f"{_NAME}; fwd=method"
            await forward()
            if 200 <= request.writer.status < 400:
                # RFC 9111 4.4: a non-error response to an unsafe method
                # invalidates the stored responses for its URL.
                store.invalidate(key)
            return
        consumer = _consumer(ex.auth)
        bypass = _bypass(ex, route, consumer)
        if bypass is not None:
            counts["bypass"].inc()
            ex.cache = CacheRequest(ex, store, key, consumer)
            ex.cache.passive = True
            ex.cache.status = f"{_NAME}; fwd=bypass; detail={bypass}"
            await forward()
            return
        headers = request.headers

        def values(name: str) -> str:
            return cacherules.normalise_field(headers.getall(name, []))

        creq = CacheRequest(ex, store, key, consumer)
        followed = False
        for _ in range(2):
            entry = store.lookup(key, consumer, values)
            now = self._clock()
            if entry is not None and entry.age(now) < entry.lifetime:
                ex.cache = creq
                result = "collapsed" if followed else "hit"
                counts[result].inc()
                creq.served = result
                ttl = int(entry.lifetime - entry.age(now))
                detail = "; collapsed" if followed else ""
                status = f"{_NAME}; fwd=miss{detail}" if followed else f"{_NAME}; hit; ttl={ttl}"
                await creq.serve(entry, status, now)
                return
            creq.stale = entry
            fill = store.fills.get((key, consumer))
            if fill is None or followed or method != "GET":
                break
            # Collapsed forwarding: wait for the request already fetching it.
            followed = True
            try:
                async with asyncio.timeout(route.config.read_timeout):
                    await fill.done.wait()
            except TimeoutError:
                break
            if not fill.stored:
                break
        ex.cache = creq
        if method == "GET" and (key, consumer) not in store.fills:
            creq.fill = store.fills[(key, consumer)] = Fill()
        try:
            await forward()
        except GatewayError as error:
            now = self._clock()
            stale = creq.stale
            if stale is not None and creq.usable_stale(now) and not request.writer.started:
                counts["stale"].inc()
                await creq.serve_stale(stale, error.status, now)
                return
            counts["miss"].inc()
            creq.status = creq.status or f"{_NAME}; fwd={'stale' if stale else 'miss'}"
            raise
        finally:
            creq.end()
        counts[creq.served or "miss"].inc()


def _consumer(auth: RequestAuth | None) -> str:
    """Whom the cache keys a request on (see `RequestAuth.who`)."""
    return auth.who if auth is not None else ""


def _bypass(ex: CacheExchange, route: RouteRuntime, consumer: str) -> str | None:
    """Why this GET/HEAD is not answered from (nor stored into) the cache."""
    method = ex.method
    request = ex.request
    if method not in ("GET", "HEAD"):
        return "method"
    if _has_auth(route) and not consumer:
        return "anonymous"
    if request.websocket:
        # A switch to another protocol: nothing to store, and a fill would stay
        # open for the tunnel's life with collapsed followers waiting on it.
        return "upgrade"
    if request.body_exists:
        return "body"
    if "Range" in request.headers:
        return "range"
    return None


__all__ = [
    "BodyTee",
    "CacheExchange",
    "CacheRequest",
    "CacheStep",
    "RouteCacheConfig",
    "unconsulted",
]
