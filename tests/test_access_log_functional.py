"""The access log over real sockets: one true line per request.

The bytes a gateway-made answer really sent, who cut a request short (the
client, the drain), and every attempt of a retried request with its target
and the status that target gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, RunningGateway, UpstreamFactory
from tests.gateway_process import free_port, upstream_url


def records(gw: RunningGateway) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.log_lines()]


def toml(targets: list[str], route: str = "", server: str = "") -> str:
    listed = ", ".join(f'"{t}"' for t in targets)
    return f"""
        [server]
        listen = ["127.0.0.1:0"]
        admin = ""
        {server}

        [upstreams.app]
        targets = [{listed}]
        [upstreams.app.breaker]
        failures = 1000

        [[routes]]
        name = "r"
        path = "/x"
        upstream = "app"
        methods = ["GET", "HEAD", "POST"]
        max_body_bytes = 10
        {route}

        [[routes]]
        name = "limited"
        path = "/limited"
        upstream = "app"
        [routes.rate_limit]
        rate = 0.001
        burst = 1
    """


class Stall:
    """An upstream whose answer waits for `release`; with `partial`, the head
    and a first piece of the body go out at once."""

    def __init__(self, partial: bool = False) -> None:
        self.partial = partial
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if self.partial:
            response.content_length = 10
            await response.prepare(request)
            await response.write(b"12345")
        self.arrived.set()
        async with asyncio.timeout(30):
            await self.release.wait()
        if not self.partial:
            return web.Response(text="done")
        await response.write(b"67890")
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        return app


def ok_app() -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


# -- gateway-made responses ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "data", "status"),
    [
        ("GET", "/nowhere", {}, None, 404),
        ("DELETE", "/x", {}, None, 405),
        ("POST", "/x", {}, b"x" * 11, 413),
        ("GET", "/limited", {}, None, 429),  # the second one; see below
        ("HEAD", "/nowhere", {}, None, 404),  # no body goes out after a HEAD
    ],
)
async def test_a_gateway_made_answer_logs_the_body_bytes_it_sent(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    method: str,
    path: str,
    headers: dict[str, str],
    data: bytes | None,
    status: int,
) -> None:
    upstream = await start_upstream(ok_app())
    gw = await make_gateway(toml([upstream_url(upstream)]))
    if status == 429:
        async with client.get(gw.url + path) as first:
            assert first.status == 200
    async with client.request(method, gw.url + path, headers=headers, data=data) as resp:
        body = await resp.read()
    assert resp.status == status
    assert (len(body) > 0) == (method != "HEAD")
    line = records(gw)[-1]
    assert (line["status"], line["bytes_out"]) == (status, len(body))
    assert line["aborted"] is None


async def test_a_malformed_request_refused_by_the_server_logs_its_body_bytes(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(ok_app())
    gw = await make_gateway(toml([upstream_url(upstream)]))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nBad\x01Name: y\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read()  # the server closes after a refusal
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    line = records(gw)[-1]
    assert (line["status"], line["error"]) == (400, "bad_request")
    assert line["bytes_out"] == len(body) > 0


# -- requests cut short --------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True], ids=["before-response", "mid-response"])
async def test_a_request_cut_by_the_drain_timeout_is_logged_as_the_drain_s_not_the_client_s(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, partial: bool
) -> None:
    stall = Stall(partial)
    upstream = await start_upstream(stall.app())
    gw = await make_gateway(toml([upstream_url(upstream)], server="drain_timeout = 0.3"))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            await stall.arrived.wait()
            await gw.gateway.drain()
            received = await reader.read()
    finally:
        stall.release.set()
        writer.close()
    line = records(gw)[-1]
    assert line["aborted"] == "drain"
    # What the client got if its response began; else 503, never 499.
    assert line["status"] == (200 if partial else 503)
    assert received.startswith(b"HTTP/1.1 200") == partial
    assert line["bytes_out"] == (5 if partial else 0)


async def test_a_client_that_goes_away_is_logged_499_aborted_by_the_client(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    stall = Stall()
    upstream = await start_upstream(stall.app())
    gw = await make_gateway(toml([upstream_url(upstream)]))
    _, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            await stall.arrived.wait()
        writer.close()
        async with asyncio.timeout(10):
            while not gw.log_lines():  # noqa: ASYNC110 - a StringIO has nothing to await
                await asyncio.sleep(0.01)
    finally:
        stall.release.set()
        writer.close()
    line = records(gw)[-1]
    assert (line["status"], line["aborted"]) == (499, "client")


# -- retries ------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["refused", "503"])
async def test_a_retried_request_logs_every_attempt_its_target_and_its_status(
    make_gateway: GatewayFactory,
    start_upstream: UpstreamFactory,
    client: aiohttp.ClientSession,
    first: str,
) -> None:
    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    if first == "refused":
        failing, failed_status = f"http://127.0.0.1:{free_port()}", None
    else:
        busy_app = web.Application()
        busy_app.router.add_route("*", "/{tail:.*}", unavailable)
        failing, failed_status = upstream_url(await start_upstream(busy_app)), 503
    ok = upstream_url(await start_upstream(ok_app()))
    gw = await make_gateway(toml([failing, ok], route="retries = 2"))
    seen: list[dict[str, Any]] = []
    for _ in range(4):  # round robin: every other first attempt is the failing one
        async with client.get(gw.url + "/x") as resp:
            await resp.read()
            assert resp.status == 200
        seen.append(records(gw)[-1])
    shapes = sorted((line["targets"], line["upstream_status"], line["attempts"]) for line in seen)
    assert shapes == sorted(
        [([failing, ok], [failed_status, 200], 2)] * 2 + [([ok], [200], 1)] * 2
    ), shapes
    assert {(line["target"], line["status"]) for line in seen} == {(ok, 200)}


async def test_a_request_refused_before_any_attempt_logs_none(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(toml([f"http://127.0.0.1:{free_port()}"]))
    with contextlib.suppress(aiohttp.ClientError):
        async with client.get(gw.url + "/nowhere") as resp:
            await resp.read()
    line = records(gw)[-1]
    assert (line["attempts"], line["targets"], line["upstream_status"]) == (0, [], [])
    assert line["target"] is None
