from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.retry import IDEMPOTENT_METHODS, RetryBudget, backoff, may_retry

# --- may_retry ---------------------------------------------------------------

METHODS = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE", "POST", "PATCH", "CONNECT"]
METHODS += ["PROPFIND", "get", "Delete"]
STATUSES: list[int | None] = [None, 200, 204, 301, 400, 404, 408, 429, 500, 501, 502, 503, 504]


def test_idempotent_methods_are_rfc_9110s() -> None:
    assert frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}) == IDEMPOTENT_METHODS


@pytest.mark.parametrize(
    ("method", "connect_failed", "status", "body_started", "expected"),
    [
        # Nothing reached the target: any method, even POST.
        ("POST", True, None, False, True),
        ("PATCH", True, None, False, True),
        ("GET", True, None, False, True),
        # The target said 502/503/504: only idempotent methods.
        ("GET", False, 503, False, True),
        ("PUT", False, 502, False, True),
        ("DELETE", False, 504, False, True),
        ("POST", False, 503, False, False),
        ("PATCH", False, 502, False, False),
        # ... and only while the body had not started going up.
        ("PUT", False, 503, True, False),
        # Streamed body bytes are gone: even a connect failure cannot resend them.
        ("POST", True, None, True, False),
        # Any other answer is the answer.
        ("GET", False, 500, False, False),
        ("GET", False, 429, False, False),
        ("GET", False, 200, False, False),
        # No connect failure, no status and no `no_answer`: e.g. a garbled head.
        ("GET", False, None, False, False),
        # Methods are case-sensitive (RFC 9110 section 9.1).
        ("get", False, 503, False, False),
    ],
)
def test_may_retry_rows(
    method: str, connect_failed: bool, status: int | None, body_started: bool, expected: bool
) -> None:
    got = may_retry(method, connect_failed=connect_failed, status=status, body_started=body_started)
    assert got is expected


def test_may_retry_exhaustive_table() -> None:
    for method, connect_failed, status, body_started, no_answer in itertools.product(
        METHODS, [False, True], STATUSES, [False, True], [False, True]
    ):
        # The CONTRACT's sentence, read literally: "on connect failure, or, for
        # an idempotent method whose request body (if any) was not yet sent,
        # on a reset or a read_timeout before the first response byte, or on a
        # 502/503/504 from the target" -- and a sent streamed body is gone.
        safe = connect_failed or (
            (no_answer or status in (502, 503, 504))
            and method in ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")
        )
        expected = safe and not body_started
        got = may_retry(
            method,
            connect_failed=connect_failed,
            status=status,
            body_started=body_started,
            no_answer=no_answer,
        )
        assert got is expected, (method, connect_failed, status, body_started, no_answer)


@pytest.mark.parametrize(
    ("method", "body_started", "expected"),
    [
        ("GET", False, True),  # reset or timed out before a byte: safe to repeat
        ("HEAD", False, True),
        ("PUT", False, True),
        ("DELETE", False, True),
        ("PUT", True, False),  # its body went up and is gone
        ("POST", False, False),  # the target may have acted on it
        ("PATCH", False, False),
        ("get", False, False),
    ],
)
def test_may_retry_a_reset_or_timeout_before_the_first_response_byte(
    method: str, body_started: bool, expected: bool
) -> None:
    got = may_retry(
        method, connect_failed=False, status=None, body_started=body_started, no_answer=True
    )
    assert got is expected


# --- backoff -----------------------------------------------------------------


@given(
    attempt=st.integers(0, 5000),
    base=st.floats(1e-4, 10.0),
    cap=st.floats(0.0, 60.0),
    u=st.floats(0.0, 1.0, exclude_max=True),
)
@example(attempt=0, base=0.025, cap=1.0, u=0.0)
@example(attempt=2000, base=0.025, cap=1.0, u=0.999999)  # 2**2000 overflows a float
@example(attempt=5, base=0.025, cap=1.0, u=0.5)
def test_backoff_is_full_jitter_within_the_capped_ceiling(
    attempt: int, base: float, cap: float, u: float
) -> None:
    ceiling = min(Fraction(cap), Fraction(base) * 2**attempt)
    delay = backoff(attempt, base, cap, rng=lambda: u)
    assert 0.0 <= delay <= float(ceiling)
    assert delay <= cap
    assert delay == pytest.approx(u * float(ceiling), rel=1e-12, abs=1e-300)


