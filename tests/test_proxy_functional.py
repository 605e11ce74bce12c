"""The streaming proxy end to end: real upstreams, the real gateway, real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, UpstreamFactory, one_upstream_config, wait_for
from tests.wire import hash_sink

GiB = 1024**3
CHUNK = 1024 * 1024


def echo_app() -> web.Application:
    """Answers with what it saw: method, raw target, headers, body hash and size."""

    async def echo(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "size": size,
                "sha256": digest.hexdigest(),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def test_get_is_proxied_with_forwarding_headers(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(echo_app())
    gw = await make_gateway(one_upstream_config(upstream.port))
    async with client.get(gw.url + "/hello?x=1", headers={"X-Request-ID": "abc-123"}) as resp:
        assert resp.status == 200
        seen = await resp.json()
        assert resp.headers["X-Request-ID"] == "abc-123"
        assert resp.headers["Via"] == "1.1 gateway"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["raw_path"] == "/hello?x=1"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert headers["via"] == "1.1 gateway"
    assert headers["x-request-id"] == "abc-123"
    assert headers["host"] == f"127.0.0.1:{gw.port}"  # preserve_host defaults to true
    line = json.loads(gw.log_lines()[-1])
    assert line["request_id"] == "abc-123"
    assert line["route"] == "all"
    assert line["status"] == 200


async def test_gateway_adds_no_header_beyond_the_contract(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(echo_app())
    gw = await make_gateway(one_upstream_config(upstream.port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    await writer.drain()
    head = _parse_head(await reader.readuntil(b"\r\n\r\n"))
    seen = json.loads(await reader.readexactly(int(head["content-length"])))
    writer.close()
    names = sorted(k.lower() for k, _ in seen["headers"])
    assert names == [
        "host",
        "traceparent",  # CONTRACT.md "Tracing": the trace goes to the target
        "via",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-request-id",
    ]


async def test_request_id_is_generated_when_missing_or_insane(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(echo_app())
    gw = await make_gateway(one_upstream_config(upstream.port))
    async with client.get(gw.url + "/", headers={"X-Request-ID": "x" * 200}) as resp:
        seen = await resp.json()
        rid = resp.headers["X-Request-ID"]
    assert rid != "x" * 200
    assert 1 <= len(rid) <= 128
    assert dict((k.lower(), v) for k, v in seen["headers"])["x-request-id"] == rid


async def test_preserve_host_false_sends_target_host(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(echo_app())
    gw = await make_gateway(one_upstream_config(upstream.port, "preserve_host = false"))
    async with client.get(gw.url + "/") as resp:
        seen = await resp.json()
    assert dict((k.lower(), v) for k, v in seen["headers"])["host"] == f"127.0.0.1:{upstream.port}"


async def test_hop_by_hop_headers_are_removed_both_ways(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    async def handler(request: web.Request) -> web.Response:
        body = json.dumps([[k, v] for k, v in request.headers.items()])
        return web.Response(
            text=body,
            headers={"X-Secret-Hop": "1", "Connection": "X-Secret-Hop", "Keep-Alive": "timeout=5"},
        )

    app = web.Application()
    app.router.add_get("/", handler)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
        b"Keep-Alive: 300\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9v\r\n"
        b"Upgrade: websocket\r\nX-Keep: 1\r\n\r\n"
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    headers = _parse_head(head)
    body = await reader.readexactly(int(headers["content-length"]))
    writer.close()
    sent = {k.lower() for k, _ in json.loads(body)}
    assert "x-keep" in sent
    for gone in ("x-drop", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert gone not in sent
    assert "x-secret-hop" not in headers
    assert "keep-alive" not in headers


def _parse_head(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")
    out = {"status": lines[0]}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            out[name.strip().lower()] = value.strip()
    return out


@pytest.mark.parametrize(
    "target",
    [
        # No dot-segment: those are refused (test_hostile_clients.py); names
        # with dots, and dots in the query, go as they came.
        "/a/.../b/%2F/.x/c//d?q=%20x&y=%zz&p=../..",
        "/%7e/%7E/caf%C3%A9?",
        "/a;p=1/b?x=1&x=2#",
        "/?",
    ],
)
async def test_raw_path_and_query_reach_the_target_unchanged(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, target: str
) -> None:
    upstream = await start_upstream(echo_app())
    gw = await make_gateway(one_upstream_config(upstream.port))
    sent_target = target.rstrip("#")
    assert (await raw_echo(gw.host, gw.port, sent_target))["raw_path"] == sent_target


async def raw_echo(host: str, port: int, target: str) -> dict[str, object]:
    """GET `target` byte-for-byte over a raw socket; the echo app's JSON answer."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    head = _parse_head(await reader.readuntil(b"\r\n\r\n"))
    body: dict[str, object] = json.loads(await reader.readexactly(int(head["content-length"])))
    writer.close()
    return body


