"""Raw-socket bulk client: one big download or upload, timed, result as one JSON line.

    python bench/bulk.py download --port P --size N [--path-prefix /x] [--verify]
    python bench/bulk.py upload   --port P --size N [--path-prefix /x] [--verify]

download: GET {prefix}/bytes/N, reads the body with recv_into() into one reused 1 MiB
buffer (Content-Length, chunked or read-to-EOF), counts it, and with --verify checks
every byte against the upstream's 00..ff pattern.
upload: POST {prefix}/sink with Content-Length N, the body streamed by sendall() from a
generator of 1 MiB slices of one preallocated buffer; with --verify the upstream hashes
the body (?hash=1) and the answer must match the client's own sha256.

The client is a blocking socket loop with no per-byte Python work, so on loopback it
moves several GB/s and is not the bottleneck. Every transfer has a hard deadline
(--deadline seconds, default 120) and a per-read socket timeout; it never hangs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Final

MIB: Final = 1024 * 1024
BUF_SIZE: Final = MIB
PATTERN: Final = bytes(range(256)) * (BUF_SIZE // 256 + 1)  # 1 MiB + 256 bytes
IO_TIMEOUT: Final = 30.0


@dataclass
class Result:
    op: str
    ok: bool
    status: int
    bytes: int
    seconds: float
    mb_per_s: float
    error: str | None = None
    verified: bool | None = None


class Deadline(Exception):
    pass


class Conn:
    """A blocking socket with a small read-ahead buffer for heads and chunk lines."""

    def __init__(self, host: str, port: int, deadline: float) -> None:
        self.deadline = deadline
        self.sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""
        self.buf = bytearray(BUF_SIZE)
        self.view = memoryview(self.buf)

    def close(self) -> None:
        self.sock.close()

    def check(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Deadline("deadline exceeded")
        self.sock.settimeout(min(IO_TIMEOUT, left))

    def recv_more(self) -> bytes:
        self.check()
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by peer")
        return data

    def read_until(self, marker: bytes, limit: int = 65536) -> bytes:
        while (idx := self.pending.find(marker)) < 0:
            if len(self.pending) > limit:
                raise ValueError(f"no {marker!r} within {limit} bytes")
            self.pending += self.recv_more()
        line, self.pending = self.pending[:idx], self.pending[idx + len(marker) :]
        return line

    def read_body(self, count: int | None, on_data: Verifier | None, offset: int) -> int:
        """Read `count` bytes (None: to EOF); returns bytes read."""
        got = 0
        if self.pending:
            take = len(self.pending) if count is None else min(count, len(self.pending))
            if on_data is not None:
                on_data.check(memoryview(self.pending)[:take], offset)
            self.pending = self.pending[take:]
            got += take
        while count is None or got < count:
            self.check()
            want = BUF_SIZE if count is None else min(BUF_SIZE, count - got)
            n = self.sock.recv_into(self.view[:want])
            if n == 0:
                if count is None:
                    break
                raise ConnectionError(f"connection closed after {got} of {count} body bytes")
            if on_data is not None:
                on_data.check(self.view[:n], offset + got)
            got += n
        return got


class Verifier:
    """Checks downloaded bytes against the upstream's repeating 00..ff pattern."""

    def __init__(self) -> None:
        self.ok = True
        self.pattern = memoryview(PATTERN)

    def check(self, data: memoryview, offset: int) -> None:
        start = offset % 256
        pos = 0
        while pos < len(data):
            step = min(len(data) - pos, BUF_SIZE)
            if data[pos : pos + step] != self.pattern[start : start + step]:
                self.ok = False
            pos += step
            start = (start + step) % 256


def read_head(conn: Conn) -> tuple[int, dict[str, str]]:
    while True:
        head = conn.read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 100:  # an interim 100 Continue is skipped
            return status, headers


