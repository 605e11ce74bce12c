"""The dashboard's rolling minute (gateway/state/stats.py), on a fake clock."""

from __future__ import annotations

import math

import pytest

from gateway.state.metrics import Metrics
from gateway.state.stats import BOUNDS, WINDOW, RouteStats, Stats, merge_exports


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_counts_requests_and_5xx_errors_of_the_last_minute() -> None:
    clock = Clock()
    stats = RouteStats(clock)
    clock.now += 120  # an old route: rates over the whole minute
    for status in (200, 404, 499, 500, 503):
        stats.record(status, 0.004)
    window = stats.window()
    assert (window["requests"], window["errors"]) == (5, 2)
    assert window["error_rate"] == 0.4
    assert window["series"]["requests"][-1] == 5
    # The current second has just begun: the rate is over the 59 whole ones before it.
    assert window["rps"] == pytest.approx(5 / (WINDOW - 1), abs=0.001)


def test_seconds_older_than_the_window_are_forgotten_even_when_their_slot_is_reused() -> None:
    clock = Clock()
    stats = RouteStats(clock)
    stats.record(200, 0.001)
    clock.now += WINDOW - 1
    assert stats.window()["requests"] == 1  # still inside the minute
    clock.now += 1
    assert stats.window()["requests"] == 0
    # The same ring slot, a minute later: the old row is cleared, not added to.
    stats.record(200, 0.001)
    assert stats.window()["requests"] == 1
    assert sum(stats.window()["series"]["requests"]) == 1


def test_quantiles_interpolate_inside_the_bucket() -> None:
    clock = Clock()
    stats = RouteStats(clock)
    for _ in range(99):
        stats.record(200, 0.003)  # bucket (2.5 ms, 5 ms]
    stats.record(200, 0.7)  # bucket (0.5 s, 1 s]
    window = stats.window()
    assert 2.5 < window["p50_ms"] <= 5.0
    assert 2.5 < window["p99_ms"] <= 5.0
    stats.record(200, 0.7)
    assert 500 < stats.window()["p99_ms"] <= 1000


def test_extreme_durations_land_in_the_end_buckets() -> None:
    clock = Clock()
    stats = RouteStats(clock)
    for duration in (0.0, -1.0, math.inf, 1e9, float("nan")):
        stats.record(200, duration)
    window = stats.window()
    assert window["requests"] == 5
    assert window["p99_ms"] == BOUNDS[-1] * 1000


def test_a_young_route_rates_over_its_life_so_far() -> None:
    clock = Clock()
    stats = RouteStats(clock)
    clock.now += 2.0
    for _ in range(20):
        stats.record(200, 0.001)
    assert stats.window()["rps"] == pytest.approx(10.0)


def test_an_empty_window_has_no_quantiles() -> None:
    window = RouteStats(Clock()).window()
    assert (window["requests"], window["p50_ms"], window["p99_ms"]) == (0, None, None)
    assert window["series"]["p99_ms"] == [None] * WINDOW


def test_a_removed_route_is_forgotten_and_a_kept_one_keeps_its_minute() -> None:
    metrics = Metrics()
    kept = metrics.stats.route("a")
    kept.record(200, 0.001)
    metrics.stats.route("b").record(200, 0.001)
    metrics.forget_route("b")
    assert metrics.stats.route("a") is kept
    assert metrics.stats.route("b").window()["requests"] == 0
    assert set(Stats().windows()) == set()


def test_merged_exports_sum_counts_and_latency_buckets_of_several_processes() -> None:
    clock = Clock()
    fast, slow = RouteStats(clock), RouteStats(clock)
    clock.now += 120
    for _ in range(99):
        fast.record(200, 0.002)
    slow.record(502, 4.0)
    clock.now += 1
    slow.record(200, 4.0)
    merged = merge_exports([fast.export(), slow.export()], clock)
    assert (merged["requests"], merged["errors"]) == (101, 1)
    assert merged["series"]["requests"][-2:] == [100, 1]
    # The quantiles come from the summed buckets, not from averaging the
    # processes' own quantiles: p50 is the fast process's bucket, p99 the slow one's.
    assert merged["p50_ms"] is not None
    assert merged["p50_ms"] <= BOUNDS[1] * 1000
    assert merged["p99_ms"] is not None
    assert merged["p99_ms"] > 2500
    assert merge_exports([], clock)["requests"] == 0


def test_merging_skips_malformed_and_out_of_window_rows() -> None:
    clock = Clock()
    stats = RouteStats(clock)
    clock.now += 120
    stats.record(200, 0.002)
    good = stats.export()
    row = good["rows"][0]
    now = int(clock.now)
    hostile: list[object] = [
        None,
        "rows",
        {"rows": "x"},
        {"born": "x", "rows": [None, [], row[:-1], [*row, 1], [now, -1, *row[2:]]]},
        {"rows": [[now - WINDOW, *row[1:]], [now + 1, *row[1:]], [True, *row[1:]]]},
        {"rows": [[now, 1.5, *row[2:]]]},
    ]
    merged = merge_exports([*hostile, good], clock)
    assert (merged["requests"], merged["errors"]) == (1, 0)
