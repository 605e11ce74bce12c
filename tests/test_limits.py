from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.limits import DEFAULT_MAX_KEYS, BucketStore, TokenBucket, rate_limit_headers


class Clock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- TokenBucket -------------------------------------------------------------


def test_bucket_starts_full_and_empties_after_burst_takes() -> None:
    bucket = TokenBucket(rate=1.0, burst=3)
    assert bucket.tokens(100.0) == 3.0
    assert bucket.seconds_until_full(100.0) == 0.0
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.tokens(100.0) == 0.0
    assert bucket.seconds_until_token(100.0) == 1.0
    assert bucket.seconds_until_full(100.0) == 3.0


def test_bucket_refills_continuously_and_caps_at_burst() -> None:
    bucket = TokenBucket(rate=4.0, burst=2)
    assert bucket.take(0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.2)  # 0.8 of a token
    assert bucket.tokens(0.2) == pytest.approx(0.8)
    assert bucket.seconds_until_token(0.2) == pytest.approx(0.05)
    assert bucket.take(0.25)
    assert bucket.tokens(100.0) == 2.0  # never more than burst


def test_refused_take_takes_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.take(0.0)
    for _ in range(10):
        assert not bucket.take(0.5)
    assert bucket.take(1.0)


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.0, 1), (-1.0, 1), (math.inf, 1), (math.nan, 1), (1.0, 0)]
)
def test_bucket_refuses_bad_settings(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match=r"rate|burst"):
        TokenBucket(rate, burst)


@st.composite
def traffic(draw: st.DrawFn) -> tuple[float, int, list[float]]:
    rate = draw(st.floats(0.01, 1000.0))
    burst = draw(st.integers(1, 20))
    now = draw(st.floats(0.0, 1e5))
    times = []
    # Gaps measured in token periods so that every rate sees bursts, waits of
    # a fraction of a token, exact whole tokens (the float edge) and a hair
    # less or more than one.
    for gap in draw(
        st.lists(
            st.one_of(st.sampled_from([0.0, 1.0, 0.9999, 1.0001]), st.floats(0.0, 3.0)),
            min_size=1,
            max_size=60,
        )
    ):
        now += gap / rate
        times.append(now)
    return rate, burst, times


@given(traffic())
@example((1.0, 1, [0.0, 1.0, 2.0, 3.0]))  # one token per period, exactly on time
@example((3.0, 2, [0.0, 0.0, 0.1, 1 / 3, 2 / 3, 1.0]))  # 1/3 is inexact in binary
@example((0.1, 5, [1e5] * 7 + [1e5 + 10.0]))
@settings(max_examples=300)
def test_bucket_admits_at_most_burst_plus_rate_times_window(
    case: tuple[float, int, list[float]],
) -> None:
    rate, burst, times = case
    bucket = TokenBucket(rate, burst)
    admitted = [bucket.take(t) for t in times]
    prefix = [0]
    for ok in admitted:
        prefix.append(prefix[-1] + ok)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            n = prefix[j + 1] - prefix[i]
            assert n <= burst + rate * (times[j] - start) + 1e-6


@given(traffic())
@example((1.0, 1, [0.0, 1.0, 2.0, 3.0]))
@example((3.0, 2, [0.0, 0.0, 0.1, 1 / 3, 2 / 3, 1.0]))
@example((10.0, 1, [0.1 * k for k in range(20)]))  # 0.1 * k drifts from k / 10
@settings(max_examples=300)
def test_bucket_matches_an_exact_model(case: tuple[float, int, list[float]]) -> None:
    # The textbook bucket in exact rationals. Where it has a token the bucket
    # must admit, where it has none it must refuse; only within a hair of
    # exactly one token may float rounding go either way.
    rate, burst, times = case
    bucket = TokenBucket(rate, burst)
    exact_rate = Fraction(rate)
    tokens = Fraction(burst)
    last = Fraction(times[0])
    for t in times:
        exact_t = Fraction(t)
        tokens = min(Fraction(burst), tokens + (exact_t - last) * exact_rate)
        last = exact_t
        assert abs(bucket.tokens(t) - float(tokens)) < 1e-6
        admitted = bucket.take(t)
        if tokens >= 1 + Fraction(1, 10**6):
            assert admitted, f"refused with {float(tokens)} tokens"
        elif tokens <= 1 - Fraction(1, 10**6):
            assert not admitted, f"admitted with {float(tokens)} tokens"
        if admitted:
            tokens -= 1


# --- BucketStore -------------------------------------------------------------


def test_store_keeps_one_bucket_per_key() -> None:
    clock = Clock()
    store = BucketStore(rate=1.0, burst=2, clock=clock)
    assert store.take("a")[0]
    assert store.take("a")[0]
    allowed, bucket = store.take("a")
    assert not allowed
    assert bucket.tokens(clock.now) == 0.0
    assert store.take("b")[0]  # another key, another bucket
    assert len(store) == 2
    assert store.max_keys == DEFAULT_MAX_KEYS


