from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway.core.breaker import CircuitBreaker, in_panic


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    failures: int = 3, cooldown: float = 10.0
) -> tuple[CircuitBreaker, Clock, list[tuple[str, str]]]:
    clock = Clock()
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        failures, cooldown, clock, lambda old, new, _why: changes.append((old, new))
    )
    return breaker, clock, changes


def state_of(breaker: CircuitBreaker) -> str:
    # Through a function so mypy does not narrow the property between calls.
    return breaker.state


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failures):
        assert breaker.acquire()
        breaker.record_failure()
    assert state_of(breaker) == "open"


# --- closed ------------------------------------------------------------------


def test_closed_admits_everything_and_reads_no_clock() -> None:
    def no_clock() -> float:
        raise AssertionError("the closed fast path must not read the clock")

    breaker = CircuitBreaker(3, 10.0, no_clock)
    assert state_of(breaker) == "closed"
    assert breaker.numeric_state() == 0
    for _ in range(100):
        assert breaker.available()
        assert breaker.acquire()
        breaker.record_success()
    assert breaker.retry_after() == 0.0


def test_closed_opens_at_the_nth_consecutive_failure() -> None:
    breaker, _, changes = make(failures=3)
    breaker.record_failure()
    breaker.record_failure()
    assert state_of(breaker) == "closed"
    assert breaker.consecutive_failures == 2
    breaker.record_failure()
    assert state_of(breaker) == "open"
    assert breaker.numeric_state() == 1
    assert changes == [("closed", "open")]
    assert breaker.retry_after() == 10.0


