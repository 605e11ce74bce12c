"""Zero-copy bodies (gateway/splice.py) end to end: real upstreams, real sockets.

Content-Length bodies of at least `splice.MIN_BYTES` skip Python: the gateway
splices them socket to socket. These tests pin that the path is taken (a spy
counts the real relay's calls) and that everything the copying path
guarantees still holds on it: bytes intact, keep-alive upstream, the client's
connection kept alive after a spliced upload, aborts visible, timeouts enforced.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import io
import json
import os
import socket
import struct
import termios
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar

import aiohttp
import pytest
from aiohttp import web

from gateway.wire import splice
from tests.conftest import GatewayFactory, UpstreamFactory, one_upstream_config, wait_for
from tests.gateway_process import SERVER_HEADER, run_gateway
from tests.test_splice import held_buffer_sizes
from tests.wire import hash_sink, read_response

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="splice(2) is Linux-only")

MiB = 1024 * 1024
SIZE = 3 * MiB + 12345  # not a multiple of any buffer size
PATTERN = bytes(range(256)) * (SIZE // 256 + 1)
BODY = PATTERN[:SIZE]


@pytest.fixture
def relays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts of bytes asked of each real Relay.run call (a spy, not a stub)."""
    calls: list[int] = []
    real = splice.Relay.run

    async def spy(
        self: splice.Relay,
        source: splice.SocketDup,
        sink: splice.SocketDup,
        count: int,
        **kwargs: float | None,
    ) -> int:
        calls.append(count)
        return await real(self, source, sink, count, **kwargs)

    monkeypatch.setattr(splice.Relay, "run", spy)
    return calls