def test_store_expires_idle_buckets_once_they_would_be_full() -> None:
    clock = Clock()
    store = BucketStore(rate=2.0, burst=4, clock=clock)  # full again 2 s after use
    for _ in range(4):
        assert store.take("a")[0]
    clock.now += 1.999
    assert len(store) == 1
    clock.now += 0.001
    assert len(store) == 0
    # A new bucket is exactly what the old one would have been by now: full.
    allowed, bucket = store.take("a")
    assert allowed
    assert bucket.tokens(clock.now) == 3.0


def test_store_does_not_expire_a_busy_bucket() -> None:
    clock = Clock(0.0)
    store = BucketStore(rate=1.0, burst=2, clock=clock)  # ttl 2 s
    assert store.take("a")[0]
    assert store.take("a")[0]
    clock.now = 1.0
    assert store.take("a")[0]  # the refilled token; restarts the ttl
    clock.now = 2.5  # 2.5 s after the bucket was first stored
    assert len(store) == 1
    allowed, bucket = store.take("a")
    assert allowed
    assert bucket.tokens(clock.now) == pytest.approx(0.5)  # not a fresh, full bucket


def test_store_evicts_the_least_recently_used_key_at_the_cap() -> None:
    clock = Clock()
    store = BucketStore(rate=1.0, burst=1, max_keys=2, clock=clock)
    assert store.take("a")[0]
    assert store.take("b")[0]
    assert not store.take("a")[0]  # a is now more recently used than b
    assert store.take("c")[0]  # evicts b
    assert len(store) == 2
    assert not store.take("a")[0]  # a kept its (empty) bucket
    assert store.take("b")[0]  # b came back with a full one (documented)


@given(
    max_keys=st.integers(1, 6),
    steps=st.lists(st.tuples(st.text("abcdefghij", max_size=2), st.floats(0.0, 1.5)), max_size=80),
)
@example(max_keys=1, steps=[("a", 0.0), ("b", 0.0), ("a", 0.0)])
def test_store_never_holds_more_than_max_keys(
    max_keys: int, steps: list[tuple[str, float]]
) -> None:
    clock = Clock()
    store = BucketStore(rate=1.0, burst=2, max_keys=max_keys, clock=clock)
    for key, dt in steps:
        clock.now += dt
        allowed, bucket = store.take(key)
        assert bucket.burst == 2
        assert len(store) <= max_keys
        if not allowed:
            assert bucket.tokens(clock.now) < 1.0


def test_store_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        BucketStore(1.0, 1, max_keys=0, clock=Clock())
    with pytest.raises(ValueError, match="rate"):
        BucketStore(0.0, 1, clock=Clock())


# --- headers -----------------------------------------------------------------


def test_headers_on_an_allowed_request() -> None:
    bucket = TokenBucket(rate=100.0, burst=200)
    assert bucket.take(0.0)
    assert rate_limit_headers("users-api", bucket, 0.0, True) == [
        ("RateLimit-Policy", '"users-api";q=200;w=2'),
        ("RateLimit", '"users-api";r=199;t=1'),
        ("X-RateLimit-Limit", "200"),
        ("X-RateLimit-Remaining", "199"),
        ("X-RateLimit-Reset", "1"),
    ]


def test_headers_on_a_refused_request_add_retry_after() -> None:
    bucket = TokenBucket(rate=0.5, burst=1)
    assert bucket.take(0.0)
    assert not bucket.take(0.5)
    assert rate_limit_headers("r", bucket, 0.5, False) == [
        ("RateLimit-Policy", '"r";q=1;w=2'),
        ("RateLimit", '"r";r=0;t=2'),
        ("X-RateLimit-Limit", "1"),
        ("X-RateLimit-Remaining", "0"),
        ("X-RateLimit-Reset", "2"),
        ("Retry-After", "2"),
    ]


def test_a_429s_reset_is_its_retry_after_not_the_seconds_until_full() -> None:
    # burst 3 at 1/s, emptied: the next token is 1 s away, a full bucket 3 s.
    bucket = TokenBucket(rate=1.0, burst=3)
    for _ in range(3):
        assert bucket.take(0.0)
    assert not bucket.take(0.0)
    headers = dict(rate_limit_headers("r", bucket, 0.0, False))
    assert headers["Retry-After"] == "1"
    assert headers["X-RateLimit-Reset"] == "1"
    assert headers["RateLimit"] == '"r";r=0;t=3'  # the draft's t stays "until full"


@given(
    rate=st.floats(0.01, 1000.0),
    burst=st.integers(1, 1000),
    extra=st.integers(1, 50),
    later=st.floats(0.0, 5.0),
)
def test_every_429_has_one_wait_in_reset_and_retry_after(
    rate: float, burst: int, extra: int, later: float
) -> None:
    bucket = TokenBucket(rate, burst)
    for _ in range(burst + extra):
        bucket.take(0.0)
    if bucket.take(later):
        return  # refilled by `later`: no refusal to look at
    headers = dict(rate_limit_headers("r", bucket, later, False))
    assert headers["X-RateLimit-Reset"] == headers["Retry-After"]
    assert int(headers["Retry-After"]) == max(
        1, math.ceil(bucket.seconds_until_token(later) - 1e-9)
    )


