"""asyncio write flow control, shared by both HTTP/1.1 ends (h1server, h1client).

The transport calls `pause_writing()` when its buffer passes the high-water
mark and `resume_writing()` when it is back under the low one. A writer that
finds `_write_paused` set waits in `_wait_for_drain()` until then, or until
the connection is gone and its protocol calls `_release_drain()`.
"""

from __future__ import annotations

import asyncio


class WriteFlow(asyncio.Protocol):
    """The write side of a protocol's flow control: a paused flag and one waiter."""

    def __init__(self) -> None:
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_drain()

    def _release_drain(self) -> None:
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def _wait_for_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._drain_waiter = waiter
        try:
            await waiter
        finally:
            self._drain_waiter = None
