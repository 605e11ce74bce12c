"""Giving freed memory back to the system after a load (glibc's malloc_trim).

A burst of streams leaves the C heap full of free chunks the allocator keeps:
glibc returns memory only from the top of the heap, and its mmap threshold
rises after large blocks are freed, so later large buffers land in the heap
too (bench/slow_streams.py: three rounds of 200 slow downloads left RSS at
105, 169, 169 MiB over a 45 MiB idle baseline). `malloc_trim(0)` releases
every free page inside the heap (madvise), not only its top. It walks the
heap, so it runs once after the load has dropped, never per request.

Before it, a full garbage collection: a request that ended by an exception
(a client reset mid-upload, a cancelled relay) leaves a reference cycle
(the exception's traceback holds the frames that hold it, and their
buffers) that only the oldest generation's collection frees, and that runs
rarely once start-up froze the config (cli.py). Without it, 1,000 uploads
whose clients reset left RSS 50 MiB over idle; collected, 17 MiB.
Elsewhere than glibc (musl, macOS) there is nothing to call: `trim()` is a
no-op.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Callable
from typing import Final

log = logging.getLogger("gateway.heap")


def _find_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        function = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


_TRIM: Final = _find_trim()
AVAILABLE: Final = _TRIM is not None


def trim() -> bool:
    """Free garbage cycles, then return the heap's free pages to the system;
    True if any went back.

    No collection while collection is off: a reload turns it off while it
    builds the new config (snapshot.gc_paused), whose objects a collection
    would scan with the GIL held, the stall that pause exists to avoid."""
    if gc.isenabled():
        gc.collect()
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
