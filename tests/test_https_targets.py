"""https targets: the upstream client's TLS (h1client), against real TLS upstreams.

The gateway verifies targets against the system's trust store (it has no CA
option), so the test points OpenSSL's `SSL_CERT_FILE` at a throwaway CA
(trustme) in the gateway's environment: a subprocess (on uvloop, the default
loop), whose TLS context reads it when the first https connection is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from tests.gateway_process import SERVER_HEADER, metric_value, named_app, run_gateway
from tests.wire import hash_sink, read_head, read_response

MiB = 1024 * 1024
BIG = 8 * MiB + 3  # streamed both ways; https bodies are copied, never spliced
PATTERN = bytes(range(256)) * (BIG // 256 + 1)


def tls_app() -> web.Application:
    async def small(request: web.Request) -> web.Response:
        return web.Response(text=f"tls {request.path_qs}", headers={"X-Seen-Host": request.host})

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = BIG
        await response.prepare(request)
        for start in range(0, BIG, MiB):
            await response.write(PATTERN[start : min(start + MiB, BIG)])
        await response.write_eof()
        return response

    async def echo(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: streamed back as it arrives
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=0)
    app.router.add_get("/big", big)
    app.router.add_post("/sink", hash_sink)
    app.router.add_post("/echo", echo)
    app.router.add_get("/{tail:.*}", small)
    return app


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[int]:
    """An aiohttp upstream on https://127.0.0.1:PORT, its certificate from `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    runner = web.AppRunner(tls_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


def config(port: int, host: str = "127.0.0.1", route: str = "") -> str:
    return config_of([f"https://{host}:{port}"], route)


def config_of(targets: list[str], route: str = "") -> str:
    return SERVER_HEADER + (
        f"[upstreams.tls]\ntargets = {json.dumps(targets)}\n"
        '[[routes]]\nname = "tls"\npath = "/"\nupstream = "tls"\npreserve_host = false\n' + route
    )


