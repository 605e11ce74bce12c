"""An immutable runtime view of one Config, and the state that outlives it.

`Runtime` owns what must survive a reload: targets (breaker, health,
in-flight), rate-limit buckets, retry budgets and the one upstream client
(a connection pool every snapshot shares), keyed by route name and by
upstream name + target URL. `Runtime.build(config)` makes a
`Snapshot` that reuses state for everything unchanged; the proxy reads the
current snapshot once per request, so each request runs wholly on one config.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.core.config import Config, RateLimitConfig, RouteConfig, TargetConfig, UpstreamConfig
from gateway.core.cors import CorsPolicy
from gateway.core.headers import TrustedProxies
from gateway.core.limits import BucketStore, SharedStore
from gateway.core.retry import RetryBudget
from gateway.core.routing import RouteTable
from gateway.state.metrics import CounterChild, HistogramChild, Metrics, RequestCounter
from gateway.state.redisstore import SharedBuckets
from gateway.state.upstream import PanicState, Pool, Target
from gateway.wire.h1client import ConnectionPool

Clock = Callable[[], float]


class RouteRuntime:
    """A route plus everything precomputed for its requests."""

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
        self.duration: HistogramChild = metrics.duration.labels(config.name)
        self.bytes_in: CounterChild = metrics.request_bytes.labels(config.name)
        self.bytes_out: CounterChild = metrics.response_bytes.labels(config.name)
        self.rate_limited: CounterChild = metrics.rate_limited.labels(config.name)
        self.count = RequestCounter(metrics, config.name).count


@dataclass(frozen=True)
class Snapshot:
    config: Config
    table: RouteTable
    routes: dict[str, RouteRuntime]
    pools: dict[str, Pool]
    trusted: TrustedProxies
    loaded_at: float  # unix time, for /status


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
    _routes_seen: set[str] = field(default_factory=set, init=False)

    def build(self, config: Config) -> Snapshot:
        """A snapshot for `config`, reusing state for what did not change.

        Nothing here awaits, so the swap the caller does afterwards is atomic.
        """
        # What can still fail (regex compilation, CIDRs) comes before any
        # shared state changes, so a failure leaves the old snapshot whole.
        table = RouteTable(config.routes)
        trusted = TrustedProxies(config.server.trusted_proxies)
        pools = {name: self._pool(up) for name, up in config.upstreams.items()}
        shared = self._shared(config)
        routes: dict[str, RouteRuntime] = {}
        for route in config.routes:
            on_redis = route.rate_limit is not None and route.rate_limit.store == "redis"
            routes[route.name] = RouteRuntime(
                route,
                pools[route.upstream],
                self._buckets(route),
                self.metrics,
                shared if on_redis else self.local_shared if route.rate_limit else None,
            )
        self._forget_missing(config)
        for gone in self._routes_seen - routes.keys():
            self.metrics.forget_route(gone)
        self._routes_seen = set(routes)
        return Snapshot(
            config=config,
            table=table,
            routes=routes,
            pools=pools,
            trusted=trusted,
            loaded_at=time.time(),
        )

    def _pool(self, up: UpstreamConfig) -> Pool:
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
        return Pool(up, tuple(targets), self.client, budget, panic)

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

    def _forget_missing(self, config: Config) -> None:
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
        route_names = {r.name for r in config.routes}
        for name in [n for n in self.buckets if n not in route_names]:
            del self.buckets[name]

    async def close(self) -> None:
        """Close every upstream connection, idle or busy (shutdown: the drain
        already ended or aborted the requests on them)."""
        await self.client.close()
        for shared in [*self._retired, *([self.shared] if self.shared else [])]:
            await shared.close()
        self._retired.clear()


class SnapshotBox:
    """The one mutable reference to the current snapshot; swapped whole."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
