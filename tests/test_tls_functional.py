"""TLS listeners and TLS to targets (CONTRACT.md "TLS"): certificates made here
with trustme, real TLS clients and servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import trustme
from aiohttp import web

from gateway.core.config import ConfigError, load
from gateway.server import Gateway
from gateway.state.log import AccessLog
from gateway.wire import splice
from tests.conftest import GatewayFactory, RunningGateway, UpstreamFactory, wait_for
from tests.gateway_process import run_command, run_gateway
from tests.wire import read_response

HOST = "127.0.0.1"


class Pair:
    """A certificate and key written to files, for one set of names."""

    def __init__(self, ca: trustme.CA, directory: Path, name: str, *hosts: str) -> None:
        self.issued = ca.issue_cert(*hosts)
        self.cert = directory / f"{name}.pem"
        self.key = directory / f"{name}.key"
        self.write(self.issued)

    def write(self, issued: trustme.LeafCert) -> None:
        issued.cert_chain_pems[0].write_to_path(str(self.cert))
        for blob in issued.cert_chain_pems[1:]:
            blob.write_to_path(str(self.cert), append=True)
        issued.private_key_pem.write_to_path(str(self.key))


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def echo_app() -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "proto": request.headers.get("X-Forwarded-Proto"),
                "path": request.path_qs,
            }
        )

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse(max_msg_size=0)
        await socket_.prepare(request)
        async for message in socket_:
            if message.type == aiohttp.WSMsgType.BINARY:
                await socket_.send_bytes(message.data)
        return socket_

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/{tail:.*}", answer)
    return app


def tls_config(upstream_port: int, certificates: list[Pair], extra_server: str = "") -> str:
    blocks = "".join(
        f'\n[[server.certificates]]\ncert = "{pair.cert}"\nkey = "{pair.key}"\n'
        for pair in certificates
    )
    return f"""
[server]
listen = [{{ address = "127.0.0.1:0", tls = true }}, "127.0.0.1:0"]
admin = ""
{extra_server}
{blocks}
[upstreams.app]
targets = ["http://127.0.0.1:{upstream_port}"]

