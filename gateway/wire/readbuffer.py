"""One read buffer per event-loop thread, shared by that loop's connections.

Both HTTP/1.1 ends read as `asyncio.BufferedProtocol`s into it: httptools
hands its callbacks copies (bytes), and what a connection keeps past a read
(a tunnel's bytes, an upgrade's tail) it copies out, so nothing refers to the
buffer after `buffer_updated` returns, and one buffer serves every connection
instead of a new bytes object per read. Per thread, because a read into it
releases the GIL.
"""

from __future__ import annotations

import threading

__all__ = ["ThreadReadBuffer"]


class ThreadReadBuffer(threading.local):
    """`view`: `size` bytes, one buffer for each thread that reads into it."""

    def __init__(self, size: int) -> None:
        self.view = memoryview(bytearray(size))
