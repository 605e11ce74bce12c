"""Rolling one-minute request figures per route, for the dashboard (/stats).

Prometheus counters answer "since start"; the dashboard wants "the last
minute", per second, without a scraper. Each route keeps a ring of 60
per-second rows in one flat list of ints, allocated once: a row is
[requests, errors, bucket 0 .. bucket N-1] of a fixed latency histogram.
Recording a request is O(1): find the row of this second (clearing it if it
held an older second), add 1 to three cells. No object is created per
request and nothing is locked (one event loop writes, the same loop reads).

Reading (the admin's /stats, every few seconds) does the work instead: it
walks the 60 rows, skips the ones older than a minute, and estimates p50 and
p99 from the merged buckets by linear interpolation inside the bucket, as
Prometheus' histogram_quantile() does. The estimate is within one bucket's
width of the truth; the buckets are spaced for API latencies (1 ms .. 10 s).

An error is a response with status >= 500 (what the gateway or the target
failed at; 4xx are the client's). 499 (client went away) is not one.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, Final

__all__ = ["BOUNDS", "WINDOW", "RouteStats", "Stats", "merge_exports"]

WINDOW: Final = 60  # seconds kept
# Upper bounds (seconds) of the latency buckets; one more bucket for above.
BOUNDS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BUCKETS: Final = len(BOUNDS) + 1
_STRIDE: Final = 2 + _BUCKETS  # requests, errors, buckets
_ZERO_ROW: Final = (0,) * _STRIDE


class RouteStats:
    """One route's last minute; `record` is the per-request call."""

    __slots__ = ("_born", "_cells", "_clock", "_secs")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._born = clock()
        self._cells = [0] * (WINDOW * _STRIDE)
        self._secs = [-1] * WINDOW  # the second each row holds (-1: never used)

    def record(self, status: int, duration: float) -> None:
        sec = int(self._clock())
        slot = sec % WINDOW
        base = slot * _STRIDE
        cells = self._cells
        if self._secs[slot] != sec:
            # A row from a minute ago (or never used): start it over.
            self._secs[slot] = sec
            cells[base : base + _STRIDE] = _ZERO_ROW
        cells[base] += 1
        if status >= 500:
            cells[base + 1] += 1
        # bisect_left: a duration equal to a bound falls in that bound's bucket (le=).
        cells[base + 2 + bisect_left(BOUNDS, duration)] += 1

    def export(self) -> dict[str, Any]:
        """The rows of the last minute as plain data, for another process to
        merge (workers = N: the main's /stats sums its workers' minutes).
        Each row is [second, requests, errors, bucket 0 .. bucket N-1]; the
        seconds are CLOCK_MONOTONIC's, one clock for every process of a host."""
        now = int(self._clock())
        rows = []
        for sec in range(now - WINDOW + 1, now + 1):
            slot = sec % WINDOW
            if self._secs[slot] == sec:
                base = slot * _STRIDE
                rows.append([sec, *self._cells[base : base + _STRIDE]])
        return {"born": self._born, "rows": rows}

    def add(self, exported: Any) -> None:
        """Sum another RouteStats' `export()` into this one (counts and
        latency buckets add; rows outside this minute or malformed are skipped)."""
        if not isinstance(exported, dict) or not isinstance(exported.get("rows"), list):
            return
        born = exported.get("born")
        if isinstance(born, int | float) and not isinstance(born, bool):
            self._born = min(self._born, float(born))
        now = int(self._clock())
        for row in exported["rows"]:
            if not isinstance(row, list) or len(row) != _STRIDE + 1:
                continue
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row):
                continue
            sec = row[0]
            if not now - WINDOW < sec <= now:
                continue
            slot = sec % WINDOW
            base = slot * _STRIDE
            if self._secs[slot] != sec:
                self._secs[slot] = sec
                self._cells[base : base + _STRIDE] = _ZERO_ROW
            for i, value in enumerate(row[1:]):
                self._cells[base + i] += value

    def window(self) -> dict[str, Any]:
        """The last minute: totals, rates and quantiles, and per-second series
        (oldest first, the current, still filling, second last)."""
        now = int(self._clock())
        cells = self._cells
        secs = self._secs
        merged = [0] * _BUCKETS
        requests = errors = 0
        rps: list[int] = []
        err: list[int] = []
        p50: list[float | None] = []
        p99: list[float | None] = []
        for sec in range(now - WINDOW + 1, now + 1):
            slot = sec % WINDOW
            if secs[slot] != sec:
                rps.append(0)
                err.append(0)
                p50.append(None)
                p99.append(None)
                continue
            base = slot * _STRIDE
            row = cells[base + 2 : base + _STRIDE]
            n = cells[base]
            requests += n
            errors += cells[base + 1]
            for i, count in enumerate(row):
                merged[i] += count
            rps.append(n)
            err.append(cells[base + 1])
            p50.append(_quantile(row, n, 0.5))
            p99.append(_quantile(row, n, 0.99))
        # The current second is partial: rates are over the whole seconds
        # before it plus the fraction of this one gone by; a route younger
        # than a minute (start-up, added by a reload) over its life so far.
        clock = self._clock()
        elapsed = max(1.0, min(WINDOW - 1 + (clock - now), clock - self._born))
        return {
            "requests": requests,
            "errors": errors,
            "rps": round(requests / elapsed, 3),
            "error_rate": round(errors / requests, 4) if requests else 0.0,
            "p50_ms": _ms(_quantile(merged, requests, 0.5)),
            "p99_ms": _ms(_quantile(merged, requests, 0.99)),
            "series": {
                "requests": rps,
                "errors": err,
                "p50_ms": [_ms(v) for v in p50],
                "p99_ms": [_ms(v) for v in p99],
            },
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _quantile(buckets: list[int], total: int, q: float) -> float | None:
    """The q-quantile (seconds) of a histogram, interpolated inside its bucket."""
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(BOUNDS):
                return BOUNDS[-1]  # above the last bound: all that can be said
            low = BOUNDS[i - 1] if i else 0.0
            return low + (BOUNDS[i] - low) * max(0.0, rank - seen) / count
        seen += count
    return BOUNDS[-1]  # unreachable while q <= 1


def merge_exports(
    exports: list[Any], clock: Callable[[], float] = time.monotonic
) -> dict[str, Any]:
    """One route's minute over several processes: the `window()` of the sum
    of their `export()`s (a route no process reported: an empty minute)."""
    merged = RouteStats(clock)
    for exported in exports:
        merged.add(exported)
    return merged.window()


class Stats:
    """Every route's `RouteStats`, by name; outlives reloads (a route that did
    not change keeps its minute)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._routes: dict[str, RouteStats] = {}

    def route(self, name: str) -> RouteStats:
        stats = self._routes.get(name)
        if stats is None:
            stats = self._routes[name] = RouteStats(self._clock)
        return stats

    def forget(self, name: str) -> None:
        self._routes.pop(name, None)

    def windows(self) -> dict[str, dict[str, Any]]:
        return {name: stats.window() for name, stats in self._routes.items()}
