"""gateway.h1client's https: TLS on the pooled connection, in process (asyncio's loop;
tests/test_https_targets.py runs the gateway, on uvloop)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

from gateway.wire.h1client import ConnectionPool, H1ConnectError, H1Error, H1Response, H1TLSError
from tests.wire import read_head

HOST = "127.0.0.1"
MiB = 1024 * 1024


class TlsServer:
    """A keep-alive TLS server answering every request with `body` (Content-Length)."""

    def __init__(self, ca: trustme.CA, name: str, body: bytes = b"ok") -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(self.context)
        self.context.sni_callback = self._sni
        self.body = body
        self.server_names: list[str | None] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    def _sni(self, _obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.server_names.append(name)

    async def start(self) -> TlsServer:
        self._server = await asyncio.start_server(self._serve, HOST, 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for _ in range(100):
                await read_head(reader)
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body)
                writer.write(head + self.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, asyncio.CancelledError):
            pass  # cancelled at close(): ends quietly, not as a "cancelled" task
        finally:
            writer.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def pool(ca: trustme.CA) -> AsyncIterator[ConnectionPool]:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    connections = ConnectionPool(ssl_context=context)
    yield connections
    await connections.close()


async def get(
    pool: ConnectionPool, host: str, port: int, connect_timeout: float = 5.0
) -> H1Response:
    return await pool.request(
        "GET", host, port, "/", [("Host", "t")], None, None, connect_timeout, 5.0, scheme="https"
    )


async def read_all(response: H1Response) -> bytes:
    chunks = []
    async with asyncio.timeout(10):
        while chunk := await response.read_chunk():
            chunks.append(chunk)
    return b"".join(chunks)


async def test_an_https_body_is_read_intact_never_offered_for_splicing_and_pooled(
    ca: trustme.CA, pool: ConnectionPool
) -> None:
    body = os.urandom(2 * MiB + 1)  # over splice.MIN_BYTES: spliced, were it plain http
    server = await TlsServer(ca, "localhost", body).start()
    try:
        for _ in range(2):
            async with asyncio.timeout(10):
                response = await get(pool, "localhost", server.port)
            assert response.unread() > 0
            assert response.dup_socket() is None  # TLS records, not the body
            assert hashlib.sha256(await read_all(response)).digest() == (
                hashlib.sha256(body).digest()
            )
            response.release()
        assert server.connections == 1  # the second request reused the first connection
        assert server.server_names == ["localhost"]
        assert pool.idle_count == 1
    finally:
        await server.close()


async def test_an_http_and_an_https_connection_to_one_host_and_port_are_not_shared(
    ca: trustme.CA, pool: ConnectionPool
) -> None:
    server = await TlsServer(ca, HOST).start()
    try:
        async with asyncio.timeout(10):
            response = await get(pool, HOST, server.port)
            assert await read_all(response) == b"ok"
            response.release()
            assert pool.idle_count == 1
            # Plain http to the same address: not the pooled TLS connection
            # but a new one, whose plain request the TLS server refuses.
            with pytest.raises(H1Error):
                await pool.request(
                    "GET", HOST, server.port, "/", [("Host", "t")], None, None, 5.0, 5.0
                )
            assert pool.idle_count == 1  # the https one, untouched
            response = await get(pool, HOST, server.port)
            assert await read_all(response) == b"ok"
            response.release()
        assert server.connections == 1  # handshakes completed: the one reused
    finally:
        await server.close()


async def test_a_certificate_for_another_name_is_an_h1_tls_error(
    ca: trustme.CA, pool: ConnectionPool
) -> None:
    server = await TlsServer(ca, "other.example").start()
    try:
        async with asyncio.timeout(10):
            with pytest.raises(H1TLSError) as caught:
                await get(pool, "localhost", server.port)
        assert isinstance(caught.value, H1ConnectError)
        assert not caught.value.timed_out
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
        assert pool.open_count == 0
    finally:
        await server.close()


async def test_an_untrusted_issuer_is_an_h1_tls_error(ca: trustme.CA) -> None:
    server = await TlsServer(trustme.CA(), HOST).start()  # not `ca`
    context = ssl.create_default_context()
    ca.configure_trust(context)
    pool = ConnectionPool(ssl_context=context)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(H1TLSError):
                await get(pool, HOST, server.port)
    finally:
        await pool.close()
        await server.close()


async def test_a_plain_http_server_behind_https_is_an_h1_tls_error(pool: ConnectionPool) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello arrives; answer in plain HTTP
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            with pytest.raises(H1TLSError):
                await get(pool, HOST, port)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_handshake_the_target_never_answers_is_a_connect_timeout(
    pool: ConnectionPool,
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            with pytest.raises(H1ConnectError) as caught:
                await get(pool, HOST, port, connect_timeout=0.3)
        assert caught.value.timed_out
        assert held  # TCP was up: the handshake is what timed out
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("scheme", ["ftp", "HTTPS", "", "https "])
async def test_a_scheme_other_than_http_or_https_is_refused(
    pool: ConnectionPool, scheme: str
) -> None:
    with pytest.raises(ValueError, match="scheme"):
        await pool.request("GET", HOST, 9, "/", [], None, None, 1.0, 1.0, scheme=scheme)
    assert pool.open_count == 0