[[routes]]
name = "all"
path = "/"
upstream = "app"
"""


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


async def get(
    port: int, context: ssl.SSLContext, name: str | None, path: str = "/x"
) -> tuple[int, bytes, ssl.SSLObject | None]:
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=context, server_hostname=name or ""
    )
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode())
        async with asyncio.timeout(10):
            status, _, body = await read_response(reader)
        return status, body, writer.get_extra_info("ssl_object")
    finally:
        writer.close()


def _peer(sslobj: ssl.SSLObject | None) -> dict[str, Any]:
    assert sslobj is not None
    cert = sslobj.getpeercert()
    assert cert is not None
    return cast(dict[str, Any], cert)


def peer_names(sslobj: ssl.SSLObject | None) -> list[str]:
    return [str(value) for kind, value in _peer(sslobj).get("subjectAltName", ()) if kind == "DNS"]


def serial(sslobj: ssl.SSLObject | None) -> str:
    return str(_peer(sslobj)["serialNumber"])


async def start_tls(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    pairs: list[Pair],
    extra_server: str = "",
) -> RunningGateway:
    server = await start_upstream(echo_app())
    assert server.port is not None
    return await make_gateway(tls_config(server.port, pairs, extra_server))


async def test_a_tls_listener_serves_https_with_x_forwarded_proto_and_alpn_http11(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    pair = Pair(ca, tmp_path, "a", "a.test")
    gw = await start_tls(make_gateway, start_upstream, [pair])
    tls_port = gw.port
    status, body, sslobj = await get(tls_port, client_context(ca), "a.test")
    assert status == 200
    assert json.loads(body)["proto"] == "https"
    assert sslobj is not None
    assert sslobj.selected_alpn_protocol() == "http/1.1"
    # The plain listener beside it says http.
    plain = gw.gateway.addresses[1]
    async with aiohttp.ClientSession() as session, session.get(f"http://{plain}/x") as response:
        assert (await response.json())["proto"] == "http"


async def test_an_h2_only_client_is_not_told_h2_and_its_preface_is_refused(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    gw = await start_tls(make_gateway, start_upstream, [Pair(ca, tmp_path, "a", "a.test")])
    context = client_context(ca)
    context.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection(
        HOST, gw.port, ssl=context, server_hostname="a.test"
    )
    try:
        # No protocol agreed (OpenSSL does not send the RFC 7301 alert), so a
        # conforming client does not speak h2; one that does is refused.
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        async with asyncio.timeout(10):
            status, _, _ = await read_response(reader)
        assert status >= 400
    finally:
        writer.close()


async def test_the_certificate_is_chosen_by_sni_and_the_first_serves_the_rest(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    first = Pair(ca, tmp_path, "a", "a.test")
    second = Pair(ca, tmp_path, "b", "b.test", "*.wild.test")
    gw = await start_tls(make_gateway, start_upstream, [first, second])
    context = client_context(ca)
    _, _, chosen = await get(gw.port, context, "b.test")
    assert peer_names(chosen) == ["b.test", "*.wild.test"]
    _, _, chosen = await get(gw.port, context, "x.wild.test")
    assert peer_names(chosen) == ["b.test", "*.wild.test"]
    loose = ssl.create_default_context()
    ca.configure_trust(loose)
    loose.check_hostname = False
    _, _, chosen = await get(gw.port, loose, "other.test")
    assert peer_names(chosen) == ["a.test"]
    _, _, chosen = await get(gw.port, loose, None)  # no SNI at all
    assert peer_names(chosen) == ["a.test"]


def _client_hello(name: bytes) -> bytes:
    """A real ClientHello whose SNI bytes are replaced by `name` (same length)."""
    context = ssl.create_default_context()
    placeholder = "a" * len(name) + ".test"
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_hostname=placeholder)
    with contextlib.suppress(ssl.SSLWantReadError):
        sslobj.do_handshake()
    hello = outgoing.read()
    return hello.replace(b"a" * len(name) + b".test", name + b".test")


@pytest.mark.parametrize("name", [b"\xff\xfe\x00\x01", b"..", b"\x1b[31m", b"a" * 60])
async def test_garbage_sni_costs_one_failed_or_default_handshake(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    ca: trustme.CA,
    tmp_path: Path,
    name: bytes,
) -> None:
    gw = await start_tls(make_gateway, start_upstream, [Pair(ca, tmp_path, "a", "a.test")])
    reader, writer = await asyncio.open_connection(HOST, gw.port)
    try:
        writer.write(_client_hello(name))
        async with asyncio.timeout(10):
            # An alert, or a ServerHello with the default certificate: either
            # way a TLS record comes back, and the gateway stays up.
            answer = await reader.read(5)
        assert not answer or answer[0] in (0x15, 0x16)
    finally:
        writer.transport.abort()
    status, _, _ = await get(gw.port, client_context(ca), "a.test")
    assert status == 200


async def test_min_version_13_refuses_a_tls12_client(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    gw = await start_tls(
        make_gateway,
        start_upstream,
        [Pair(ca, tmp_path, "a", "a.test")],
        '[server.tls]\nmin_version = "1.3"',
    )
    old = client_context(ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await get(gw.port, old, "a.test")
    _, _, sslobj = await get(gw.port, client_context(ca), "a.test")
    assert sslobj is not None
    assert sslobj.version() == "TLSv1.3"


async def test_a_stalled_client_hello_is_cut_at_client_timeout_and_costs_no_request(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    gw = await start_tls(
        make_gateway,
        start_upstream,
        [Pair(ca, tmp_path, "a", "a.test")],
        "client_timeout = 0.5",
    )
    hello = _client_hello(b"aaaa")
    stalled = []
    try:
        for part in (b"", hello[:3], hello[: len(hello) // 2]):
            reader, writer = await asyncio.open_connection(HOST, gw.port)
            writer.write(part)
            stalled.append((reader, writer))
        server = gw.gateway._proxy_server
        assert server is not None
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(10):
            for reader, _ in stalled:
                with contextlib.suppress(ConnectionError):
                    await reader.read()
                # No connection object, no handler task, while it stalled.
                assert not server.connections
                assert not server.tasks
        took = asyncio.get_running_loop().time() - started
        assert took < 5.0
    finally:
        for _, writer in stalled:
            writer.transport.abort()
    status, _, _ = await get(gw.port, client_context(ca), "a.test")
    assert status == 200


async def test_sighup_rotates_certificates_and_open_connections_keep_theirs(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    pair = Pair(ca, tmp_path, "a", "a.test")
    server = await start_upstream(echo_app())
    assert server.port is not None
    config_path = tmp_path / "routes.toml"
    config_path.write_text(tls_config(server.port, [pair]))
    # Loaded from its file, so that the reload reads that file again.
    gateway = Gateway(
        load(str(config_path)), environ={}, access_log=AccessLog("off", stream=io.StringIO())
    )
    await gateway.start()
    try:
        await _rotate(gateway, ca, pair)
    finally:
        await gateway.close()


async def _rotate(gateway: Gateway, ca: trustme.CA, pair: Pair) -> None:
    port = int(gateway.addresses[0].rpartition(":")[2])
    context = client_context(ca)
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=context, server_hostname="a.test"
    )
    try:
        old_serial = serial(writer.get_extra_info("ssl_object"))
        renewed = ca.issue_cert("a.test")
        pair.write(renewed)  # certbot's renewal writes new files in place
        assert gateway.reloader is not None
        assert await gateway.reloader.reload_once()
        _, _, fresh = await get(port, context, "a.test")
        new_serial = serial(fresh)
        assert new_serial != old_serial
        # The connection opened before keeps its pair and still serves.
        writer.write(b"GET /still HTTP/1.1\r\nHost: a.test\r\n\r\n")
        async with asyncio.timeout(10):
            status, _, body = await read_response(reader)
        assert status == 200
        assert json.loads(body)["path"] == "/still"
        assert serial(writer.get_extra_info("ssl_object")) == old_serial
        # A mismatched pair (another certificate's key) rejects the reload.
        other = ca.issue_cert("a.test")
        other.private_key_pem.write_to_path(str(pair.key))
        assert not await gateway.reloader.reload_once()
        _, _, kept = await get(port, context, "a.test")
        assert serial(kept) == new_serial
    finally:
        writer.close()


async def test_a_reload_rejected_by_the_commit_keeps_the_old_listener_certificate(
    start_upstream: UpstreamFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    # The listener pair loads fine but an upstream CA file (loaded by the
    # commit, after the listener pairs) is garbage: the whole reload is
    # rejected, so the renewed listener certificate must not be served yet.
    pair = Pair(ca, tmp_path, "a", "a.test")
    server = await start_upstream(echo_app())
    assert server.port is not None
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config_path = tmp_path / "routes.toml"
    config_path.write_text(
        tls_config(server.port, [pair])
        + f"""