def test_retry_after_is_at_least_one_second() -> None:
    bucket = TokenBucket(rate=1000.0, burst=1)
    assert bucket.take(0.0)
    assert not bucket.take(0.0)
    headers = dict(rate_limit_headers("r", bucket, 0.0, False))
    assert headers["Retry-After"] == "1"
    assert headers["RateLimit-Policy"] == '"r";q=1;w=1'


def test_headers_on_a_full_bucket() -> None:
    headers = dict(rate_limit_headers("r", TokenBucket(3.0, 10), 7.0, True))
    assert headers["RateLimit"] == '"r";r=10;t=0'
    assert headers["X-RateLimit-Reset"] == "0"


@pytest.mark.parametrize(
    ("route", "quoted"),
    [
        ("plain", '"plain"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("café", '"caf?"'),
        ("tab\there", '"tab?here"'),
    ],
)
def test_route_names_are_sf_strings(route: str, quoted: str) -> None:
    headers = dict(rate_limit_headers(route, TokenBucket(1.0, 1), 0.0, True))
    assert headers["RateLimit-Policy"] == f"{quoted};q=1;w=1"
    assert headers["RateLimit"].startswith(quoted + ";")


SF_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"'


@given(
    route=st.text(max_size=12),
    rate=st.floats(0.01, 1000.0),
    burst=st.integers(1, 1000),
    takes=st.integers(0, 1200),
    later=st.floats(0.0, 100.0),
)
@example(route="x", rate=0.3, burst=1, takes=2, later=0.0)
@example(route="x", rate=1.0, burst=3, takes=4, later=0.0)  # the 429: Reset 3, Retry 1
def test_headers_are_consistent(
    route: str, rate: float, burst: int, takes: int, later: float
) -> None:
    bucket = TokenBucket(rate, burst)
    allowed = True
    for _ in range(takes):
        allowed = bucket.take(0.0)
    headers = rate_limit_headers(route, bucket, later, allowed)
    names = [name for name, _ in headers]
    assert names[:5] == [
        "RateLimit-Policy",
        "RateLimit",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    ]
    values = dict(headers)
    policy = re.fullmatch(SF_STRING + r";q=(\d+);w=(\d+)", values["RateLimit-Policy"])
    limit = re.fullmatch(SF_STRING + r";r=(\d+);t=(\d+)", values["RateLimit"])
    assert policy is not None
    assert limit is not None
    q, w = int(policy[1]), int(policy[2])
    r, t = int(limit[1]), int(limit[2])
    assert q == burst == int(values["X-RateLimit-Limit"])
    assert w == math.ceil(burst / rate)
    assert 0 <= r <= q
    assert r == int(values["X-RateLimit-Remaining"])
    assert 0 <= t <= w
    if allowed:
        assert t == int(values["X-RateLimit-Reset"])
        assert "Retry-After" not in values
    else:
        assert names[5:] == ["Retry-After"]
        assert 1 <= int(values["Retry-After"]) <= max(1, t)
        # One wait per 429: the classic reset is the Retry-After.
        assert values["X-RateLimit-Reset"] == values["Retry-After"]


# -- the shared (Redis) form -----------------------------------------------------


def test_shared_keys_of_different_route_and_key_pairs_never_collide() -> None:
    from gateway.core.limits import shared_key

    assert shared_key("a:b", "c") != shared_key("a", "b:c")
    assert shared_key("r", "") != shared_key("r:", "")


@pytest.mark.parametrize("debt", [float("nan"), float("-inf"), -1.0, 0.0])
def test_a_shared_bucket_answer_that_is_no_debt_is_a_full_bucket(debt: float) -> None:
    from gateway.core.limits import shared_bucket

    assert shared_bucket(2.0, 4, debt, 10.0).tokens(10.0) == 4.0


@pytest.mark.parametrize("debt", [float("inf"), 1e300, 100.0])
def test_a_huge_shared_bucket_debt_is_clamped_to_an_empty_bucket(debt: float) -> None:
    from gateway.core.limits import shared_bucket

    bucket = shared_bucket(2.0, 4, debt, 10.0)
    assert bucket.tokens(10.0) == 0.0
    assert bucket.seconds_until_full(10.0) == 2.5


def test_a_shared_bucket_shows_the_tokens_redis_left() -> None:
    from gateway.core.limits import shared_bucket

    # 1.5 s until full at 2 tokens/s: 3 of 4 tokens used, 1 left.
    assert shared_bucket(2.0, 4, 1.5, 10.0).tokens(10.0) == pytest.approx(1.0)