def test_closed_success_resets_the_failure_count() -> None:
    breaker, _, changes = make(failures=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert state_of(breaker) == "closed"
    assert changes == []


def test_one_failure_is_enough_when_failures_is_one() -> None:
    breaker, _, _ = make(failures=1)
    breaker.record_failure()
    assert state_of(breaker) == "open"


# --- open --------------------------------------------------------------------


def test_open_refuses_until_the_cooldown_is_over() -> None:
    breaker, clock, _ = make(cooldown=10.0)
    trip(breaker)
    clock.now += 9.5
    assert not breaker.available()
    assert not breaker.acquire()
    assert breaker.retry_after() == pytest.approx(0.5)
    assert state_of(breaker) == "open"


def test_open_after_cooldown_is_available_but_still_reports_open() -> None:
    breaker, clock, changes = make(cooldown=10.0)
    trip(breaker)
    clock.now += 10.0
    # available() only looks: asking twice grants nothing and changes nothing.
    assert breaker.available()
    assert breaker.available()
    assert state_of(breaker) == "open"
    assert breaker.retry_after() == 0.0
    assert changes == [("closed", "open")]


def test_open_ignores_verdicts_of_requests_admitted_before_the_trip() -> None:
    breaker, _, changes = make()
    trip(breaker)
    breaker.record_success()
    breaker.record_failure()
    breaker.release()
    assert state_of(breaker) == "open"
    assert breaker.retry_after() == 10.0  # the failure did not restart the cooldown
    assert changes == [("closed", "open")]


# --- half open ---------------------------------------------------------------


def test_cooldown_grants_exactly_one_trial() -> None:
    breaker, clock, changes = make()
    trip(breaker)
    clock.now += 10.0
    assert breaker.acquire()
    assert state_of(breaker) == "half_open"
    assert breaker.numeric_state() == 2
    assert breaker.retry_after() == 0.0
    assert not breaker.available()
    assert not breaker.acquire()
    clock.now += 1000.0
    assert not breaker.acquire()  # however long the trial takes
    assert changes == [("closed", "open"), ("open", "half_open")]


def test_trial_success_closes_with_the_count_reset() -> None:
    breaker, clock, changes = make(failures=3)
    trip(breaker)
    clock.now += 10.0
    assert breaker.acquire()
    breaker.record_success()
    assert state_of(breaker) == "closed"
    assert breaker.consecutive_failures == 0
    assert changes[-1] == ("half_open", "closed")
    breaker.record_failure()
    breaker.record_failure()
    assert state_of(breaker) == "closed"  # a fresh count: two is not three


def test_trial_failure_reopens_with_a_new_cooldown_from_now() -> None:
    breaker, clock, changes = make(cooldown=10.0)
    trip(breaker)
    clock.now += 10.0
    assert breaker.acquire()
    clock.now += 4.0  # the trial took a while
    breaker.record_failure()
    assert state_of(breaker) == "open"
    assert breaker.retry_after() == 10.0
    assert changes[-1] == ("half_open", "open")
    clock.now += 9.999
    assert not breaker.acquire()
    clock.now += 0.001
    assert breaker.acquire()


def test_trial_release_lets_the_next_request_trial_at_once() -> None:
    breaker, clock, changes = make()
    trip(breaker)
    clock.now += 10.0
    assert breaker.acquire()
    clock.now += 3.0
    breaker.release()
    assert state_of(breaker) == "open"
    assert breaker.retry_after() == 0.0
    assert breaker.available()
    assert breaker.acquire()
    assert state_of(breaker) == "half_open"
    assert changes[1:] == [("open", "half_open"), ("half_open", "open"), ("open", "half_open")]


def test_release_when_closed_does_nothing() -> None:
    breaker, _, changes = make(failures=2)
    breaker.record_failure()
    breaker.release()
    assert state_of(breaker) == "closed"
    assert breaker.consecutive_failures == 1
    assert changes == []


def test_zero_cooldown_trials_immediately() -> None:
    breaker, _, _ = make(failures=1, cooldown=0.0)
    breaker.record_failure()
    assert state_of(breaker) == "open"
    assert breaker.available()
    assert breaker.acquire()
    assert state_of(breaker) == "half_open"


def test_works_without_on_change() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.acquire()
    breaker.record_success()
    assert state_of(breaker) == "closed"
    assert "closed" in repr(breaker)


@pytest.mark.parametrize(
    ("failures", "cooldown"), [(0, 1.0), (-1, 1.0), (1, -0.5), (1, float("nan"))]
)
def test_bad_settings_are_refused(failures: int, cooldown: float) -> None:
    with pytest.raises(ValueError, match=r"failures|cooldown"):
        CircuitBreaker(failures, cooldown, Clock())


# --- model-based -------------------------------------------------------------


class BreakerMachine(RuleBasedStateMachine):
    """Callers hitting one breaker, against a model of the documented rules.

    Each admitted request later reports exactly one verdict; a trial whose
    client goes away calls release() (and only a trial: see breaker.py rule 4).
    Requests admitted while closed may report long after the breaker tripped.
    A pool in panic asks for early trials; active health checks end cooldowns.
    """

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock(0.0)
        self.changes: list[tuple[str, str]] = []
        self.next_id = 0
        # The model.
        self.state = "closed"
        self.consecutive = 0
        self.open_until = 0.0
        self.trial = False
        self.changes_expected: list[tuple[str, str]] = []

    @initialize(
        failures=st.integers(1, 4),
        cooldown=st.sampled_from([0.0, 1.0, 5.0, 30.0]),
        growth=st.sampled_from([1.0, 2.0, 3.0, 12.0]),
    )
    def setup(self, failures: int, cooldown: float, growth: float) -> None:
        self.failures = failures
        self.cooldown = self.cooldown_now = cooldown
        self.max_cooldown = cooldown * growth
        self.breaker = CircuitBreaker(
            failures,
            cooldown,
            self.clock,
            lambda old, new, _why: self.changes.append((old, new)),
            max_cooldown=self.max_cooldown,
        )

    def _move(self, new: str) -> None:
        self.changes_expected.append((self.state, new))
        self.state = new

    @rule(dt=st.floats(0.0, 40.0, allow_nan=False))
    def time_passes(self, dt: float) -> None:
        self.clock.now += dt

    @precondition(lambda self: self.state == "open")
    @rule(early=st.sampled_from([0.0, 0.0, 1e-9, 0.001, 0.5]))
    def time_nears_cooldown_end(self, early: float) -> None:
        # The edge is where an off-by-a-bit admission would hide.
        self.clock.now = max(self.clock.now, self.open_until - early)

    @rule(target=requests, early=st.sampled_from([False, False, True]))
    def acquire(self, early: bool) -> tuple[int, bool] | None:
        now = self.clock.now
        available = self.breaker.available()
        triable = self.breaker.triable()
        assert self.breaker.state == self.state  # available() changed nothing
        admitted = self.breaker.acquire(early)
        assert (triable if early else available) == admitted
        if self.state == "closed":
            assert admitted
            return self._admit(trial=False)
        if self.trial:
            assert not admitted, "a second trial beside the one in flight"
            return None
        if self.state == "open" and now < self.open_until and not early:
            assert not admitted, "admitted while open before the cooldown ended"
            return None
        assert admitted
        if self.state == "open":
            self._move("half_open")
        self.trial = True
        return self._admit(trial=True)

    @rule()
    def health_check_passes(self) -> None:
        self.breaker.end_cooldown()
        if self.state == "open":
            self.open_until = min(self.open_until, self.clock.now)
            self._move("half_open")

    def _admit(self, trial: bool) -> tuple[int, bool]:
        self.next_id += 1
        return (self.next_id, trial)

    @rule(request=consumes(requests))
    def success(self, request: tuple[int, bool] | None) -> None:
        if request is None:
            return
        self.breaker.record_success()
        if self.state == "closed":
            self.consecutive = 0
        elif self.state == "half_open":
            self.consecutive = 0
            self.trial = False
            self.cooldown_now = self.cooldown
            self._move("closed")

    @rule(request=consumes(requests))
    def failure(self, request: tuple[int, bool] | None) -> None:
        if request is None:
            return
        self.breaker.record_failure()
        if self.state == "closed":
            self.consecutive += 1
            if self.consecutive >= self.failures:
                self.open_until = self.clock.now + self.cooldown_now
                self._move("open")
        elif self.state == "half_open":
            self.cooldown_now = min(self.cooldown_now * 2, self.max_cooldown)
            self.open_until = self.clock.now + self.cooldown_now
            self.trial = False
            self._move("open")

    @rule(request=consumes(requests))
    def client_goes_away(self, request: tuple[int, bool] | None) -> None:
        if request is None:
            return
        _, trial = request
        if not trial:
            return  # not the trial: nothing to tell the breaker
        self.breaker.release()
        # Any trial's release counts while one is in flight, even one whose
        # trial a straggler already settled: the breaker has no identities.
        if self.state == "half_open" and self.trial:
            self.trial = False
            self._move("open")

    @invariant()
    def matches_the_model(self) -> None:
        if not hasattr(self, "breaker"):
            return
        breaker = self.breaker
        assert breaker.state == self.state
        assert breaker.numeric_state() == {"closed": 0, "open": 1, "half_open": 2}[self.state]
        expected_wait = max(0.0, self.open_until - self.clock.now) if self.state == "open" else 0.0
        assert breaker.retry_after() == expected_wait
        assert self.changes == self.changes_expected
        assert breaker.trial_in_flight == self.trial
        assert self.cooldown <= breaker.current_cooldown == self.cooldown_now <= self.max_cooldown
        if self.state == "closed":
            assert breaker.consecutive_failures == self.consecutive < self.failures
            assert breaker.current_cooldown == self.cooldown


TestBreakerMachine = BreakerMachine.TestCase


# --- following the target: doubling, probes, early trials ---------------------


def test_each_failed_trial_doubles_the_cooldown_up_to_max_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 5.0, clock, max_cooldown=60.0)
    breaker.record_failure()
    waits = []
    for _ in range(6):
        waits.append(breaker.retry_after())
        clock.now += breaker.retry_after()
        assert breaker.acquire()
        breaker.record_failure()
    assert waits == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert breaker.current_cooldown == 60.0


