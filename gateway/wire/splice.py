"""Zero-copy relay of a known number of body bytes from one socket to another.

A body copied through Python costs two kernel copies (recv into a buffer,
send out of it) plus the interpreter's work per chunk. Linux `splice(2)`
moves the bytes through a pipe instead: socket -> pipe hands over references
to the kernel's pages, pipe -> socket sends them, and no byte enters this
process (HAProxy's `option splice-response` does the same). It only pays for
bodies of a known, large size (`MIN_BYTES`), where setting the pipe up and
handing the sockets over is small against the transfer.

The sockets stay owned by their asyncio transports, which must not read
(`pause_reading()`) or hold unsent bytes while the relay runs. asyncio and
uvloop both refuse `add_reader` on a transport's descriptor, so the relay
works on duplicates (`os.dup`): same socket, own descriptor number.

The one rule: a transport's descriptor number is never kept, only a
duplicate taken from it at once (`dup_socket`, with no `await` between
looking at the transport and duplicating). A number names a socket only
while its transport is open: when the peer resets, the transport closes it,
and the next socket the process opens (a new client's, a new upstream
connection's) gets the same number; bytes sent "to the target" after an
`await` would then go to that stranger. A duplicate keeps naming this socket
until it is closed, and its holder checks that the transport is still open
(`SocketDup.gone`) before and while writing through it. Holders close their
duplicates when the relay ends, so the socket itself closes with its
transport as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
from typing import ClassVar, Final

from gateway.wire.writeflow import kernel_unsent

#: Whether this platform has splice(2) (Linux; Python >= 3.10).
AVAILABLE: Final = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
#: Bodies smaller than this are relayed through Python as usual.
MIN_BYTES: Final = 256 * 1024
#: Relays running at once; beyond, bodies are copied (see `Relay`).
MAX_ACTIVE: Final = 32
#: Tunnel directions spliced at once (two per WebSocket tunnel); beyond,
#: tunnels are copied. Apart from MAX_ACTIVE: a tunnel lives for hours and
#: must not take the bodies' relays. Each keeps the default 64 KiB pipe (16
#: pages), so 256 of them stay well inside fs.pipe-user-pages-soft.
MAX_TUNNEL_ACTIVE: Final = 256
# Asked for with F_SETPIPE_SZ (the default pipe holds 64 KiB); capped by
# /proc/sys/fs/pipe-max-size, 1 MiB by default. A relay starts with the
# default pipe and grows it to this once its destination proves fast
# (GROW_AFTER, GROW_RATE): a slow client's relay holds 64 KiB of pipe, not
# 1 MiB, of kernel memory (which counts toward a cgroup's memory.max).
PIPE_BYTES: Final = 1 << 20
#: A relay grows (its pipe to PIPE_BYTES, its sockets' buffers to
#: SHORT_PATH_BUFFER on a short path) once it has delivered GROW_AFTER bytes
#: at GROW_RATE bytes/s or more, counted from its start. Until then its
#: destination's send buffer on a short path is held to SLOW_SINK_BUFFER
#: (Linux doubles it: 128 KiB) and its source's receive buffer is the
#: kernel's: loopback starts a send buffer at tcp_wmem's 4 MiB maximum, all
#: of which a slow reader's stream would fill.
GROW_AFTER: Final = 512 * 1024
GROW_RATE: Final = 16 * 1024 * 1024
SLOW_SINK_BUFFER: Final = 64 * 1024
#: On a short path (see `fit_short_path_buffers`) a relay holds its source's
#: receive buffer and its destination's send buffer to this. Linux doubles
#: the figure for its own bookkeeping (about 1 MiB each, as much as the pipe)
#: after capping it at net.core.rmem_max / wmem_max (212992 by default).
SHORT_PATH_BUFFER: Final = 512 * 1024
#: "Short": a minimum round-trip time of at most this, in microseconds. A
#: 1 MiB buffer keeps such a path busy up to 1 GB/s; loopback measures 4-30.
SHORT_PATH_RTT_US: Final = 1000
# struct tcp_info (linux/tcp.h), u32 fields in microseconds: tcpi_min_rtt at
# byte 148 (Linux 4.6+), the smoothed tcpi_rtt at byte 68 for older kernels.
_TCPI_U32: Final = struct.Struct("=I")
_TCPI_MIN_RTT: Final = 148
_TCPI_RTT: Final = 68
log = logging.getLogger("gateway.splice")
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


class SpliceError(Exception):
    """The relay stopped before `count` bytes; `moved` were delivered."""

    def __init__(self, message: str, moved: int) -> None:
        super().__init__(message)
        self.moved = moved


class SourceClosed(SpliceError):
    """The source ended (EOF) or failed (reset) before the count was reached."""


class SourceTimeout(SpliceError):
    """The source sent nothing for `read_timeout` seconds."""


class SinkFailed(SpliceError):
    """The destination is gone (EPIPE, reset)."""


class SinkTimeout(SpliceError):
    """The destination took nothing for `write_timeout` seconds."""


class SocketDup:
    """An owned duplicate of a socket's descriptor, and the transport it came from.

    Take one with `dup_socket()`; close it (or use `with`) when done. The
    descriptor stays this socket's whatever happens to the transport, so
    writing through it never reaches another connection; `gone()` says
    whether the transport has closed meanwhile, after which nothing more may
    be written: the socket may be the peer's reset one, or one we abandoned.
    """

    __slots__ = ("fd", "transport")

    def __init__(self, fd: int, transport: asyncio.Transport | None = None) -> None:
        self.fd = fd
        #: None for a bare socket (tests): then only the descriptor counts.
        self.transport = transport

    def gone(self) -> bool:
        """Whether the transport this socket belongs to is closing or closed."""
        return self.fd < 0 or (self.transport is not None and self.transport.is_closing())

    def close(self) -> None:
        """Close the duplicate (idempotent); the socket stays its transport's."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> SocketDup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def dup_socket(transport: asyncio.Transport | None) -> SocketDup | None:
    """A duplicate of an open plain-TCP transport's socket; None for TLS, a
    closing transport, or when the process is out of descriptors.

    Synchronous on purpose: the transport is seen open and its number
    duplicated in one step, so the number cannot have been closed and given
    to another socket in between (see the module's docstring).
    """
    if transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        fd = sock.fileno()
    except (OSError, AttributeError):
        return None
    if not isinstance(fd, int) or fd < 0:
        return None
    try:
        return SocketDup(os.dup(fd), transport)
    except OSError as exc:
        log.warning("zero-copy relay unavailable, copying instead: %s", exc)
        return None


