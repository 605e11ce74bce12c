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


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_trim_frees_a_garbage_cycle_that_holds_a_large_buffer() -> None:
    was_enabled = gc.isenabled()
    gc.disable()  # so that only trim() may collect the cycle
    try:
        before = _rss_kib()
        _Exchange()  # unreachable at once, kept alive by its own cycle
        held = _rss_kib()
        assert held - before > BUFFER // 1024 // 2
        heap.trim()
        after = _rss_kib()
    finally:
        if was_enabled:
            gc.enable()
    assert held - after > BUFFER // 1024 // 2, (before, held, after)
