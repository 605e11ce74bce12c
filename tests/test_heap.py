"""heap.trim(): what a load left behind goes back to the system.

A request that ends by an exception leaves a reference cycle holding its
buffers (the traceback's frames hold the exception, and their locals); only
a full collection frees it. trim() collects before giving pages back, so the
memory of a burst of aborted streams returns (bench/slow_streams.py --op
upload: 1,000 reset uploads left RSS 50 MiB over idle without it).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from gateway.wire import heap

BUFFER = 64 * 1024 * 1024


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class _Exchange:
    """Stands for any object that ends up in a cycle with a large buffer."""

    def __init__(self) -> None:
        self.buffer = bytearray(BUFFER)  # touched: zero-filled pages count in RSS
        self.buffer[::4096] = b"x" * (BUFFER // 4096)
        self.me = self


_NEEDS_PROC = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


@_NEEDS_PROC
def test_trim_frees_a_garbage_cycle_that_holds_a_large_buffer() -> None:
    thresholds = gc.get_threshold()
    gc.set_threshold(1 << 30)  # collection on, but only trim() may run one
    try:
        before = _rss_kib()
        _Exchange()  # unreachable at once, kept alive by its own cycle
        held = _rss_kib()
        assert held - before > BUFFER // 1024 // 2
        heap.trim()
        after = _rss_kib()
    finally:
        gc.set_threshold(*thresholds)
    assert held - after > BUFFER // 1024 // 2, (before, held, after)


@_NEEDS_PROC
def test_trim_runs_no_collection_while_a_reload_has_collection_off() -> None:
    # snapshot.gc_paused turns collection off while a reload builds its
    # config; a collection then would scan all of it with the GIL held.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        _Exchange()
        held = _rss_kib()
        heap.trim()
        still = _rss_kib()
        assert held - still < BUFFER // 1024 // 2, (held, still)
    finally:
        gc.collect()  # the cycle this test made
        if was_enabled:
            gc.enable()