async def wait_flushed(dst: SocketDup, write_timeout: float | None) -> None:
    """Until the transport has handed every byte it holds to the kernel.

    The relay writes to the socket behind the transport's back, so anything
    the transport still buffers (a response head, body bytes read before the
    hand-over) must leave first. The transport flushes when the socket turns
    writable: wait for that, as it does, until nothing is left. A transport
    that closes meanwhile (the peer reset: its buffer is dropped, not
    flushed) raises SinkFailed; one that takes nothing for `write_timeout`
    seconds, SinkTimeout.
    """
    transport = dst.transport
    loop = asyncio.get_running_loop()
    while True:
        if dst.gone():
            raise SinkFailed("the connection closed", 0)
        if transport is None or not transport.get_write_buffer_size():
            return
        if not await _writable(loop, dst.fd, write_timeout):
            raise SinkTimeout(f"the peer took nothing for {write_timeout:g} s", 0)
        # Writable: the transport's own callback runs in this same loop
        # iteration; yield once so it can flush before we look again.
        await asyncio.sleep(0)


def fit_short_path_buffers(
    src_fd: int, dst_fd: int, *, max_rtt_us: int = SHORT_PATH_RTT_US
) -> None:
    """Hold a relay's receive and send buffers to `SHORT_PATH_BUFFER` on short paths.

    Linux sizes a TCP send buffer from the MSS, and loopback's MSS is 64 KiB,
    so every loopback socket starts with the 4 MiB maximum (`tcp_wmem`); the
    receive side autotunes as high. Through a relay that is several MiB of
    body in flight between the sender's copy into the kernel and the
    receiver's copy out of it, and pages that old are out of cache by the
    time they are read. On one core (bench/ab_bulk.py, 5 fresh gateways per
    variant), held buffers took a 1 GiB download from 0.49-0.52x of a direct
    connection's MB/s to 0.62-0.66x, and an upload from 0.49-0.60x to
    0.64-0.73x. Capped at the kernel's default rmem_max/wmem_max (416 KiB
    each) they gave about half of that gain.

    Only a path whose minimum round trip (the path's own, not the peer's
    think time that a smoothed RTT on a keep-alive connection includes) is
    at most `max_rtt_us` is held: there 1 MiB is more than the
    bandwidth-delay product. A longer one (a client across a WAN) keeps the
    kernel's autotuning, which it needs for throughput. Setting a size fixes
    it for the socket's life, which is right for a connection whose path
    does not change. Best effort: a socket that refuses is left as it is.
    """
    for fd, option in ((src_fd, socket.SO_RCVBUF), (dst_fd, socket.SO_SNDBUF)):
        try:
            sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed
        except OSError:
            continue
        try:
            rtt = _path_rtt_us(sock)
            if rtt is not None and rtt <= max_rtt_us:
                sock.setsockopt(socket.SOL_SOCKET, option, SHORT_PATH_BUFFER)
        except OSError:
            pass  # not TCP (a Unix socket has no TCP_INFO), or gone
        finally:
            sock.detach()


