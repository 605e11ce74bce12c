"""Hostile and broken clients over raw sockets: the contract's "Malformed requests".

Every refusal is checked four ways: (a) the status line and, where the
gateway makes the answer, the contract's JSON with the X-Request-ID it
carries; (b) the connection is closed afterwards (read to EOF, bounded);
(c) nothing reached a target (the upstreams record every request at the
moment it arrives); (d) the gateway still serves a normal request on a new
connection.

What llhttp (strict mode, through httptools) refuses by itself and what the
gateway adds is described in gateway/vetting.py and gateway/h1server.py;
these tests pin the behaviour on the wire, whichever layer provides it. The
status line is matched as HTTP/1.x (RFC 9110 6.2 would allow answering a
suspect client in HTTP/1.0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from gateway.wire import h1server
from tests.conftest import GatewayFactory, RunningGateway, UpstreamFactory, wait_for

CLIENT_TIMEOUT = 0.5
# How long a test waits for the gateway to close a connection it refused:
# at once for a refusal, one client_timeout plus a sweep for a silent client.
EOF_WAIT = 3.0

Part = bytes | float  # bytes to send, or seconds to pause


@dataclass
class Seen:
    """One request as an upstream saw it, recorded before its body is read."""

    method: str
    raw_path: str
    headers: dict[str, str]
    fields: list[tuple[str, str]] = field(default_factory=list)  # every line, in order
    outcome: str = "reading"  # then "complete" or "aborted"
    body: bytes = b""


@dataclass
class Recorder:
    """An upstream that records every request it receives, whatever the target."""

    name: str
    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        async def record(request: web.Request) -> web.StreamResponse:
            seen = Seen(
                request.method,
                request.raw_path,
                dict(request.headers),
                [
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in request.raw_headers
                ],
            )
            self.seen.append(seen)
            try:
                seen.body = await request.read()
            except BaseException:
                seen.outcome = "aborted"
                raise
            seen.outcome = "complete"
            return web.Response(text=f"{self.name}: {request.method} {request.raw_path}")

        # A middleware sees requests no route would match (CONNECT's
        # authority-form, "*"), so nothing that arrives goes unrecorded.
        @web.middleware
        async def everything(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            return await record(request)

        # Roomy limits, so the gateway's own limits are what the tests meet.
        return web.Application(
            middlewares=[everything],
            handler_args={"max_field_size": 65536, "max_headers": 512, "max_line_size": 65536},
        )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Exchange:
    replies: list[Reply]
    raw: bytes
    closed: bool  # the gateway closed the connection (EOF or reset)
    elapsed: float  # seconds from connect to EOF (or to giving up)


@dataclass
class Env:
    gw: RunningGateway
    app: Recorder  # the catch-all route's upstream
    named: Recorder  # the upstream of the route for host elsewhere.example

    def seen(self) -> list[Seen]:
        return self.app.seen + self.named.seen

    async def exchange(
        self, *parts: Part, wait: float = EOF_WAIT, stop_at_eof: bool = False
    ) -> Exchange:
        return await exchange(self.gw, parts, wait=wait, stop_at_eof=stop_at_eof)

    async def assert_still_serving(self) -> None:
        """(d): a normal request on a new connection is answered by the target."""
        before = len(self.app.seen)
        result = await self.exchange(
            b"GET /still-ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert [r.status for r in result.replies] == [200], result.raw[:300]
        assert result.replies[0].body == b"app: GET /still-ok"
        assert [s.raw_path for s in self.app.seen[before:]] == ["/still-ok"]


def gateway_config(
    app_port: int, named_port: int, client_timeout: float, trusted_proxies: str = "[]"
) -> str:
    return f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = ""
        client_timeout = {client_timeout}
        trusted_proxies = {trusted_proxies}

        [upstreams.app]
        targets = ["http://127.0.0.1:{app_port}"]
        [upstreams.named]
        targets = ["http://127.0.0.1:{named_port}"]

        [[routes]]
        name = "named"
        host = "elsewhere.example"
        path = "/"
        upstream = "named"

        [[routes]]
        name = "capped"
        path = "/capped"
        upstream = "app"
        max_body_bytes = 1000

        [[routes]]
        name = "api"
        path = "/api"
        upstream = "app"

        [[routes]]
        name = "all"
        path = "/"
        upstream = "app"
    """


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(make_gateway: GatewayFactory, start_upstream: UpstreamFactory) -> EnvFactory:
    async def factory(client_timeout: float = CLIENT_TIMEOUT, trusted_proxies: str = "[]") -> Env:
        app, named = Recorder("app"), Recorder("named")
        app_server = await start_upstream(app.app())
        named_server = await start_upstream(named.app())
        assert app_server.port is not None
        assert named_server.port is not None
        config = gateway_config(app_server.port, named_server.port, client_timeout, trusted_proxies)
        return Env(await make_gateway(config), app, named)

    return factory


@pytest.fixture
async def env(make_env: EnvFactory) -> Env:
    return await make_env()


async def exchange(
    gw: RunningGateway, parts: Sequence[Part], *, wait: float, stop_at_eof: bool = False
) -> Exchange:
    """Send `parts` (pausing at floats), then read until the gateway closes.

    `stop_at_eof`: send nothing more once the gateway has closed (a trickle
    longer than the test needs). `elapsed` ends at the EOF, if one came.
    """
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    raw = bytearray()
    closed = False
    closed_at = 0.0

    async def read_all() -> None:
        nonlocal closed, closed_at
        try:
            while chunk := await reader.read(65536):
                raw.extend(chunk)
        except ConnectionResetError:
            pass
        closed = True
        closed_at = time.monotonic()

    reading = asyncio.create_task(read_all())
    try:
        for part in parts:
            if stop_at_eof and reading.done():
                break
            if isinstance(part, float):
                if stop_at_eof:
                    await asyncio.wait([reading], timeout=part)
                else:
                    await asyncio.sleep(part)
            elif not writer.is_closing():
                writer.write(part)
                try:
                    await writer.drain()
                except ConnectionError:
                    break  # refused and closed: the rest is never read anyway
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(reading)
        except TimeoutError:
            pass
        elapsed = (closed_at if closed else time.monotonic()) - started
    finally:
        reading.cancel()
        writer.close()
    return Exchange(parse_replies(bytes(raw)), bytes(raw), closed, elapsed)


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*")


