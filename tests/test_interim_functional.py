"""Interim (1xx) responses from a target, relayed: CONTRACT.md "Interim responses".

Raw targets on 127.0.0.1 write exact byte sequences (with delays); a raw
client reads every head with its arrival time, so a 103 can be seen to
arrive well before a final response the target holds back. RFC 9110 15.2: a
proxy forwards the 1xx it did not ask for, never to an HTTP/1.0 client, with
the hop-by-hop rules of any response; they are not the response (retries,
breakers, the logged status and the 64 KiB head limit see the final one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.wire.h1messages import Reply, Request
from gateway.wire.h1server import H1Server
from tests.conftest import GatewayFactory, RunningGateway, wait_for

HOST = "127.0.0.1"
WITHIN = 10.0  # every wait of a test is bounded by this
HINT = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# A step of a target's script: bytes to write, or seconds to wait.
Step = bytes | float


@dataclass
class Target:
    """A raw target answering each request on a connection with `script`."""

    script: Sequence[Step]
    port: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    endless: bytes = b""  # then written over and over, bounded, until cut
    written: int = 0
    cut: bool = False
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> Target:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            for _ in range(100):
                self.heads.append(await reader.readuntil(b"\r\n\r\n"))
                for step in self.script:
                    if isinstance(step, bytes):
                        writer.write(step)
                        await writer.drain()
                    else:
                        await asyncio.sleep(step)
                if self.endless:
                    await self._stream(writer)
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        deadline = time.monotonic() + WITHIN
        try:
            while self.written < 32 * 1024 * 1024 and time.monotonic() < deadline:
                writer.write(self.endless)
                await writer.drain()
                self.written += len(self.endless)
        except ConnectionError:
            self.cut = True

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await self._server.wait_closed()


@pytest.fixture
async def target() -> AsyncIterator[Callable[..., Awaitable[Target]]]:
    made: list[Target] = []

    async def factory(*script: Step, endless: bytes = b"") -> Target:
        made.append(await Target(script, endless=endless).start())
        return made[-1]

    yield factory
    for one in made:
        await one.close()


def config(*urls: str, retries: int = 1, failures: int = 5) -> str:
    listed = ", ".join(f'"{url}"' for url in urls)
    return f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = "127.0.0.1:0"
        access_log = "json"

        [upstreams.app]
        targets = [{listed}]
        [upstreams.app.breaker]
        failures = {failures}
        cooldown = 30.0

        [[routes]]
        name = "r"
        path = "/"
        upstream = "app"
        read_timeout = 5.0
        retries = {retries}
    """


@dataclass
class Head:
    at: float  # monotonic arrival time
    status: int
    line: str
    fields: list[tuple[str, str]]

    def get(self, name: str) -> list[str]:
        return [value for key, value in self.fields if key.lower() == name.lower()]


@dataclass
class Exchange:
    sent_at: float
    heads: list[Head]  # every head, interim ones first, the final one last
    body: bytes
    raw: bytes  # everything read, for what a test must not find

    @property
    def final(self) -> Head:
        return self.heads[-1]

    @property
    def interim(self) -> list[Head]:
        return self.heads[:-1]


async def read_heads(
    reader: asyncio.StreamReader, method: str = "GET"
) -> tuple[list[Head], bytes, bytes]:
    """Every head of one response (1xx ones first) and its Content-Length body."""
    heads: list[Head] = []
    raw = b""
    for _ in range(10_000):  # bounded: a gateway relaying 1xx for ever fails the test
        data = await reader.readuntil(b"\r\n\r\n")
        raw += data
        lines = data.decode("latin-1").split("\r\n")
        fields = [(n.strip(), v.strip()) for n, _, v in (x.partition(":") for x in lines[1:] if x)]
        head = Head(time.monotonic(), int(lines[0].split(" ")[1]), lines[0], fields)
        heads.append(head)
        if head.status >= 200:
            length = int(head.get("Content-Length")[0]) if head.get("Content-Length") else 0
            body = b"" if method == "HEAD" else await reader.readexactly(length)
            return heads, body, raw + body
    raise AssertionError("no final response")


