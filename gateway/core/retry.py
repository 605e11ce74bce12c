"""Retries: when one is safe, how long to wait, and how many the gateway affords.

- `may_retry` is the CONTRACT's rule: only what cannot have had an effect on a
  target, or what may be repeated without changing its effect, is tried again.
- `backoff` is "full jitter" (AWS Architecture Blog, "Exponential Backoff And
  Jitter", 2015): uniform in [0, min(cap, base * 2**attempt)), so clients that
  failed together do not retry together.
- `RetryBudget` bounds retries to about a fifth of the traffic, with floors
  (Envoy's concurrent `retry_budget` or Finagle's windowed `RetryBudget`,
  whichever has room): when a whole upstream is failing, per-request retry
  counts alone would multiply its load by `retries + 1` exactly when it can
  least take it.
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
    """A retry may start when the concurrency rule OR the rate rule has room.

    - Concurrency (Envoy's `retry_budget`, `budget_percent` 20 %,
      `min_retry_concurrency` 3; envoy/config/cluster/v3/circuit_breaker.proto):
      fewer than `max(min_concurrency, ratio * active)` retries in flight,
      `active` being the upstream's requests in flight. A client alone,
      sending one request at a time, has at most one retry running, always
      within the floor, however fast it goes and however many of its
      requests meet a failing target.
    - Rate (Finagle's `RetryBudget(ttl = 10.s, minRetriesPerSec = 10,
      percentCanRetry = 0.2)`, its default): at most
      `min_per_sec * window + ratio * first attempts` retries in the last
      `window` seconds. A burst of requests that fail together (a frozen
      target: every request parked on it times out within milliseconds)
      retries all at once on what the window has earned, where the
      concurrency rule alone let only 3 of 16 retry.

    Each rule alone failed one of those two cases (a window with a floor of
    3 retries per 10 s failed the lone client; the concurrency rule alone
    the burst). Under a storm (every target failing, many requests) both are
    exceeded, so retries stay about a fifth of the traffic: the larger of
    `ratio` of first attempts plus the floor per window (the rate rule) and
    `ratio` of the requests in flight (the concurrency rule), instead of the
    `retries + 1` times its load a failing upstream would get without one.

    `enter()` counts a request (its first attempt) and must be followed by
    one `leave()`; every True from `try_spend()` counts a retry in flight
    until one `give_back()` once that retry has its verdict, each in a
    `finally` (a lost `leave()` would widen the concurrency rule for good, a
    lost `give_back()` narrow it). The window slides in `SLOTS` slots: O(1)
    memory and work per call however busy the upstream is; a slot leaves as
    a whole, so the window covered is between 0.9 and 1.0 times `window`.
    """

    SLOTS: Final = 10

    __slots__ = (
        "_active",
        "_clock",
        "_firsts",
        "_head",
        "_retries",
        "_retrying",
        "_slot_width",
        "_total_firsts",
        "_total_retries",
        "min_concurrency",
        "min_per_sec",
        "ratio",
        "window",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        min_concurrency: int = 3,
        min_per_sec: float = 10.0,
        window: float = 10.0,
        *,
        clock: Callable[[], float],
    ) -> None:
        if not (ratio >= 0.0 and math.isfinite(ratio)):
            raise ValueError("ratio must be a finite number >= 0")
        if min_concurrency < 0:
            raise ValueError("min_concurrency must be >= 0")
        if not (min_per_sec >= 0.0 and math.isfinite(min_per_sec)):
            raise ValueError("min_per_sec must be a finite number >= 0")
        if not (window > 0.0 and math.isfinite(window)):
            raise ValueError("window must be a positive number of seconds")
        self.ratio: Final = ratio
        self.min_concurrency: Final = min_concurrency
        self.min_per_sec: Final = min_per_sec
        self.window: Final = window
        self._clock = clock
        self._active = 0
        self._retrying = 0
        self._slot_width = window / self.SLOTS
        self._firsts = [0] * self.SLOTS
        self._retries = [0] * self.SLOTS
        self._total_firsts = 0
        self._total_retries = 0
        # Index (time // slot width) of the newest slot; the older ones hold
        # slot indices head-9 .. head-1, modulo SLOTS.
        self._head = math.floor(clock() / self._slot_width)

    @property
    def active(self) -> int:
        """Requests of the upstream in flight."""
        return self._active

    @property
    def retrying(self) -> int:
        """Retries in flight."""
        return self._retrying

    def firsts(self) -> int:
        """First attempts in the current window."""
        self._advance()
        return self._total_firsts

    def retries(self) -> int:
        """Retries started in the current window."""
        self._advance()
        return self._total_retries

    def enter(self) -> None:
        """A request starts: one more in flight, one more first attempt."""
        self._active += 1
        self._firsts[self._advance()] += 1
        self._total_firsts += 1

    def leave(self) -> None:
        self._active -= 1

    def try_spend(self) -> bool:
        """Start one retry and return True if either rule has room for it."""
        slot = self._advance()
        concurrent = self._retrying + 1 <= max(
            float(self.min_concurrency), self.ratio * self._active
        )
        if not concurrent:
            floor = self.min_per_sec * self.window
            if self._total_retries + 1 > floor + self.ratio * self._total_firsts:
                return False
        # Both rules count every retry, whichever rule let it in.
        self._retrying += 1
        self._retries[slot] += 1
        self._total_retries += 1
        return True

    def give_back(self) -> None:
        """A retry got its verdict (or was abandoned): no longer in flight.

        It stays counted in the window it started in.
        """
        self._retrying -= 1

    def _advance(self) -> int:
        """Drop the slots that slid out of the window; return the current one."""
        index = math.floor(self._clock() / self._slot_width)
        head = self._head
        if index > head:
            # At most SLOTS slots to clear, however long the budget sat idle.
            for old in range(head + 1, min(index, head + self.SLOTS) + 1):
                slot = old % self.SLOTS
                self._total_firsts -= self._firsts[slot]
                self._total_retries -= self._retries[slot]
                self._firsts[slot] = 0
                self._retries[slot] = 0
            self._head = head = index
        # A clock that stepped back (it should not: monotonic) counts into
        # the newest slot rather than into one already reused.
        return head % self.SLOTS