def parse_replies(raw: bytes) -> list[Reply]:
    """Responses back to back, each framed by its Content-Length."""
    replies = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {raw[:200]!r}"
        lines = head.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(lines[0])
        assert match is not None, f"bad status line: {lines[0]!r}"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        replies.append(Reply(int(match[1]), headers, rest[:length]))
        raw = rest[length:]
    return replies


def assert_gateway_error(reply: Reply, status: int, code: str) -> dict[str, str]:
    """(a): the status and the contract's JSON, whose id is the X-Request-ID."""
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json")
    body: dict[str, str] = json.loads(reply.body)
    assert set(body) == {"error", "message", "request_id"}
    assert body["error"] == code
    assert body["request_id"] == reply.headers["x-request-id"]
    assert 1 <= len(body["request_id"]) <= 128
    return body


async def assert_refused(env: Env, result: Exchange, status: int, code: str) -> None:
    """(a) one JSON answer, (b) closed, (c) nothing reached a target, (d) still serving."""
    assert len(result.replies) == 1, result.raw[:500]
    assert_gateway_error(result.replies[0], status, code)
    assert result.closed, "the gateway kept the connection open after a refusal"
    assert env.seen() == []
    await env.assert_still_serving()


POST = b"POST /up HTTP/1.1\r\nHost: x\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"
GET = b"GET / HTTP/1.1\r\nHost: x\r\n"