async def ask(gw: RunningGateway, path: str = "/", version: str = "1.1") -> Exchange:
    """One GET on a new raw connection: every head with its arrival time."""
    reader, writer = await asyncio.open_connection(gw.host, gw.port, limit=1 << 20)
    try:
        async with asyncio.timeout(WITHIN):
            sent = time.monotonic()
            writer.write(f"GET {path} HTTP/{version}\r\nHost: x\r\n\r\n".encode())
            heads, body, raw = await read_heads(reader)
            return Exchange(sent, heads, body, raw)
    finally:
        writer.transport.abort()


def records(gw: RunningGateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.log_lines()]


async def breaker_of(gw: RunningGateway, url: str) -> str:
    assert gw.admin_url is not None
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WITHIN)) as session,
        session.get(gw.admin_url + "/status") as response,
    ):
        doc = await response.json()
    for one in doc["upstreams"]["app"]["targets"]:
        if one["url"] == url:
            return str(one["breaker"])
    raise AssertionError(url)


# -- relayed as they arrive ----------------------------------------------------------


async def test_a_103_reaches_the_client_long_before_the_final_response_the_target_delays(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    upstream = await target(HINT, 0.4, OK)
    gw = await make_gateway(config(upstream.url))
    got = await ask(gw)
    assert [head.status for head in got.heads] == [103, 200]
    hint, final = got.heads
    assert hint.line == "HTTP/1.1 103 Early Hints"
    assert hint.get("Link") == ["</style.css>; rel=preload"]
    assert hint.at - got.sent_at < 0.3  # as it arrived, not with the final head
    assert final.at - hint.at >= 0.3
    assert got.body == b"ok"
    assert "Link" not in dict(final.fields)  # the hint's fields stay the hint's
    # No framing on a 1xx (RFC 9110 8.6); the response rules otherwise.
    assert hint.get("Content-Length") == hint.get("Transfer-Encoding") == []
    assert hint.get("Via") == ["1.1 gateway"]
    assert hint.get("X-Request-ID") == final.get("X-Request-ID")
    await wait_for(lambda: len(gw.log_lines()) == 1)
    (line,) = records(gw)
    assert (line["status"], line["interim"], line["upstream_status"]) == (200, 1, [200])


async def test_several_interim_responses_in_a_row_are_relayed_in_order_but_not_a_100(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    upstream = await target(
        b"HTTP/1.1 102 Processing\r\n\r\n",
        0.05,
        b"HTTP/1.1 100 Continue\r\n\r\n" + HINT,
        0.05,
        b"HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload\r\n\r\n",
        b"HTTP/1.1 199 Something New\r\nX-New: 1\r\n\r\n",
        0.05,
        OK,
    )
    gw = await make_gateway(config(upstream.url))
    got = await ask(gw)
    assert [head.status for head in got.heads] == [102, 103, 103, 199, 200]
    assert got.heads[3].line == "HTTP/1.1 199 Something New"
    assert got.heads[3].get("X-New") == ["1"]
    assert got.heads[2].get("Link") == ["</app.js>; rel=preload"]
    assert b" 100 " not in got.raw  # the gateway's own, never the target's
    assert b"Expect" not in upstream.heads[0]
    await wait_for(lambda: len(gw.log_lines()) == 1)
    assert records(gw)[0]["interim"] == 4


async def test_an_http10_client_gets_no_interim_response(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    upstream = await target(HINT, b"HTTP/1.1 102 Processing\r\n\r\n", 0.05, OK)
    gw = await make_gateway(config(upstream.url))
    got = await ask(gw, version="1.0")
    assert [head.status for head in got.heads] == [200]
    assert got.final.line.startswith("HTTP/1.0 200")
    assert got.body == b"ok"
    await wait_for(lambda: len(gw.log_lines()) == 1)
    assert (records(gw)[0]["status"], records(gw)[0]["interim"]) == (200, 0)


async def test_interim_hop_by_hop_and_framing_fields_are_not_relayed(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    upstream = await target(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
        b"Connection: X-Hop, keep-alive\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: Basic\r\nTrailer: X-T\r\nUpgrade: h2c\r\nTE: trailers\r\n"
        b"Content-Length: 0\r\nX-Kept: yes\r\n\r\n",
        0.05,
        OK,
    )
    gw = await make_gateway(config(upstream.url))
    hint = (await ask(gw)).heads[0]
    names = {name.lower() for name, _ in hint.fields}
    assert names == {"link", "x-kept", "via", "x-request-id"}


# -- not the response: retries and breakers see the final status ------------------------


async def test_a_503_after_a_relayed_103_is_retried_on_the_other_target(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    failing = await target(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        0.05,
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
    )
    working = await target(
        b"HTTP/1.1 103 Early Hints\r\nLink: </b.css>; rel=preload\r\n\r\n", 0.05, OK
    )
    gw = await make_gateway(config(failing.url, working.url))
    # Round robin: one of two requests tries the failing target first.
    answers = [await ask(gw) for _ in range(2)]
    retried = [got for got in answers if len(got.heads) == 3]
    assert len(retried) == 1, [[h.line for h in got.heads] for got in answers]
    got = retried[0]
    assert [head.status for head in got.heads] == [103, 103, 200]
    assert [head.get("Link") for head in got.interim] == [
        ["</a.css>; rel=preload"],
        ["</b.css>; rel=preload"],
    ]
    assert got.body == b"ok"
    await wait_for(lambda: len(gw.log_lines()) == 2)
    line = next(line for line in records(gw) if line["attempts"] == 2)
    assert (line["status"], line["upstream_status"], line["interim"]) == (200, [503, 200], 2)


async def test_the_breaker_sees_the_final_status_not_the_interim_one(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    failing = await target(HINT, 0.05, b"HTTP/1.1 503 Nope\r\nContent-Length: 0\r\n\r\n")
    hinting = await target(HINT, 0.05, OK)
    gw = await make_gateway(config(failing.url, hinting.url, retries=0, failures=1))
    statuses = sorted([(await ask(gw)).final.status for _ in range(2)])
    assert statuses == [200, 503]  # relayed after its 103, out of retries
    assert await breaker_of(gw, failing.url) == "open"
    assert await breaker_of(gw, hinting.url) == "closed"


# -- hostile targets --------------------------------------------------------------------


async def test_an_endless_stream_of_interim_responses_is_a_502_and_others_are_served(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    endless = await target(endless=b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
    healthy = await target(OK)
    gw = await make_gateway(
        config(endless.url)
        + f"""
        [upstreams.healthy]
        targets = ["{healthy.url}"]
        [[routes]]
        name = "healthy"
        path = "/healthy"
        upstream = "healthy"
        """
    )
    reader, writer = await asyncio.open_connection(gw.host, gw.port, limit=1 << 20)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        # Meanwhile (this client reads nothing yet) everyone else is served.
        for _ in range(3):
            assert (await ask(gw, "/healthy")).final.status == 200
        async with asyncio.timeout(WITHIN):
            heads, body, raw = await read_heads(reader)
    finally:
        writer.transport.abort()
    assert heads[-1].status == 502
    assert json.loads(body)["error"] == "bad_gateway"
    assert {head.status for head in heads[:-1]} <= {103}
    # 64 KiB of heads from the target (the cap), at most a few times that relayed.
    assert len(raw) < 512 * 1024
    await wait_for(lambda: endless.cut, within=WITHIN)
    assert endless.written < 16 * 1024 * 1024


HOSTILE = {
    # RFC 9112 6.3: a 1xx ends at its empty line; what follows is the next head.
    "a body-looking payload": HINT + b"<html>hello</html>\r\n\r\n" + OK,
    "an unknown 1xx with Content-Length": b"HTTP/1.1 199 Odd\r\nContent-Length: 5\r\n\r\n"
    + b"HTTP/"
    + OK,
    "a 103 with Content-Length": b"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\n" + OK,
    "a 1xx with Transfer-Encoding": b"HTTP/1.1 103 Early Hints\r\n"
    + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    + OK,
    "a status code of two digits": b"HTTP/1.1 10 Hints\r\n\r\n" + OK,
    "a letter in the status code": b"HTTP/1.1 1O3 Hints\r\n\r\n" + OK,
    "a status code of four digits": b"HTTP/1.1 1030 Hints\r\n\r\n" + OK,
    "a 0xx status code": b"HTTP/1.1 099 Hints\r\n\r\n" + OK,
}


@pytest.mark.parametrize("script", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_malformed_interim_response_is_a_502_and_its_connection_closed(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]], script: bytes
) -> None:
    upstream = await target(script)
    gw = await make_gateway(config(upstream.url, retries=0))
    got = await ask(gw)
    assert got.final.status == 502
    assert json.loads(got.body)["error"] == "bad_gateway"
    assert {head.status for head in got.interim} <= {103}  # a well-formed one before: relayed
    assert (await ask(gw)).final.status == 502
    assert upstream.connections == 2  # never reused


async def test_a_zero_content_length_on_a_1xx_is_harmless_and_not_relayed(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    upstream = await target(b"HTTP/1.1 199 Odd\r\nContent-Length: 0\r\n\r\n", OK)
    gw = await make_gateway(config(upstream.url))
    got = await ask(gw)
    assert [head.status for head in got.heads] == [199, 200]
    assert got.heads[0].get("Content-Length") == []
    assert got.body == b"ok"


async def test_an_interim_response_after_the_final_one_is_stray_and_never_relayed(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    upstream = await target(OK + HINT)
    gw = await make_gateway(config(upstream.url))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        async with asyncio.timeout(WITHIN):
            for _ in range(2):  # one client connection, keep-alive
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                heads, body, _ = await read_heads(reader)
                assert [head.status for head in heads] == [200]
                assert body == b"ok"
    finally:
        writer.transport.abort()
    # The stray 103 ended the first upstream connection (CONTRACT.md: no
    # stray bytes); the second request went on a fresh one.
    assert upstream.connections == 2


async def test_a_client_gone_while_interim_responses_flow_is_logged_as_499(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    upstream = await target(HINT, 5.0, OK)
    gw = await make_gateway(config(upstream.url))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    with contextlib.closing(writer.transport):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(WITHIN):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 103 ")
        writer.transport.abort()
    await wait_for(lambda: len(gw.log_lines()) == 1)
    line = records(gw)[0]
    assert (line["status"], line["aborted"], line["interim"]) == (499, "client", 1)


async def test_the_gateways_own_100_continue_and_a_targets_103_both_reach_the_client(
    make_gateway: GatewayFactory, target: Callable[..., Awaitable[Target]]
) -> None:
    upstream = await target(0.2, HINT, 0.05, OK)
    gw = await make_gateway(config(upstream.url))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        async with asyncio.timeout(WITHIN):
            writer.write(
                b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            )
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"data")
            heads, body, _ = await read_heads(reader)
    finally:
        writer.transport.abort()
    assert [head.status for head in heads] == [103, 200]
    assert body == b"ok"
    assert b"Expect" not in upstream.heads[0]
    await wait_for(lambda: len(gw.log_lines()) == 1)
    assert records(gw)[0]["interim"] == 1  # the target's; the 100 is the gateway's own


# -- the writer's rules -----------------------------------------------------------------


async def test_the_writer_refuses_an_interim_response_after_the_final_head_or_to_http10() -> None:
    outcomes: list[object] = []

    async def handler(request: Request) -> Reply | None:
        writer = request.writer

        def attempt(status: int) -> None:
            try:
                outcomes.append(writer.send_interim(status, "X", CIMultiDict({"A": "1"})))
            except (RuntimeError, ValueError) as exc:
                outcomes.append(type(exc).__name__)

        for status in (103, 100, 101, 200, 99):
            attempt(status)
        # Framing a caller left in is not relayed; a CR/LF field is dropped whole.
        writer.send_interim(103, "X", CIMultiDict({"Content-Length": "9", "B": "2"}))
        outcomes.append(writer.send_interim(103, "X", CIMultiDict({"C": "x\r\nInjected: 1"})))
        writer.start(200, "OK", CIMultiDict({"Content-Length": "2"}), hold=True)
        attempt(103)
        await writer.write_eof(b"ok")
        return None

    server = await asyncio.get_running_loop().create_server(H1Server(handler), HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for version in ("1.1", "1.0"):
            outcomes.clear()
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                async with asyncio.timeout(WITHIN):
                    writer.write(f"GET / HTTP/{version}\r\nHost: x\r\n\r\n".encode())
                    heads, body, raw = await read_heads(reader)
            finally:
                writer.transport.abort()
            written = version == "1.1"
            assert outcomes == [written, *["ValueError"] * 4, False, "RuntimeError"]
            assert [head.status for head in heads] == [103, 103, 200][(0 if written else 2) :]
            assert body == b"ok"
            assert b"Injected" not in raw
            if written:
                assert heads[0].fields == [("A", "1")]
                assert heads[1].fields == [("B", "2")]
    finally:
        server.close()
        await server.wait_closed()
