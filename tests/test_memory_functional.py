"""Memory per slow stream, measured on a real gateway process (bench/slow_streams.py
is the full-size version).

A raw target writes a large body as fast as its socket takes it; clients with a
small receive buffer read nothing. The gateway must stop reading from the target
(the rest waits in the kernel's socket buffers, bounded by TCP flow control)
instead of reading ahead into its own memory, and give freed memory back once
the streams are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from pathlib import Path

from yarl import URL

from tests.gateway_process import run_gateway

STREAMS = 64
BODY = 8 * 1024 * 1024
# Before: a 1 MiB read-ahead plus the client write buffer, 1.3-1.5 MiB per
# stream (bench/slow_streams.py); then a 64 KiB read-ahead, two reads of it
# joined, behind asyncio's 64 KiB write high-water: 179-198 KiB here. Now the
# target's socket is not read while the client is slow and the client's
# transport holds the rest of one write: 13-15 KiB here (issue 19's bound).
PER_STREAM_KIB = 128
# Issue 19's bound for "memory comes back": within 30 MiB of the idle
# baseline after the load (measured 3-21 MiB; 16 MiB failed once in a CI run: 16.5 MiB).
RETURNED_KIB = 30 * 1024
# Fast uploads (the client sends as fast as the gateway takes) to a target
# that reads nothing: 327-361 KiB each here when the client socket was read
# 256 KiB at a time (one read in the body buffer, one unsent piece for the
# target); 140-148 with reads sized by the body reader's pace but 64 KiB
# buffered before the handler reads; 110-137 with 16 KiB (quiet 2-core host,
# 2026-12-07). Issue 19's 128 KiB is for slow clients (38-46 KiB in
# bench/slow_streams.py); this bound catches a return to reading ahead.
UPLOAD_KIB = 192


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class FastTarget:
    """Answers every request with BODY bytes, written as fast as the socket takes
    them, on a small send buffer; counts what each connection managed to write."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        index = len(self.written)
        self.written.append(0)
        piece = bytes(256 * 1024)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BODY)
                sent = 0
                while sent < BODY:
                    writer.write(piece)
                    sent += len(piece)
                    self.written[index] += len(piece)
                    await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def slow_client(host: str, port: int, opened: list[socket.socket]) -> None:
    """Sends one GET and reads (almost) nothing: a client that does not keep up."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    opened.append(sock)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    await loop.sock_recv(sock, 4096)  # the head: the stream is running


def config(target: int) -> str:
    return f"""
[upstreams.t]
targets = ["http://127.0.0.1:{target}"]

[[routes]]
name = "r"
path = "/"
upstream = "t"
"""


async def test_slow_downloads_cost_kilobytes_each_and_memory_comes_back(
    tmp_path: Path,
) -> None:
    target = FastTarget()
    port = await target.start()
    opened: list[socket.socket] = []
    try:
        async with run_gateway(tmp_path, config(port)) as gw:
            proxy = URL(gw.url)
            assert proxy.host is not None
            assert proxy.port is not None
            # One warm-up stream, so imports and pools are in the baseline.
            await asyncio.wait_for(slow_client(proxy.host, proxy.port, opened), 10)
            opened.pop().close()
            await asyncio.sleep(0.5)
            before = rss_kib(gw.pid)
            async with asyncio.timeout(30):
                await asyncio.gather(
                    *(slow_client(proxy.host, proxy.port, opened) for _ in range(STREAMS))
                )
            peak = before
            for _ in range(20):  # 2 s: every stream reaches its stall
                await asyncio.sleep(0.1)
                peak = max(peak, rss_kib(gw.pid))
            per_stream = (peak - before) / STREAMS
            assert per_stream < PER_STREAM_KIB, (before, peak, per_stream)
            # The target could write the kernel's socket buffers' worth (and
            # a relay's pipe), not the whole body.
            stalled = sorted(target.written)[-STREAMS:]
            assert max(stalled) < BODY, stalled
            for sock in opened:
                sock.close()
            opened.clear()
            after = peak
            for _ in range(40):  # memory comes back within 4 s of the load dropping
                await asyncio.sleep(0.1)
                after = rss_kib(gw.pid)
                if after < before + RETURNED_KIB:
                    break
            assert after < before + RETURNED_KIB, (before, peak, after)
    finally:
        for sock in opened:
            sock.close()
        await target.close()


class StalledTarget:
    """Takes request heads and never reads a body: a target that does not keep up."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.held: list[asyncio.StreamWriter] = []
        self.done = asyncio.Event()

    async def start(self) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        self.server = await asyncio.start_server(self.handle, sock=listener)
        port: int = listener.getsockname()[1]
        return port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held.append(writer)
        with contextlib.suppress(
            OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError
        ):
            await reader.readuntil(b"\r\n\r\n")
            async with asyncio.timeout(60):
                await self.done.wait()

    async def close(self) -> None:
        self.done.set()
        for writer in self.held:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def fast_uploader(host: str, port: int, opened: list[socket.socket], seconds: float) -> int:
    """Sends a chunked body as fast as the gateway takes it, for `seconds`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    opened.append(sock)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    await loop.sock_sendall(
        sock, b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"%x\r\n%b\r\n" % (256 * 1024, bytes(256 * 1024))
    sent = 0
    end = loop.time() + seconds
    with contextlib.suppress(TimeoutError, OSError):
        while loop.time() < end and sent < BODY:
            async with asyncio.timeout(max(0.01, end - loop.time())):
                await loop.sock_sendall(sock, piece)
            sent += len(piece)
    return sent


async def test_uploads_to_a_stalled_target_cost_one_read_each(tmp_path: Path) -> None:
    target = StalledTarget()
    port = await target.start()
    opened: list[socket.socket] = []
    try:
        async with run_gateway(tmp_path, config(port)) as gw:
            proxy = URL(gw.url)
            assert proxy.host is not None
            assert proxy.port is not None
            await asyncio.wait_for(fast_uploader(proxy.host, proxy.port, opened, 0.3), 10)
            opened.pop().close()
            await asyncio.sleep(0.5)
            before = rss_kib(gw.pid)
            peak = before
            async with asyncio.timeout(30):
                uploads = asyncio.gather(
                    *(fast_uploader(proxy.host, proxy.port, opened, 2.0) for _ in range(STREAMS))
                )
                while not uploads.done():
                    await asyncio.sleep(0.1)
                    peak = max(peak, rss_kib(gw.pid))
                sent = await uploads
            for _ in range(5):
                await asyncio.sleep(0.1)
                peak = max(peak, rss_kib(gw.pid))
            assert min(sent) > 0, sent
            per_stream = (peak - before) / STREAMS
            # Before: a 256 KiB body high-water, one read past it and the
            # target transport's buffer, 850-900 KiB per upload
            # (bench/slow_streams.py); then a 256 KiB read and an unsent
            # piece; now a read of 16-32 KiB and an unsent piece of as much:
            # the rest of each upload waits in the kernel, taken from the
            # client only as TCP flow control lets it.
            assert per_stream < UPLOAD_KIB, (before, peak, per_stream)
            # The clients give up (reset: a close would queue its FIN behind
            # the unsent body, and TCP keeps delivering that). Though their
            # sockets are not being read (the target takes nothing), the
            # gateway notices, ends the uploads and gives the memory back.
            for sock in opened:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            opened.clear()
            after = peak
            for _ in range(50):
                await asyncio.sleep(0.1)
                after = rss_kib(gw.pid)
                if after < before + RETURNED_KIB:
                    break
            assert after < before + RETURNED_KIB, (before, peak, after)
    finally:
        for sock in opened:
            sock.close()
        await target.close()