def bytes_app(peers: list[object]) -> web.Application:
    """GET /bytes/N: N pattern bytes with Content-Length; POST /sink: size + sha256."""

    async def serve(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        size = int(request.match_info["size"])
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        sent = 0
        while sent < size:
            piece = PATTERN[: min(256 * 1024, size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/bytes/{size}", serve)
    app.router.add_post("/sink", hash_sink)
    return app


async def test_large_download_is_spliced_intact_and_the_target_connection_reused(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, relays: list[int]
) -> None:
    peers: list[object] = []
    upstream = await start_upstream(bytes_app(peers))
    gw = await make_gateway(one_upstream_config(upstream.port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    for size in (SIZE, SIZE, 100):  # the small one: the next response parses cleanly
        writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = await read_response(reader)
        assert status == 200
        assert headers["content-length"] == str(size)
        assert body == PATTERN[:size]
    writer.close()
    assert len(relays) == 2
    assert all(splice.MIN_BYTES <= count <= SIZE for count in relays)
    # One upstream connection for all three: the parser was reset after each splice.
    assert len(peers) == 3
    assert len(set(map(str, peers))) == 1
    log = [json.loads(line) for line in gw.log_lines()]
    assert [entry["bytes_out"] for entry in log] == [SIZE, SIZE, 100]


async def test_a_spliced_upload_goes_on_a_fresh_target_connection(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, relays: list[int]
) -> None:
    # A pooled connection's receive window is what its earlier small
    # exchanges made it (see h1client ConnectionPool.request); small requests
    # still reuse connections, the upload's included once it is done.
    peers: list[str] = []

    async def small(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(str(request.transport.get_extra_info("peername")))
        return web.Response(text="ok")

    async def sink(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(str(request.transport.get_extra_info("peername")))
        return await hash_sink(request)

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_post("/sink", sink)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    small_get = b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(small_get)
    assert (await read_response(reader))[0] == 200
    writer.write(f"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n".encode())
    writer.write(BODY)
    status, _, body = await read_response(reader)
    assert status == 200
    assert json.loads(body)["sha256"] == hashlib.sha256(BODY).hexdigest()
    writer.write(small_get)
    assert (await read_response(reader))[0] == 200
    writer.close()
    assert len(relays) == 1  # the upload was spliced
    first, upload, last = peers
    assert upload != first  # not the idle pooled connection
    assert last in (first, upload)  # small requests reuse the pool


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
async def test_large_upload_is_spliced_intact_and_the_connection_serves_the_next_request(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    relays: list[int],
    expect: bool,
) -> None:
    upstream = await start_upstream(bytes_app([]))
    gw = await make_gateway(one_upstream_config(upstream.port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    head = f"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n"
    if expect:
        writer.write((head + "Expect: 100-continue\r\n\r\n").encode())
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(BODY)
    else:
        writer.write((head + "\r\n").encode() + BODY)
    status, headers, body = await read_response(reader)
    assert status == 200
    assert json.loads(body) == {"size": SIZE, "sha256": hashlib.sha256(BODY).hexdigest()}
    assert "connection" not in headers  # kept alive
    assert json.loads(gw.log_lines()[-1])["bytes_in"] == SIZE
    # The parser skipped the spliced bytes: the next request on the same
    # connection, pipelined right behind another upload, parses cleanly.
    second = f"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n".encode()
    writer.write(second + BODY + b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200
    assert json.loads(body)["sha256"] == hashlib.sha256(BODY).hexdigest()
    status, _, body = await read_response(reader)
    assert (status, body) == (200, PATTERN[:10])
    writer.close()
    assert len(relays) == 2


async def download_then_upload(host: str, port: int) -> object:
    """GET then POST a SIZE body on one connection, both checked whole; the
    client's own address is returned."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /bytes/{SIZE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _, body = await read_response(reader)
    assert (status, body) == (200, BODY)
    writer.write(f"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n".encode())
    writer.write(BODY)
    status, _, body = await read_response(reader)
    assert status == 200
    assert json.loads(body) == {"size": SIZE, "sha256": hashlib.sha256(BODY).hexdigest()}
    address: object = writer.get_extra_info("sockname")
    writer.close()
    return address


@pytest.fixture
def fitted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, int, object, int]]:
    """After each real fit_short_path_buffers call: (source peer, its receive
    buffer, destination peer, its send buffer), read from the sockets."""
    seen: list[tuple[object, int, object, int]] = []
    real = splice.fit_short_path_buffers

    def spy(src_fd: int, dst_fd: int) -> None:
        real(src_fd, dst_fd)
        src, dst = socket.socket(fileno=src_fd), socket.socket(fileno=dst_fd)
        try:
            seen.append(
                (
                    src.getpeername(),
                    src.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                    dst.getpeername(),
                    dst.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                )
            )
        finally:
            src.detach()
            dst.detach()

    monkeypatch.setattr(splice, "fit_short_path_buffers", spy)
    return seen


async def test_spliced_bodies_on_loopback_hold_both_socket_buffers_to_the_bound(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    fitted: list[tuple[object, int, object, int]],
) -> None:
    upstream = await start_upstream(bytes_app([]))
    gw = await make_gateway(one_upstream_config(upstream.port))
    client = await download_then_upload(gw.host, gw.port)
    target = (gw.host, upstream.port)
    rcv, snd = held_buffer_sizes()
    # Each relay holds its source's receive buffer and its destination's send buffer.
    assert fitted == [(target, rcv, client, snd), (client, rcv, target, snd)]


async def test_small_bodies_are_not_spliced(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    relays: list[int],
) -> None:
    upstream = await start_upstream(bytes_app([]))
    gw = await make_gateway(one_upstream_config(upstream.port))
    small = splice.MIN_BYTES - 1
    async with client.get(f"{gw.url}/bytes/{small}") as resp:
        assert await resp.read() == PATTERN[:small]
    async with client.post(gw.url + "/sink", data=BODY[:small]) as resp:
        assert (await resp.json())["size"] == small
        assert resp.headers.get("Connection", "").lower() != "close"
    assert relays == []


async def test_target_reset_mid_spliced_download_aborts_the_client_transfer(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    relays: list[int],
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 8 * MiB
        await response.prepare(request)
        await response.write(b"x" * MiB)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    app = web.Application()
    app.router.add_get("/broken", broken)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))
    async with client.get(gw.url + "/broken") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert len(relays) == 1
    assert json.loads(gw.log_lines()[-1])["error"] == "upstream_aborted"
    async with client.get(gw.url + "/broken") as resp:  # still serving
        assert resp.status == 200


async def test_target_silent_mid_spliced_download_is_cut_after_read_timeout(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    relays: list[int],
) -> None:
    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 8 * MiB
        await response.prepare(request)
        await response.write(b"x" * MiB)
        await asyncio.sleep(30)
        return response

    app = web.Application()
    app.router.add_get("/stalls", stalls)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port, "read_timeout = 0.3"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.get(gw.url + "/stalls") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert loop.time() - started < 5
    assert len(relays) == 1


async def test_client_gone_mid_spliced_download_closes_the_target_connection(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, relays: list[int]
) -> None:
    upstream_saw_close = asyncio.Event()

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1024 * MiB
        await response.prepare(request)
        try:
            for _ in range(1024):
                await response.write(b"y" * MiB)
        except (ConnectionError, asyncio.CancelledError):
            upstream_saw_close.set()
            raise
        return response

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_get("/big", big)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readexactly(2 * MiB)
    writer.transport.abort()
    async with asyncio.timeout(10):
        await upstream_saw_close.wait()
    assert len(relays) == 1
    pool = gw.gateway.box.snapshot.pools["app"] if gw.gateway.box else None
    assert pool is not None
    await wait_for(lambda: pool.targets[0].in_flight == 0)


async def test_client_silent_mid_spliced_upload_gets_408_and_the_target_an_aborted_body(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, relays: list[int]
) -> None:
    target_saw: list[str] = []

    async def sink(request: web.Request) -> web.Response:
        try:
            async for _ in request.content.iter_any():
                pass
        except (aiohttp.ClientError, ConnectionError, asyncio.CancelledError) as exc:
            target_saw.append(type(exc).__name__)
            raise
        target_saw.append("whole body")
        return web.Response(text="unexpected")

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_post("/sink", sink)
    upstream = await start_upstream(app)
    gw = await make_gateway(
        '[server]\nlisten = ["127.0.0.1:0"]\nadmin = ""\nclient_timeout = 0.5\n'
        + one_upstream_config(upstream.port)
    )
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(f"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n".encode())
    writer.write(BODY[: 2 * MiB])  # then silence
    async with asyncio.timeout(10):
        status, headers, body = await read_response(reader)
        assert status == 408
        assert json.loads(body)["error"] == "client_timeout"
        assert headers["connection"].lower() == "close"
        await wait_for(lambda: bool(target_saw))
    assert target_saw != ["whole body"]
    assert len(relays) == 1
    writer.close()


async def test_target_that_stops_reading_a_spliced_upload_gets_504(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, relays: list[int]
) -> None:
    test_over = asyncio.Event()

    async def never_reads(request: web.Request) -> web.Response:
        # Its socket is not read either (aiohttp paused it, buffer full), so
        # this handler cannot see the gateway close: the test ends it.
        await test_over.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/sink", never_reads)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port, "read_timeout = 0.5"))
    size = 256 * MiB  # far more than the socket buffers on both hops hold
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(f"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())

    async def send_until_refused() -> None:
        block = b"z" * MiB
        for _ in range(size // MiB):
            writer.write(block)
            await writer.drain()

    sending = asyncio.create_task(send_until_refused())
    async with asyncio.timeout(10):
        status, _, body = await read_response(reader)
    assert status == 504
    assert json.loads(body)["error"] == "upstream_timeout"
    writer.transport.abort()
    (sent,) = await asyncio.gather(sending, return_exceptions=True)
    assert sent is not None  # the body was never taken whole
    assert len(relays) == 1
    # The gateway dropped its connection to the target (never pooled).
    pool = gw.gateway.box.snapshot.pools["app"] if gw.gateway.box else None
    assert pool is not None
    assert pool.client.open_count == 0
    test_over.set()


async def test_target_answering_early_to_a_spliced_upload_reaches_a_client_still_sending(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, relays: list[int]
) -> None:
    async def refuses(request: web.Request) -> web.Response:
        return web.Response(status=403, text="not for me")

    app = web.Application()
    app.router.add_post("/sink", refuses)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    size = 64 * MiB
    writer.write(f"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())

    async def keep_sending() -> None:
        # Slowly, as a real client on a slower link: still sending when the
        # answer comes, so closing at once would reset the answer away.
        for _ in range(size // (64 * 1024)):
            writer.write(b"q" * (64 * 1024))
            await writer.drain()
            await asyncio.sleep(0.002)

    sending = asyncio.create_task(keep_sending())
    async with asyncio.timeout(10):
        status, headers, body = await read_response(reader)
    assert status == 403
    assert body == b"not for me"
    assert headers["connection"] == "close"  # the rest of the body is not read
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
    writer.transport.abort()
    assert splice.Relay.active == 0


async def _through_subprocess(
    tmp_path: Path, upstream_port: int | None, check: Callable[[str], Awaitable[None]]
) -> None:
    toml = SERVER_HEADER + one_upstream_config(upstream_port)
    async with run_gateway(tmp_path, toml) as gw:  # --loop auto: uvloop when installed
        await check(gw.url)


async def test_spliced_bodies_on_the_default_event_loop_of_the_real_process(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    """The same paths under `gateway run` (uvloop), whose transports differ."""
    upstream = await start_upstream(bytes_app([]))
    size = 64 * MiB + 7
    payload = os.urandom(MiB) * 64 + b"1234567"

    async def check(url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            async with session.get(f"{url}/bytes/{size}") as resp:
                digest = hashlib.sha256()
                async for chunk in resp.content.iter_any():
                    digest.update(chunk)
            expected = hashlib.sha256()
            for start in range(0, size, 256 * 1024):
                expected.update(PATTERN[: min(256 * 1024, size - start)])
            assert digest.hexdigest() == expected.hexdigest()
            async with session.post(f"{url}/sink", data=io.BytesIO(payload)) as resp:
                seen = await resp.json()
            assert seen == {"size": size, "sha256": hashlib.sha256(payload).hexdigest()}

    await _through_subprocess(tmp_path, upstream.port, check)


async def test_bodies_are_copied_when_no_relay_can_be_had(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    relays: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(splice, "MAX_ACTIVE", 0)  # as when 32 relays are running
    upstream = await start_upstream(bytes_app([]))
    gw = await make_gateway(one_upstream_config(upstream.port))
    await download_then_upload(gw.host, gw.port)
    assert relays == []


# -- a target that resets a spliced upload it never read --------------------------------
#
# The gateway's upload path holds the target socket's descriptor across awaits
# (flushing the body bytes read before the hand-over). When the target resets,
# asyncio closes that descriptor; the number is free for the next socket the
# process opens, a new client's. Only a duplicate taken at once keeps naming
# the target's socket (splice.py).

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class ResettingTarget:
    """A raw target on 127.0.0.1 that accepts, reads nothing, and resets on cue.

    Its listening socket advertises a small MSS (the 1460 bytes of a real
    Ethernet path instead of loopback's 64 KiB) and a small receive buffer, so
    the gateway's send buffer to it stays small, as on a real network: a few
    hundred KiB of body cannot leave the gateway's transport at once, which is
    the window in which the reset must land.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]

    async def reset_next_once_body_arrives(self) -> None:
        """Accept one connection, wait (bounded) until body bytes sit unread
        in its receive queue (the gateway is flushing a spliced body), reset it."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10):
            conn, _ = await loop.sock_accept(self.sock)
        try:
            await wait_for(lambda: _unread(conn) >= 1024, within=10)  # the head is ~100 bytes
        finally:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in `sock`'s receive queue (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])


def _upload_head(size: int) -> bytes:
    return f"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()


async def test_target_resetting_an_unread_spliced_upload_gets_502_json_not_500(
    make_gateway: GatewayFactory, relays: list[int]
) -> None:
    target = ResettingTarget()
    try:
        gw = await make_gateway(one_upstream_config(target.port))
        for _ in range(3):
            reader, writer = await asyncio.open_connection(gw.host, gw.port)
            writer.write(_upload_head(2 * MiB) + b"a" * (2 * MiB))
            await target.reset_next_once_body_arrives()
            async with asyncio.timeout(10):
                status, headers, body = await read_response(reader)
            writer.transport.abort()
            assert status == 502, body
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["error"] == "bad_gateway"
        assert len(relays) <= 3  # the reset may come before the relay ran
        await wait_for(lambda: splice.Relay.active == 0)
        log = [json.loads(line) for line in gw.log_lines()]
        assert [entry["status"] for entry in log] == [502, 502, 502]
    finally:
        target.close()


async def test_a_new_client_never_receives_the_upload_a_reset_target_left(
    tmp_path: Path,
) -> None:
    """The reviewer's leak, in the real process (uvloop, its own descriptor
    table): while a target resets an upload it never read, new clients keep
    arriving; each must get its own response and nothing else."""
    target = ResettingTarget()
    loop = asyncio.get_running_loop()
    ok_server = await loop.create_server(StrictOkTarget, "127.0.0.1", 0)
    ok_port = ok_server.sockets[0].getsockname()[1]
    toml = (
        SERVER_HEADER
        + one_upstream_config(
            target.port, extra_upstream="[upstreams.app.breaker]\nfailures = 1000"
        )
        + f"""
        [upstreams.ok]
        targets = ["http://127.0.0.1:{ok_port}"]

        [[routes]]
        name = "ok"
        path = "/ok"
        upstream = "ok"
        """
    )
    answers: list[bytes] = []
    statuses: list[int] = []
    try:
        async with run_gateway(tmp_path, toml) as gw:
            host, _, port = gw.url.removeprefix("http://").rpartition(":")

            async def bystander(delay: float) -> None:
                await asyncio.sleep(delay)
                reader, writer = await asyncio.open_connection(host, int(port))
                try:
                    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    async with asyncio.timeout(10):
                        answers.append(await reader.read(-1))
                finally:
                    writer.close()

            for _ in range(20):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(_upload_head(2 * MiB) + b"a" * (2 * MiB))
                # New clients around the reset, one every 0.2 ms for 6 ms.
                crowd = [asyncio.create_task(bystander(i * 0.0002)) for i in range(30)]
                await target.reset_next_once_body_arrives()
                async with asyncio.timeout(10):
                    status, _, _ = await read_response(reader)
                    await asyncio.gather(*crowd)
                writer.transport.abort()
                statuses.append(status)
    finally:
        ok_server.close()
        target.close()
    strangers = [answer[:40] for answer in answers if not _just_ok(answer)]
    assert strangers == []
    assert len(answers) == 20 * 30
    assert statuses == [502] * 20
    assert StrictOkTarget.garbage == []


def _just_ok(answer: bytes) -> bool:
    """Whether `answer` is one 200 response with body `ok` and nothing else."""
    head, _, body = answer.partition(b"\r\n\r\n")
    return (
        head.startswith(b"HTTP/1.1 200 OK\r\n")
        and b"\r\nContent-Length: 2\r\n" in head
        and body == b"ok"
    )


class StrictOkTarget(asyncio.Protocol):
    """Answers every request head with `ok`; keeps whatever is not a request
    (another client's upload reaching it would be) in `garbage`."""

    garbage: ClassVar[list[bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            if not head.startswith(b"GET /ok HTTP/1.1\r\n"):
                StrictOkTarget.garbage.append(head[:40])
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if len(self.buffer) > 16384:
            StrictOkTarget.garbage.append(self.buffer[:40])
            self.transport.abort()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _narrow_listener() -> socket.socket:
    """A listening socket whose connections take almost nothing: a 536-byte
    MSS (the gateway's send buffer is sized from it, about 40 KiB) and a
    tiny receive window, so a large request head stays in the gateway's
    transport, unsent, while the target answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def test_an_early_answer_before_a_spliced_upload_began_leaks_no_descriptor(
    make_gateway: GatewayFactory,
) -> None:
    """The target answers (and the gateway drops the connection) while the
    request head still waits to be flushed, so the upload's pour never
    starts: the relay's pipe, the client socket's duplicate and the Relay
    slot must still be released, and the client's connection closed (the
    duplicate kept it open)."""
    held: list[asyncio.StreamWriter] = []

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Reads nothing; holds the connection so the head stays unsent.
        held.append(writer)
        writer.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope"
        )
        await writer.drain()

    target = await asyncio.start_server(early, sock=_narrow_listener())
    try:
        port = target.sockets[0].getsockname()[1]
        gw = await make_gateway(one_upstream_config(port))
        baseline_relays = splice.Relay.active
        # 60 KiB of fields: under the head caps (16 KiB a field, 64 KiB in all).
        pad = b"".join(b"X-Pad-%d: " % i + b"p" * (15 * 1024) + b"\r\n" for i in range(4))
        head = _upload_head(MiB).replace(b"\r\n\r\n", b"\r\n" + pad + b"\r\n")
        rounds = 12
        fds_before = 0
        for attempt in range(rounds + 1):
            if attempt == 1:  # after one exchange: the pools and listeners settled
                fds_before = _open_fds()
            reader, writer = await asyncio.open_connection(gw.host, gw.port)
            try:
                writer.write(head)  # the body is never sent
                async with asyncio.timeout(10):
                    status, _, _ = await read_response(reader)
                    assert status == 413
                    # The gateway closes the client connection: nothing holds it.
                    assert await reader.read() == b""
            finally:
                writer.transport.abort()
        await wait_for(lambda: splice.Relay.active == baseline_relays)
        for writer in held:
            writer.transport.abort()
        await wait_for(lambda: _open_fds() <= fds_before)
    finally:
        target.close()
        for writer in held:
            writer.transport.abort()
