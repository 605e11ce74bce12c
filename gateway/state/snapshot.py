"""An immutable runtime view of one Config, and the state that outlives it.

`Runtime` owns what must survive a reload: targets (breaker, health,
in-flight), rate-limit buckets, retry budgets and the one upstream client
(a connection pool every snapshot shares), keyed by route name and by
upstream name + target URL. `Runtime.build(config)` makes a
`Snapshot` that reuses state for everything unchanged; the proxy reads the
current snapshot once per request, so each request runs wholly on one config.

A build has two halves, so that a reload of a large config never stalls the
event loop: `prepare(config)` (the route table, the trusted-proxy set, which
routes are unchanged since the last snapshot, and new `RouteRuntime`s for
the routes on unchanged upstreams) may run in a worker thread;
`commit(prepared)` runs on the loop and touches only what changed (new
pools and the routes on them, the routes removed), reusing the previous
snapshot's pools and `RouteRuntime`s for everything else. A route that only
moved in the file counts as unchanged. `dismantle` frees a replaced
snapshot off the loop.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Final

from msgspec import structs

from gateway.core.auth import IpRules
from gateway.core.config import (
    CacheConfig,
    Config,
    ConfigError,
    RateLimitConfig,
    RouteCacheConfig,
    RouteConfig,
    TargetConfig,
    UpstreamConfig,
)
from gateway.core.cors import CorsPolicy
from gateway.core.headers import TrustedProxies
from gateway.core.limits import BucketStore, SharedStore
from gateway.core.retry import RetryBudget
from gateway.core.routing import RouteTable
from gateway.state.auth import AuthState, PolicySet
from gateway.state.cache import ResponseCache
from gateway.state.metrics import (
    CACHE_RESULTS,
    CounterChild,
    GaugeChild,
    HistogramChild,
    Metrics,
    RequestCounter,
)
from gateway.state.redisstore import SharedBuckets
from gateway.state.stats import RouteStats
from gateway.state.upstream import PanicState, Pool, Target
from gateway.wire.h1client import ConnectionPool
from gateway.wire.tls import ClientContexts, ClientTLS

Clock = Callable[[], float]


class RouteRuntime:
    """A route plus everything precomputed for its requests.

    Slotted: a config of 120,000 routes holds 120,000 of these. Built in the
    reload's worker thread for routes on an unchanged upstream (nothing here
    is bound to the loop: metric children and bucket stores are plain
    objects), on the loop otherwise.
    """

    __slots__ = (
        "auth_failures",
        "buckets",
        "bytes_in",
        "bytes_out",
        "cache_config",
        "cache_counts",
        "config",
        "cors",
        "count",
        "duration",
        "ip_rules",
        "limit_by_client",
        "limit_by_consumer",
        "limit_by_route",
        "limit_header",
        "name",
        "plain",
        "pool",
        "rate_limited",
        "rewrite",
        "shared",
        "stats",
        "tunnel_bytes",
        "tunnels",
    )

    def __init__(
        self,
        config: RouteConfig,
        pool: Pool,
        buckets: BucketStore | None,
        metrics: Metrics,
        shared: SharedStore | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.pool = pool
        self.buckets = buckets
        # store = "redis": the shared buckets, with `buckets` as the fallback.
        self.shared = shared
        self.cors = CorsPolicy(config.cors) if config.cors is not None else None
        rate_limit = config.rate_limit
        self.limit_header: str | None = None
        if rate_limit is not None and rate_limit.key.startswith("header:"):
            self.limit_header = rate_limit.key.removeprefix("header:")
        self.limit_by_route = rate_limit is not None and rate_limit.key == "route"
        self.limit_by_consumer = rate_limit is not None and rate_limit.key == "consumer"
        self.limit_by_client = rate_limit is not None and rate_limit.key == "client_ip"
        access = config.access
        self.ip_rules: IpRules | None = None
        if access is not None and (access.allow_ips or access.deny_ips):
            self.ip_rules = IpRules(access.allow_ips, access.deny_ips)
        # Compiled once here, never per request; routes without a rewrite
        # (nearly all) get neither a pattern nor a closure.
        self.rewrite: Callable[[str], str] | None = None
        if config.rewrite is not None:
            self.rewrite = _rewriter(config.rewrite.pattern, config.rewrite.replace)
        # None of the auth step applies to the route (edges/auth.py): no
        # policy, IP rule, rewrite, header transform, redirect or credential
        # to strip. Its requests then skip the step, unless the snapshot's
        # policies forward identity headers, which every route strips.
        self.plain = (
            not config.auth
            and self.ip_rules is None
            and self.rewrite is None
            and config.request_headers is None
            and config.response_headers is None
            and config.redirect is None
            and not config.strip_credentials
        )
        self.auth_failures = metrics.auth_failures
        key = (config.name,)  # one label tuple for every family keyed by route alone
        self.duration: HistogramChild = metrics.duration.child(key)
        self.bytes_in: CounterChild = metrics.request_bytes.child(key)
        self.bytes_out: CounterChild = metrics.response_bytes.child(key)
        self.rate_limited: CounterChild = metrics.rate_limited.child(key)
        self.count = RequestCounter(metrics, config.name).count
        # WebSocket tunnels: the gauge exists at 0 from the route's load on.
        self.tunnels: GaugeChild = metrics.tunnels_active.child(key)
        # Its bytes series are made at the route's first tunnel (`tunnel_counters`).
        self.tunnel_bytes = metrics.tunnel_bytes
        # `[routes.cache]` (None: the route does not cache) and its counters.
        self.cache_config = config.cache
        self.cache_counts: dict[str, CounterChild] = _NO_CACHE_COUNTS
        if config.cache is not None:
            self.cache_counts = {
                result: metrics.cache_requests.labels(config.name, result)
                for result in CACHE_RESULTS
            }
        self.stats: RouteStats = metrics.stats.route(config.name)

    def tunnel_counters(self) -> tuple[CounterChild, CounterChild]:
        """`gateway_tunnel_bytes_total` up and down for this route, made at
        its first tunnel: two series per route that never tunnels, times
        120,000 routes, are megabytes for nothing."""
        name = self.name
        return self.tunnel_bytes.labels(name, "up"), self.tunnel_bytes.labels(name, "down")

    def with_pool(self, pool: Pool) -> RouteRuntime:
        """This route on another pool (its upstream's was rebuilt), sharing
        everything else: metric series, buckets, policies."""
        clone = copy.copy(self)
        clone.pool = pool
        return clone


# Shared by every route without [routes.cache]; never written to.
_NO_CACHE_COUNTS: Final[dict[str, CounterChild]] = {}


def _rewriter(pattern: str, template: str) -> Callable[[str], str]:
    compiled = re.compile(pattern)
    return lambda path: compiled.sub(template, path, count=1)


def same_route(a: RouteConfig, b: RouteConfig) -> bool:
    """Equal but for the position in the file (`index`): a route that only
    moved keeps its RouteRuntime (metric series, rate-limit buckets)."""
    if a.index == b.index:
        return a == b
    return structs.replace(a, index=b.index) == b


@dataclass(frozen=True)
class Snapshot:
    config: Config
    table: RouteTable
    routes: dict[str, RouteRuntime]
    pools: dict[str, Pool]
    trusted: TrustedProxies
    loaded_at: float  # unix time, for /status
    auth: PolicySet = field(default_factory=PolicySet)
    cache: ResponseCache | None = None  # the shared store; None without [cache]


@dataclass(frozen=True)
class Prepared:
    """The pure half of a snapshot, built off the event loop by `Runtime.prepare`."""

    config: Config
    table: RouteTable
    trusted: TrustedProxies
    base: Snapshot | None  # the snapshot the comparisons below were made against
    same_upstreams: frozenset[str]  # upstreams whose config equals base's
    # The new snapshot's routes dict: base's RouteRuntime for every route
    # whose config (position aside) and upstream are unchanged, and a new one,
    # built in the worker thread on base's pool, for every other route on an
    # unchanged upstream. `commit` adds the rest.
    kept: dict[str, RouteRuntime]
    todo: tuple[RouteConfig, ...]  # routes whose RouteRuntime `commit` builds
    route_names: frozenset[str]
    # Unchanged routes whose upstream changed: `commit` moves them to its new pool.
    rebind: tuple[RouteRuntime, ...] = ()
    # Rate-limit stores the routes built in `kept` use (None: the route has
    # no limit any more); `commit` records them in `Runtime.buckets`.
    buckets: dict[str, _BucketEntry | None] = field(default_factory=dict)
    cache_signatures: dict[str, tuple[object, ...]] | None = None
    gone: frozenset[str] | None = None  # base's routes not in config (None: unknown)


@dataclass
class _BucketEntry:
    config: RateLimitConfig
    store: BucketStore


@dataclass
class Runtime:
    """State kept across snapshots; `build()` is the only way to get one."""

    metrics: Metrics
    clock: Clock = time.monotonic
    targets: dict[tuple[str, str], Target] = field(default_factory=dict)
    budgets: dict[str, RetryBudget] = field(default_factory=dict)
    panics: dict[str, PanicState] = field(default_factory=dict)
    buckets: dict[str, _BucketEntry] = field(default_factory=dict)
    # Every upstream of every snapshot: connections are per (scheme, host,
    # port), so a reload that removes an upstream cuts none of its running
    # requests; `build` then closes (`retain`) the removed targets' idle
    # connections at once and their busy ones when their request ends.
    client: ConnectionPool = field(default_factory=ConnectionPool)
    # JWKS stores, fetchers and token caches, by policy name.
    auth: AuthState = field(default_factory=AuthState)
    # [upstreams.NAME.tls] contexts, built when a config is applied (never
    # per request), reused across reloads while settings and files stay.
    client_tls: ClientContexts = field(default_factory=ClientContexts)
    # The response store outlives reloads while [cache] is unchanged; a
    # route's entries survive while its cache config and match are unchanged.
    cache: ResponseCache | None = None
    cache_config: CacheConfig | None = None
    _cache_routes: dict[str, tuple[object, ...]] = field(default_factory=dict, init=False)
    # The [redis] store of the current config; ones a reload replaced are
    # closed at shutdown (a request may still be on them).
    shared: SharedBuckets | None = None
    # In a worker process: the main process's buckets, for store = "local"
    # routes (one limit for the whole gateway, as nginx's shared zones).
    local_shared: SharedStore | None = None
    # The last good set of each dns/srv target, by (upstream, entry as
    # written); filled by gateway.state.discovery.
    discovered: dict[tuple[str, str], tuple[TargetConfig, ...]] = field(default_factory=dict)
    _retired: list[SharedBuckets] = field(default_factory=list, init=False)
    # Routes of the current snapshot: a reload forgets the metric series of
    # the ones it removes.
    _routes_seen: frozenset[str] = field(default_factory=frozenset, init=False)
    # The last snapshot built: what `prepare` compares a new config with.
    _current: Snapshot | None = field(default=None, init=False)

    def build(self, config: Config, *, rebuild: bool = False) -> Snapshot:
        """A snapshot for `config`, reusing state for what did not change.

        `rebuild`: every pool and route anew, for what the config does not
        show (DNS changed a target set under an unchanged config). Nothing
        here awaits, so the swap the caller does afterwards is atomic.
        """
        prepared = self.prepare(config)
        if rebuild:
            prepared = replace(prepared, base=None)  # commit then reuses nothing
        return self.commit(prepared)

    def prepare(self, config: Config) -> Prepared:
        """Everything about `config` that needs no loop-bound object.

        Safe in a worker thread: it reads only immutable configs, the current
        snapshot reference and `buckets` (which only `commit` writes; reloads
        run one at a time), and builds new objects: the route table and the
        RouteRuntimes of routes on unchanged upstreams (metric children are
        plain objects in dicts; creating one is a single dict store under the
        GIL); the one write to a live object is an unchanged RouteRuntime's
        `config`, set to the new, equal config. What can still fail (regex
        compilation, CIDRs) fails in the table's build, before that, so a
        failure leaves the old snapshot whole (at worst, zero-valued series
        for routes that never loaded).
        """
        base = self._current
        table = RouteTable(config.routes)
        trusted = TrustedProxies(config.server.trusted_proxies)
        names = frozenset(route.name for route in config.routes)
        signatures = {r.name: _cache_signature(r, r.cache) for r in config.routes if r.cache}
        if base is None:
            return Prepared(
                config,
                table,
                trusted,
                None,
                frozenset(),
                {},
                config.routes,
                names,
                cache_signatures=signatures,
            )
        old = base.config
        same_upstreams = frozenset(
            name for name, up in config.upstreams.items() if old.upstreams.get(name) == up
        )
        kept: dict[str, RouteRuntime] = {}
        todo: list[RouteConfig] = []
        rebind: list[RouteRuntime] = []
        buckets: dict[str, _BucketEntry | None] = {}
        old_routes = base.routes
        old_pools = base.pools
        metrics = self.metrics
        for route in config.routes:
            was = old_routes.get(route.name)
            upstream = route.upstream
            # Redirect routes ("" upstream) use no pool: nothing to compare.
            same_pool = upstream in same_upstreams or not upstream
            if was is not None and same_route(was.config, route):
                # Equal configs, wherever they sit in the file: the old
                # RouteRuntime is what a rebuild would make (same series,
                # same buckets), on the new pool if its upstream changed.
                # It now refers to the new, equal config (one store, atomic
                # under the GIL; requests still on the old snapshot read the
                # same values), so the old RouteConfig goes with the old
                # Config instead of living on in the runtime: one RouteConfig
                # per route after a reload, not two.
                was.config = route
                if same_pool:
                    kept[route.name] = was
                else:
                    rebind.append(was)
                continue
            pool = old_pools.get(upstream) if upstream in same_upstreams else None
            if pool is None:
                todo.append(route)
                continue
            limit = route.rate_limit
            store = None
            if limit is None:
                buckets[route.name] = None
            else:
                entry = self.buckets.get(route.name)
                if entry is None or entry.config != limit:
                    entry = _BucketEntry(
                        limit, BucketStore(limit.rate, limit.burst, clock=self.clock)
                    )
                    buckets[route.name] = entry
                store = entry.store
            kept[route.name] = RouteRuntime(route, pool, store, metrics)
        return Prepared(
            config,
            table,
            trusted,
            base,
            same_upstreams,
            kept,
            tuple(todo),
            names,
            tuple(rebind),
            buckets,
            signatures,
            # _routes_seen is base's route names: commit sets both together.
            self._routes_seen - names,
        )

    def commit(self, prepared: Prepared) -> Snapshot:
        """The snapshot for `prepared`; on the loop, no await (atomic with the swap).

        Incremental: an upstream whose config is unchanged keeps its `Pool`,
        a route whose config and upstream are unchanged keeps its
        `RouteRuntime` (metric series, rate-limit buckets, CORS policy), and
        `prepare` already built the RouteRuntimes of the other routes on
        unchanged upstreams, so the work here is proportional to the routes
        on new or changed upstreams (nothing per route otherwise).
        """
        config = prepared.config
        if prepared.base is not self._current:
            # Prepared against another snapshot (not the reloader's way):
            # nothing can be reused safely, so rebuild every route here.
            prepared = replace(
                prepared,
                base=None,
                same_upstreams=frozenset(),
                kept={},
                todo=config.routes,
                rebind=(),
                buckets={},
                gone=None,
            )
        base = prepared.base
        old_pools = base.pools if base is not None else {}
        # Loads the files [upstreams.NAME.tls] names; one that cannot be loaded
        # now raises ConfigError here, before anything is swapped.
        tls = self._client_tls(config)
        self.client_tls.retain(set(tls.values()))
        pools: dict[str, Pool] = {}
        rebuilt: set[str] = set()  # unchanged config, but new TLS files
        for name, up in config.upstreams.items():
            kept_pool = old_pools.get(name) if name in prepared.same_upstreams else None
            if kept_pool is not None and kept_pool.tls is tls.get(name):
                pools[name] = kept_pool
            else:  # new or changed, or its TLS files changed under the same config
                pools[name] = self._pool(up, tls.get(name))
                if kept_pool is not None:
                    rebuilt.add(name)
        previous_shared = self.shared
        shared = self._shared(config)

        def store_of(route: RouteConfig) -> SharedStore | None:
            # store = "redis": the [redis] store; "local" in a worker: the main's.
            if route.rate_limit is None:
                return None
            return shared if route.rate_limit.store == "redis" else self.local_shared

        routes = prepared.kept  # built for this snapshot alone: ours to fill
        metrics = self.metrics
        if rebuilt:  # rare: a per-route pass only then
            for name, runtime in list(routes.items()):
                if runtime.config.upstream in rebuilt:
                    routes[name] = runtime.with_pool(pools[runtime.config.upstream])
        for runtime in prepared.rebind:
            routes[runtime.name] = runtime.with_pool(pools[runtime.config.upstream])
        for name, entry in prepared.buckets.items():
            if entry is None:
                self.buckets.pop(name, None)
            else:
                self.buckets[name] = entry
        todo = list(prepared.todo)
        if shared is not None or previous_shared is not None or self.local_shared is not None:
            # A shared store in play (Redis, or the main's buckets in a
            # worker): routes built or kept without theirs are built again.
            for name, runtime in list(routes.items()):
                if runtime.shared is not store_of(runtime.config):
                    del routes[name]
                    todo.append(runtime.config)
        for route in todo:
            # A redirect route has no upstream; it answers before any pool
            # is used, so an empty one stands in (never in `pools`, never probed).
            pool = pools.get(route.upstream) or self._no_pool()
            routes[route.name] = RouteRuntime(
                route, pool, self._buckets(route), metrics, store_of(route)
            )
        auth = self.auth.build(config.auth)
        cache = self._cache(config, prepared.cache_signatures)
        self._forget_missing(config, prepared.route_names)
        gone = prepared.gone
        if gone is None:
            gone = self._routes_seen - prepared.route_names
        if gone:
            self.metrics.forget_routes(gone)
        self._routes_seen = prepared.route_names
        snapshot = Snapshot(
            config=config,
            table=prepared.table,
            routes=routes,
            pools=pools,
            trusted=prepared.trusted,
            loaded_at=time.time(),
            cache=cache,
            auth=auth,
        )
        self._current = snapshot
        return snapshot

    def _no_pool(self) -> Pool:
        return Pool(
            UpstreamConfig(name="", targets=()),
            (),
            self.client,
            RetryBudget(clock=self.clock),
            PanicState("", self.metrics),
        )

    def _client_tls(self, config: Config) -> dict[str, ClientTLS]:
        """Every upstream's TLS context; a file that cannot be loaded now
        (replaced since `gateway check` read it) rejects the whole config."""
        out: dict[str, ClientTLS] = {}
        errors: list[str] = []
        for name, up in config.upstreams.items():
            settings = up.tls
            if settings is None:
                continue
            try:
                out[name] = self.client_tls.get(
                    verify=settings.verify,
                    ca_file=settings.ca_file,
                    server_name=settings.server_name,
                    cert=settings.cert,
                    key=settings.key,
                )
            except (ssl.SSLError, OSError, ValueError) as exc:
                errors.append(f"upstreams.{name}.tls: cannot load: {exc}")
        if errors:
            raise ConfigError(errors)
        return out

    def _pool(self, up: UpstreamConfig, tls: ClientTLS | None = None) -> Pool:
        targets = []
        for t in self.targets_of(up):
            key = (up.name, t.url)
            target = self.targets.get(key)
            if target is None:
                # New targets start in rotation (also under active checks, as
                # Envoy does: the first probes take them out if needed).
                target = Target(up.name, t.url, t.weight, up.breaker, self.metrics, self.clock)
                self.targets[key] = target
            elif target.breaker_config != up.breaker:
                target.replace_breaker(up.breaker)
            target.weight = t.weight
            targets.append(target)
        budget = self.budgets.get(up.name)
        if budget is None:
            budget = self.budgets[up.name] = RetryBudget(clock=self.clock)
        panic = self.panics.get(up.name)
        if panic is None:
            panic = self.panics[up.name] = PanicState(up.name, self.metrics)
        return Pool(up, tuple(targets), self.client, budget, panic, tls)

    def _cache(
        self, config: Config, signatures: dict[str, tuple[object, ...]] | None = None
    ) -> ResponseCache | None:
        """The store for `config`: the same one while [cache] is unchanged,
        minus the entries of routes whose cache config or match changed."""
        if signatures is None:
            signatures = {r.name: _cache_signature(r, r.cache) for r in config.routes if r.cache}
        if config.cache is None:
            self.cache = None
        elif self.cache is None or config.cache != self.cache_config:
            self.cache = ResponseCache(config.cache.max_bytes, config.cache.max_entry_bytes)
        else:
            changed = [n for n, sig in signatures.items() if self._cache_routes.get(n) != sig]
            self.cache.retain(signatures, changed)
        self.cache_config = config.cache
        self._cache_routes = signatures
        self.metrics.cache_gauges.source = self.cache.stats if self.cache is not None else None
        return self.cache

    def _buckets(self, route: RouteConfig) -> BucketStore | None:
        limit = route.rate_limit
        if limit is None:
            self.buckets.pop(route.name, None)
            return None
        entry = self.buckets.get(route.name)
        if entry is None or entry.config != limit:
            entry = _BucketEntry(limit, BucketStore(limit.rate, limit.burst, clock=self.clock))
            self.buckets[route.name] = entry
        return entry.store

    def _shared(self, config: Config) -> SharedBuckets | None:
        """The Redis store for `config`, kept across reloads while [redis] stays."""
        if self.shared is not None and self.shared.config != config.redis:
            self._retired.append(self.shared)
            self.shared = None
        if self.shared is None and config.redis is not None:
            self.shared = SharedBuckets(config.redis, self.metrics, self.clock)
        return self.shared

    def targets_of(self, up: UpstreamConfig) -> list[TargetConfig]:
        """The static targets of `up`, then those its dns/srv entries resolved
        to (an address also written as a static target counts once)."""
        targets = list(up.targets)
        seen = {t.url for t in targets}
        for found in up.discover:
            for t in self.discovered.get((up.name, found.written), ()):
                if t.url not in seen:
                    seen.add(t.url)
                    targets.append(t)
        return targets

    def _forget_missing(self, config: Config, route_names: frozenset[str]) -> None:
        live_targets = {
            (u.name, t.url) for u in config.upstreams.values() for t in self.targets_of(u)
        }
        for key in [k for k in self.targets if k not in live_targets]:
            del self.targets[key]
            self.metrics.forget_target(*key)
        self.client.retain({t.pool_key for t in self.targets.values()})
        for name in [n for n in self.budgets if n not in config.upstreams]:
            del self.budgets[name]
            self.panics.pop(name, None)
        for name in [n for n in self.buckets if n not in route_names]:
            del self.buckets[name]

    async def close(self) -> None:
        """Close every upstream connection, idle or busy (shutdown: the drain
        already ended or aborted the requests on them)."""
        await self.auth.close()
        await self.client.close()
        for shared in [*self._retired, *([self.shared] if self.shared else [])]:
            await shared.close()
        self._retired.clear()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC while building a snapshot; what survives is frozen after.

    A config of 12,000 routes is some 10^5 tracked objects (twice that while a
    reload holds the old and the new), and CPython's full collection scans
    them all with the GIL held: 80 ms with 12,000 routes, close to a second
    with 120,000, a stall for every request in flight, whichever thread
    triggered it. So: no automatic collection during the build (refcounting
    still frees almost everything: configs, tables and snapshots hold no
    cycles), and on success `gc.freeze()` moves every live object, the new
    snapshot included, out of the collector's sight, so later collections
    only scan what was allocated since (the usual pre-fork recipe, gc docs).
    An old snapshot's objects are still freed by refcount when it goes.
    """
    enabled = gc.isenabled()
    gc.disable()
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:
            gc.freeze()
        if enabled:
            gc.enable()


def dismantle(retired: list[Snapshot]) -> None:
    """Free a snapshot a reload replaced, a piece at a time; in a worker thread.

    A snapshot of 120,000 routes is about a million objects (configs, the
    route table's trie, its compiled entries). Freed by its last reference,
    that is one deallocation cascade with the GIL held: 100 ms and more
    without a break for the event loop. Here every piece is held in a list
    first, the snapshot dropped (its containers go, their items survive in
    the list), and then the list is emptied one item per bytecode step,
    parents before children, so each step frees one object (its exclusive
    leaves at most) and the interpreter can hand the GIL to the loop between
    any two. `retired` must hold the only references the caller has
    (it is emptied here); pieces still in use (unchanged RouteRuntimes,
    requests still running on the old snapshot) merely lose one reference.
    """
    snapshot = retired.pop()
    held: list[object] = [snapshot, snapshot.config, snapshot.routes]
    held.extend(snapshot.table.parts())
    held.append(snapshot.config.routes)
    held.extend(snapshot.config.routes)
    held.extend(snapshot.routes.values())
    del snapshot
    held.reverse()  # pop() from the end: parents first
    while held:
        held.pop()


def _cache_signature(route: RouteConfig, cache: RouteCacheConfig) -> tuple[object, ...]:
    """What a route's stored responses depend on: its cache config, how it
    matches, what it forwards to and what it asks the target (rewrite,
    request headers, credentials) or stores (response headers): a changed
    one starts empty, else answers for the old target path would be served
    until their TTL."""
    return (
        cache,
        route.path,
        route.path_regex,
        route.host,
        route.methods,
        route.headers,
        route.upstream,
        route.strip_prefix,
        route.preserve_host,
        route.auth,
        route.strip_credentials,
        route.rewrite,
        route.request_headers,
        route.response_headers,
    )


class SnapshotBox:
    """The one mutable reference to the current snapshot; swapped whole."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
