"""asyncio write flow control, shared by both HTTP/1.1 ends (h1server, h1client).

The transport calls `pause_writing()` when its buffer passes the high-water
mark and `resume_writing()` when it is back under the low one. A writer that
finds `_write_paused` set waits in `_wait_for_drain()` until then, or until
the connection is gone and its protocol calls `_release_drain()`.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from typing import Final

_INT: Final = struct.Struct("i")


def kernel_unsent(fd: int) -> int:
    """Bytes in a socket's send queue that the peer has not acknowledged yet
    (SIOCOUTQ, Linux's TIOCOUTQ on a TCP socket); 0 when it cannot be told."""
    try:
        return int(_INT.unpack(fcntl.ioctl(fd, termios.TIOCOUTQ, bytes(_INT.size)))[0])
    except OSError:
        return 0


def unsent(transport: asyncio.WriteTransport) -> int:
    """What a transport has written that its peer has not taken yet: the
    transport's own buffer and its socket's send queue.

    A peer that reads makes this shrink at once. The transport's buffer
    alone would not: the kernel wakes a writer only when a third of a full
    send buffer (up to 4 MiB on loopback, Linux's tcp_wmem) is free again,
    so a slow reader can take a long while to move it.
    """
    size = transport.get_write_buffer_size()
    if transport.is_closing():
        return size
    sock = transport.get_extra_info("socket")
    try:
        fd = sock.fileno()
    except (OSError, AttributeError):
        return size
    # Used at once, with no await: the number is this transport's socket.
    return size + kernel_unsent(fd) if isinstance(fd, int) and fd >= 0 else size


class WriteFlow(asyncio.BaseProtocol):
    """The write side of a protocol's flow control: a paused flag and one waiter.

    A BaseProtocol, not a Protocol: uvloop reads into a protocol's own buffer
    (`get_buffer`, h1client's) only when it is no `asyncio.Protocol`.
    Slotted, so that a subclass may be (h1server's Connection).
    """

    __slots__ = ("_drain_waiter", "_write_paused")

    def __init__(self) -> None:
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def write_blocked(self) -> bool:
        """Whether a writer would wait now (the transport is over its high-water mark)."""
        return self._write_paused

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
