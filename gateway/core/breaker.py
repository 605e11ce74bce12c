"""Per-target circuit breaker: closed, open, half-open.

The rules, in the manner of h11's `_state.py` (every state change goes through
`_TRANSITIONS` below; nothing else assigns `_state`):

1. CLOSED admits every request. Each failure adds one to a count of
   consecutive failures and each success resets it to 0. The `failures`-th
   consecutive failure opens the breaker (TRIP) for the current cooldown
   (`cooldown` seconds, unless failed trials doubled it, see 3).
2. OPEN admits nothing until its cooldown is over. After that the first
   `acquire()` is granted as the one trial request (TRIAL) and the breaker
   becomes HALF_OPEN. `available()` only looks: it never grants.
   `acquire(early=True)` grants the trial before the cooldown is over: a
   pool in panic (see `in_panic`) asks that of an open target rather than
   answer 503 (Envoy's panic mode routes to every host; the one-trial rule
   below keeps that from hammering a dead or hung target).
   A passing active health check ends the cooldown at once (PROBE): the
   breaker becomes HALF_OPEN with no trial in flight, and the next request
   is the trial.
3. HALF_OPEN admits one trial at a time, so a target that is still down
   costs one request per cooldown, not a stampede (and a hung target holds
   at most one request). The trial's success closes the breaker with the
   count and the cooldown reset (SUCCESS); its failure opens it again
   (FAILURE) with the cooldown doubled, up to `max_cooldown`, from now (the
   exponential ejection of Envoy's outlier detection, `base_ejection_time`
   times the ejection count up to `max_ejection_time`); a trial that ends
   without a verdict, because the client went away (RELEASE), reopens it
   with its cooldown end unchanged (over already, unless the trial was an
   early one) so that the target is not judged on it.
4. Verdicts that arrive while OPEN are ignored: they come from requests
   admitted before the breaker tripped and say nothing newer than the trip.
   While HALF_OPEN the breaker cannot tell the trial from such a straggler,
   so the first verdict to arrive settles the trial either way: a success is
   a real answer from the target and a failure a real recent failure. The
   caller should call `release()` only for the trial (after `acquire()`
   returned True, the request is the trial exactly when `state` is
   "half_open"); `release()` in CLOSED or OPEN does nothing.

What is reported: `state` is the stored state, never derived from the clock.
An open breaker whose cooldown has passed still reports "open" (with
`retry_after() == 0`) until a trial is actually granted, and only then
"half_open". So /status, the `gateway_breaker_state` gauge and `on_change`
always agree, and reading the state never changes it.

Every True from `acquire()` must be followed by exactly one of
`record_success()`, `record_failure()` or (for the trial) `release()`, in a
`finally`, including on cancellation: a trial that never reports leaves the
breaker HALF_OPEN, admitting nothing, for good.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final, Literal

__all__ = ["BreakerState", "CircuitBreaker", "in_panic"]

BreakerState = Literal["closed", "open", "half_open"]
_Event = Literal["trip", "trial", "probe", "success", "failure", "release", "reset"]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

# (state, event) -> next state. A pair missing here is not a transition.
_TRANSITIONS: Final[dict[tuple[BreakerState, _Event], BreakerState]] = {
    (CLOSED, "trip"): OPEN,
    (OPEN, "trial"): HALF_OPEN,
    (OPEN, "probe"): HALF_OPEN,
    (HALF_OPEN, "success"): CLOSED,
    (HALF_OPEN, "failure"): OPEN,
    (HALF_OPEN, "release"): OPEN,
    # An operator's reset (admin POST /breakers/reset): closed at once.
    (OPEN, "reset"): CLOSED,
    (HALF_OPEN, "reset"): CLOSED,
}

# gateway_breaker_state: 0 closed, 1 open, 2 half-open (CONTRACT.md, Metrics).
_NUMERIC: Final[dict[BreakerState, int]] = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}

OnChange = Callable[[str, str, str], None]


def in_panic(available: int, total: int, threshold: float) -> bool:
    """Whether a pool with `available` of `total` targets usable panics.

    Envoy's `healthy_panic_threshold`: below that share of usable hosts,
    strict ejection would pile the whole load on the few left (or answer
    nothing at all), so the pool stops trusting its own view of the targets.
    `threshold` 0 never panics; an empty pool has nothing to panic about.
    """
    return total > 0 and available < threshold * total


class CircuitBreaker:
    """One target's breaker. Pure: time comes from `clock` (monotonic seconds).

    `on_change(old, new, reason)` is called after every state change, e.g. to
    log it, count it or set the gauge; it runs synchronously inside the call
    that caused it. `max_cooldown` defaults to `cooldown` (no doubling).
    """

    __slots__ = (
        "_clock",
        "_consecutive",
        "_cooldown_now",
        "_open_until",
        "_state",
        "_trial",
        "closed",
        "cooldown",
        "failures",
        "max_cooldown",
        "on_change",
    )

    def __init__(
        self,
        failures: int,
        cooldown: float,
        clock: Callable[[], float],
        on_change: OnChange | None = None,
        *,
        max_cooldown: float | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        if not (cooldown >= 0.0 and math.isfinite(cooldown)):  # also refuses NaN
            raise ValueError("cooldown must be a non-negative number of seconds")
        if max_cooldown is None:
            max_cooldown = cooldown
        if not (max_cooldown >= cooldown and math.isfinite(max_cooldown)):
            raise ValueError("max_cooldown must be a number of seconds >= cooldown")
        self.failures: Final = failures
        self.cooldown: Final = cooldown
        self.max_cooldown: Final = max_cooldown
        self.on_change = on_change
        self._clock = clock
        self._state: BreakerState = CLOSED
        # `_state == CLOSED`, kept beside it: the per-request pick reads it
        # as a plain attribute (a property or method call costs more than
        # the test itself).
        self.closed = True
        self._consecutive = 0
        # The cooldown the next opening lasts: `cooldown`, doubled per failed trial.
        self._cooldown_now = cooldown
        # Monotonic instant the cooldown ends; meaningful only while OPEN.
        self._open_until = 0.0
        # A trial request is in flight (only ever True while HALF_OPEN).
        self._trial = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def numeric_state(self) -> int:
        return _NUMERIC[self._state]

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    @property
    def current_cooldown(self) -> float:
        """Seconds the breaker stays open when it (re)opens next, or is open for."""
        return self._cooldown_now

    @property
    def trial_in_flight(self) -> bool:
        return self._trial

    def available(self) -> bool:
        """Would `acquire()` admit a request now? Changes nothing."""
        state = self._state
        if state == CLOSED:
            return True
        if state == OPEN:
            return self._clock() >= self._open_until
        return not self._trial

    def triable(self) -> bool:
        """Would `acquire(early=True)` admit a request now? Changes nothing."""
        return self._state == CLOSED or not self._trial

    def acquire(self, early: bool = False) -> bool:
        """Admit one request, granting the trial if the cooldown is over (or `early`)."""
        state = self._state
        if state == CLOSED:
            return True
        if self._trial:
            return False
        if state == OPEN:
            if not early and self._clock() < self._open_until:
                return False
            self._trial = True
            self._fire(
                "trial",
                "early trial: pool in panic" if early and self._cooling() else "cooldown over",
            )
            return True
        # HALF_OPEN after a passing health check: this request is the trial.
        self._trial = True
        return True

    def end_cooldown(self) -> None:
        """A passing active health check: the next request is the trial."""
        if self._state == OPEN:
            self._open_until = min(self._open_until, self._clock())
            self._fire("probe", "active health check passed")

    def record_success(self) -> None:
        state = self._state
        if state == CLOSED:
            self._consecutive = 0
        elif state == HALF_OPEN:
            self._trial = False
            self._cooldown_now = self.cooldown
            self._fire("success", "trial succeeded")
        # OPEN: a straggler from before the trip (rule 4).

    def record_failure(self) -> None:
        state = self._state
        if state == CLOSED:
            self._consecutive += 1
            if self._consecutive >= self.failures:
                self._open_until = self._clock() + self._cooldown_now
                self._fire(
                    "trip",
                    f"{self._consecutive} consecutive failures, cooldown {self._cooldown_now:g}s",
                )
        elif state == HALF_OPEN:
            self._trial = False
            self._cooldown_now = min(self._cooldown_now * 2.0, self.max_cooldown)
            self._open_until = self._clock() + self._cooldown_now
            self._fire("failure", f"trial failed, cooldown {self._cooldown_now:g}s")
        # OPEN: a straggler from before the trip (rule 4).

    def release(self) -> None:
        """The trial ended without a verdict (client gone): let the next one try."""
        if self._state == HALF_OPEN and self._trial:
            # The target has not been judged: the cooldown end stays where it
            # was (already passed, unless the trial was an early one).
            self._trial = False
            self._fire("release", "trial ended without a verdict")

    def reset(self, reason: str = "reset by an operator") -> bool:
        """Close now, with the cooldown back at its start; True if it was not
        closed. A trial still in flight then reports to a closed breaker: a
        success changes nothing, a failure counts as the first of a new run."""
        if self._state == CLOSED:
            return False
        self._trial = False
        self._cooldown_now = self.cooldown
        self._fire("reset", reason)
        return True

    def retry_after(self) -> float:
        """Seconds until the cooldown ends; 0 unless OPEN and still cooling down."""
        if self._state != OPEN:
            return 0.0
        left = self._open_until - self._clock()
        return left if left > 0.0 else 0.0

    def _cooling(self) -> bool:
        return self._clock() < self._open_until

    def _fire(self, event: _Event, reason: str) -> None:
        old = self._state
        new = _TRANSITIONS[(old, event)]
        # Counting restarts from zero whenever the breaker closes again.
        if new == CLOSED:
            self._consecutive = 0
        self._state = new
        self.closed = new == CLOSED
        if self.on_change is not None:
            self.on_change(old, new, reason)

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self._state} failures={self._consecutive}/{self.failures} "
            f"cooldown={self._cooldown_now:g}s>"
        )
