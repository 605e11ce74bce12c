"""https targets: aiohttp's ClientSession path, against real TLS upstreams.

The gateway verifies targets against the system's trust store (it has no CA
option yet), so the test points OpenSSL's `SSL_CERT_FILE` at a throwaway CA
(trustme) in the gateway's environment: a subprocess, since aiohttp builds its
default SSL context when it is imported.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from tests.gateway_process import SERVER_HEADER, run_gateway
from tests.wire import hash_sink

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

    app = web.Application(client_max_size=0)
    app.router.add_get("/big", big)
    app.router.add_post("/sink", hash_sink)
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


def config(port: int) -> str:
    return SERVER_HEADER + (
        f'[upstreams.tls]\ntargets = ["https://127.0.0.1:{port}"]\n'
        '[[routes]]\nname = "tls"\npath = "/"\nupstream = "tls"\npreserve_host = false\n'
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