def hold_sink_small(dst_fd: int, *, max_rtt_us: int = SHORT_PATH_RTT_US) -> None:
    """Hold a relay's destination send buffer to `SLOW_SINK_BUFFER` on a short
    path, until the relay grows (`fit_short_path_buffers`). Best effort."""
    try:
        sock = socket.socket(fileno=dst_fd)  # borrowed: detached below, never closed
    except OSError:
        return
    try:
        rtt = _path_rtt_us(sock)
        if rtt is not None and rtt <= max_rtt_us:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SLOW_SINK_BUFFER)
    except OSError:
        pass  # not TCP, or gone
    finally:
        sock.detach()


def _path_rtt_us(sock: socket.socket) -> int | None:
    """The path's minimum round-trip time for `sock`; None before any sample."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    offset = _TCPI_MIN_RTT if len(info) >= _TCPI_MIN_RTT + 4 else _TCPI_RTT
    if len(info) < offset + 4:
        return None
    (rtt,) = _TCPI_U32.unpack_from(info, offset)
    return int(rtt) or None


class Relay:
    """One zero-copy transfer: a pipe, then the run between two `SocketDup`s.

    `open()` returns None when no relay can be had now: `MAX_ACTIVE` are
    running (each may grow a pipe of up to 1 MiB; an unprivileged user gets
    16384 pipe pages in all, `fs.pipe-user-pages-soft`), or the process is
    out of descriptors. The caller then copies the body as usual. The
    sockets' duplicates are the caller's (taken with `dup_socket` the moment
    it looked at the transports, closed by it after the run).

    `run()` starts small (the default 64 KiB pipe; the destination's send
    buffer held to SLOW_SINK_BUFFER on a short path) and grows once the
    destination proves fast (GROW_AFTER at GROW_RATE): a full-size pipe and
    both sockets' buffers held to `SHORT_PATH_BUFFER` on a short path
    (`fit_short_path_buffers`).
    """

    active: ClassVar[int] = 0
    tunnels_active: ClassVar[int] = 0

    def __init__(self, pipe_r: int, pipe_w: int, pipe_bytes: int, tunnel: bool = False) -> None:
        self._pipe_r = pipe_r
        self._pipe_w = pipe_w
        self._pipe_bytes = pipe_bytes
        self._closed = False
        self._tunnel = tunnel
        self._grown = False  # see _drain
        #: Bytes delivered to the destination so far (also after a failure
        #: or cancellation: for the access log).
        self.moved = 0
        if tunnel:
            Relay.tunnels_active += 1
        else:
            Relay.active += 1

    @property
    def pipe_bytes(self) -> int:
        """The pipe's size now (it grows once the destination proves fast)."""
        return self._pipe_bytes

    @classmethod
    def open_for_tunnel(cls) -> Relay | None:
        """A relay for one direction of a tunnel (see MAX_TUNNEL_ACTIVE)."""
        if not AVAILABLE or cls.tunnels_active >= MAX_TUNNEL_ACTIVE:
            return None
        return cls._with_pipe(tunnel=True)

    @classmethod
    def open(cls) -> Relay | None:
        if not AVAILABLE or cls.active >= MAX_ACTIVE:
            return None
        return cls._with_pipe(tunnel=False)

    @classmethod
    def _with_pipe(cls, *, tunnel: bool) -> Relay | None:
        """A relay on a new pipe of the default size; None (the caller copies)
        when the process is out of descriptors or pipe pages."""
        try:
            pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            what = "tunnel" if tunnel else "relay"
            log.warning("zero-copy %s unavailable, copying instead: %s", what, exc)
            return None
        try:
            pipe_bytes = fcntl.fcntl(pipe_w, fcntl.F_GETPIPE_SZ)
        except OSError:
            pipe_bytes = 65536
        return cls(pipe_r, pipe_w, pipe_bytes, tunnel=tunnel)

    def _drain(
        self, loop: asyncio.AbstractEventLoop, src: int, dst: int, in_pipe: int, started_at: float
    ) -> int:
        """Splice what the pipe holds into `dst`; how many bytes went (0: the
        destination is full). Grows the relay once, when the destination has
        taken GROW_AFTER bytes at GROW_RATE on average since `started_at` (a
        stream that turns fast later grows then)."""
        try:
            n = os.splice(self._pipe_r, dst, in_pipe, flags=_FLAGS)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise SinkFailed(f"writing failed: {_reason(exc)}", self.moved) from exc
        self.moved += n
        if (
            not self._grown
            and self.moved >= GROW_AFTER
            and self.moved >= GROW_RATE * (loop.time() - started_at)
        ):
            self._grown = True
            self._grow(src, dst)
        return n

    def _grow(self, src: int, dst: int) -> int:
        """The destination keeps up: a full-size pipe and held socket buffers
        (see GROW_AFTER); returns the pipe's size. A tunnel keeps its pipe."""
        if not self._tunnel:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._pipe_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            with contextlib.suppress(OSError):
                self._pipe_bytes = fcntl.fcntl(self._pipe_w, fcntl.F_GETPIPE_SZ)
        fit_short_path_buffers(src, dst)
        return self._pipe_bytes

    def close(self) -> None:
        """Release the pipe (idempotent); the sockets' duplicates are the caller's."""
        if self._closed:
            return
        self._closed = True
        if self._tunnel:
            Relay.tunnels_active -= 1
        else:
            Relay.active -= 1
        for fd in (self._pipe_r, self._pipe_w):
            os.close(fd)

    async def run(
        self,
        source: SocketDup,
        sink: SocketDup,
        count: int,
        *,
        read_timeout: float | None,
        write_timeout: float | None,
    ) -> int:
        """Move exactly `count` bytes from `source` to `sink`; return `count`.

        Raises a `SpliceError` subclass (with the bytes delivered so far) when
        either side fails or stalls for its timeout, or when its transport
        closes meanwhile (SourceClosed, SinkFailed): a closed transport's
        socket is abandoned, and the duplicate must not keep writing into
        it. Cancellation stops at once; either way the bytes still in the
        pipe are lost, so the caller must abort both connections after any
        exception.
        """
        loop = asyncio.get_running_loop()
        pipe_w, chunk = self._pipe_w, self._pipe_bytes
        left = count  # still to take from the source
        in_pipe = 0
        if sink.gone():
            raise SinkFailed("the connection closed", 0)
        if source.gone():
            raise SourceClosed("the connection closed", 0)
        src, dst = source.fd, sink.fd
        hold_sink_small(dst)
        grow_at = loop.time()  # GROW_AFTER bytes by `grow_at`: fast enough
        while left or in_pipe:
            drained = filled = False
            if in_pipe:
                n = self._drain(loop, src, dst, in_pipe, grow_at)
                in_pipe -= n
                drained = n > 0
                chunk = self._pipe_bytes  # grown, once the destination keeps up
            if left:
                try:
                    # Never ask for more than is left: the bytes after this
                    # body (a next response, pipelined request) are not ours.
                    n = os.splice(src, pipe_w, min(left, chunk), flags=_FLAGS)
                except BlockingIOError:
                    pass  # nothing to read, or the pipe is full
                except OSError as exc:
                    raise SourceClosed(f"reading failed: {_reason(exc)}", self.moved) from exc
                else:
                    if n == 0:
                        raise SourceClosed(
                            f"closed after {count - left} of {count} bytes", self.moved
                        )
                    left -= n
                    in_pipe += n
                    filled = True
            if drained or filled:
                continue
            if in_pipe:
                # The destination is full; the pipe must empty before more
                # is read (what arrives meanwhile waits in the socket).
                if not await _writable(loop, dst, write_timeout):
                    raise SinkTimeout(f"the peer took nothing for {write_timeout:g} s", self.moved)
            elif not await _ready(loop, src, False, read_timeout):
                raise SourceTimeout(f"the peer sent nothing for {read_timeout:g} s", self.moved)
            # Either transport may have closed while we waited (our own side
            # gave the connection up, or the peer reset and asyncio noticed
            # first): its socket is no longer one to write to or read from.
            if sink.gone():
                raise SinkFailed("the connection closed", self.moved)
            if source.gone():
                raise SourceClosed("the connection closed", self.moved)
        return self.moved

    async def pump(self, source: SocketDup, sink: SocketDup) -> int:
        """Move bytes from `source` to `sink` until the source's EOF; return
        how many (a tunnel's direction, whose length nobody announced).

        No timeouts: the tunnel's owner watches `moved` for its idle timeout
        and cancels. Raises SourceClosed on a reset, SinkFailed when the sink
        is gone; either way the bytes still in the pipe are lost, so both
        connections must end. At EOF the pipe is emptied first.
        """
        loop = asyncio.get_running_loop()
        pipe_w, chunk = self._pipe_w, self._pipe_bytes
        in_pipe = 0
        eof = False
        src, dst = source.fd, sink.fd
        hold_sink_small(dst)
        grow_at = loop.time()
        while not eof or in_pipe:
            if sink.gone():
                raise SinkFailed("the connection closed", self.moved)
            if source.gone() and not eof:
                raise SourceClosed("the connection closed", self.moved)
            drained = filled = False
            if in_pipe:
                n = self._drain(loop, src, dst, in_pipe, grow_at)
                in_pipe -= n
                drained = n > 0
                chunk = self._pipe_bytes  # grown, once the destination keeps up
            if not eof and in_pipe < chunk:
                try:
                    n = os.splice(src, pipe_w, chunk - in_pipe, flags=_FLAGS)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise SourceClosed(f"reading failed: {_reason(exc)}", self.moved) from exc
                else:
                    if n == 0:
                        eof = True
                    in_pipe += n
                    filled = n > 0
            if drained or filled or (eof and not in_pipe):
                continue
            if in_pipe:
                await _writable(loop, dst, None)
            else:
                await _ready(loop, src, False, None)
        return self.moved