def test_a_successful_trial_resets_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 5.0, clock, max_cooldown=60.0)
    breaker.record_failure()
    clock.now += 5.0
    assert breaker.acquire()
    breaker.record_failure()
    assert breaker.current_cooldown == 10.0
    clock.now += 10.0
    assert breaker.acquire()
    breaker.record_success()
    assert state_of(breaker) == "closed"
    breaker.record_failure()
    assert breaker.retry_after() == 5.0


def test_a_passing_health_check_ends_the_cooldown_and_the_next_request_is_the_trial() -> None:
    breaker, _, changes = make(cooldown=30.0)
    trip(breaker)
    breaker.end_cooldown()
    assert state_of(breaker) == "half_open"
    assert not breaker.trial_in_flight
    assert breaker.retry_after() == 0.0
    assert breaker.available()
    assert breaker.acquire()  # the trial
    assert not breaker.acquire()  # nothing beside it
    breaker.record_success()
    assert state_of(breaker) == "closed"
    assert changes[1:] == [("open", "half_open"), ("half_open", "closed")]


def test_a_passing_health_check_does_nothing_to_a_closed_or_half_open_breaker() -> None:
    breaker, _, changes = make()
    breaker.end_cooldown()
    assert state_of(breaker) == "closed"
    trip(breaker)
    breaker.end_cooldown()
    assert breaker.acquire()
    breaker.end_cooldown()
    assert breaker.trial_in_flight
    assert changes == [("closed", "open"), ("open", "half_open")]


