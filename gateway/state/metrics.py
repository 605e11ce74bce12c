"""Every metric the contract names, on a registry of the gateway's own.

One `Metrics` per gateway process (tests run several in one interpreter, so
nothing is registered on prometheus_client's global registry). Labels are
bounded: route and upstream names and target URLs come from the config,
never from a request.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Final, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.state.stats import Stats

_Child = TypeVar("_Child", "CounterChild", "GaugeChild", "HistogramChild")

# Latency buckets from 1 ms to 5 min: the histogram runs to the last body
# byte, so long downloads and SSE streams need the high end.
_DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    float("inf"),
)


class CounterChild:
    """One labelled series: a plain float, added to on the event loop thread."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class GaugeChild:
    """One labelled gauge: a float moved up and down on the loop thread."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class HistogramChild:
    """One labelled histogram: a count per bucket (not cumulative) and a sum."""

    __slots__ = ("_bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        # Made at the first observation: one child per route, and most of
        # 120,000 routes may never see a request (~180 bytes each).
        self.counts: list[int] | None = None
        self.total = 0.0

    def observe(self, value: float) -> None:
        counts = self.counts
        if counts is None:
            counts = self.counts = [0] * len(self._bounds)
        # Bucket i counts bounds[i-1] < value <= bounds[i] ("le").
        counts[bisect.bisect_left(self._bounds, value)] += 1
        self.total += value


class _Family(Collector, Generic[_Child]):
    """A labelled family counted in plain Python, rendered at scrape time.

    prometheus_client's Counter and Histogram cost four Python calls and a
    lock per event (observability checks, a mutex value): about 10 µs per
    proxied request with the six events a request makes. Everything that
    counts runs on the event loop thread, and so does the /metrics handler,
    so plain floats are exact here. Registered on the registry as a custom
    collector; the exposition is prometheus_client's.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Child:
        return self.child(values)

    def child(self, key: tuple[str, ...]) -> _Child:
        """`labels(*key)`, keeping `key` itself as the series' key: the
        families labelled by route alone share one tuple per route (some
        60 bytes each, times the families, times 120,000 routes)."""
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
            child = self._children[key] = self._new_child()
        return child

    def remove(self, *values: str) -> None:
        del self._children[values]

    def remove_where(self, label: str, value: str) -> None:
        """Drop every series whose `label` is `value` (a route or target gone)."""
        index = self.labelnames.index(label)
        for values in [v for v in self._children if v[index] == value]:
            del self._children[values]

    def remove_where_in(self, label: str, values: AbstractSet[str]) -> None:
        """Drop every series whose `label` is one of `values`: one pass, however many."""
        if self.labelnames == (label,):
            # The label is the whole key: a lookup per value, not a pass over
            # every series (a reload removing one of 120,000 routes).
            self.remove_keys((value,) for value in values)
            return
        index = self.labelnames.index(label)
        gone = [v for v in self._children if v[index] in values]
        for labels in gone:
            del self._children[labels]

    def remove_keys(self, keys: Iterable[tuple[str, ...]]) -> None:
        """Drop the series with these exact label values, where present."""
        children = self._children
        for key in keys:
            children.pop(key, None)

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def _new_child(self) -> _Child:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError


class FastCounter(_Family[CounterChild]):
    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in self._children.items():
            family.add_metric(values, child.value)
        return [family]


class FastGauge(_Family[GaugeChild]):
    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in self._children.items():
            family.add_metric(values, child.value)
        return [family]