def test_backoff_defaults() -> None:
    assert backoff(0, rng=lambda: 0.5) == pytest.approx(0.0125)
    assert backoff(3, rng=lambda: 0.5) == pytest.approx(0.1)
    assert backoff(10, rng=lambda: 0.5) == pytest.approx(0.5)  # capped at 1.0
    rng = random.Random(1).random
    for attempt in range(20):
        assert 0.0 <= backoff(attempt, rng=rng) <= min(1.0, 0.025 * 2**attempt)
    assert 0.0 <= backoff(1) < 0.05  # the default rng


def test_backoff_refuses_a_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff(-1)


# --- RetryBudget -------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budget_at(clock: Clock, **kwargs: float) -> RetryBudget:
    return RetryBudget(clock=clock, **kwargs)  # type: ignore[arg-type]


def test_budget_allows_the_concurrency_floor_with_no_traffic_and_no_rate_floor() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrency=3, min_per_sec=0.0, clock=Clock())
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
    assert budget.retrying == 3
    budget.give_back()
    assert budget.try_spend()


def test_budget_caps_concurrent_retries_at_a_ratio_of_requests_in_flight() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrency=3, min_per_sec=0.0, clock=Clock())
    for _ in range(100):
        budget.enter()
    # 100 first attempts also earn 20 retries by the rate rule; spent below.
    granted = 0
    while budget.try_spend():
        granted += 1
    assert granted == 20
    # Five more requests in flight earn one more concurrent retry (and one
    # more by the rate rule: both rules agree here).
    for _ in range(5):
        budget.enter()
    assert budget.try_spend()
    assert not budget.try_spend()


def test_a_burst_failing_together_retries_whole_on_the_rate_rule() -> None:
    # The freeze of a target: 16 requests parked on it time out together.
    # The concurrency rule has room for 3; the window's floor for all 16.
    clock = Clock(50.0)
    budget = RetryBudget(clock=clock)
    for _ in range(16):
        budget.enter()
    assert all(budget.try_spend() for _ in range(16))
    assert budget.retrying == 16


def test_the_rate_rule_earns_a_fifth_of_the_first_attempts_plus_ten_per_second() -> None:
    clock = Clock()
    budget = RetryBudget(min_concurrency=0, clock=clock)  # only the rate rule
    for _ in range(500):
        budget.enter()
        budget.leave()
    granted = 0
    while budget.try_spend():
        granted += 1
    assert granted == 10 * 10 + 500 // 5
    # The window slides: 10 s later both the retries and what earned them
    # are gone, and the floor is back.
    clock.now += 10.0
    assert (budget.firsts(), budget.retries()) == (0, 0)
    assert sum(budget.try_spend() for _ in range(150)) == 100


@pytest.mark.parametrize("requests", [1, 2, 10, 1000, 20_000])
def test_budget_never_refuses_a_client_with_one_request_at_a_time(requests: int) -> None:
    # The low-rate defect: a floor counted per 10 s window ran out after a few
    # retries; a floor of concurrent retries never does for a lone client,
    # even one so fast that every one of its requests retries.
    clock = Clock()
    budget = RetryBudget(clock=clock)
    for _ in range(requests):
        budget.enter()
        assert budget.try_spend()
        budget.give_back()
        budget.leave()
        clock.now += 0.0001
    assert (budget.active, budget.retrying) == (0, 0)


