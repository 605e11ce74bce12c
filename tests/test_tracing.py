"""W3C Trace Context: what the target receives and what the access log says."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from aiohttp import web

from gateway.core.tracing import parse_traceparent, trace_context
from tests.conftest import GatewayFactory, UpstreamFactory, one_upstream_config

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"
SENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

HOSTILE = {
    "version ff": f"ff-{TRACE}-{PARENT}-01",
    "version not hex": f"0g-{TRACE}-{PARENT}-01",
    "uppercase trace id": f"00-{TRACE.upper()}-{PARENT}-01",
    "uppercase parent id": f"00-{TRACE}-{PARENT.upper()}-01",
    "uppercase version": f"0A-{TRACE}-{PARENT}-01",
    "all-zero trace id": f"00-{'0' * 32}-{PARENT}-01",
    "all-zero parent id": f"00-{TRACE}-{'0' * 16}-01",
    "version 00 too long": f"{VALID}-extra",
    "version 00 one more char": f"{VALID}0",
    "future version, no dash after flags": f"01-{TRACE}-{PARENT}-01x",
    "flags not hex": f"00-{TRACE}-{PARENT}-zz",
    "flags one digit": f"00-{TRACE}-{PARENT}-1",
    "short trace id": f"00-{TRACE[:-1]}-{PARENT}-01",
    "wrong separator": f"00_{TRACE}_{PARENT}_01",
    "empty": "",
    "garbage": "x" * 55,
    "non-ascii": f"00-{TRACE[:-1]}é-{PARENT}-01",
}


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_invalid_traceparent_values_are_refused(value: str) -> None:
    assert parse_traceparent(value) is None


def test_a_valid_traceparent_keeps_trace_id_and_flags() -> None:
    assert parse_traceparent(VALID) == (TRACE, "01")
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00") == (TRACE, "00")


def test_a_future_version_is_read_as_00_keeping_only_the_sampled_bit() -> None:
    # Trace Context §4.3: a higher version may carry more fields after a "-".
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-03-what-comes-next") == (TRACE, "01")
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-02") == (TRACE, "00")


def test_new_traces_get_random_nonzero_ids_and_the_sampled_flag() -> None:
    ids = {trace_context(None).trace_id for _ in range(100)}
    assert len(ids) == 100
    context = trace_context(None)
    match = SENT.fullmatch(context.traceparent)
    assert match is not None
    assert match[3] == "01"
    assert not context.continued


def test_two_traceparent_headers_start_a_new_trace() -> None:
    context = trace_context([VALID, VALID])
    assert context.trace_id != TRACE
    assert not context.continued


def _echo_headers() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "traceparent": request.headers.getall("traceparent", []),
                "tracestate": request.headers.getall("tracestate", []),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def _send(port: int, headers: list[tuple[str, str]]) -> dict[str, list[str]]:
    """One GET from a raw socket (header lines exactly as given, repeats included)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    writer.write(f"GET /t HTTP/1.1\r\nHost: h\r\n{lines}Connection: close\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(10):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    seen: dict[str, list[str]] = json.loads(body)
    return seen


async def test_a_valid_traceparent_reaches_the_target_with_the_gateways_span_as_parent(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_echo_headers())
    gw = await make_gateway(one_upstream_config(upstream.port))
    seen = await _send(
        gw.port, [("traceparent", VALID), ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa")]
    )
    [sent] = seen["traceparent"]
    match = SENT.fullmatch(sent)
    assert match is not None
    assert match[1] == TRACE
    assert match[2] != PARENT  # the gateway's own span
    assert match[2] != "0" * 16
    assert match[3] == "01"
    assert seen["tracestate"] == ["congo=t61rcWkgMzE,rojo=00f067aa"]
    line = json.loads(gw.log_lines()[-1])
    assert line["trace_id"] == TRACE


async def test_without_traceparent_the_gateway_starts_a_trace_and_logs_its_id(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_echo_headers())
    gw = await make_gateway(one_upstream_config(upstream.port))
    seen = await _send(gw.port, [("tracestate", "orphan=1")])
    [sent] = seen["traceparent"]
    match = SENT.fullmatch(sent)
    assert match is not None
    assert match[3] == "01"
    # A tracestate without its traceparent belongs to no trace we continue.
    assert seen["tracestate"] == []
    line = json.loads(gw.log_lines()[-1])
    assert line["trace_id"] == match[1]


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_hostile_traceparent_is_replaced_by_a_new_trace_at_the_target(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory, value: str
) -> None:
    upstream = await start_upstream(_echo_headers())
    gw = await make_gateway(one_upstream_config(upstream.port))
    headers = [("tracestate", "vendor=x")]
    if value:
        headers.append(("traceparent", value))
    seen = await _send(gw.port, headers)
    [sent] = seen["traceparent"]
    match = SENT.fullmatch(sent)
    assert match is not None
    assert match[1] != TRACE
    assert match[1].lower() != TRACE.lower()
    assert seen["tracestate"] == []  # dropped with the refused trace
    assert json.loads(gw.log_lines()[-1])["trace_id"] == match[1]


async def test_a_repeated_traceparent_header_starts_a_new_trace_at_the_target(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_echo_headers())
    gw = await make_gateway(one_upstream_config(upstream.port))
    seen = await _send(gw.port, [("traceparent", VALID), ("traceparent", VALID)])
    [sent] = seen["traceparent"]
    assert TRACE not in sent


async def test_the_text_access_log_carries_the_trace_id(
    make_gateway: GatewayFactory, start_upstream: UpstreamFactory
) -> None:
    upstream = await start_upstream(_echo_headers())
    gw = await make_gateway(
        '[server]\nlisten = ["127.0.0.1:0"]\nadmin = ""\naccess_log = "text"\n'
        + one_upstream_config(upstream.port)
    )
    await _send(gw.port, [("traceparent", VALID)])
    assert f" trace={TRACE}" in gw.log_lines()[-1]