def read_response_body(
    conn: Conn, headers: dict[str, str], verifier: Verifier | None
) -> tuple[int, bytes | None]:
    """Returns (body length, body bytes if small enough to keep)."""
    keep = verifier is None and int(headers.get("content-length", "0") or 0) <= 65536
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        kept = b""
        while True:
            size = int(conn.read_until(b"\r\n").split(b";")[0].strip(), 16)
            if size == 0:
                while conn.read_until(b"\r\n"):  # trailers, up to the empty line
                    pass
                break
            if keep and size <= 65536:
                while len(conn.pending) < size:
                    conn.pending += conn.recv_more()
                kept += conn.pending[:size]
                conn.pending = conn.pending[size:]
            else:
                keep = False
                conn.read_body(size, verifier, total)
            total += size
            conn.read_until(b"\r\n")
        return total, kept if keep else None
    if "content-length" in headers:
        length = int(headers["content-length"])
        if keep:
            while len(conn.pending) < length:
                conn.pending += conn.recv_more()
            body, conn.pending = conn.pending[:length], conn.pending[length:]
            return length, body
        return conn.read_body(length, verifier, 0), None
    return conn.read_body(None, verifier, 0), None


def download(host: str, port: int, prefix: str, size: int, verify: bool, deadline: float) -> Result:
    start = time.perf_counter()
    status = 0
    got = 0
    verifier = Verifier() if verify else None
    try:
        conn = Conn(host, port, deadline)
        try:
            request = f"GET {prefix}/bytes/{size} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
            conn.sock.sendall(request.encode())
            status, headers = read_head(conn)
            got, _ = read_response_body(conn, headers, verifier)
        finally:
            conn.close()
    except (OSError, ValueError, Deadline) as exc:
        seconds = time.perf_counter() - start
        return Result("download", False, status, got, seconds, got / 1e6 / seconds, repr(exc))
    seconds = time.perf_counter() - start
    ok = status == 200 and got == size and (verifier is None or verifier.ok)
    error = None if ok else f"status {status}, {got} of {size} bytes"
    return Result(
        "download",
        ok,
        status,
        got,
        seconds,
        got / 1e6 / seconds,
        error,
        None if verifier is None else verifier.ok,
    )


def body_chunks(size: int) -> Iterator[memoryview]:
    """The upload body: 1 MiB slices of one preallocated buffer (same 00..ff pattern)."""
    view = memoryview(PATTERN)[:BUF_SIZE]
    sent = 0
    while sent < size:
        step = min(BUF_SIZE, size - sent)
        yield view[:step]
        sent += step


def upload(host: str, port: int, prefix: str, size: int, verify: bool, deadline: float) -> Result:
    start = time.perf_counter()
    status = 0
    sent = 0
    hasher = hashlib.sha256() if verify else None
    try:
        conn = Conn(host, port, deadline)
        try:
            query = "?hash=1" if verify else ""
            request = (
                f"POST {prefix}/sink{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
            )
            conn.sock.sendall(request.encode())
            for chunk in body_chunks(size):
                conn.check()
                conn.sock.sendall(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                sent += len(chunk)
            status, headers = read_head(conn)
            _, body = read_response_body(conn, headers, None)
        finally:
            conn.close()
    except (OSError, ValueError, Deadline) as exc:
        seconds = time.perf_counter() - start
        return Result("upload", False, status, sent, seconds, sent / 1e6 / seconds, repr(exc))
    seconds = time.perf_counter() - start
    answer: dict[str, object] = {}
    with contextlib.suppress(ValueError):
        answer = json.loads(body or b"{}")
    counted = answer.get("bytes")
    verified = None if hasher is None else answer.get("sha256") == hasher.hexdigest()
    ok = status == 200 and counted == size and verified is not False
    error = None if ok else f"status {status}, upstream counted {counted} of {size} bytes"
    return Result("upload", ok, status, sent, seconds, sent / 1e6 / seconds, error, verified)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op", choices=("download", "upload"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--path-prefix", default="")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds, hard limit")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost"):
        parser.error("loopback only")
    deadline = time.monotonic() + args.deadline
    run = download if args.op == "download" else upload
    result = run(args.host, args.port, args.path_prefix, args.size, args.verify, deadline)
    print(json.dumps(asdict(result)), flush=True)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
