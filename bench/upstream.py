"""A fast loopback HTTP/1.1 upstream for the benchmarks (raw asyncio.Protocol).

    python bench/upstream.py --port 9000 [--loop uvloop|asyncio] [--max-seconds 900]

It must never be the bottleneck, so it is a hand-written protocol, not a framework:

- any small request (no body)    -> 200 "hello", keep-alive
- GET /bytes/N                   -> N bytes, Content-Length set, written in 256 KiB slices
                                    of one preallocated buffer, with transport backpressure
- POST /sink[?hash=1]            -> reads and discards the body (Content-Length or chunked),
                                    answers {"bytes": N} (+ "sha256" with ?hash=1)

The body of /bytes/N is the repeating pattern 00 01 .. ff, so a client can check what it
received without a second copy (bench/bulk.py --verify). Requests with a body on any
other path are read and answered "hello". The server exits by itself after
--max-seconds, or when its parent process goes away, so it never outlives a bench run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
from typing import Final, cast

CHUNK_SIZE: Final = 256 * 1024
CHUNK: Final = bytes(range(256)) * (CHUNK_SIZE // 256)
CHUNK_VIEW: Final = memoryview(CHUNK)
MAX_HEAD: Final = 64 * 1024

HELLO: Final = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
BAD_REQUEST: Final = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

# Parser states.
HEAD: Final = 0  # waiting for a request head
BODY: Final = 1  # Content-Length body: `remaining` bytes left
CHUNK_LINE: Final = 2  # chunked: waiting for a chunk-size line
CHUNK_DATA: Final = 3  # chunked: `remaining` bytes of chunk data left
CHUNK_END: Final = 4  # chunked: waiting for the CRLF after chunk data
TRAILER: Final = 5  # chunked: trailer lines until an empty one
SENDING: Final = 6  # writing a /bytes/N response; input is buffered meanwhile
CLOSED: Final = 7


class UpstreamProtocol(asyncio.Protocol):
    """One client connection; HTTP/1.1 keep-alive, pipelining tolerated."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = HEAD
        self.remaining = 0
        self.keep_alive = True
        self.sink = False
        self.received = 0
        self.hasher: hashlib._Hash | None = None
        self.send_remaining = 0
        self.paused = False

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look-alikes.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=4 * CHUNK_SIZE, low=CHUNK_SIZE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.state == SENDING and self._pump():
            self._sent()

    def data_received(self, data: bytes) -> None:
        # Fast path: one complete small request in one segment, nothing pending.
        if (
            self.state == HEAD
            and not self.buf
            and data.endswith(b"\r\n\r\n")
            and data.find(b"\r\n\r\n") == len(data) - 4
        ):
            self._on_head(data[:-4])
            if self.state == HEAD or self.state == SENDING or self.state == CLOSED:
                return
            data = b""
        self._feed(data)

    # -- parsing -------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        end = len(data)
        while True:
            state = self.state
            if state in (BODY, CHUNK_DATA):
                if pos >= end:
                    return
                take = min(self.remaining, end - pos)
                self._consume(view[pos : pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    if state == BODY:
                        self._body_done()
                    else:
                        self.state = CHUNK_END
                continue
            if state in (SENDING, CLOSED):
                if pos < end and state == SENDING:
                    self.buf += view[pos:]
                return
            # Line-oriented states work on self.buf.
            if pos < end:
                self.buf += view[pos:]
                pos = end
            if state == HEAD:
                idx = self.buf.find(b"\r\n\r\n")
                if idx < 0:
                    if len(self.buf) > MAX_HEAD:
                        self._bad()
                    return
                head = bytes(self.buf[:idx])
                del self.buf[: idx + 4]
                self._on_head(head)
            else:
                idx = self.buf.find(b"\r\n")
                if idx < 0:
                    if len(self.buf) > MAX_HEAD:
                        self._bad()
                    return
                line = bytes(self.buf[:idx])
                del self.buf[: idx + 2]
                if state == CHUNK_LINE:
                    try:
                        size = int(line.split(b";", 1)[0].strip(), 16)
                    except ValueError:
                        self._bad()
                        return
                    if size == 0:
                        self.state = TRAILER
                    else:
                        self.remaining = size
                        self.state = CHUNK_DATA
                elif state == CHUNK_END:
                    if line:
                        self._bad()
                        return
                    self.state = CHUNK_LINE
                elif not line:  # TRAILER: an empty line ends the body
                    self._body_done()
            # Whatever is left in buf goes back through the state machine.
            if self.state in (BODY, CHUNK_DATA) and self.buf:
                data = bytes(self.buf)
                self.buf.clear()
                view = memoryview(data)
                pos = 0
                end = len(data)

    def _on_head(self, head: bytes) -> None:
        line_end = head.find(b"\r\n")
        request_line = head if line_end < 0 else head[:line_end]
        parts = request_line.split(b" ")
        if len(parts) != 3:
            self._bad()
            return
        method, target, version = parts
        self.keep_alive = version == b"HTTP/1.1"
        content_length = 0
        chunked = False
        expect = False
        if line_end >= 0:
            lower = head[line_end:].lower()
            if (
                b"\r\ncontent-length:" in lower
                or b"\r\ntransfer-encoding:" in lower
                or b"\r\nconnection:" in lower
                or b"\r\nexpect:" in lower
            ):
                for line in lower.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    value = value.strip()
                    if name == b"content-length":
                        try:
                            content_length = int(value)
                        except ValueError:
                            self._bad()
                            return
                    elif name == b"transfer-encoding":
                        chunked = b"chunked" in value
                    elif name == b"connection":
                        if b"close" in value:
                            self.keep_alive = False
                        elif b"keep-alive" in value:
                            self.keep_alive = True
                    elif name == b"expect":
                        expect = value == b"100-continue"
        path, _, query = target.partition(b"?")
        transport = self.transport
        if transport is None:
            return
        if chunked or content_length > 0:
            self.sink = path == b"/sink"
            self.received = 0
            self.hasher = hashlib.sha256() if self.sink and b"hash=1" in query else None
            if expect:
                transport.write(CONTINUE)
            if chunked:
                self.state = CHUNK_LINE
            else:
                self.remaining = content_length
                self.state = BODY
            return
        if path.startswith(b"/bytes/") and method in (b"GET", b"HEAD"):
            try:
                size = int(path[7:])
            except ValueError:
                self._bad()
                return
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % size
            )
            if method == b"GET" and size > 0:
                self.send_remaining = size
                self.state = SENDING
                if self._pump():
                    self.state = HEAD
                    self._maybe_close()
            else:
                self._maybe_close()
            return
        if path == b"/sink":
            self.sink = True
            self.received = 0
            self.hasher = hashlib.sha256() if b"hash=1" in query else None
            self._body_done()
            return
        transport.write(HELLO)
        self._maybe_close()

    # -- bodies --------------------------------------------------------------

    def _consume(self, chunk: memoryview) -> None:
        self.received += len(chunk)
        if self.hasher is not None:
            self.hasher.update(chunk)

    def _body_done(self) -> None:
        self.state = HEAD
        transport = self.transport
        if transport is None:
            return
        if self.sink:
            answer: dict[str, object] = {"bytes": self.received}
            if self.hasher is not None:
                answer["sha256"] = self.hasher.hexdigest()
            body = json.dumps(answer).encode()
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        else:
            transport.write(HELLO)
        self.hasher = None
        self._maybe_close()

    def _pump(self) -> bool:
        """Write /bytes/N slices until done (True) or the transport pushes back."""
        transport = self.transport
        if transport is None:
            return False
        while self.send_remaining > 0 and not self.paused:
            if self.send_remaining >= CHUNK_SIZE:
                transport.write(CHUNK)
                self.send_remaining -= CHUNK_SIZE
            else:
                transport.write(CHUNK_VIEW[: self.send_remaining])
                self.send_remaining = 0
        return self.send_remaining == 0

    def _sent(self) -> None:
        self.state = HEAD
        if self._maybe_close():
            return
        if self.buf:
            self._feed(b"")

    def _maybe_close(self) -> bool:
        if not self.keep_alive and self.transport is not None:
            self.state = CLOSED
            self.transport.close()
            return True
        return False

    def _bad(self) -> None:
        self.state = CLOSED
        if self.transport is not None:
            self.transport.write(BAD_REQUEST)
            self.transport.close()


async def serve(host: str, port: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = await loop.create_server(UpstreamProtocol, sock=sock, backlog=4096)
    parent = os.getppid()
    deadline = loop.time() + max_seconds
    async with server:
        # Bounded: stops on a signal, at the deadline, or when orphaned.
        while not stop.is_set() and loop.time() < deadline and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost"):
        parser.error("loopback only")
    factory = None
    if args.loop == "uvloop":
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.host, args.port, args.max_seconds))


if __name__ == "__main__":
    main()