async def _writable(loop: asyncio.AbstractEventLoop, fd: int, patience: float | None) -> bool:
    """Wait until `fd` is writable; False if the peer took nothing at all for
    `patience` seconds.

    Progress is the peer acknowledging bytes (the send queue shrinking), not
    only the socket turning writable: Linux wakes a writer when a third of a
    full send buffer is free, which a slow reader behind a large buffer
    takes long to free, though it keeps reading (nginx's send_timeout
    likewise counts from the last progress, not per response).
    """
    while True:
        before = kernel_unsent(fd)
        if await _ready(loop, fd, True, patience):
            return True
        # Each further round follows a strictly shorter queue: bounded.
        if kernel_unsent(fd) >= before:
            return False


async def _ready(
    loop: asyncio.AbstractEventLoop, fd: int, writable: bool, patience: float | None
) -> bool:
    """Wait until `fd` is readable (or writable); False if `patience` ran out first."""
    waiter: asyncio.Future[bool] = loop.create_future()

    def settle(result: bool) -> None:
        if not waiter.done():
            waiter.set_result(result)

    if writable:
        loop.add_writer(fd, settle, True)
    else:
        loop.add_reader(fd, settle, True)
    timer = loop.call_later(patience, settle, False) if patience else None
    try:
        return await waiter
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
        if timer is not None:
            timer.cancel()


def _reason(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))