[upstreams.secure]
targets = ["https://127.0.0.1:9"]
[upstreams.secure.tls]
ca_file = "{ca_file}"
"""
    )
    gateway = Gateway(
        load(str(config_path)), environ={}, access_log=AccessLog("off", stream=io.StringIO())
    )
    await gateway.start()
    try:
        port = int(gateway.addresses[0].rpartition(":")[2])
        context = client_context(ca)
        _, _, first = await get(port, context, "a.test")
        old_serial = serial(first)
        pair.write(ca.issue_cert("a.test"))  # a renewed listener certificate
        prepared = gateway.prepare(load(str(config_path)))  # the worker-thread half
        ca_file.write_text("garbage, replaced between prepare and apply\n")
        with pytest.raises(ConfigError):
            gateway.apply(prepared)
        _, _, after = await get(port, context, "a.test")
        assert serial(after) == old_serial
    finally:
        await gateway.close()


async def test_a_websocket_tunnel_runs_over_a_tls_listener(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    gw = await start_tls(make_gateway, start_upstream, [Pair(ca, tmp_path, "a", "a.test")])
    payload = os.urandom(2 * 1024 * 1024)
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        asyncio.timeout(30),
        session.ws_connect(
            f"https://{HOST}:{gw.port}/ws", server_hostname="a.test", max_msg_size=0
        ) as ws,
    ):
        assert splice.Relay.tunnels_active == 0  # TLS: copied, never spliced
        await ws.send_bytes(payload)
        assert await ws.receive_bytes() == payload


# -- TLS to targets --------------------------------------------------------------


@pytest.fixture
async def mtls_upstream(ca: trustme.CA) -> AsyncIterator[int]:
    """An https target (certificate for billing.internal) that demands a client
    certificate issued by `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("billing.internal").configure_cert(context)
    context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(context)

    async def answer(request: web.Request) -> web.Response:
        sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
        peer = sslobj.getpeercert() if sslobj is not None else None
        subject = dict(x[0] for x in peer["subject"]) if peer and peer.get("subject") else {}
        names = [v for k, v in (peer or {}).get("subjectAltName", ()) if k == "DNS"]
        return web.json_response({"client": names, "subject": subject})

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=context)
    await site.start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


def upstream_tls_config(port: int, tls: str) -> str:
    return f"""
[upstreams.billing]
targets = ["https://127.0.0.1:{port}"]

[upstreams.billing.tls]
{tls}

[[routes]]
name = "billing"
path = "/"
upstream = "billing"
"""


async def test_mutual_tls_to_a_target_that_demands_a_client_certificate(
    make_gateway: GatewayFactory, ca: trustme.CA, tmp_path: Path, mtls_upstream: int
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = Pair(ca, tmp_path, "client", "gateway.client")
    gw = await make_gateway(
        upstream_tls_config(
            mtls_upstream,
            f'ca_file = "{ca_file}"\nserver_name = "billing.internal"\n'
            f'cert = "{client.cert}"\nkey = "{client.key}"',
        )
    )
    async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/pay") as response:
        assert response.status == 200
        assert (await response.json())["client"] == ["gateway.client"]


async def test_without_its_client_certificate_the_target_refuses_and_it_is_a_502(
    make_gateway: GatewayFactory, ca: trustme.CA, tmp_path: Path, mtls_upstream: int
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    gw = await make_gateway(
        upstream_tls_config(
            mtls_upstream, f'ca_file = "{ca_file}"\nserver_name = "billing.internal"'
        )
    )
    async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/pay") as response:
        assert response.status == 502
        assert (await response.json())["error"] == "bad_gateway"


async def test_a_target_failing_verification_is_a_502_with_the_reason_in_the_log(
    make_gateway: GatewayFactory,
    ca: trustme.CA,
    tmp_path: Path,
    mtls_upstream: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = Pair(ca, tmp_path, "client", "gateway.client")
    # No server_name: the name checked is 127.0.0.1, which the certificate lacks.
    gw = await make_gateway(
        upstream_tls_config(
            mtls_upstream, f'ca_file = "{ca_file}"\ncert = "{client.cert}"\nkey = "{client.key}"'
        )
    )
    async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/pay") as response:
        assert response.status == 502
        body = await response.text()
    assert "127.0.0.1" not in body  # topology stays in the log
    assert any("certificate verify failed" in r.getMessage() for r in caplog.records)


async def test_verify_false_talks_to_an_untrusted_target(
    make_gateway: GatewayFactory, tmp_path: Path, mtls_upstream: int
) -> None:
    stranger = trustme.CA()  # a client certificate the target trusts, from its CA...
    del stranger
    other_ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other_ca.issue_cert("nobody.test").configure_cert(context)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="untrusted but encrypted")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=context)
    await site.start()
    try:
        port = int(runner.addresses[0][1])
        gw = await make_gateway(upstream_tls_config(port, "verify = false"))
        async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/") as response:
            assert response.status == 200
            assert await response.text() == "untrusted but encrypted"
    finally:
        await runner.cleanup()


# -- gateway check ----------------------------------------------------------------


def test_check_rejects_missing_mismatched_and_garbage_files(ca: trustme.CA, tmp_path: Path) -> None:
    good = Pair(ca, tmp_path, "good", "a.test")
    other = Pair(ca, tmp_path, "other", "b.test")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    text = f"""
[server]
listen = [{{ address = "127.0.0.1:8443", tls = true }}]

[[server.certificates]]
cert = "{good.cert}"
key = "{other.key}"

[[server.certificates]]
cert = "{tmp_path / "missing.pem"}"
key = "{good.key}"

[[server.certificates]]
cert = "{garbage}"
key = "{good.key}"

[upstreams.u]
targets = ["https://127.0.0.1:1"]

[upstreams.u.tls]
ca_file = "{garbage}"
cert = "{good.cert}"

[[routes]]
name = "r"
path = "/"
upstream = "u"
websocket = "yes"
"""
    path = tmp_path / "routes.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as failed:
        load(str(path))
    errors = "\n".join(failed.value.errors)
    assert "server.certificates[0]" in errors
    assert "does not belong" in errors
    assert "server.certificates[1]" in errors
    assert "cannot read certificate" in errors
    assert "server.certificates[2]" in errors
    assert "upstreams.u.tls.key: required with cert" in errors
    assert "upstreams.u.tls.ca_file" in errors
    assert 'routes[0] ("r").websocket' in errors


def test_a_tls_listener_without_certificates_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(
        '[server]\nlisten = [{ address = "127.0.0.1:8443", tls = true }, { tls = true }]\n'
        '[upstreams.u]\ntargets = ["http://127.0.0.1:1"]\n'
        '[[routes]]\nname = "r"\npath = "/"\nupstream = "u"\n'
    )
    with pytest.raises(ConfigError) as failed:
        load(str(path))
    errors = "\n".join(failed.value.errors)
    assert "server.certificates: required" in errors
    assert "server.listen[1].address: required" in errors


def test_hosts_default_to_the_certificate_names(ca: trustme.CA, tmp_path: Path) -> None:
    pair = Pair(ca, tmp_path, "a", "a.test", "*.b.test")
    path = tmp_path / "routes.toml"
    path.write_text(
        '[server]\nlisten = [{ address = "127.0.0.1:8443", tls = true }]\n'
        f'[[server.certificates]]\ncert = "{pair.cert}"\nkey = "{pair.key}"\n'
        '[upstreams.u]\ntargets = ["http://127.0.0.1:1"]\n'
        '[[routes]]\nname = "r"\npath = "/"\nupstream = "u"\n'
    )
    config = load(str(path))
    assert config.server.certificates[0].hosts == ("a.test", "*.b.test")
    assert config.server.tls_listen == (0,)


# -- socket activation ---------------------------------------------------------------


async def test_an_inherited_socket_named_tls_is_a_tls_listener(
    tmp_path: Path, start_upstream: UpstreamFactory, ca: trustme.CA
) -> None:
    server = await start_upstream(echo_app())
    assert server.port is not None
    pair = Pair(ca, tmp_path, "a", "a.test")
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    toml = tls_config(server.port, [pair]).replace(
        '[{ address = "127.0.0.1:0", tls = true }, "127.0.0.1:0"]', '["127.0.0.1:1"]'
    )
    command = run_command(tmp_path / "routes.toml")
    # Python, not sh: dash takes no descriptor numbers above 9.
    launcher = (
        "import os, sys; "
        f"os.dup2({fd}, 3); os.close({fd}); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='tls'); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    argv = [sys.executable, "-c", launcher, *command]
    try:
        async with run_gateway(tmp_path, toml, argv=argv, pass_fds=[fd]):
            listener.close()
            status, body, sslobj = await get(port, client_context(ca), "a.test")
            assert status == 200
            assert json.loads(body)["proto"] == "https"
            assert sslobj is not None
    finally:
        listener.close()


async def test_health_probes_use_the_upstream_tls_settings(
    make_gateway: GatewayFactory, ca: trustme.CA, tmp_path: Path, mtls_upstream: int
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = Pair(ca, tmp_path, "client", "gateway.client")
    gw = await make_gateway(
        upstream_tls_config(
            mtls_upstream,
            f'ca_file = "{ca_file}"\nserver_name = "billing.internal"\n'
            f'cert = "{client.cert}"\nkey = "{client.key}"',
        ).replace(
            "[upstreams.billing.tls]",
            '[upstreams.billing.health]\npath = "/h"\ninterval = 0.05\n'
            "unhealthy_threshold = 1\nhealthy_threshold = 1\n\n[upstreams.billing.tls]",
        )
    )
    assert gw.gateway.box is not None
    target = gw.gateway.box.snapshot.pools["billing"].targets[0]
    probes = 0

    def probed() -> bool:
        nonlocal probes
        probes += 1
        return probes > 40  # about a second of 50 ms probes, checked every 10-20 ms

    await wait_for(probed)
    # Verified against ca_file with the client certificate: still healthy.
    assert target.healthy
