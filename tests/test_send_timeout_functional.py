"""A client that stops reading its response: cut after `client_timeout`.

The contract's `server.client_timeout` bounds how long "a response the client
does not read may stall" (nginx's `send_timeout`): after that long with no
progress the gateway aborts the client connection and closes, never pools,
the target's. Both ways a body leaves the gateway are pinned: copied through
Python (a chunked body) and spliced (a Content-Length body of at least
`splice.MIN_BYTES`). The client holds a small receive buffer, so the bodies
(64 MiB) cannot hide in socket buffers.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from aiohttp import web

from gateway.wire import splice
from tests.conftest import GatewayFactory, UpstreamFactory, one_upstream_config, wait_for
from tests.wire import read_head

MiB = 1024 * 1024
BODY_BYTES = 64 * MiB
CLIENT_TIMEOUT = 1.0
# From the moment the client stops reading: the buffers on the way fill in a
# moment, then the gateway waits CLIENT_TIMEOUT without progress and cuts.
MARGIN = 3.0


def streaming_app(chunked: bool, events: dict[str, asyncio.Event]) -> web.Application:
    """GET /big: BODY_BYTES in 1 MiB writes, chunked or with Content-Length.

    `events["gone"]` is set when the gateway drops the connection mid-body
    (the handler's write fails or it is cancelled), `events["whole"]` if the
    body was ever taken whole (it must not be).
    """

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if not chunked:
            response.content_length = BODY_BYTES
        await response.prepare(request)
        block = b"z" * MiB
        try:
            for _ in range(BODY_BYTES // MiB):
                await response.write(block)
        except (ConnectionError, asyncio.CancelledError):
            events["gone"].set()
            raise
        events["whole"].set()
        return response

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_get("/big", big)
    return app


async def non_reading_client(
    host: str, port: int, rcvbuf: int = 4096
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a small receive buffer that asks for /big, reads the head
    and then nothing. (Keep the writer: a collected one closes the connection.)"""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        await loop.sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        status_line, _ = await read_head(reader)
    assert status_line.startswith("HTTP/1.1 200 ")
    return reader, writer


async def read_to_the_end(reader: asyncio.StreamReader) -> int:
    """Read until EOF or reset, bounded; how many body bytes arrived."""
    got = 0
    async with asyncio.timeout(10):
        while True:
            try:
                chunk = await reader.read(MiB)
            except ConnectionError:
                return got
            if not chunk:
                return got
            got += len(chunk)


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts of bytes asked of each real Relay.run call (a spy, not a stub)."""
    calls: list[int] = []
    real_run = splice.Relay.run

    async def counting_run(
        self: splice.Relay,
        source: splice.SocketDup,
        sink: splice.SocketDup,
        count: int,
        **kwargs: float | None,
    ) -> int:
        calls.append(count)
        return await real_run(self, source, sink, count, **kwargs)

    monkeypatch.setattr(splice.Relay, "run", counting_run)
    return calls


@pytest.mark.parametrize("chunked", [True, False], ids=["copied-chunked", "spliced-length"])
async def test_a_client_that_stops_reading_is_cut_after_client_timeout_and_the_target_closed(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    runs: list[int],
    chunked: bool,
) -> None:
    events = {"gone": asyncio.Event(), "whole": asyncio.Event()}
    upstream = await start_upstream(streaming_app(chunked, events))
    gw = await make_gateway(
        f'[server]\nlisten = ["127.0.0.1:0"]\nadmin = ""\nclient_timeout = {CLIENT_TIMEOUT}\n'
        + one_upstream_config(upstream.port, "read_timeout = 2")
    )
    loop = asyncio.get_running_loop()
    reader, writer = await non_reading_client(gw.host, gw.port)
    try:
        stopped_at = loop.time()
        async with asyncio.timeout(CLIENT_TIMEOUT + MARGIN):
            await events["gone"].wait()
        cut_after = loop.time() - stopped_at
        # Not before client_timeout without progress has passed.
        assert cut_after >= CLIENT_TIMEOUT * 0.9
        # The client's connection ends too: what was in flight, then EOF or RST.
        received = await read_to_the_end(reader)
        assert received < BODY_BYTES
    finally:
        writer.close()
    assert not events["whole"].is_set()
    assert len(runs) == (0 if chunked else 1)
    # The target's connection was closed, not pooled.
    pool = gw.gateway.box.snapshot.pools["app"] if gw.gateway.box else None
    assert pool is not None
    await wait_for(lambda: pool.client.open_count == 0)
    await wait_for(lambda: bool(gw.log_lines()))
    entry = json.loads(gw.log_lines()[-1])
    # The status the client was sent (the response had begun), cut on its account.
    assert (entry["status"], entry["aborted"]) == (200, "client")
    assert entry["error"] == "client_timeout"
    assert 0 < entry["bytes_out"] < BODY_BYTES


@pytest.mark.parametrize("chunked", [True, False], ids=["copied-chunked", "spliced-length"])
async def test_a_slow_client_that_keeps_reading_is_not_cut(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, runs: list[int], chunked: bool
) -> None:
    """The timeout is for a stall, not for the whole response (nginx's
    send_timeout): a client reading 4 MiB over several times client_timeout,
    a little at a time, gets all of it. Its reads free less than the third of
    the gateway's (loopback-sized) send buffer after which Linux reports the
    socket writable, so progress must be seen in the send queue itself."""
    size = 4 * MiB

    async def medium(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if not chunked:
            response.content_length = size
        await response.prepare(request)
        for _ in range(size // (256 * 1024)):
            await response.write(b"m" * (256 * 1024))
        return response

    app = web.Application()
    app.router.add_get("/big", medium)
    upstream = await start_upstream(app)
    gw = await make_gateway(
        '[server]\nlisten = ["127.0.0.1:0"]\nadmin = ""\nclient_timeout = 0.3\n'
        + one_upstream_config(upstream.port)
    )
    reader, writer = await non_reading_client(gw.host, gw.port, rcvbuf=32 * 1024)
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = 0
    tail = b""
    try:
        async with asyncio.timeout(20):
            # A Content-Length body ends at its size; a chunked one (the
            # gateway frames its own chunks) at the last-chunk marker.
            while got < size if not chunked else not tail.endswith(b"\r\n0\r\n\r\n"):
                chunk = await reader.read(64 * 1024)
                assert chunk, f"closed after {got} bytes"
                got += len(chunk)
                tail = (tail + chunk)[-16:]
                await asyncio.sleep(0.02)  # a few MB/s at most: over 1 s in all
    finally:
        writer.close()
    assert loop.time() - started > 3 * 0.3
    assert got == size if not chunked else got > size
    assert len(runs) == (0 if chunked else 1)
    entry = json.loads(gw.log_lines()[-1])
    assert entry["status"] == 200
    assert entry["error"] is None
