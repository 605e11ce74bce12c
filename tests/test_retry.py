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


def test_budget_allows_the_floor_with_no_traffic() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrency=3)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
    assert budget.retrying == 3
    budget.give_back()
    assert budget.try_spend()


def test_budget_caps_concurrent_retries_at_a_ratio_of_requests_in_flight() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrency=3)
    for _ in range(100):
        budget.enter()
    granted = 0
    while budget.try_spend():
        granted += 1
    assert granted == 20
    # Five more requests in flight earn one more concurrent retry.
    for _ in range(5):
        budget.enter()
    assert budget.try_spend()
    assert not budget.try_spend()


@pytest.mark.parametrize("requests", [1, 2, 10, 1000])
def test_budget_never_refuses_a_client_with_one_request_at_a_time(requests: int) -> None:
    # The low-rate defect: a floor counted per 10 s window ran out after a few
    # retries; a floor of concurrent retries never does for a lone client.
    budget = RetryBudget()
    for _ in range(requests):
        budget.enter()
        assert budget.try_spend()
        budget.give_back()
        budget.leave()
    assert (budget.active, budget.retrying) == (0, 0)


def test_budget_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(ratio=-0.1)
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(ratio=float("nan"))
    with pytest.raises(ValueError, match="min_concurrency"):
        RetryBudget(min_concurrency=-1)


@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    minimum=st.integers(0, 4),
    events=st.lists(
        st.sampled_from(["enter", "enter", "leave", "spend", "give_back"]), max_size=200
    ),
)
@example(ratio=0.2, minimum=0, events=["enter"] * 5 + ["spend"] * 2)
@example(ratio=0.0, minimum=1, events=["spend", "spend", "give_back", "spend"])
@settings(max_examples=300)
def test_budget_against_a_model(ratio: float, minimum: int, events: list[str]) -> None:
    budget = RetryBudget(ratio=ratio, min_concurrency=minimum)
    active = retrying = 0
    for event in events:
        if event == "enter":
            budget.enter()
            active += 1
        elif event == "leave" and active > 0:
            budget.leave()
            active -= 1
        elif event == "give_back" and retrying > 0:
            budget.give_back()
            retrying -= 1
        elif event == "spend":
            room = retrying + 1 <= max(minimum, ratio * active)
            assert budget.try_spend() == room
            retrying += room
        # The storm bound: never more retries in flight than the budget allows
        # at the moment each was granted, and never fewer than it could.
        assert (budget.active, budget.retrying) == (active, retrying)