async def test_strip_prefix_and_target_base_path(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(echo_app())
    gw = await make_gateway(f"""
        [upstreams.app]
        targets = ["http://127.0.0.1:{upstream.port}/base"]
        [[routes]]
        name = "users"
        path = "/api/users"
        strip_prefix = true
        upstream = "app"
    """)
    for sent, expected in [
        ("/api/users/7?x", "/base/7?x"),
        ("/api/users", "/base/"),
        ("/api/users?", "/base/?"),
    ]:
        assert (await raw_echo(gw.host, gw.port, sent))["raw_path"] == expected, sent
    async with client.get(gw.url + "/api/usersX") as resp:
        assert resp.status == 404


async def test_upload_streams_with_content_length_and_hash(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(echo_app())
    gw = await make_gateway(one_upstream_config(upstream.port))
    payload = bytes(range(256)) * 4096 * 8  # 8 MiB
    async with client.post(gw.url + "/up", data=io.BytesIO(payload)) as resp:
        seen = await resp.json()
    assert seen["size"] == len(payload)
    assert seen["sha256"] == hashlib.sha256(payload).hexdigest()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["content-length"] == str(len(payload))
    assert "transfer-encoding" not in headers


async def test_chunked_upload_stays_chunked(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(echo_app())
    gw = await make_gateway(one_upstream_config(upstream.port))

    async def body() -> object:
        for i in range(5):
            yield bytes([i]) * 1000

    async with client.post(gw.url + "/up", data=body()) as resp:
        seen = await resp.json()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in headers
    assert seen["size"] == 5000


async def test_slow_upload_reaches_the_target_before_the_client_finishes(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    first_bytes = asyncio.Event()

    async def sink(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            first_bytes.set()
        return web.json_response({"size": total})

    app = web.Application()
    app.router.add_post("/sink", sink)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))
    release_rest = asyncio.Event()

    async def body() -> object:
        yield b"first"
        await release_rest.wait()
        yield b"-rest"

    async def send() -> int:
        async with client.post(gw.url + "/sink", data=body()) as resp:
            return int((await resp.json())["size"])

    task = asyncio.create_task(send())
    async with asyncio.timeout(5):
        await first_bytes.wait()  # reached the target while the client still holds the rest
    assert not task.done()
    release_rest.set()
    assert await task == len(b"first-rest")


async def test_server_sent_events_arrive_as_written(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    next_event = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: {i}\n\n".encode())
            await next_event.wait()
            next_event.clear()
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/events", events)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))
    async with client.get(gw.url + "/events") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        for i in range(3):
            async with asyncio.timeout(2):  # no buffering: each event before the next
                line = await resp.content.readuntil(b"\n\n")
            assert line == f"data: {i}\n\n".encode()
            next_event.set()


async def test_target_reset_mid_body_aborts_the_client_transfer(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        chunked = request.query.get("chunked") == "1"
        resp = web.StreamResponse()
        if not chunked:
            resp.content_length = 10 * CHUNK
        await resp.prepare(request)
        await resp.write(b"x" * CHUNK)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_get("/broken", broken)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))
    for query in ("", "?chunked=1"):
        async with client.get(gw.url + "/broken" + query) as resp:
            assert resp.status == 200  # the response had begun: only an abort is left
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


async def test_client_disconnect_mid_download_closes_the_target_connection(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    upstream_saw_close = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"y" * 65536)
                await asyncio.sleep(0.001)
        except (ConnectionError, asyncio.CancelledError):
            upstream_saw_close.set()
            raise
        return resp

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_get("/endless", endless)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readexactly(200_000)
    writer.transport.abort()
    async with asyncio.timeout(5):
        await upstream_saw_close.wait()
    pool = gw.gateway.box.snapshot.pools["app"] if gw.gateway.box else None
    assert pool is not None
    await wait_for(lambda: pool.targets[0].in_flight == 0)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_head_and_empty_statuses_carry_no_body(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, method: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        status = int(request.query["s"])
        if status in (204, 304):
            return web.Response(status=status)
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/", handler)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    for status in (200, 204, 304):
        writer.write(f"{method} /?s={status} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        head = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        assert head["status"].startswith(f"HTTP/1.1 {status}")
        if method == "GET" and status == 200:
            assert await reader.readexactly(5) == b"hello"
        if method == "HEAD" and status == 200:
            assert head["content-length"] == "5"
    # The connection is still in sync: one more request answers cleanly.
    writer.write(b"GET /?s=200 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = _parse_head(await reader.readuntil(b"\r\n\r\n"))
    assert head["status"].startswith("HTTP/1.1 200")
    writer.close()


async def test_expect_100_continue_is_answered_once_by_the_gateway(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(echo_app())
    gw = await make_gateway(one_upstream_config(upstream.port, "max_body_bytes = 100"))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"100 Continue" not in head
    seen = json.loads(await reader.readexactly(int(_parse_head(head)["content-length"])))
    assert seen["size"] == 5
    assert "expect" not in {k.lower() for k, _ in seen["headers"]}
    # Over the limit: refused with 413 before the client sends a byte.
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    writer.close()


async def _json_error(resp: aiohttp.ClientResponse) -> dict[str, str]:
    assert resp.headers["Content-Type"].startswith("application/json")
    body: dict[str, str] = await resp.json()
    assert set(body) == {"error", "message", "request_id"}
    assert body["request_id"] == resp.headers["X-Request-ID"]
    return body


async def test_gateway_errors_are_json(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    stall = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await stall.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    upstream = await start_upstream(app)
    refused = await start_upstream(web.Application())
    refused_port = refused.port
    await refused.close()
    gw = await make_gateway(f"""
        [upstreams.app]
        targets = ["http://127.0.0.1:{upstream.port}"]
        [upstreams.dead]
        targets = ["http://127.0.0.1:{refused_port}"]
        [[routes]]
        name = "getonly"
        path = "/slow"
        methods = ["GET"]
        read_timeout = 0.2
        max_body_bytes = 10
        upstream = "app"
        [[routes]]
        name = "small"
        path = "/small"
        max_body_bytes = 10
        upstream = "app"
        [[routes]]
        name = "dead"
        path = "/dead"
        upstream = "dead"
    """)
    async with client.get(gw.url + "/nothing") as resp:
        assert resp.status == 404
        assert (await _json_error(resp))["error"] == "no_route"
    async with client.delete(gw.url + "/slow") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, HEAD"
        assert (await _json_error(resp))["error"] == "method_not_allowed"
    async with client.post(gw.url + "/small", data=b"x" * 11) as resp:
        assert resp.status == 413
        assert (await _json_error(resp))["error"] == "body_too_large"
    async with client.get(gw.url + "/dead") as resp:
        assert resp.status == 502
        assert (await _json_error(resp))["error"] == "bad_gateway"
    async with client.get(gw.url + "/slow") as resp:
        assert resp.status == 504
        assert (await _json_error(resp))["error"] == "upstream_timeout"
    stall.set()


async def test_chunked_body_over_the_limit_is_cut_with_413(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    upstream = await start_upstream(echo_app())
    gw = await make_gateway(one_upstream_config(upstream.port, "max_body_bytes = 100000"))

    async def body() -> object:
        for _ in range(100):
            yield b"z" * 10_000

    async with client.post(gw.url + "/up", data=body()) as resp:
        assert resp.status == 413
        assert (await _json_error(resp))["error"] == "body_too_large"


@pytest.mark.slow
async def test_one_gib_download_and_upload_arrive_intact(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    block = hashlib.sha256(b"seed").digest() * (CHUNK // 32)  # 1 MiB, not all one byte
    expected = hashlib.sha256()
    for i in range(GiB // CHUNK):
        expected.update(block[i % 7 :] + block[: i % 7])
    expected_hex = expected.hexdigest()

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = GiB
        await resp.prepare(request)
        for i in range(GiB // CHUNK):
            await resp.write(block[i % 7 :] + block[: i % 7])
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=2 * GiB)
    app.router.add_get("/big", download)
    app.router.add_post("/big", hash_sink)
    upstream = await start_upstream(app)
    gw = await make_gateway(one_upstream_config(upstream.port))

    received = hashlib.sha256()
    size = 0
    async with client.get(gw.url + "/big") as resp:
        assert resp.headers["Content-Length"] == str(GiB)
        async for chunk in resp.content.iter_any():
            received.update(chunk)
            size += len(chunk)
    assert size == GiB
    assert received.hexdigest() == expected_hex

    async def body() -> object:
        for i in range(GiB // CHUNK):
            yield block[i % 7 :] + block[: i % 7]

    async with client.post(
        gw.url + "/big", data=body(), headers={"Content-Length": str(GiB)}
    ) as resp:
        seen = await resp.json()
    assert seen == {"size": GiB, "sha256": expected_hex}


async def test_expect_continue_waits_for_a_target_so_a_refused_upload_is_never_invited(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    refused = await start_upstream(web.Application())
    port = refused.port
    await refused.close()
    gw = await make_gateway(one_upstream_config(port))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    # No target could take the body: the answer comes without a 100 first.
    assert head.startswith(b"HTTP/1.1 502"), head


async def test_response_head_the_client_side_cannot_write_is_a_json_502(
    make_gateway: GatewayFactory,
) -> None:
    """A DEL byte in a response header (RFC 9110 5.5: no CTL in a field value)
    is refused with the head: a JSON 502, never relayed."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Weird: a\x7fb\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await make_gateway(one_upstream_config(port))
        async with (
            aiohttp.ClientSession() as client,
            client.get(gw.url + "/", headers={"X-Request-ID": "mine-1"}) as resp,
        ):
            assert resp.status == 502
            body = await _json_error(resp)
        assert body["error"] == "bad_gateway"
        assert body["request_id"] == "mine-1"
    finally:
        server.close()
        await server.wait_closed()
