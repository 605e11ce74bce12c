"""Per-target circuit breaker: closed, open, half-open.

The rules, in the manner of h11's `_state.py` (every state change goes through
`_TRANSITIONS` below; nothing else assigns `_state`):

1. CLOSED admits every request. Each failure adds one to a count of
   consecutive failures and each success resets it to 0. The `failures`-th
   consecutive failure opens the breaker (TRIP) for `cooldown` seconds.
2. OPEN admits nothing until `cooldown` seconds after it opened. After that
   the first `acquire()` is granted as the one trial request (TRIAL) and the
   breaker becomes HALF_OPEN. `available()` only looks: it never grants.
3. HALF_OPEN admits nothing else while the trial is in flight, so a target
   that is still down costs one request per cooldown, not a stampede.
   The trial's success closes the breaker with the count reset (SUCCESS); its
   failure opens it again with a new cooldown from now (FAILURE); a trial that
   ends without a verdict, because the client went away (RELEASE), reopens it
   with the cooldown already over so that the next request is the trial.
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

from collections.abc import Callable
from typing import Final, Literal

__all__ = ["BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]
_Event = Literal["trip", "trial", "success", "failure", "release"]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

# (state, event) -> next state. A pair missing here is not a transition.
_TRANSITIONS: Final[dict[tuple[BreakerState, _Event], BreakerState]] = {
    (CLOSED, "trip"): OPEN,
    (OPEN, "trial"): HALF_OPEN,
    (HALF_OPEN, "success"): CLOSED,
    (HALF_OPEN, "failure"): OPEN,
    (HALF_OPEN, "release"): OPEN,
}

# gateway_breaker_state: 0 closed, 1 open, 2 half-open (CONTRACT.md, Metrics).
_NUMERIC: Final[dict[BreakerState, int]] = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


class CircuitBreaker:
    """One target's breaker. Pure: time comes from `clock` (monotonic seconds).

    `on_change(old, new)` is called after every state change, e.g. to log it
    or set the gauge; it runs synchronously inside the call that caused it.
    """

    __slots__ = (
        "_clock",
        "_consecutive",
        "_open_until",
        "_state",
        "cooldown",
        "failures",
        "on_change",
    )

    def __init__(
        self,
        failures: int,
        cooldown: float,
        clock: Callable[[], float],
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        if not cooldown >= 0.0:  # also refuses NaN
            raise ValueError("cooldown must be a non-negative number of seconds")
        self.failures: Final = failures
        self.cooldown: Final = cooldown
        self.on_change = on_change
        self._clock = clock
        self._state: BreakerState = CLOSED
        self._consecutive = 0
        # Monotonic instant the cooldown ends; meaningful only while OPEN.
        self._open_until = 0.0

    @property
    def state(self) -> BreakerState:
        return self._state

    def numeric_state(self) -> int:
        return _NUMERIC[self._state]

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def available(self) -> bool:
        """Would `acquire()` admit a request now? Changes nothing."""
        state = self._state
        if state == CLOSED:
            return True
        if state == OPEN:
            return self._clock() >= self._open_until
        return False  # HALF_OPEN: the trial is in flight

    def acquire(self) -> bool:
        """Admit one request, granting the trial if the cooldown is over."""
        state = self._state
        if state == CLOSED:
            return True
        if state == OPEN and self._clock() >= self._open_until:
            self._fire("trial")
            return True
        return False

    def record_success(self) -> None:
        state = self._state
        if state == CLOSED:
            self._consecutive = 0
        elif state == HALF_OPEN:
            self._fire("success")
        # OPEN: a straggler from before the trip (rule 4).

    def record_failure(self) -> None:
        state = self._state
        if state == CLOSED:
            self._consecutive += 1
            if self._consecutive >= self.failures:
                self._open_until = self._clock() + self.cooldown
                self._fire("trip")
        elif state == HALF_OPEN:
            self._open_until = self._clock() + self.cooldown
            self._fire("failure")
        # OPEN: a straggler from before the trip (rule 4).

    def release(self) -> None:
        """The trial ended without a verdict (client gone): let the next one try."""
        if self._state == HALF_OPEN:
            # The cooldown already ran out once; the target has not been
            # judged since, so there is no reason to wait again.
            self._open_until = self._clock()
            self._fire("release")

    def retry_after(self) -> float:
        """Seconds until the cooldown ends; 0 unless OPEN and still cooling down."""
        if self._state != OPEN:
            return 0.0
        left = self._open_until - self._clock()
        return left if left > 0.0 else 0.0

    def _fire(self, event: _Event) -> None:
        old = self._state
        new = _TRANSITIONS[(old, event)]
        # Counting restarts from zero whenever the breaker closes again.
        if new == CLOSED:
            self._consecutive = 0
        self._state = new
        if self.on_change is not None:
            self.on_change(old, new)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self._state} failures={self._consecutive}/{self.failures}>"