def test_a_storm_gets_the_larger_of_the_two_rules_not_their_sum() -> None:
    # Every request fails and wants a retry; 50 in flight at a time, each
    # retry held for one round. Retries stay near a fifth of the traffic.
    clock = Clock()
    budget = RetryBudget(clock=clock)
    firsts = retries = 0
    for _ in range(200):  # 200 rounds of 50 requests within one window
        for _ in range(50):
            budget.enter()
        firsts += 50
        granted = 0
        while granted < 50 and budget.try_spend():
            granted += 1
        retries += granted
        for _ in range(granted):
            budget.give_back()
        for _ in range(50):
            budget.leave()
        clock.now += 0.04
    rate = 0.2 * firsts + 100
    concurrent = 200 * 10  # 20 % of 50 in flight, per round
    assert retries <= max(rate, concurrent) + 1
    assert retries <= 0.21 * firsts + 100


def test_the_clock_stepping_back_or_leaping_breaks_nothing() -> None:
    clock = Clock(100.0)
    budget = RetryBudget(min_concurrency=0, clock=clock)
    budget.enter()
    clock.now = 3.0  # back: counts into the newest slot
    budget.enter()
    assert budget.firsts() == 2
    clock.now = 1e300  # a leap of ages clears at most SLOTS slots
    assert (budget.firsts(), budget.retries()) == (0, 0)
    assert budget.try_spend()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": float("inf")}, "ratio"),
        ({"min_concurrency": -1}, "min_concurrency"),
        ({"min_per_sec": -1.0}, "min_per_sec"),
        ({"min_per_sec": float("nan")}, "min_per_sec"),
        ({"window": 0.0}, "window"),
        ({"window": -1.0}, "window"),
        ({"window": float("inf")}, "window"),
        ({"window": float("nan")}, "window"),
    ],
)
def test_budget_refuses_bad_settings(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        budget_at(Clock(), **kwargs)


@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    minimum=st.integers(0, 4),
    per_sec=st.sampled_from([0.0, 0.3, 1.0, 10.0]),
    events=st.lists(
        st.sampled_from(["enter", "enter", "leave", "spend", "spend", "give_back", "tick"]),
        max_size=300,
    ),
)
@example(ratio=0.2, minimum=0, per_sec=0.0, events=["enter"] * 5 + ["spend"] * 2)
@example(ratio=0.0, minimum=1, per_sec=0.0, events=["spend", "spend", "give_back", "spend"])
@example(ratio=0.0, minimum=0, per_sec=0.3, events=["spend"] * 4 + ["tick"] * 10 + ["spend"] * 4)
@settings(max_examples=300)
def test_budget_against_a_model(
    ratio: float, minimum: int, per_sec: float, events: list[str]
) -> None:
    # The model keeps every first attempt and retry with its time and counts
    # those of the last 10 s (slots of 1 s: what happened in the slot that
    # fell out of the window is forgotten as a whole).
    clock = Clock(7.0)
    budget = RetryBudget(ratio=ratio, min_concurrency=minimum, min_per_sec=per_sec, clock=clock)
    active = retrying = 0
    firsts: list[int] = []  # slot index of each first attempt
    retries: list[int] = []
    for event in events:
        slot = int(clock.now // 1.0)
        if event == "enter":
            budget.enter()
            active += 1
            firsts.append(slot)
        elif event == "leave" and active > 0:
            budget.leave()
            active -= 1
        elif event == "give_back" and retrying > 0:
            budget.give_back()
            retrying -= 1
        elif event == "tick":
            clock.now += 0.5
        elif event == "spend":
            in_window = [s for s in firsts if s > slot - 10]
            spent = [s for s in retries if s > slot - 10]
            concurrent = retrying + 1 <= max(minimum, ratio * active)
            rate = len(spent) + 1 <= per_sec * 10.0 + ratio * len(in_window)
            room = concurrent or rate
            assert budget.try_spend() == room
            if room:
                retrying += 1
                retries.append(slot)
        now = int(clock.now // 1.0)
        assert (budget.active, budget.retrying) == (active, retrying)
        assert budget.firsts() == sum(s > now - 10 for s in firsts)
        assert budget.retries() == sum(s > now - 10 for s in retries)