# (id, bytes sent in one write, status, code)
MALFORMED: list[tuple[str, bytes, int, str]] = [
    # Content-Length with Transfer-Encoding (RFC 9112 6.1: the classic
    # CL.TE / TE.CL smuggling pair), in both orders.
    (
        "cl-then-te",
        POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "te-then-cl",
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"5c\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    # Content-Length variants. Identical duplicates ("5, 5" or the header
    # twice) could be merged (RFC 9110 8.6, RFC 9112 6.3 rule 5 allows
    # either); we refuse them like nginx does: agreeing is no reason to trust
    # that every hop counts the same way.
    (
        "cl-differ",
        POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
        "bad_request",
    ),
    ("cl-list-differ", POST + b"Content-Length: 5, 6\r\n\r\nhello!", 400, "bad_request"),
    ("cl-list-same", POST + b"Content-Length: 5, 5\r\n\r\nhello", 400, "bad_request"),
    (
        "cl-twice-same",
        POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
        "bad_request",
    ),
    ("cl-plus", POST + b"Content-Length: +5\r\n\r\nhello", 400, "bad_request"),
    ("cl-negative", POST + b"Content-Length: -5\r\n\r\nhello", 400, "bad_request"),
    ("cl-hex", POST + b"Content-Length: 0x5\r\n\r\nhello", 400, "bad_request"),
    ("cl-overflow", POST + b"Content-Length: 99999999999999999999999\r\n\r\nx", 400, "bad_request"),
    # Bad chunk sizes (RFC 9112 7.1: chunk-size = 1*HEXDIG).
    ("chunk-not-hex", CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    ("chunk-leading-space", CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    ("chunk-trailing-junk", CHUNKED + b"5x\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    ("chunk-trailing-space", CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    ("chunk-0x-prefix", CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    ("chunk-negative", CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    ("chunk-overflow", CHUNKED + b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    ("chunk-no-crlf-after-data", CHUNKED + b"5\r\nhelloXX0\r\n\r\n", 400, "bad_request"),
    ("chunk-bare-lf", CHUNKED + b"5\nhello\n0\n\n", 400, "bad_request"),
    # Obfuscated Transfer-Encoding: every variant some hop might read
    # differently is refused (RFC 9112 6.3 rule 4 and 5.1).
    (
        "te-xchunked",
        POST + b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "te-space-before-colon",
        POST + b"Transfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "te-chunked-not-last",
        POST + b"Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    ("te-identity", POST + b"Transfer-Encoding: identity\r\n\r\nhello", 400, "bad_request"),
    (
        "te-twice",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "te-vertical-tab",
        POST + b"Transfer-Encoding:\x0bchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "te-on-http10",
        b"POST /up HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    # Valid by RFC 9110 5.5 (trailing OWS), but llhttp refuses a tab after
    # "chunked": a refusal of an exotic spelling, never a misreading.
    (
        "te-tab-after",
        POST + b"Transfer-Encoding: chunked\t\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "te-chunked-twice-in-list",
        POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    # Codings before chunked are well-formed but cannot be forwarded (the
    # gateway drops Transfer-Encoding as hop-by-hop): RFC 9112 6.1 says 501.
    (
        "te-identity-chunked",
        POST + b"Transfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        501,
        "not_implemented",
    ),
    (
        "te-gzip-chunked",
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        501,
        "not_implemented",
    ),
    # obs-fold (RFC 9112 5.2: a server MUST reject it or replace it; we reject).
    ("obs-fold-space", GET + b"X-A: a\r\n b\r\n\r\n", 400, "bad_request"),
    ("obs-fold-tab", GET + b"X-A: a\r\n\tb\r\n\r\n", 400, "bad_request"),
    ("space-before-first-header", b"GET / HTTP/1.1\r\n Host: x\r\n\r\n", 400, "bad_request"),
    # Control bytes (RFC 9110 5.5; RFC 9112 2.2 on bare CR).
    ("bare-cr-in-value", GET + b"X-A: a\rb\r\n\r\n", 400, "bad_request"),
    ("bare-cr-in-name", GET + b"X-\rA: ab\r\n\r\n", 400, "bad_request"),
    ("nul-in-value", GET + b"X-A: a\x00b\r\n\r\n", 400, "bad_request"),
    ("nul-in-name", GET + b"X-\x00A: ab\r\n\r\n", 400, "bad_request"),
    ("ctl-01-in-value", GET + b"X-A: a\x01b\r\n\r\n", 400, "bad_request"),
    ("ctl-01-in-name", GET + b"X-\x01A: ab\r\n\r\n", 400, "bad_request"),
    ("del-in-value", GET + b"X-A: a\x7fb\r\n\r\n", 400, "bad_request"),
    ("del-in-name", GET + b"X-\x7fA: ab\r\n\r\n", 400, "bad_request"),
    ("ctl-1f-in-value", GET + b"X-A: a\x1fb\r\n\r\n", 400, "bad_request"),
    ("space-in-name", GET + b"X A: ab\r\n\r\n", 400, "bad_request"),
    ("empty-name", GET + b": ab\r\n\r\n", 400, "bad_request"),
    ("no-colon", GET + b"XA\r\n\r\n", 400, "bad_request"),
    # Bare LF line endings: RFC 9112 2.2 lets a recipient accept them; we do
    # not, since a hop that disagrees on where a line ends can be smuggled
    # past.
    ("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: x\n\n", 400, "bad_request"),
    ("bare-lf-in-headers", b"GET / HTTP/1.1\r\nHost: x\nX-A: a\r\n\r\n", 400, "bad_request"),
    ("bare-lf-ending-head", b"GET / HTTP/1.1\r\nHost: x\r\n\n", 400, "bad_request"),
    # Sizes: 16 KiB per field line, 128 fields, 64 KiB in all; 8 KiB target.
    (
        "field-value-too-large",
        GET + b"X-A: " + b"a" * 16400 + b"\r\n\r\n",
        431,
        "header_fields_too_large",
    ),
    (
        "field-name-too-large",
        GET + b"X-" + b"a" * 16400 + b": a\r\n\r\n",
        431,
        "header_fields_too_large",
    ),
    (
        "too-many-fields",
        GET + b"".join(b"X-%d: a\r\n" % i for i in range(128)) + b"\r\n",
        431,
        "header_fields_too_large",
    ),
    (
        "header-section-too-large",
        GET + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 8000) for i in range(9)) + b"\r\n",
        431,
        "header_fields_too_large",
    ),
    # 64 KiB of bytes on the wire, though fewer characters once decoded
    # (5 x 7,000 two-byte UTF-8 characters: 70,000 bytes, 35,000 characters).
    (
        "header-section-too-large-in-utf8-bytes",
        GET + b"".join(b"X-%d: %s\r\n" % (i, "\u00e9".encode() * 7000) for i in range(5)) + b"\r\n",
        431,
        "header_fields_too_large",
    ),
    (
        "target-too-long",
        b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
        "uri_too_long",
    ),
    # Methods and versions. llhttp knows the registered methods only, so an
    # unknown but well-formed token is a 400 too (not 501).
    ("method-with-paren", b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ("method-unknown", b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ("method-lowercase", b"get / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ("tls-on-plain-port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "bad_request"),
    ("http-2.0", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    ("http-0.9", b"GET /\r\n\r\n", 505, "http_version_not_supported"),
    ("http-1.2", b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ("http-3.0", b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ("http-1.10", b"GET / HTTP/1.10\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad_request"),
    # Host (RFC 9112 3.2: missing on 1.1, repeated or invalid -> 400).
    ("host-missing", b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("host-twice", b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "bad_request"),
    ("host-with-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "bad_request"),
    ("host-with-path", b"GET / HTTP/1.1\r\nHost: evil.example/x\r\n\r\n", 400, "bad_request"),
    ("host-with-userinfo", b"GET / HTTP/1.1\r\nHost: user@x\r\n\r\n", 400, "bad_request"),
    ("host-bad-port", b"GET / HTTP/1.1\r\nHost: x:8o\r\n\r\n", 400, "bad_request"),
    # Request targets.
    ("target-no-slash", b"GET x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    ("target-with-space", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    # RFC 9112 3.2.4: "*" is OPTIONS's alone (llhttp takes it with any method).
    ("asterisk-with-get", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    (
        "asterisk-with-post",
        b"POST * HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "absolute-form-userinfo",
        b"GET http://user:pw@elsewhere.example/x HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "absolute-form-other-scheme",
        b"GET ftp://elsewhere.example/x HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n",
        400,
        "bad_request",
    ),
    # Not a forward proxy: CONNECT is refused, with an empty Allow (the
    # authority-form target names no resource of ours; RFC 9110 10.2.1).
    (
        "connect",
        b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n"
        b"\x16\x03\x01\x00\x05hello",
        405,
        "method_not_allowed",
    ),
    # llhttp ends an Upgrade request at its head; a body with it would be
    # parsed as the next request (smuggling) unless refused.
    (
        "upgrade-with-length-body",
        POST + b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 35\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "upgrade-with-chunked-body",
        POST + b"Connection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"23\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
]


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [pytest.param(data, status, code, id=name) for name, data, status, code in MALFORMED],
)
async def test_malformed_request_is_refused_and_never_forwarded(
    env: Env, request_bytes: bytes, status: int, code: str
) -> None:
    result = await env.exchange(request_bytes)
    await assert_refused(env, result, status, code)


async def test_connect_is_refused_with_an_empty_allow_and_the_clients_request_id(
    env: Env,
) -> None:
    result = await env.exchange(
        b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n"
        b"X-Request-ID: tunnel-1\r\n\r\n"
    )
    await assert_refused(env, result, 405, "method_not_allowed")
    reply = result.replies[0]
    assert reply.headers["allow"] == ""
    # The head parsed, so the client's sane id is kept (unlike a head that
    # did not parse, which gets a fresh one).
    assert reply.headers["x-request-id"] == "tunnel-1"


@pytest.mark.parametrize(
    "coding",
    [b"chunked", b"\tchunked", b" \t chunked", b"chunked  ", b"CHUNKED", b"Chunked"],
    ids=["plain", "tab-before", "ows-before", "spaces-after", "upper", "mixed-case"],
)
async def test_well_formed_chunked_spellings_are_served(env: Env, coding: bytes) -> None:
    # OWS around a field value includes HTAB and codings ignore case
    # (RFC 9110 5.5, 5.6.3, 7.3): these are valid, not obfuscations.
    result = await env.exchange(
        POST + b"Transfer-Encoding:" + coding + b"\r\nConnection: close\r\n\r\n"
        b"5;ext=1\r\nhello\r\n0\r\n\r\n"
    )
    assert [r.status for r in result.replies] == [200], result.raw[:300]
    [seen] = env.app.seen
    assert (seen.outcome, seen.body) == ("complete", b"hello")
    assert seen.headers.get("Transfer-Encoding") == "chunked"  # chunked stays chunked


async def test_requests_at_the_limits_are_served(env: Env) -> None:
    head = (
        b"GET /" + b"t" * 8000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"X-Big: "
        + b"v" * 16000
        + b"\r\n"
        + b"".join(b"X-%d: a\r\n" % i for i in range(125))  # 128 fields in all
        + b"\r\n"
    )
    result = await env.exchange(head)
    assert [r.status for r in result.replies] == [200], result.raw[:300]
    [seen] = env.app.seen
    assert len(seen.raw_path) == 8001
    assert len(seen.headers["X-Big"]) == 16000


async def test_http10_without_host_and_empty_host_are_served(env: Env) -> None:
    # Host is required from HTTP/1.1 on; an empty one is valid when the
    # target URI has no authority (RFC 9112 3.2).
    for head in (
        b"GET /ten HTTP/1.0\r\n\r\n",
        b"GET /empty HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
    ):
        result = await env.exchange(head)
        assert [r.status for r in result.replies] == [200], result.raw[:300]
    assert [s.raw_path for s in env.app.seen] == ["/ten", "/empty"]


# -- dot-segments: a route's prefix confines what reaches its target ----------

# Only "/api" (and the catch-all) is routed; a target that removes
# dot-segments would serve each of these from outside "/api" (CONTRACT.md:
# refused with 400, and nothing reaches a target).
DOT_SEGMENT_TARGETS = [
    b"/api/../internal/secret",
    b"/api/%2e%2e/internal/secret",
    b"/api/%2E%2E/internal/secret",
    b"/api/%2e./internal",
    b"/api/.%2E/internal",
    b"/api/..",
    b"/api/.",
    b"/api/x/../../internal",
    b"/api/./x",
    b"/api/..%2Finternal",
    b"/api/..%2finternal",
    b"/api/..;/internal",
    b"/api/..\\internal",
    b"/api/..%5Cinternal",
    b"/api/..#/internal",
    b"/api/../internal?x=1",
    b"http://x/api/../internal",
]


@pytest.mark.parametrize("target", DOT_SEGMENT_TARGETS, ids=lambda t: t.decode())
async def test_a_dot_segment_in_the_path_is_refused_and_reaches_no_target(
    env: Env, target: bytes
) -> None:
    result = await env.exchange(
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    await assert_refused(env, result, 400, "bad_request")


@pytest.mark.parametrize(
    "request_bytes",
    [
        # A preflight is answered by the gateway itself: the refusal comes first.
        b"OPTIONS /api/../internal HTTP/1.1\r\nHost: x\r\nOrigin: http://o.example\r\n"
        b"Access-Control-Request-Method: GET\r\nConnection: close\r\n\r\n",
        # With a body: refused before a byte of it goes anywhere.
        b"POST /api/%2e%2e/internal HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nhello",
        b"PUT /capped/.. HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["preflight", "post-with-length", "chunked-put"],
)
async def test_a_dot_segment_is_refused_whatever_the_method_or_body(
    env: Env, request_bytes: bytes
) -> None:
    result = await env.exchange(request_bytes)
    await assert_refused(env, result, 400, "bad_request")


@pytest.mark.parametrize(
    "target",
    [
        b"/api/...",
        b"/api/.hidden",
        b"/api/a.b/c..d",
        b"/api/..a/a..",
        b"/api/%252e%252e/x",
        b"/api/x?path=../../etc&y=./z",
        b"/api/x?..",
        b"/api/v1.2/f.json",
    ],
)
async def test_names_with_dots_and_dotted_queries_are_forwarded_unchanged(
    env: Env, target: bytes
) -> None:
    result = await env.exchange(
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert [r.status for r in result.replies] == [200], result.raw[:300]
    assert [s.raw_path for s in env.app.seen] == [target.decode()]


# -- client identity headers: what an untrusted peer may not claim --------------

# Hostile spellings of the fields that name the client: several lines, any
# case, underscores that CGI-style backends read as dashes (CONTRACT.md
# "Headers"). Each case: extra header lines sent by the peer.
SPOOFED_IDENTITY: list[tuple[str, bytes]] = [
    ("forwarded", b"Forwarded: for=6.6.6.6;proto=https\r\n"),
    (
        "forwarded-many-lines-any-case",
        b"Forwarded: for=6.6.6.6\r\nforwarded: for=7.7.7.7;proto=https\r\n"
        b'FORWARDED: for="[2001:db8::6]"\r\n',
    ),
    ("x-real-ip", b"X-Real-IP: 6.6.6.6\r\n"),
    ("x-real-ip-duplicates", b"x-real-ip: 6.6.6.6\r\nX-REAL-IP: 7.7.7.7\r\nX-Real-Ip: 8.8.8.8\r\n"),
    ("x_real_ip", b"X_Real_IP: 6.6.6.6\r\nx_real_ip: 7.7.7.7\r\n"),
    ("x_forwarded_for", b"X_Forwarded_For: 6.6.6.6\r\n"),
    (
        "x_forwarded_proto-and-host",
        b"X_Forwarded_Proto: https\r\nX-Forwarded_Host: evil.example\r\n",
    ),
    ("lone-underscores", b"_: x\r\n__: y\r\nA_: z\r\n"),
    (
        "everything-at-once",
        b"Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n",
    ),
]


def names_seen(seen: Seen) -> list[str]:
    return [name.lower() for name, _ in seen.fields]


@pytest.mark.parametrize(
    "spoof", [pytest.param(spoof, id=name) for name, spoof in SPOOFED_IDENTITY]
)
async def test_an_untrusted_peer_cannot_tell_the_target_who_the_client_is(
    env: Env, spoof: bytes
) -> None:
    result = await env.exchange(
        b"GET /who HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 9.9.9.9\r\n"
        + spoof
        + b"X-Kept: yes\r\nConnection: close\r\n\r\n"
    )
    assert [r.status for r in result.replies] == [200], result.raw[:300]
    [seen] = env.app.seen
    names = names_seen(seen)
    assert "forwarded" not in names
    assert "x-real-ip" not in names
    assert not [name for name in names if "_" in name]
    # X-Forwarded-For is kept and appended to; the rest is what this hop saw.
    assert seen.headers["X-Forwarded-For"] == "9.9.9.9, 127.0.0.1"
    assert names.count("x-forwarded-for") == 1
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert seen.headers["X-Forwarded-Host"] == "x"
    assert seen.headers["X-Kept"] == "yes"


async def test_a_trusted_peer_keeps_forwarded_and_x_real_ip_but_not_underscored_names(
    make_env: EnvFactory,
) -> None:
    env = await make_env(trusted_proxies='["127.0.0.0/8"]')
    result = await env.exchange(
        b"GET /who HTTP/1.1\r\nHost: x\r\nForwarded: for=6.6.6.6;proto=https\r\n"
        b"forwarded: for=7.7.7.7\r\nX-Real-IP: 6.6.6.6\r\nX_Real_IP: 8.8.8.8\r\n"
        b"X_Forwarded_For: 8.8.8.8\r\nConnection: close\r\n\r\n"
    )
    assert [r.status for r in result.replies] == [200], result.raw[:300]
    [seen] = env.app.seen
    fields = [(name.lower(), value) for name, value in seen.fields]
    # Kept as written: each line as it came.
    assert [v for n, v in fields if n == "forwarded"] == ["for=6.6.6.6;proto=https", "for=7.7.7.7"]
    assert [v for n, v in fields if n == "x-real-ip"] == ["6.6.6.6"]
    assert not [n for n, _ in fields if "_" in n]
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"


# -- absolute-form -------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host", "upstream", "path"),
    [
        ("http://elsewhere.example/x", "elsewhere.example", "named", "/x"),
        # RFC 9112 3.2.2: the target's authority wins over Host.
        ("http://elsewhere.example/x?q=1", "other.example", "named", "/x?q=1"),
        ("HTTP://ELSEWHERE.EXAMPLE:8080", "x", "named", "/"),
        ("https://unknown.example/y", "elsewhere.example", "app", "/y"),
    ],
)
async def test_absolute_form_is_routed_by_our_table_never_to_the_named_host(
    env: Env, target: str, host: str, upstream: str, path: str
) -> None:
    result = await env.exchange(
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    )
    # A 200 from our own upstream: the named host (unresolvable, or not us)
    # was never contacted, and the target sees origin-form.
    assert [r.status for r in result.replies] == [200], result.raw[:300]
    assert result.replies[0].body == f"{upstream}: GET {path}".encode()
    recorder = env.named if upstream == "named" else env.app
    other = env.app if upstream == "named" else env.named
    assert [s.raw_path for s in recorder.seen] == [path]
    assert other.seen == []


@pytest.mark.parametrize(
    "target",
    [b"*", b"http://elsewhere.example", b"HTTP://x:8080"],
    ids=["asterisk", "absolute", "port"],
)
async def test_options_asterisk_is_answered_by_the_gateway_and_reaches_no_target(
    env: Env, target: bytes
) -> None:
    # RFC 9110 9.3.7: OPTIONS * asks about the server itself, which is the
    # gateway; an absolute-form URI with an empty path and no query is the
    # same question (RFC 9112 3.2.4). The connection goes on.
    result = await env.exchange(
        b"OPTIONS " + target + b" HTTP/1.1\r\nHost: x\r\nX-Request-ID: ask-1\r\n\r\n"
        b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert [r.status for r in result.replies] == [200, 200], result.raw[:500]
    asked = result.replies[0]
    assert asked.headers["content-length"] == "0"
    assert asked.headers["x-request-id"] == "ask-1"
    assert asked.body == b""
    assert [s.raw_path for s in env.seen()] == ["/after"]


async def test_options_for_a_path_in_absolute_form_is_routed_as_usual(env: Env) -> None:
    result = await env.exchange(
        b"OPTIONS http://elsewhere.example/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert [r.status for r in result.replies] == [200], result.raw[:300]
    assert result.replies[0].body == b"named: OPTIONS /"


async def test_a_whole_body_answered_unread_does_not_stall_the_next_request(env: Env) -> None:
    # Pipelined behind another request, OPTIONS *'s body is parsed whole
    # while it waits (over the 256 KiB that pause the socket) and answered
    # without being read: the connection must go on to the next request.
    body = b"a" * (300 * 1024)
    reader, writer = await asyncio.open_connection(env.gw.host, env.gw.port)
    try:
        writer.write(
            b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        answered = b""
        while answered.count(b"HTTP/1.1 200 ") < 2:
            answered += await asyncio.wait_for(reader.read(65536), EOF_WAIT)
        assert b"connection: close" not in answered.lower()
        writer.write(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), EOF_WAIT)
    finally:
        writer.close()
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:200]
    assert [s.raw_path for s in env.seen()] == ["/first", "/after"]


# -- pipelining behind a malformed request ------------------------------------


async def test_pipelined_requests_behind_a_malformed_one_are_not_processed(env: Env) -> None:
    result = await env.exchange(
        GET + b"X-A: \x01\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    await assert_refused(env, result, 400, "bad_request")


async def test_pipelined_request_behind_a_refused_head_is_not_processed(env: Env) -> None:
    # Refused by the gateway's own head checks (not by llhttp), with the
    # next request in the same read and more bytes after the answer.
    result = await env.exchange(
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n",
        0.1,
        b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    await assert_refused(env, result, 400, "bad_request")
    assert json.loads(result.replies[0].body)["message"] == "invalid Host header"


async def test_requests_held_back_behind_an_upgrade_are_vetted_too(env: Env) -> None:
    # llhttp stops after an Upgrade request's head; an upgrade the gateway
    # never switches to (h2c: its Upgrade is dropped as hop-by-hop) is served
    # as HTTP/1.1, and what follows is parsed, and vetted, as requests. (The
    # bytes after a WebSocket upgrade are never parsed: they are the
    # tunnel's, see test_websocket_functional.py.)
    result = await env.exchange(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a b\r\n\r\nGET /third HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert [r.status for r in result.replies] == [200, 400], result.raw[:500]
    assert_gateway_error(result.replies[1], 400, "bad_request")
    assert result.closed
    [seen] = env.seen()
    assert seen.raw_path == "/ws"
    assert "Upgrade" not in seen.headers
    await env.assert_still_serving()


async def test_good_request_is_answered_before_a_malformed_one_is_refused(env: Env) -> None:
    result = await env.exchange(
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n",
        0.2,
        GET + b"X-A: \x00\r\n\r\nGET /third HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert [r.status for r in result.replies] == [200, 400], result.raw[:500]
    assert_gateway_error(result.replies[1], 400, "bad_request")
    assert result.closed
    assert [s.raw_path for s in env.seen()] == ["/first"]
    await env.assert_still_serving()


async def test_smuggled_request_inside_a_broken_chunked_body_is_not_processed(env: Env) -> None:
    result = await env.exchange(
        CHUNKED + b"5\r\nhello\r\nzz\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    await assert_refused(env, result, 400, "bad_request")


# -- a body that breaks after its head went upstream --------------------------


@pytest.mark.parametrize(
    "bad_chunk",
    [b"zz\r\n", b"5\r\nhelloXX", b"1" + b"0" * 16 + b"\r\n"],
    ids=["not-hex", "no-crlf-after-data", "overflow"],
)
async def test_bad_chunk_after_the_head_was_forwarded_aborts_the_upload_with_400(
    env: Env, bad_chunk: bytes
) -> None:
    # The gateway streams: once the head is in, the upload to the target has
    # begun, so the target sees the request start. What it must never see is
    # a complete request: the upload is aborted at once (not after
    # client_timeout), and the client gets 400, not 408 or 502.
    result = await env.exchange(
        CHUNKED + b"5\r\nhello\r\n",
        0.3,
        bad_chunk + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert len(result.replies) == 1, result.raw[:500]
    assert_gateway_error(result.replies[0], 400, "bad_request")
    assert result.closed
    assert result.elapsed < 0.3 + CLIENT_TIMEOUT
    [seen] = env.seen()
    assert seen.raw_path == "/up"
    await wait_for(lambda: seen.outcome != "reading", within=2)
    assert seen.outcome == "aborted"
    await env.assert_still_serving()
    # The client's fault is not the target's: no failure counts against its
    # breaker (else a few bad uploads would open it for everyone).
    box = env.gw.gateway.box
    assert box is not None
    assert box.snapshot.pools["app"].targets[0].breaker.consecutive_failures == 0


# -- lingering close: a refusal survives the bytes the client sends after it ----

FLOOD = b"f" * (1024 * 1024)
# A well-formed chunked stream of as much: a body over max_body_bytes must
# meet the 413, not trip over bad framing first.
CHUNK_FLOOD = (b"400\r\n" + b"c" * 1024 + b"\r\n") * 1024
CAPPED = b"POST /capped HTTP/1.1\r\nHost: x\r\n"

# (id, parts ending in a 1 MiB flood, status, code). The client writes all of
# it without reading, as a client streaming an upload does; only then does it
# read. Closing with those bytes unread makes Linux send a reset, which
# destroys the answer in the client's receive buffer (RFC 9112 9.6).
UNREAD_AFTER_REFUSAL: list[tuple[str, tuple[Part, ...], int, str]] = [
    ("bad-chunk-size", (CHUNKED + b"zz\r\n", FLOOD), 400, "bad_request"),
    (
        "bad-chunk-size-after-the-head-went-upstream",
        (CHUNKED + b"5\r\nhello\r\n", 0.2, b"5x\r\n", FLOOD),
        400,
        "bad_request",
    ),
    (
        "endless-trailer",
        (CHUNKED + b"5\r\nhello\r\n0\r\nX-Trailer: ", 0.2, FLOOD),
        400,
        "bad_request",
    ),
    (
        "cl-and-te",
        (POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n", FLOOD),
        400,
        "bad_request",
    ),
    (
        "chunked-over-max-body-bytes",
        (CAPPED + b"Transfer-Encoding: chunked\r\n\r\n", CHUNK_FLOOD),
        413,
        "body_too_large",
    ),
    (
        "length-over-max-body-bytes",
        (CAPPED + b"Content-Length: 2000000\r\n\r\n", FLOOD),
        413,
        "body_too_large",
    ),
    (
        "header-field-too-large",
        (GET + b"X-A: " + b"a" * 16400 + b"\r\n\r\n", FLOOD),
        431,
        "header_fields_too_large",
    ),
    (
        "target-too-long",
        (b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\n", FLOOD),
        414,
        "uri_too_long",
    ),
]


async def send_unread_then_read(gw: RunningGateway, parts: Sequence[Part]) -> tuple[bytes, str]:
    """Send `parts` on a plain socket that reads nothing meanwhile, then read
    to EOF; the bytes read and how the read ended ("eof", "reset", "timeout").

    asyncio's streams read in the background: a plain socket leaves the
    answer in the kernel's receive buffer, where a reset destroys it.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    raw = bytearray()
    try:
        async with asyncio.timeout(EOF_WAIT):
            await loop.sock_connect(sock, (gw.host, gw.port))
        for part in parts:
            if isinstance(part, float):
                await asyncio.sleep(part)
                continue
            try:
                async with asyncio.timeout(EOF_WAIT):
                    await loop.sock_sendall(sock, part)
            except (ConnectionError, TimeoutError):
                break  # closed on us, or not reading at all: the read tells
        try:
            async with asyncio.timeout(EOF_WAIT):
                while chunk := await loop.sock_recv(sock, 65536):
                    raw += chunk
        except ConnectionResetError:
            return bytes(raw), "reset"
        except TimeoutError:
            return bytes(raw), "timeout"
        return bytes(raw), "eof"
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("parts", "status", "code"),
    [
        pytest.param(parts, status, code, id=name)
        for name, parts, status, code in UNREAD_AFTER_REFUSAL
    ],
)
async def test_a_refusal_reaches_a_client_that_keeps_sending_without_reading(
    env: Env, parts: tuple[Part, ...], status: int, code: str
) -> None:
    raw, ending = await send_unread_then_read(env.gw, parts)
    assert ending == "eof", (ending, raw[:300])
    replies = parse_replies(raw)
    assert len(replies) == 1, raw[:500]
    assert_gateway_error(replies[0], status, code)
    assert replies[0].headers["connection"] == "close"
    # Forwarded or not, no target saw a whole request.
    assert all(seen.outcome != "complete" for seen in env.seen())
    await env.assert_still_serving()


async def test_a_lingering_connection_is_closed_after_the_linger_time(env: Env) -> None:
    # A client that keeps sending after its refusal is read (and dropped) for
    # LINGER_SECONDS, not for as long as it likes.
    reader, writer = await asyncio.open_connection(env.gw.host, env.gw.port)
    started = time.monotonic()
    try:
        writer.write(CHUNKED + b"zz\r\n")
        async with asyncio.timeout(h1server.LINGER_SECONDS + EOF_WAIT):
            answer = await reader.read()  # the 400, then EOF: the write side is shut
            assert parse_replies(answer)[0].status == 400
            with contextlib.suppress(ConnectionError):
                while time.monotonic() - started < h1server.LINGER_SECONDS + 2.0:
                    writer.write(b"x" * 1024)
                    await writer.drain()
                    await asyncio.sleep(0.05)
        assert time.monotonic() - started < h1server.LINGER_SECONDS + 1.5
    finally:
        writer.close()


# -- slow loris -----------------------------------------------------------------


def trickle(data: bytes, step: int, pause: float) -> list[Part]:
    """`data` in pieces of `step` bytes, `pause` seconds apart."""
    parts: list[Part] = []
    for i in range(0, len(data), step):
        parts += [data[i : i + step], pause]
    return parts


async def test_a_head_trickling_in_within_client_timeout_is_served(env: Env) -> None:
    head = b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    result = await env.exchange(*trickle(head, 12, 0.05))  # 5 pieces in 0.25 s
    assert [r.status for r in result.replies] == [200], result.raw[:300]
    assert [s.raw_path for s in env.app.seen] == ["/slow"]


FIRST = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
# Heads whose bytes each come well within client_timeout (0.2 s apart for a
# 0.5 s timeout) but which as a whole would take seconds: client_timeout is a
# deadline for the whole head, not a silence that every byte restarts
# (CONTRACT.md; nginx's client_header_timeout).
TRICKLED_HEADS: list[tuple[str, list[Part], list[int]]] = [
    ("request-line-byte-by-byte", trickle(b"GET /slowly/and/slower HTTP/1.1\r\n", 1, 0.2), [408]),
    (
        "header-lines-one-by-one",
        [
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            0.2,
            *trickle(b"".join(b"X-%d: v\r\n" % i for i in range(40)), 8, 0.2),
        ],
        [408],
    ),
    (
        "header-value-byte-by-byte",
        [b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", *trickle(b"a" * 40, 1, 0.2)],
        [408],
    ),
    (
        "second-head-on-keep-alive",
        [FIRST, 0.1, *trickle(b"GET /second HTTP/1.1\r\nHost: x\r\n", 1, 0.2)],
        [200, 408],
    ),
    (
        "second-head-pipelined-behind-the-first",
        [FIRST + b"GET /sec", *trickle(b"ond HTTP/1.1\r\nHost: x\r\n", 1, 0.2)],
        [200, 408],
    ),
    (
        "second-head-after-a-chunked-body",
        [
            CHUNKED + b"5\r\nhello\r\n0\r\n\r\n",
            0.1,
            *trickle(b"GET /second HTTP/1.1\r\nHost: x\r\n", 1, 0.2),
        ],
        [200, 408],
    ),
]


@pytest.mark.parametrize(
    ("parts", "statuses"), [pytest.param(*case[1:], id=case[0]) for case in TRICKLED_HEADS]
)
async def test_a_head_trickled_past_client_timeout_gets_408_however_steady_the_trickle(
    env: Env, parts: list[Part], statuses: list[int]
) -> None:
    result = await env.exchange(*parts, stop_at_eof=True)
    assert [r.status for r in result.replies] == statuses, result.raw[:500]
    assert_gateway_error(result.replies[-1], 408, "client_timeout")
    assert result.replies[-1].headers["connection"] == "close"
    assert result.closed
    # From the head's start: the connect, or the first request's answer
    # (0.1 s in at most); a sweep runs every client_timeout / 4.
    assert result.elapsed < 0.1 + CLIENT_TIMEOUT * 1.25 + 0.5
    # Only the whole heads before it reached a target.
    assert len(env.seen()) == len(statuses) - 1
    await env.assert_still_serving()


async def test_one_header_byte_every_1_5_s_is_cut_at_a_client_timeout_of_2_s(
    make_env: EnvFactory,
) -> None:
    # The report's own numbers: each byte within the timeout, the head never.
    env = await make_env(client_timeout=2.0)
    parts = [b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", *trickle(b"a" * 10, 1, 1.5)]
    result = await env.exchange(*parts, stop_at_eof=True, wait=5.0)
    assert [r.status for r in result.replies] == [408], result.raw[:300]
    assert result.closed
    assert 2.0 <= result.elapsed < 2.0 + 0.5 + 0.5  # the deadline, one sweep, a margin
    assert env.seen() == []


async def test_head_stalled_past_client_timeout_gets_408_and_is_closed(env: Env) -> None:
    result = await env.exchange(b"GET /never HTTP/1.1\r\nHo")
    assert len(result.replies) == 1, result.raw[:300]
    assert_gateway_error(result.replies[0], 408, "client_timeout")
    assert result.replies[0].headers["connection"] == "close"
    assert result.closed
    assert CLIENT_TIMEOUT * 0.9 < result.elapsed < CLIENT_TIMEOUT + 1.0
    assert env.seen() == []
    await env.assert_still_serving()


async def test_connection_that_sends_nothing_is_closed_without_an_answer(env: Env) -> None:
    # No 408 on a connection that never sent a byte: a client about to use
    # it would take the 408 for the answer to its request.
    result = await env.exchange()
    assert result.raw == b""
    assert result.closed
    assert CLIENT_TIMEOUT * 0.9 < result.elapsed < CLIENT_TIMEOUT + 1.0
    await env.assert_still_serving()


@pytest.mark.parametrize(
    "head",
    [POST + b"Content-Length: 100\r\n\r\n0123456789", CHUNKED + b"a\r\n0123456789\r\n"],
    ids=["content-length", "chunked"],
)
async def test_body_stalled_past_client_timeout_gets_408_and_aborts_the_upload(
    env: Env, head: bytes
) -> None:
    result = await env.exchange(head)
    assert len(result.replies) == 1, result.raw[:300]
    assert_gateway_error(result.replies[0], 408, "client_timeout")
    assert result.closed
    # Closed with the 408, not after aiohttp's lingering read of the body.
    assert CLIENT_TIMEOUT * 0.9 < result.elapsed < CLIENT_TIMEOUT + 1.0
    [seen] = env.seen()
    await wait_for(lambda: seen.outcome != "reading", within=2)
    assert seen.outcome == "aborted"  # the target never saw a complete upload
    await env.assert_still_serving()


async def test_partial_head_pipelined_behind_a_request_is_cut_after_client_timeout(
    env: Env,
) -> None:
    for parts in (
        (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHo",),
        (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", 0.05, b"GET /b HTTP/1.1\r\nHo"),
    ):
        result = await env.exchange(*parts)
        assert [r.status for r in result.replies] == [200, 408], result.raw[:500]
        assert_gateway_error(result.replies[1], 408, "client_timeout")
        assert result.closed
        assert result.elapsed < CLIENT_TIMEOUT + 1.0
    assert [s.raw_path for s in env.app.seen] == ["/a", "/a"]


@pytest.mark.parametrize(
    "first",
    [
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n",
        POST + b"Content-Length: 5\r\n\r\nhello",
        CHUNKED + b"5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["get", "content-length-body", "chunked-body"],
)
async def test_idle_keepalive_connection_outlives_client_timeout(env: Env, first: bytes) -> None:
    # client_timeout is about a request being sent; between requests the
    # (longer) keepalive_timeout rules, as with nginx.
    result = await env.exchange(
        first,
        2.5 * CLIENT_TIMEOUT,
        b"GET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert [r.status for r in result.replies] == [200, 200], result.raw[:500]
    assert [s.raw_path for s in env.app.seen][-1] == "/2"


@pytest.mark.slow
async def test_a_thousand_silent_connections_do_not_starve_a_normal_client(
    make_env: EnvFactory,
) -> None:
    timeout = 1.5  # long enough that all 1000 are open at once
    env = await make_env(client_timeout=timeout)
    count = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * count + 256  # client and server ends, plus the rest
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    first_opened_at = time.monotonic()
    try:
        async with asyncio.timeout(10):
            for _ in range(count // 100):
                batch = await asyncio.gather(
                    *(asyncio.open_connection(env.gw.host, env.gw.port) for _ in range(100))
                )
                for _reader, writer in batch:
                    writer.write(b"GET /loris HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                connections.extend(batch)

        started = time.monotonic()
        result = await env.exchange(
            b"GET /normal HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", wait=1.0
        )
        assert [r.status for r in result.replies] == [200]
        assert time.monotonic() - started < 1.0
        # Served while all 1000 were open: none can be cut before it has
        # been silent for the timeout.
        assert time.monotonic() - first_opened_at < timeout
        assert all(not reader.at_eof() for reader, _ in connections)

        async def cut(reader: asyncio.StreamReader) -> bytes:
            return await reader.read()  # to EOF

        async with asyncio.timeout(timeout + 3.0):
            answers = await asyncio.gather(*(cut(reader) for reader, _ in connections))
        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
        assert [s.raw_path for s in env.seen()] == ["/normal"]
    finally:
        for _reader, writer in connections:
            writer.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_refusals_reach_the_access_log_and_the_request_counter(env: Env) -> None:
    malformed = await env.exchange(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    stalled = await env.exchange(b"GET /never HTTP/1.1\r\nHo")
    lines = [json.loads(line) for line in env.gw.log_lines()]
    refused = [line for line in lines if line["route"] is None]
    assert [(line["status"], line["error"]) for line in refused] == [
        (400, "bad_request"),
        (408, "client_timeout"),
    ]
    assert refused[0]["request_id"] == malformed.replies[0].headers["x-request-id"]
    assert refused[1]["request_id"] == stalled.replies[0].headers["x-request-id"]
    assert refused[0]["client"] == "127.0.0.1"
    registry = env.gw.gateway.metrics.registry
    for code in ("400", "408"):
        sample = registry.get_sample_value(
            "gateway_requests_total", {"route": "", "method": "", "code": code}
        )
        assert sample == 1.0