class FastHistogram(_Family[HistogramChild]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        if buckets[-1] != float("inf"):
            raise ValueError("the last bucket must be +Inf")
        self._bounds = tuple(buckets)
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        zeros = (0,) * len(self._bounds)
        for values, child in self._children.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            counts = child.counts or zeros
            for bound, count in zip(self._bounds, counts, strict=True):
                cumulative += count
                buckets.append((_le(bound), cumulative))
            family.add_metric(values, buckets, child.total)
        return [family]


class _CacheGauges(Collector):
    """`gateway_cache_bytes` and `gateway_cache_entries`, read from the store
    at scrape time (nothing to update on the hot path); 0 without a cache."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.source: Callable[[], tuple[int, int]] | None = None
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return self._families(0, 0)

    def collect(self) -> Iterable[Metric]:
        held, entries = self.source() if self.source is not None else (0, 0)
        return self._families(held, entries)

    @staticmethod
    def _families(held: int, entries: int) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "gateway_cache_bytes", "Bytes held by stored responses (heads and bodies).", held
            ),
            GaugeMetricFamily("gateway_cache_entries", "Stored responses.", entries),
        ]


# The result label values of gateway_cache_requests_total.
CACHE_RESULTS: Final = ("hit", "miss", "stale", "revalidated", "bypass", "collapsed")


def _le(bound: float) -> str:
    # The "le" label as prometheus_client writes it (floatToGoString).
    return "+Inf" if bound == float("inf") else repr(float(bound))


# The `to` label values of gateway_breaker_transitions_total (breaker.py's states).
BREAKER_STATES: Final = ("closed", "open", "half_open")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The dashboard's rolling minute per route (gateway/state/stats.py).
        self.stats = Stats()
        r = self.registry
        # What prometheus_client puts on its global registry, on ours: the
        # process_* (CPU, RSS, open fds, start time), python_info and
        # python_gc_* series every Python exporter is expected to have.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # Counted on every request: plain-Python families (see _Family).
        self.requests = FastCounter(
            "gateway_requests_total",
            "Requests answered, by route, method and status code.",
            ["route", "method", "code"],
            r,
        )
        self.duration = FastHistogram(
            "gateway_request_duration_seconds",
            "Time from request head to the last response body byte.",
            ["route"],
            r,
            buckets=_DURATION_BUCKETS,
        )
        self.upstream_requests = FastCounter(
            "gateway_upstream_requests_total",
            "Attempts sent to targets, by outcome (ok|error|timeout).",
            ["upstream", "target", "outcome"],
            r,
        )
        self.upstream_in_flight = Gauge(
            "gateway_upstream_in_flight",
            "Requests currently held by a target.",
            ["upstream", "target"],
            registry=r,
        )
        self.request_bytes = FastCounter(
            "gateway_request_bytes_total",
            "Request body bytes received from clients.",
            ["route"],
            r,
        )
        self.response_bytes = FastCounter(
            "gateway_response_bytes_total",
            "Response body bytes sent to clients.",
            ["route"],
            r,
        )
        self.rate_limited = FastCounter(
            "gateway_rate_limited_total",
            "Requests refused with 429.",
            ["route"],
            r,
        )
        self.auth_failures = FastCounter(
            "gateway_auth_failures_total",
            "Requests refused by identity and access checks, by reason "
            "(missing, invalid, expired, forbidden, ip_denied).",
            ["route", "reason"],
            r,
        )
        # Label-less: one Redis serves every route, and an outage is one event.
        self.ratelimit_store_errors = FastCounter(
            "gateway_ratelimit_store_errors_total",
            "Shared rate-limit store (Redis) commands that failed or timed out.",
            [],
            r,
        )
        self.ratelimit_store_errors.labels()
        self.breaker_state = Gauge(
            "gateway_breaker_state",
            "Circuit breaker per target: 0 closed, 1 open, 2 half-open.",
            ["upstream", "target"],
            registry=r,
        )
        self.breaker_transitions = FastCounter(
            "gateway_breaker_transitions_total",
            "Circuit breaker state changes per target, by the state entered.",
            ["upstream", "target", "to"],
            r,
        )
        self.upstream_panic = FastCounter(
            "gateway_upstream_panic_total",
            "Times an upstream entered panic mode (too few targets available).",
            ["upstream"],
            r,
        )
        self.target_healthy = Gauge(
            "gateway_target_healthy",
            "1 when the target is in rotation for active health checks, else 0.",
            ["upstream", "target"],
            registry=r,
        )
        self.health_probe_duration = Histogram(
            "gateway_health_probe_duration_seconds",
            "Active health probe round trips, failures and timeouts included.",
            ["upstream", "target"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, float("inf")),
            registry=r,
        )
        # Counted in plain Python like the families above: prometheus_client's
        # Gauge child is ~0.6 KiB with its lock, one per route.
        self.tunnels_active = FastGauge(
            "gateway_tunnels_active",
            "Open WebSocket tunnels (after 101 Switching Protocols), by route.",
            ["route"],
            r,
        )
        self.tunnel_bytes = FastCounter(
            "gateway_tunnel_bytes_total",
            "Bytes relayed through tunnels: up (client to target), down (target to client).",
            ["route", "direction"],
            r,
        )
        self.config_reloads = FastCounter(
            "gateway_config_reloads_total",
            "Config reloads by result (success|failure).",
            ["result"],
            r,
        )
        self.config_last_reload_success = Gauge(
            "gateway_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load (start-up included).",
            registry=r,
        )
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.cache_requests = FastCounter(
            "gateway_cache_requests_total",
            "Requests on caching routes, by what the cache did "
            "(hit|miss|stale|revalidated|bypass|collapsed).",
            ["route", "result"],
            r,
        )
        self.cache_gauges = _CacheGauges(r)

    def forget_route(self, route: str) -> None:
        """A reload removed the route: its series leave /metrics (no unbounded
        growth across reloads; a route added back starts from 0, a counter
        reset Prometheus' rate() handles)."""
        self.forget_routes({route})

    def forget_routes(self, routes: AbstractSet[str]) -> None:
        """`forget_route` for many: one pass over each family's series (a
        reload removing thousands of routes stays linear)."""
        for family in (
            self.requests,
            self.request_bytes,
            self.response_bytes,
            self.rate_limited,
            self.duration,
            self.auth_failures,
            self.cache_requests,
            self.tunnels_active,
        ):
            family.remove_where_in("route", routes)
        self.tunnel_bytes.remove_keys(
            (route, direction) for route in routes for direction in ("up", "down")
        )
        for route in routes:
            self.stats.forget(route)

    def forget_target(self, upstream: str, target: str) -> None:
        for outcome in ("ok", "error", "timeout"):
            with contextlib.suppress(KeyError):
                self.upstream_requests.remove(upstream, target, outcome)
        for state in BREAKER_STATES:
            with contextlib.suppress(KeyError):
                self.breaker_transitions.remove(upstream, target, state)
        for metric in (
            self.upstream_in_flight,
            self.breaker_state,
            self.target_healthy,
            self.health_probe_duration,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(upstream, target)


class RequestCounter:
    """`gateway_requests_total` for one route, its children cached.

    `labels()` builds a label tuple (with `str(status)`) per call; caching the
    child per (method, status) keeps that off the hot path. Methods come from
    clients, but llhttp admits only registered ones, so the cache stays small.
    Slotted, the cache made at the first request: one per route.
    """

    __slots__ = ("_children", "_requests", "_route")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._requests = metrics.requests
        self._route = route
        self._children: dict[tuple[str, int], CounterChild] | None = None

    def count(self, method: str, status: int) -> None:
        children = self._children
        if children is None:
            children = self._children = {}
        key = (method, status)
        counter = children.get(key)
        if counter is None:
            counter = self._requests.labels(self._route, method, str(status))
            children[key] = counter
        counter.value += 1  # CounterChild.inc() without its call: once per request
