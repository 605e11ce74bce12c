"""Targets and pools: the state that outlives one config snapshot.

A `Target` is keyed by (upstream name, URL as written) and carries its
breaker, health and in-flight count across reloads, behind one `available()`
predicate (as Caddy's reverse proxy keeps host state outside its config).
A `Pool` is one upstream of one snapshot: its balancer over those targets,
its retry budget, its panic state, and the process's one upstream client
(`h1client.ConnectionPool`, keyed by scheme, host and port), which every
snapshot shares.

Never dark (CONTRACT.md): when fewer than `panic_threshold` of a pool's
targets are available (healthy and breaker admitting), the pool panics as
Envoy's does (`healthy_panic_threshold`, default 50%): health verdicts are
ignored and an open breaker grants an early trial, one request at a time per
target. A pool whose targets all restarted within one cooldown then serves
from whichever is back on the next request, instead of answering 503 until
a cooldown or a health interval runs out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import Gauge
from yarl import URL

from gateway.core.balancers import Balancer, make_balancer
from gateway.core.breaker import CircuitBreaker, in_panic
from gateway.core.config import BreakerConfig, UpstreamConfig
from gateway.core.retry import RetryBudget
from gateway.state.metrics import BREAKER_STATES, CounterChild, Metrics
from gateway.wire.h1client import ConnectionPool
from gateway.wire.tls import ClientTLS

log = logging.getLogger("gateway.upstream")

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
        self._transitions: dict[str, CounterChild] = {
            state: metrics.breaker_transitions.labels(upstream, url, state)
            for state in BREAKER_STATES
        }
        self._clock = clock
        self.breaker = self._new_breaker(breaker_config)

    def _new_breaker(self, config: BreakerConfig) -> CircuitBreaker:
        breaker = CircuitBreaker(
            config.failures,
            config.cooldown,
            self._clock,
            on_change=self._breaker_moved,
            max_cooldown=config.max_cooldown,
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

    def _breaker_moved(self, old: str, new: str, reason: str) -> None:
        self._breaker_gauge.set(self.breaker.numeric_state())
        self._transitions[new].inc()
        # An opening is what an operator must see; the way back is routine.
        log.log(
            logging.WARNING if new == "open" else logging.INFO,
            "upstream %s target %s breaker %s -> %s: %s",
            self.upstream,
            self.url,
            old,
            new,
            reason,
        )

    def set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        self._healthy_gauge.set(1 if healthy else 0)

    def available(self) -> bool:
        return self.healthy and self.breaker.available()

    def pass_probe(self) -> None:
        """An active health check passed: an open breaker's cooldown ends now."""
        self.breaker.end_cooldown()

    def url_for(self, path_qs: str) -> URL:
        # encoded=True: the raw request target goes out byte-for-byte (no
        # re-quoting, no dot-segment removal). The query rides inside `path`
        # so that an empty query ("?") survives; yarl would drop it otherwise.
        return URL.build(
            scheme=self.scheme, host=self._build_host, port=self.port, path=path_qs, encoded=True
        )


class PanicState:
    """Whether an upstream is in panic; outlives snapshots like the targets.

    Entering and leaving are logged once each and entering is counted
    (`gateway_upstream_panic_total`), not every request made in panic.
    """

    def __init__(self, upstream: str, metrics: Metrics) -> None:
        self.upstream = upstream
        self.active = False
        self._counter = metrics.upstream_panic.labels(upstream)

    def update(self, panicking: bool, available: int, total: int, threshold: float) -> None:
        if panicking == self.active:
            return
        self.active = panicking
        if panicking:
            self._counter.inc()
            log.warning(
                "upstream %s target * panic: %d of %d targets available, below "
                "panic_threshold %g; health verdicts ignored, open breakers get early trials",
                self.upstream,
                available,
                total,
                threshold,
            )
        else:
            log.info(
                "upstream %s target * panic over: %d of %d targets available",
                self.upstream,
                available,
                total,
            )


class Pool:
    """One upstream as one snapshot sees it."""

    def __init__(
        self,
        config: UpstreamConfig,
        targets: tuple[Target, ...],
        client: ConnectionPool,
        budget: RetryBudget,
        panic: PanicState,
        tls: ClientTLS | None = None,
    ) -> None:
        self.name = config.name
        #: [upstreams.NAME.tls] made into a context (None: the client's default).
        self.tls = tls
        self.config = config
        self.targets = targets
        self.client = client
        self.budget = budget
        self.panic = panic
        self.balancer: Balancer[Target] = make_balancer(config.balancer)

    def pick(self, client: str, exclude: tuple[Target, ...] = ()) -> tuple[Target, bool] | None:
        """The next target for this request, and whether it may take an early trial.

        Pass the result's flag to `breaker.acquire(early=...)`, with no await
        in between: then the acquire is granted. None: nothing can be tried.
        """
        targets = self.targets
        if not exclude and not self.panic.active:
            # The usual first attempt: every target healthy with its breaker
            # closed, so all of them are candidates and none panics. Tested
            # inline: this runs per request, and the general path below
            # makes two lists and five calls for the same answer.
            for target in targets:
                if not (target.healthy and target.breaker.closed):
                    break
            else:
                chosen = self.balancer.pick(targets, client)
                return None if chosen is None else (chosen, False)
        ready = [t for t in targets if t.available()]
        threshold = self.config.panic_threshold
        panicking = in_panic(len(ready), len(targets), threshold)
        self.panic.update(panicking, len(ready), len(targets), threshold)
        if not panicking:
            candidates = [t for t in ready if t not in exclude]
            early = False
            if not candidates and exclude:
                # Every untried target is out. A retry goes to an untried one
                # whose breaker is open, as its early trial (one at a time),
                # before going back to the one that just failed: in a rolling
                # restart that is the target already back up.
                candidates = [
                    t for t in targets if t not in exclude and t.healthy and t.breaker.triable()
                ]
                early = bool(candidates)
                if not candidates:
                    candidates = ready
            chosen = self.balancer.pick(candidates, client)
            return None if chosen is None else (chosen, early)
        # Panic: every target whose breaker has no trial in flight, healthy or
        # not, balanced as if all were (Envoy). A retry takes an untried
        # ready target first: the one attempt left should go where an answer
        # is likeliest.
        candidates = [t for t in ready if t not in exclude] if exclude else []
        if not candidates:
            candidates = [t for t in targets if t not in exclude and t.breaker.triable()]
        if not candidates and exclude:
            candidates = [t for t in targets if t.breaker.triable()]
        chosen = self.balancer.pick(candidates, client)
        return None if chosen is None else (chosen, True)

    def retry_after(self) -> float:
        """Seconds until the earliest breaker cooldown ends (at least 1)."""
        waits = [t.breaker.retry_after() for t in self.targets if t.healthy]
        positive = [w for w in waits if w > 0]
        return max(1.0, min(positive)) if positive else 1.0
