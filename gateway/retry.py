"""Retries: when one is safe, how long to wait, and how many the gateway affords.

- `may_retry` is the CONTRACT's rule: only what cannot have had an effect on a
  target, or what may be repeated without changing its effect, is tried again.
- `backoff` is "full jitter" (AWS Architecture Blog, "Exponential Backoff And
  Jitter", 2015): uniform in [0, min(cap, base * 2**attempt)), so clients that
  failed together do not retry together.
- `RetryBudget` bounds retries to a fraction of first attempts, like Finagle's
  `RetryBudget` and Envoy's `retry_budget`: when a whole upstream is failing,
  per-request retry counts alone would multiply its load by `retries + 1`
  exactly when it can least take it.
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


def may_retry(method: str, *, connect_failed: bool, status: int | None, body_started: bool) -> bool:
    """Whether the attempt that just failed may be made again (CONTRACT.md, Retries).

    - `connect_failed`: no connection to the target, so no byte of the request
      reached it, and any method may go again.
    - `status`: a 502/503/504 from the target itself (None when it never
      answered). Only an idempotent method may go again: the target may have
      acted on the request before answering (RFC 9110 section 9.2.2).
    - `body_started`: some of the request body has been read from the client
      and sent up (a request without a body has not started one). Those bytes
      were streamed, not kept, so the request cannot be sent again whole;
      this refuses the retry even after a connect failure.

    The gateway's own timeouts are not a `status` here: a read timeout means
    the target may still be working on the request.
    """
    if body_started:
        return False
    if connect_failed:
        return True
    return status in RETRYABLE_STATUSES and method in IDEMPOTENT_METHODS


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
    """At most `min_retries_per_window + ratio * first attempts` retries per window.

    Call `record_attempt()` for every first attempt and `try_spend()` before
    every retry; `try_spend()` counts the retry when it allows it. The
    `min_retries_per_window` floor lets a quiet upstream still retry its rare
    failure (a ratio of few requests is zero).

    The window slides in ten slots of `window / 10` seconds, each a pair of
    counters, plus running totals: O(1) memory and work per call however
    busy the upstream is. A slot leaves the totals as a whole, so the window
    actually covered is between 0.9 and 1.0 times `window`.
    """

    SLOTS: Final = 10

    __slots__ = (
        "_attempts",
        "_clock",
        "_head",
        "_retries",
        "_slot_width",
        "_total_attempts",
        "_total_retries",
        "min_retries_per_window",
        "ratio",
        "window",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        min_retries_per_window: int = 3,
        window: float = 10.0,
        *,
        clock: Callable[[], float],
    ) -> None:
        if not ratio >= 0.0:
            raise ValueError("ratio must be >= 0")
        if min_retries_per_window < 0:
            raise ValueError("min_retries_per_window must be >= 0")
        if not (window > 0.0 and math.isfinite(window)):
            raise ValueError("window must be a positive number of seconds")
        self.ratio: Final = ratio
        self.min_retries_per_window: Final = min_retries_per_window
        self.window: Final = window
        self._clock = clock
        self._slot_width = window / self.SLOTS
        self._attempts = [0] * self.SLOTS
        self._retries = [0] * self.SLOTS
        self._total_attempts = 0
        self._total_retries = 0
        # Index (time // slot width) of the newest slot; older ones hold the
        # slot indices head-9 .. head-1, modulo SLOTS.
        self._head = math.floor(clock() / self._slot_width)

    def record_attempt(self) -> None:
        slot = self._advance()
        self._attempts[slot] += 1
        self._total_attempts += 1

    def try_spend(self) -> bool:
        """Count one retry and return True if the budget has room for it."""
        slot = self._advance()
        allowed = self.min_retries_per_window + self.ratio * self._total_attempts
        if self._total_retries + 1 > allowed:
            return False
        self._retries[slot] += 1
        self._total_retries += 1
        return True

    def attempts(self) -> int:
        """First attempts in the current window."""
        self._advance()
        return self._total_attempts

    def retries(self) -> int:
        """Retries spent in the current window."""
        self._advance()
        return self._total_retries

    def _advance(self) -> int:
        """Drop slots that slid out of the window; return the current slot."""
        index = math.floor(self._clock() / self._slot_width)
        head = self._head
        if index > head:
            attempts = self._attempts
            retries = self._retries
            # At most SLOTS slots to clear, however long the budget sat idle.
            for old in range(head + 1, min(index, head + self.SLOTS) + 1):
                slot = old % self.SLOTS
                self._total_attempts -= attempts[slot]
                self._total_retries -= retries[slot]
                attempts[slot] = 0
                retries[slot] = 0
            self._head = head = index
        # A clock that stepped back (it should not: monotonic) counts into the
        # newest slot rather than into one already reused.
        return head % self.SLOTS
