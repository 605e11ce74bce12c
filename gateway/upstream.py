"""Targets and pools: the state that outlives one config snapshot.

A `Target` is keyed by (upstream name, URL as written) and carries its
breaker, health and in-flight count across reloads, behind one `available()`
predicate (as Caddy's reverse proxy keeps host state outside its config).
A `Pool` is one upstream of one snapshot: its balancer over those targets,
its retry budget, and the process's one upstream client (`h1client.
ConnectionPool`, keyed by scheme, host and port), which every snapshot shares.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Gauge
from yarl import URL

from gateway.balancers import Balancer, make_balancer
from gateway.breaker import CircuitBreaker
from gateway.config import BreakerConfig, UpstreamConfig
from gateway.h1client import ConnectionPool
from gateway.metrics import Metrics
from gateway.retry import RetryBudget

Clock = Callable[[], float]


class Target:
    """One target URL of one upstream; mutable state shared by every snapshot."""

    def __init__(
        self,
        upstream: str,
        url: str,
        weight: int,
        breaker_config: BreakerConfig,
        metrics: Metrics,
        clock: Clock = time.monotonic,
    ) -> None:
        parsed = URL(url)
        self.upstream = upstream
        self.url = url
        self.weight = weight
        self.in_flight = 0
        # Without active checks a target is always "healthy"; the breaker is
        # the passive check.
        self.healthy = True
        self.scheme = parsed.scheme
        self.host = parsed.raw_host or ""
        self.port = parsed.port
        self.base_path = parsed.raw_path.rstrip("/") if parsed.raw_path != "/" else ""
        host_sub = parsed.host_subcomponent or self.host
        default_port = 443 if self.scheme == "https" else 80
        # Where the upstream client connects, and its pool key.
        self.pool_key = (self.scheme, self.host, self.port or default_port)
        self.host_header = (
            host_sub if parsed.explicit_port in (None, default_port) else f"{host_sub}:{self.port}"
        )
        self._build_host = f"[{self.host}]" if ":" in self.host else self.host
        self.breaker_config = breaker_config
        # Read at scrape time: no gauge update per request.
        metrics.upstream_in_flight.labels(upstream, url).set_function(lambda: self.in_flight)
        self._breaker_gauge: Gauge = metrics.breaker_state.labels(upstream, url)
        self._healthy_gauge: Gauge = metrics.target_healthy.labels(upstream, url)
        self._healthy_gauge.set(1)
        self.probe_duration = metrics.health_probe_duration.labels(upstream, url)
        self.ok_counter = metrics.upstream_requests.labels(upstream, url, "ok")
        self.error_counter = metrics.upstream_requests.labels(upstream, url, "error")
        self.timeout_counter = metrics.upstream_requests.labels(upstream, url, "timeout")
        self._clock = clock
        self.breaker = self._new_breaker(breaker_config)

    def _new_breaker(self, config: BreakerConfig) -> CircuitBreaker:
        breaker = CircuitBreaker(
            config.failures, config.cooldown, self._clock, on_change=self._breaker_moved
        )
        self._breaker_gauge.set(breaker.numeric_state())
        return breaker

    def replace_breaker(self, config: BreakerConfig) -> None:
        """New breaker settings from a reload: a fresh, closed breaker.

        The target itself (in-flight count, health, gauges) stays. The old
        breaker stops reporting, so requests still running on it cannot
        overwrite the gauge of the new one.
        """
        self.breaker.on_change = None
        self.breaker_config = config
        self.breaker = self._new_breaker(config)

    def _breaker_moved(self, old: str, new: str) -> None:
        self._breaker_gauge.set(self.breaker.numeric_state())

    def set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        self._healthy_gauge.set(1 if healthy else 0)

    def available(self) -> bool:
        return self.healthy and self.breaker.available()

    def url_for(self, path_qs: str) -> URL:
        # encoded=True: the raw request target goes out byte-for-byte (no
        # re-quoting, no dot-segment removal). The query rides inside `path`
        # so that an empty query ("?") survives; yarl would drop it otherwise.
        return URL.build(
            scheme=self.scheme, host=self._build_host, port=self.port, path=path_qs, encoded=True
        )

    def __enter__(self) -> None:
        """`with target:` holds one request in flight (least-connections, the gauge)."""
        self.in_flight += 1

    def __exit__(self, *exc_info: object) -> None:
        self.in_flight -= 1


class Pool:
    """One upstream as one snapshot sees it."""

    def __init__(
        self,
        config: UpstreamConfig,
        targets: tuple[Target, ...],
        client: ConnectionPool,
        budget: RetryBudget,
    ) -> None:
        self.name = config.name
        self.config = config
        self.targets = targets
        self.client = client
        self.budget = budget
        self.balancer: Balancer[Target] = make_balancer(config.balancer)

    def pick(self, client: str, exclude: tuple[Target, ...] = ()) -> Target | None:
        candidates = [t for t in self.targets if t not in exclude and t.available()]
        if not candidates and exclude:
            # Every untried target is out: a retry may go back to one tried
            # before rather than fail outright.
            candidates = [t for t in self.targets if t.available()]
        return self.balancer.pick(candidates, client)

    def retry_after(self) -> float:
        """Seconds until the earliest breaker cooldown ends (at least 1)."""
        waits = [t.breaker.retry_after() for t in self.targets if t.healthy]
        positive = [w for w in waits if w > 0]
        return max(1.0, min(positive)) if positive else 1.0