def trusting(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """The gateway's environment, trusting only `ca`."""
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    return {"SSL_CERT_FILE": str(pem), "SSL_CERT_DIR": os.devnull}


async def test_requests_and_bodies_reach_an_https_target_intact(
    tmp_path: Path, ca: trustme.CA, tls_upstream: int
) -> None:
    payload = os.urandom(BIG)
    async with run_gateway(tmp_path, config(tls_upstream), env=trusting(ca, tmp_path)) as gw:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            async with session.get(gw.url + "/a?b=1") as resp:
                assert resp.status == 200
                assert await resp.text() == "tls /a?b=1"
                # preserve_host = false: the target's own authority, as its
                # certificate names it.
                assert resp.headers["X-Seen-Host"] == f"127.0.0.1:{tls_upstream}"
            async with session.get(gw.url + "/big") as resp:
                assert resp.status == 200
                assert await resp.read() == PATTERN[:BIG]
            async with session.post(gw.url + "/sink", data=io.BytesIO(payload)) as resp:
                seen = await resp.json()
    assert seen == {"size": BIG, "sha256": hashlib.sha256(payload).hexdigest()}


async def test_an_https_target_with_an_untrusted_certificate_is_a_json_502(
    tmp_path: Path, tls_upstream: int
) -> None:
    other = trustme.CA()  # the gateway trusts this one, not the target's issuer
    env = trusting(other, tmp_path)
    async with (
        run_gateway(tmp_path, config(tls_upstream), env=env) as gw,
        aiohttp.ClientSession() as session,
        session.get(gw.url + "/x") as resp,
    ):
        assert resp.status == 502
        body = json.loads(await resp.read())
    assert body["error"] == "bad_gateway"
    assert body["request_id"] == resp.headers["X-Request-ID"]


class RawTlsUpstream:
    """A TLS upstream on 127.0.0.1 from raw asyncio streams: counts connections,
    records the SNI name of each handshake, keeps connections alive, and
    answers each request with `answer(writer)`."""

    def __init__(self, ca: trustme.CA, name: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(self.context)
        self.context.sni_callback = self._sni
        self.server_names: list[str | None] = []
        self.connections = 0
        self.answer: Callable[[asyncio.StreamWriter], Awaitable[bool]] = self.ok
        # False: after a head, read nothing more until closed (a stalled upload).
        self.read_bodies = True
        self.stalled = 0
        self._closing = asyncio.Event()
        self._server: asyncio.Server | None = None

    def _sni(self, _obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.server_names.append(name)

    @staticmethod
    async def ok(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True  # keep the connection

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for _ in range(100):  # bounded: a test sends a handful
                _, headers = await read_head(reader)
                if not self.read_bodies:
                    self.stalled += 1
                    await self._closing.wait()
                    return
                await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self.answer(writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return
        finally:
            writer.transport.abort()

    async def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def raw_localhost(ca: trustme.CA) -> AsyncIterator[tuple[RawTlsUpstream, int]]:
    """A raw TLS upstream with a certificate for "localhost" (listening on 127.0.0.1)."""
    upstream = RawTlsUpstream(ca, "localhost")
    port = await upstream.start()
    yield upstream, port
    await upstream.close()


async def test_the_tls_handshake_sends_the_target_urls_host_as_sni(
    tmp_path: Path, ca: trustme.CA, raw_localhost: tuple[RawTlsUpstream, int]
) -> None:
    upstream, port = raw_localhost
    env = trusting(ca, tmp_path)
    async with (
        run_gateway(tmp_path, config(port, host="localhost"), env=env) as gw,
        aiohttp.ClientSession() as session,
        session.get(gw.url + "/x") as resp,
    ):
        assert resp.status == 200
        assert await resp.read() == b"ok"
    # The certificate names "localhost" only: verified against the URL's
    # host, which the handshake also announced.
    assert upstream.server_names == ["localhost"]


async def test_sequential_requests_to_an_https_target_reuse_one_tls_connection(
    tmp_path: Path, ca: trustme.CA, raw_localhost: tuple[RawTlsUpstream, int]
) -> None:
    upstream, port = raw_localhost
    async with run_gateway(tmp_path, config(port, "localhost"), env=trusting(ca, tmp_path)) as gw:
        for _ in range(3):
            # A fresh client connection each time: only the upstream side is pooled.
            async with aiohttp.ClientSession() as session, session.get(gw.url + "/") as resp:
                assert resp.status == 200
                assert await resp.read() == b"ok"
    assert upstream.connections == 1
    assert upstream.server_names == ["localhost"]


async def test_an_8_mib_chunked_body_echoed_by_an_https_target_is_intact_both_ways(
    tmp_path: Path, ca: trustme.CA, tls_upstream: int
) -> None:
    payload = os.urandom(BIG)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, BIG, 300_001):  # odd sizes: no record boundary lines up
            yield payload[start : start + 300_001]

    async with run_gateway(tmp_path, config(tls_upstream), env=trusting(ca, tmp_path)) as gw:
        timeout = aiohttp.ClientTimeout(total=60)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(gw.url + "/echo", data=chunks()) as resp,
        ):
            assert resp.status == 200
            digest = hashlib.sha256()
            size = 0
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
    assert size == BIG
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_a_tls_target_that_resets_mid_body_aborts_the_client_transfer(
    tmp_path: Path, ca: trustme.CA, raw_localhost: tuple[RawTlsUpstream, int]
) -> None:
    upstream, port = raw_localhost
    declared = 4 * MiB

    async def reset_mid_body(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared)
        writer.write(b"x" * (512 * 1024))
        await writer.drain()
        sock = writer.get_extra_info("socket")
        # SO_LINGER 0: close() sends an RST, not a FIN (nor a TLS close_notify).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return False

    upstream.answer = reset_mid_body
    async with run_gateway(tmp_path, config(port, "localhost"), env=trusting(ca, tmp_path)) as gw:
        host, _, gw_port = gw.url.removeprefix("http://").rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(gw_port))
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\n")
            async with asyncio.timeout(20):
                status_line, headers = await read_head(reader)
                received = 0
                with contextlib.suppress(ConnectionError):
                    while chunk := await reader.read(65536):
                        received += len(chunk)
        finally:
            writer.close()
    # The head went out with the target's status: the only honest signal
    # left is a transfer cut short (CONTRACT.md "upstream_aborted").
    assert status_line.startswith("HTTP/1.1 200")
    assert headers["content-length"] == str(declared)
    assert received < declared


async def test_a_plain_http_server_behind_an_https_target_is_a_json_502(
    tmp_path: Path, ca: trustme.CA
) -> None:
    runner = web.AppRunner(named_app("plain"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        async with (
            run_gateway(tmp_path, config(port), env=trusting(ca, tmp_path)) as gw,
            aiohttp.ClientSession() as session,
            session.get(gw.url + "/x") as resp,
        ):
            assert resp.status == 502
            body = json.loads(await resp.read())
            assert "TLS handshake with https://127.0.0.1" in gw.stderr()
    finally:
        await runner.cleanup()
    assert body["error"] == "bad_gateway"
    assert str(port) not in json.dumps(body)  # the target's address stays internal


async def test_an_https_target_whose_certificate_names_another_host_is_a_json_502(
    tmp_path: Path, ca: trustme.CA
) -> None:
    upstream = RawTlsUpstream(ca, "other.example")  # trusted issuer, wrong name
    port = await upstream.start()
    try:
        async with (
            run_gateway(tmp_path, config(port, "localhost"), env=trusting(ca, tmp_path)) as gw,
            aiohttp.ClientSession() as session,
            session.get(gw.url + "/x") as resp,
        ):
            assert resp.status == 502
            body = json.loads(await resp.read())
            assert "certificate" in gw.stderr().lower()
    finally:
        await upstream.close()
    assert body["error"] == "bad_gateway"
    assert upstream.connections == 0  # no request ever reached it


async def test_an_https_target_silent_during_the_handshake_is_a_504(
    tmp_path: Path, ca: trustme.CA
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # takes the ClientHello, never answers it

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        toml = config(port, route="connect_timeout = 0.5\n")
        async with (
            run_gateway(tmp_path, toml, env=trusting(ca, tmp_path)) as gw,
            aiohttp.ClientSession() as session,
            asyncio.timeout(10),
            session.get(gw.url + "/x") as resp,
        ):
            assert resp.status == 504
            body = json.loads(await resp.read())
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert body["error"] == "upstream_timeout"
    assert accepted  # the TCP connect succeeded: it was the handshake that timed out


async def test_a_failed_tls_handshake_is_a_connect_failure_retried_on_another_target(
    tmp_path: Path, ca: trustme.CA, tls_upstream: int
) -> None:
    """Even a POST goes again: no byte of it reached the target (CONTRACT.md "Retries")."""
    wrong = RawTlsUpstream(ca, "other.example")
    wrong_port = await wrong.start()
    targets = [f"https://127.0.0.1:{wrong_port}", f"https://127.0.0.1:{tls_upstream}"]
    payload = os.urandom(100_000)
    try:
        toml = config_of(targets, route="retries = 1\n")
        async with (
            run_gateway(tmp_path, toml, env=trusting(ca, tmp_path)) as gw,
            aiohttp.ClientSession() as session,
        ):
            for _ in range(2):  # round robin: one of them starts on the wrong target
                async with session.post(gw.url + "/sink", data=payload) as resp:
                    assert resp.status == 200
                    assert await resp.json() == {
                        "size": len(payload),
                        "sha256": hashlib.sha256(payload).hexdigest(),
                    }
            async with session.get(gw.admin_url + "/metrics") as resp:
                metrics = await resp.text()
    finally:
        await wrong.close()
    errors = metric_value(
        metrics,
        "gateway_upstream_requests_total",
        upstream="tls",
        target=targets[0],
        outcome="error",
    )
    assert errors is not None
    assert errors >= 1


async def test_an_https_target_that_takes_none_of_an_upload_is_a_504_after_read_timeout(
    tmp_path: Path, ca: trustme.CA, raw_localhost: tuple[RawTlsUpstream, int]
) -> None:
    """nginx's proxy_send_timeout, as on plain-http targets: the body waits on
    a target that reads nothing, and read_timeout bounds the wait."""
    upstream, port = raw_localhost
    upstream.read_bodies = False
    toml = config(port, "localhost", route="read_timeout = 1.0\n")
    size = 64 * MiB  # far beyond what the socket buffers hold
    async with run_gateway(tmp_path, toml, env=trusting(ca, tmp_path)) as gw:
        host, _, gw_port = gw.url.removeprefix("http://").rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(gw_port))

        async def send_until_refused() -> None:
            writer.write(b"POST /up HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % size)
            block = b"z" * MiB
            for _ in range(size // MiB):
                writer.write(block)
                await writer.drain()

        sending = asyncio.create_task(send_until_refused())
        try:
            async with asyncio.timeout(20):
                status, _, body = await read_response(reader)
        finally:
            writer.transport.abort()
            (sent,) = await asyncio.gather(sending, return_exceptions=True)
    assert status == 504
    assert json.loads(body)["error"] == "upstream_timeout"
    assert sent is not None  # the body was never taken whole
    assert upstream.stalled == 1
