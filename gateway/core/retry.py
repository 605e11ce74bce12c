"""Retries: when one is safe, how long to wait, and how many the gateway affords.

- `may_retry` is the CONTRACT's rule: only what cannot have had an effect on a
  target, or what may be repeated without changing its effect, is tried again.
- `backoff` is "full jitter" (AWS Architecture Blog, "Exponential Backoff And
  Jitter", 2015): uniform in [0, min(cap, base * 2**attempt)), so clients that
  failed together do not retry together.
- `RetryBudget` bounds the retries in flight to a fraction of the requests in
  flight, with a floor, as Envoy's `retry_budget` does: when a whole upstream
  is failing, per-request retry counts alone would multiply its load by
  `retries + 1` exactly when it can least take it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Final

__all__ = ["IDEMPOTENT_METHODS", "RETRYABLE_STATUSES", "RetryBudget", "backoff", "may_retry"]

# RFC 9110 section 9.2.2. Method names are case-sensitive (section 9.1), so
# "get" is not GET and is not retried.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# The target (or something in front of it) said it could not serve the request
# now; any other status is the target's answer and goes to the client as is.
RETRYABLE_STATUSES: Final = frozenset({502, 503, 504})


def may_retry(
    method: str,
    *,
    connect_failed: bool,
    status: int | None,
    body_started: bool,
    no_answer: bool = False,
) -> bool:
    """Whether the attempt that just failed may be made again (CONTRACT.md, Retries).

    - `connect_failed`: no connection to the target, so no byte of the request
      reached it, and any method may go again.
    - `no_answer`: the connection was reset or closed, or `read_timeout`
      passed, before the first response byte. The target may have acted on
      the request, so only an idempotent method may go again (RFC 9110
      section 9.2.2: a client may retry it when "the communication failed
      before receiving a response"; nginx's `proxy_next_upstream error
      timeout` does the same for them by default).
    - `status`: a 502/503/504 from the target itself (None when it never
      answered). Only an idempotent method may go again: the target may have
      acted on the request before answering (RFC 9110 section 9.2.2).
    - `body_started`: some of the request body has been read from the client
      and sent up (a request without a body has not started one). Those bytes
      were streamed, not kept, so the request cannot be sent again whole;
      this refuses the retry even after a connect failure.

    The gateway's own timeouts are not a `status` here but `no_answer`.
    """
    if body_started:
        return False
    if connect_failed:
        return True
    return (no_answer or status in RETRYABLE_STATUSES) and method in IDEMPOTENT_METHODS


# Past this the delay is `cap` for any sane base; clamping the exponent keeps
# ldexp from overflowing on a runaway attempt number.
_MAX_EXPONENT: Final = 512


def backoff(
    attempt: int,
    base: float = 0.025,
    cap: float = 1.0,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry).

    Full jitter: uniform in [0, min(cap, base * 2**attempt)). `rng` returns a
    float in [0, 1), like `random.random`; tests pass their own.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling = min(cap, math.ldexp(base, min(attempt, _MAX_EXPONENT)))
    return rng() * ceiling if ceiling > 0.0 else 0.0


class RetryBudget:
    """Envoy's retry budget: a bound on retries *in flight*, not per window.

    A retry may start while fewer than `max(min_concurrency, ratio * active)`
    retries are running, `active` being the upstream's requests in flight
    (Envoy's `retry_budget`: `budget_percent` 20%, `min_retry_concurrency` 3;
    envoy/api/envoy/config/cluster/v3/circuit_breaker.proto). Under load,
    retries stay a fifth of the traffic however many targets fail, so a
    failing upstream is not sent `retries + 1` times its load (a retry
    storm). A client alone, sending one request at a time, has at most one
    retry running, always within the floor, so it is never refused a retry
    while a healthy target is there: a floor counted per time window (3 per
    10 s before) ran out after a few failures of a dead target and failed
    requests a healthy target could have served.

    Every `enter()` must be followed by one `leave()`, and every True from
    `try_spend()` by one `give_back()` once that retry has its verdict, each
    in a `finally` (a lost `leave()` would widen the budget for good, a lost
    `give_back()` narrow it).
    """

    __slots__ = ("_active", "_retrying", "min_concurrency", "ratio")

    def __init__(self, ratio: float = 0.2, min_concurrency: int = 3) -> None:
        if not (ratio >= 0.0 and math.isfinite(ratio)):
            raise ValueError("ratio must be a finite number >= 0")
        if min_concurrency < 0:
            raise ValueError("min_concurrency must be >= 0")
        self.ratio: Final = ratio
        self.min_concurrency: Final = min_concurrency
        self._active = 0
        self._retrying = 0

    @property
    def active(self) -> int:
        """Requests of the upstream in flight."""
        return self._active

    @property
    def retrying(self) -> int:
        """Retries in flight."""
        return self._retrying

    def enter(self) -> None:
        self._active += 1

    def leave(self) -> None:
        self._active -= 1

    def try_spend(self) -> bool:
        """Start one retry and return True if the budget has room for it."""
        allowed = max(float(self.min_concurrency), self.ratio * self._active)
        if self._retrying + 1 > allowed:
            return False
        self._retrying += 1
        return True

    def give_back(self) -> None:
        """A retry got its verdict (or was abandoned): it no longer counts."""
        self._retrying -= 1
