"""splice.Relay on real TCP socket pairs over loopback: counts, ends, stalls."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.wire import splice

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="splice(2) is Linux-only")

MiB = 1024 * 1024


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection (splice needs a real socket)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    for sock in (client, accepted):
        sock.setblocking(False)
    return client, accepted


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def new_pair(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> tuple[socket.socket, socket.socket]:
    pair = tcp_pair()
    pairs.append(pair)
    return pair


async def relay(
    src_fd: int, dst_fd: int, count: int, *, read_timeout: float, write_timeout: float
) -> int:
    """One Relay between duplicates of `src_fd` and `dst_fd`, run and closed,
    as the proxy uses it."""
    opened = splice.Relay.open()
    assert opened is not None
    with splice.SocketDup(os.dup(src_fd)) as src, splice.SocketDup(os.dup(dst_fd)) as dst:
        try:
            return await opened.run(
                src, dst, count, read_timeout=read_timeout, write_timeout=write_timeout
            )
        finally:
            opened.close()


async def read_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def test_relay_moves_exactly_the_count_and_leaves_what_follows(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    src_writer, src = new_pair(pairs)
    dst, dst_reader = new_pair(pairs)
    body = os.urandom(5 * MiB + 3)
    after = b"NEXT MESSAGE"
    loop = asyncio.get_running_loop()
    sending = asyncio.create_task(loop.sock_sendall(src_writer, body + after))
    receiving = asyncio.create_task(read_exactly(dst_reader, len(body)))
    moved = await relay(src.fileno(), dst.fileno(), len(body), read_timeout=5, write_timeout=5)
    await sending
    assert moved == len(body)
    assert await receiving == body
    # The bytes after the count stay in the source socket for their owner.
    assert await read_exactly(src, len(after)) == after


async def test_relay_reports_an_early_end_with_the_bytes_delivered(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    src_writer, src = new_pair(pairs)
    dst, dst_reader = new_pair(pairs)
    src_writer.sendall(b"a" * 1000)
    src_writer.close()
    with pytest.raises(splice.SourceClosed) as info:
        await relay(src.fileno(), dst.fileno(), MiB, read_timeout=5, write_timeout=5)
    assert info.value.moved == 1000
    assert await read_exactly(dst_reader, 1000) == b"a" * 1000


async def test_relay_gives_up_on_a_silent_source(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    src_writer, src = new_pair(pairs)
    dst, _ = new_pair(pairs)
    src_writer.sendall(b"b" * 10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(splice.SourceTimeout) as info:
        await relay(src.fileno(), dst.fileno(), MiB, read_timeout=0.2, write_timeout=5)
    assert info.value.moved == 10
    assert 0.15 < loop.time() - started < 2


async def test_relay_gives_up_on_a_destination_that_takes_nothing(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    src_writer, src = new_pair(pairs)
    dst, _never_read = new_pair(pairs)
    loop = asyncio.get_running_loop()
    size = 256 * MiB  # more than both socket buffers hold
    block = b"c" * MiB

    async def feed() -> None:
        for _ in range(size // MiB):
            await loop.sock_sendall(src_writer, block)

    feeding = asyncio.create_task(feed())
    with pytest.raises(splice.SinkTimeout) as info:
        await relay(src.fileno(), dst.fileno(), size, read_timeout=5, write_timeout=0.2)
    assert 0 < info.value.moved < size
    feeding.cancel()
    await asyncio.gather(feeding, return_exceptions=True)


async def test_relay_reports_a_destination_that_is_gone(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    src_writer, src = new_pair(pairs)
    dst, dst_reader = new_pair(pairs)
    dst_reader.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    dst_reader.close()  # RST: writes to dst fail
    src_writer.sendall(b"d" * (2 * MiB))
    with pytest.raises(splice.SinkFailed):
        await relay(src.fileno(), dst.fileno(), 2 * MiB, read_timeout=5, write_timeout=5)


async def test_relay_closes_its_descriptors_whatever_happens(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    before = len(os.listdir("/proc/self/fd"))
    src_writer, src = new_pair(pairs)
    dst, _ = new_pair(pairs)
    opened = len(os.listdir("/proc/self/fd"))
    src_writer.sendall(b"e" * 100)
    with pytest.raises(splice.SourceTimeout):
        await relay(src.fileno(), dst.fileno(), 200, read_timeout=0.05, write_timeout=5)
    task = asyncio.create_task(
        relay(src.fileno(), dst.fileno(), 200, read_timeout=5, write_timeout=5)
    )
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(os.listdir("/proc/self/fd")) == opened
    assert opened == before + 4


def test_relay_open_gives_way_when_descriptors_run_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Earlier tests' sockets closed by the collector mid-test would change the count.
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))

    def no_more_descriptors(flags: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pipe2", no_more_descriptors)
    assert splice.Relay.open() is None  # the caller copies instead
    assert len(os.listdir("/proc/self/fd")) == before
    assert splice.Relay.active == 0


def test_relay_open_refuses_beyond_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splice, "MAX_ACTIVE", splice.Relay.active + 2)
    opened = [splice.Relay.open() for _ in range(3)]
    assert [r is not None for r in opened] == [True, True, False]
    for r in opened:
        if r is not None:
            r.close()
            r.close()  # idempotent
    assert splice.Relay.active == 0


def held_buffer_sizes() -> tuple[int, int]:
    """(receive, send) as Linux reports them after a fit: the request capped
    at net.core.rmem_max / wmem_max, then doubled."""
    caps = [
        int(Path(f"/proc/sys/net/core/{name}").read_text()) for name in ("rmem_max", "wmem_max")
    ]
    rcv, snd = (2 * min(splice.SHORT_PATH_BUFFER, cap) for cap in caps)
    return rcv, snd


def buffer_sizes(src: socket.socket, dst: socket.socket) -> tuple[int, int]:
    return (
        src.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        dst.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )


async def test_short_path_buffers_are_held_to_the_bound_and_the_sockets_stay_usable(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    src_writer, src = new_pair(pairs)
    dst, dst_reader = new_pair(pairs)
    # Loopback starts its send buffers at the tcp_wmem maximum (64 KiB MSS).
    assert buffer_sizes(src, dst) != held_buffer_sizes()
    splice.fit_short_path_buffers(src.fileno(), dst.fileno())
    assert buffer_sizes(src, dst) == held_buffer_sizes()
    # The descriptors were borrowed, not closed: a relay still runs on them.
    body = os.urandom(3 * MiB)
    loop = asyncio.get_running_loop()
    sending = asyncio.create_task(loop.sock_sendall(src_writer, body))
    receiving = asyncio.create_task(read_exactly(dst_reader, len(body)))
    await relay(src.fileno(), dst.fileno(), len(body), read_timeout=5, write_timeout=5)
    await sending
    assert await receiving == body


def test_a_path_longer_than_the_bound_keeps_the_kernels_autotuning(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    _, src = new_pair(pairs)
    dst, _ = new_pair(pairs)
    before = buffer_sizes(src, dst)
    # Loopback's round trip is some microseconds: longer than a 0 µs bound.
    splice.fit_short_path_buffers(src.fileno(), dst.fileno(), max_rtt_us=0)
    assert buffer_sizes(src, dst) == before


def test_fitting_buffers_leaves_unix_sockets_alone_and_open() -> None:
    # socket() accepts the descriptor, TCP_INFO then fails: it must still be
    # handed back, not closed with the borrowed socket object.
    left, right = socket.socketpair()
    try:
        before = buffer_sizes(left, right)
        splice.fit_short_path_buffers(left.fileno(), right.fileno())
        assert buffer_sizes(left, right) == before
        right.sendall(b"still open")
        assert left.recv(64) == b"still open"
    finally:
        left.close()
        right.close()


def test_fitting_buffers_leaves_what_is_not_a_tcp_socket_alone() -> None:
    read_end, write_end = os.pipe()
    try:
        splice.fit_short_path_buffers(read_end, write_end)
        os.write(write_end, b"still open")
        assert os.read(read_end, 64) == b"still open"
    finally:
        os.close(read_end)
        os.close(write_end)


def pipe_max_size() -> int:
    return int(Path("/proc/sys/fs/pipe-max-size").read_text())


async def stalled_run(
    opened: splice.Relay, src: splice.SocketDup, dst: splice.SocketDup, size: int
) -> splice.SinkTimeout:
    with pytest.raises(splice.SinkTimeout) as info:
        await opened.run(src, dst, size, read_timeout=5, write_timeout=0.3)
    return info.value


async def test_a_relay_to_a_slow_destination_keeps_a_small_pipe_and_send_buffer(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    # A client that reads nothing: its relay must not fill a 1 MiB pipe and
    # a 1 MiB send buffer of kernel memory (a cgroup's memory.max counts it).
    src_writer, src = new_pair(pairs)
    dst, _never_read = new_pair(pairs)
    loop = asyncio.get_running_loop()
    size = 64 * MiB
    block = b"s" * MiB

    async def feed() -> None:
        for _ in range(size // MiB):
            await loop.sock_sendall(src_writer, block)

    feeding = asyncio.create_task(feed())
    opened = splice.Relay.open()
    assert opened is not None
    try:
        with (
            splice.SocketDup(os.dup(src.fileno())) as a,
            splice.SocketDup(os.dup(dst.fileno())) as b,
        ):
            info = await stalled_run(opened, a, b, size)
        assert opened.pipe_bytes < splice.PIPE_BYTES
        assert dst.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * splice.SLOW_SINK_BUFFER
        # What left the pipe sits in the send buffer and the peer's receive buffer.
        assert 0 < info.moved < MiB
    finally:
        opened.close()
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)


async def test_a_relay_to_a_fast_destination_grows_its_pipe_and_buffers(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    src_writer, src = new_pair(pairs)
    dst, dst_reader = new_pair(pairs)
    body = os.urandom(16 * MiB)
    loop = asyncio.get_running_loop()
    sending = asyncio.create_task(loop.sock_sendall(src_writer, body))
    receiving = asyncio.create_task(read_exactly(dst_reader, len(body)))
    opened = splice.Relay.open()
    assert opened is not None
    try:
        with (
            splice.SocketDup(os.dup(src.fileno())) as a,
            splice.SocketDup(os.dup(dst.fileno())) as b,
        ):
            await opened.run(a, b, len(body), read_timeout=5, write_timeout=5)
        assert opened.pipe_bytes == min(splice.PIPE_BYTES, pipe_max_size())
    finally:
        opened.close()
    await sending
    assert await receiving == body
    assert buffer_sizes(src, dst) == held_buffer_sizes()
