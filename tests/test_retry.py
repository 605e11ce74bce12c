from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.retry import IDEMPOTENT_METHODS, RetryBudget, backoff, may_retry


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
        # No connect failure and no status: e.g. a read timeout, target may be working.
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
    for method, connect_failed, status, body_started in itertools.product(
        METHODS, [False, True], STATUSES, [False, True]
    ):
        # The CONTRACT's sentence, read literally: "on connect failure, or on a
        # 502/503/504 from the target for an idempotent method whose request
        # body (if any) was not yet sent" -- and a sent streamed body is gone.
        safe = connect_failed or (
            status in (502, 503, 504)
            and method in ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")
        )
        expected = safe and not body_started
        got = may_retry(
            method, connect_failed=connect_failed, status=status, body_started=body_started
        )
        assert got is expected, (method, connect_failed, status, body_started)


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


def test_budget_allows_the_minimum_with_no_traffic() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_window=3, window=10.0, clock=Clock())
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
    assert budget.retries() == 3


def test_budget_caps_retries_at_a_ratio_of_first_attempts() -> None:
    clock = Clock(100.0)
    budget = RetryBudget(ratio=0.2, min_retries_per_window=3, window=10.0, clock=clock)
    for _ in range(100):
        budget.record_attempt()
    granted = 0
    while budget.try_spend():
        granted += 1
    assert granted == 3 + 20
    assert budget.attempts() == 100
    # Fresh first attempts earn more room: five of them earn one retry.
    for _ in range(5):
        budget.record_attempt()
    assert budget.try_spend()
    assert not budget.try_spend()


def test_budget_recovers_after_the_window() -> None:
    clock = Clock(100.0)
    budget = RetryBudget(ratio=0.0, min_retries_per_window=2, window=10.0, clock=clock)
    assert budget.try_spend()
    assert budget.try_spend()
    assert not budget.try_spend()
    clock.now += 9.0  # still inside the window
    assert not budget.try_spend()
    clock.now += 1.0
    assert budget.try_spend()
    assert budget.retries() == 1


def test_budget_slides_slot_by_slot() -> None:
    clock = Clock(0.0)
    budget = RetryBudget(ratio=1.0, min_retries_per_window=0, window=10.0, clock=clock)
    for second in range(10):
        clock.now = second + 0.5
        budget.record_attempt()
    assert budget.attempts() == 10
    clock.now = 10.5  # the slot of second 0 leaves the window
    assert budget.attempts() == 9
    clock.now = 15.5
    assert budget.attempts() == 4
    clock.now = 1e6  # a long idle: every slot cleared, in bounded work
    assert budget.attempts() == 0
    assert budget.retries() == 0


def test_budget_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(ratio=-0.1, clock=Clock())
    with pytest.raises(ValueError, match="min_retries"):
        RetryBudget(min_retries_per_window=-1, clock=Clock())
    with pytest.raises(ValueError, match="window"):
        RetryBudget(window=0.0, clock=Clock())


@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    minimum=st.integers(0, 4),
    events=st.lists(
        st.tuples(st.sampled_from(["attempt", "attempt", "retry"]), st.integers(0, 3000)),
        max_size=120,
    ),
)
@example(ratio=0.2, minimum=0, events=[("attempt", 0)] * 5 + [("retry", 0)] * 2)
@example(ratio=0.0, minimum=1, events=[("retry", 0), ("retry", 9999), ("retry", 1)])
@settings(max_examples=300)
def test_budget_against_exact_windows(
    ratio: float, minimum: int, events: list[tuple[str, int]]
) -> None:
    # Window 10 s in 1 s slots; times on a millisecond grid. The budget looks
    # at the slots covering [floor(t) - 9, t], which lies within [t - 10, t]
    # and contains [t - 9, t]. So a granted retry must fit the budget counted
    # over the shorter span for retries and the longer one for attempts, and
    # a retry that fits even when counted the strict way must be granted.
    clock = Clock(1000.0)
    budget = RetryBudget(ratio=ratio, min_retries_per_window=minimum, window=10.0, clock=clock)
    now_ms = 1_000_000
    attempts: list[int] = []
    retries: list[int] = []

    def count(times: list[int], since_ms: int) -> int:
        return sum(1 for t in times if t >= since_ms)

    for kind, gap_ms in events:
        now_ms += gap_ms
        clock.now = now_ms / 1000
        if kind == "attempt":
            budget.record_attempt()
            attempts.append(now_ms)
            continue
        granted = budget.try_spend()
        if granted:
            retries.append(now_ms)
            assert (
                count(retries, now_ms - 9000)
                <= minimum + ratio * count(attempts, now_ms - 10_000) + 1e-9
            )
        elif count(retries, now_ms - 10_000) + 1 <= minimum + ratio * count(
            attempts, now_ms - 9000
        ):
            pytest.fail(f"refused a retry the budget had room for at {now_ms} ms")
