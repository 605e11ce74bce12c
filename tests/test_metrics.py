"""The plain-Python metric families render exactly as prometheus_client's own."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.state.metrics import FastCounter, FastHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, float("inf"))
values = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text format, without the _created series only prometheus_client adds."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), values), max_size=50))
def test_fast_histogram_renders_as_prometheus_client_does(
    observations: list[tuple[str, float]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("x_seconds", "Help.", ["route"], ours, buckets=BUCKETS)
    real = Histogram("x_seconds", "Help.", ["route"], registry=theirs, buckets=BUCKETS)
    for route in ("a", "b"):
        fast.labels(route)
        real.labels(route)
    for route, value in observations:
        fast.labels(route).observe(value)
        real.labels(route).observe(value)
    assert exposition(ours) == exposition(theirs)


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), values), max_size=50))
def test_fast_counter_renders_as_prometheus_client_does(
    increments: list[tuple[str, float]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastCounter("x_total", "Help.", ["code"], ours)
    real = Counter("x_total", "Help.", ["code"], registry=theirs)
    for code, amount in increments:
        fast.labels(code).inc(amount)
        real.labels(code).inc(amount)
    assert exposition(ours) == exposition(theirs)


def test_fast_families_refuse_wrong_label_counts_and_forget_removed_series() -> None:
    registry = CollectorRegistry()
    counter = FastCounter("y_total", "Help.", ["a", "b"], registry)
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("only-one")
    counter.labels("1", "2").inc()
    counter.remove("1", "2")
    assert 'y_total{a="1"' not in generate_latest(registry).decode()