def test_early_trial_is_granted_during_the_cooldown_one_at_a_time() -> None:
    breaker, _, _ = make(cooldown=30.0)
    trip(breaker)
    assert not breaker.acquire()
    assert breaker.triable()
    assert breaker.acquire(early=True)
    assert state_of(breaker) == "half_open"
    assert not breaker.triable()
    assert not breaker.acquire(early=True)  # a hung target holds one request
    breaker.release()  # no verdict: the cooldown end stays where it was
    assert state_of(breaker) == "open"
    assert breaker.retry_after() == 30.0
    assert breaker.acquire(early=True)
    breaker.record_failure()
    assert breaker.retry_after() == 30.0  # no max_cooldown given: no doubling


def test_reasons_are_given_for_every_transition() -> None:
    reasons: list[str] = []
    clock = Clock()
    breaker = CircuitBreaker(
        2, 1.0, clock, lambda _o, _n, why: reasons.append(why), max_cooldown=4.0
    )
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.acquire(early=True)
    breaker.record_failure()
    breaker.end_cooldown()
    assert breaker.acquire()
    breaker.release()
    assert breaker.acquire()
    breaker.record_success()
    assert reasons == [
        "2 consecutive failures, cooldown 1s",
        "early trial: pool in panic",
        "trial failed, cooldown 2s",
        "active health check passed",
        "trial ended without a verdict",
        "cooldown over",
        "trial succeeded",
    ]


@pytest.mark.parametrize(
    ("cooldown", "max_cooldown"), [(5.0, 4.0), (1.0, float("nan")), (1.0, float("inf"))]
)
def test_bad_max_cooldown_is_refused(cooldown: float, max_cooldown: float) -> None:
    with pytest.raises(ValueError, match="max_cooldown"):
        CircuitBreaker(1, cooldown, Clock(), max_cooldown=max_cooldown)


# --- panic rule ----------------------------------------------------------------


@given(
    available=st.integers(0, 50),
    total=st.integers(0, 50),
    threshold=st.floats(0.0, 1.0),
)
@example(available=1, total=2, threshold=0.5)  # half left: not below the threshold
@example(available=0, total=2, threshold=0.5)
@example(available=0, total=0, threshold=1.0)
def test_in_panic_is_below_the_share_of_available_targets(
    available: int, total: int, threshold: float
) -> None:
    available = min(available, total)
    panics = in_panic(available, total, threshold)
    assert panics == (total > 0 and available / total < threshold)
    if threshold == 0.0:
        assert not panics  # 0 turns panic off
    if total > 0 and available == 0 and threshold > 0.0:
        assert panics  # nothing available and panic on: always panic
    if available == total:
        assert not panics  # everything available: never panic


def test_reset_closes_open_and_half_open_breakers_and_restarts_the_cooldown() -> None:
    breaker = CircuitBreaker(1, 10.0, Clock(), max_cooldown=80.0)
    assert breaker.reset() is False  # closed already: nothing to do
    breaker.record_failure()
    assert state_of(breaker) == "open"
    assert breaker.reset() is True
    assert state_of(breaker) == "closed"
    assert breaker.available()
    # Half-open with a trial in flight, the cooldown doubled by a failed trial.
    breaker.record_failure()
    assert breaker.acquire(early=True)
    breaker.record_failure()
    assert breaker.current_cooldown == 20.0
    assert breaker.acquire(early=True)
    assert state_of(breaker) == "half_open"
    assert breaker.reset() is True
    assert (state_of(breaker), breaker.current_cooldown) == ("closed", 10.0)
    # The trial's late verdict lands on a closed breaker: one failure opens
    # it again (failures = 1), with the restarted cooldown.
    breaker.record_failure()
    assert (state_of(breaker), breaker.current_cooldown) == ("open", 10.0)
