"""Runtime state across snapshots: what a reload keeps, replaces and closes."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import parse
from gateway.h1client import H1Error
from gateway.metrics import Metrics
from gateway.snapshot import Runtime


def config(breaker_failures: int = 1, with_other: bool = True) -> str:
    other = (
        """
        [upstreams.other]
        targets = ["http://127.0.0.1:9"]
        """
        if with_other
        else ""
    )
    return f"""
        [upstreams.app]
        targets = ["http://127.0.0.1:9"]
        [upstreams.app.breaker]
        failures = {breaker_failures}
        cooldown = 30.0
        {other}
        [[routes]]
        name = "all"
        path = "/"
        upstream = "app"
    """


def breaker_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(
        "gateway_breaker_state", {"upstream": "app", "target": "http://127.0.0.1:9"}
    )


async def test_breaker_settings_change_keeps_the_target_with_a_fresh_breaker() -> None:
    metrics = Metrics()
    runtime = Runtime(metrics)
    try:
        target = runtime.build(parse(config(breaker_failures=1))).pools["app"].targets[0]
        old_breaker = target.breaker
        old_breaker.record_failure()
        assert breaker_gauge(metrics) == 1.0
        target.in_flight = 3  # requests still running on the old config
        again = runtime.build(parse(config(breaker_failures=2))).pools["app"].targets[0]
        assert again is target
        assert again.in_flight == 3
        assert again.breaker is not old_breaker
        assert again.breaker.state == "closed"
        assert breaker_gauge(metrics) == 0.0
        # A request admitted by the old breaker reports to it, not to the gauge.
        old_breaker.record_success()
        old_breaker.record_failure()
        assert breaker_gauge(metrics) == 0.0
    finally:
        await runtime.close()


async def test_a_reload_removing_an_upstream_keeps_its_running_request_until_close() -> None:
    """Every snapshot shares one connection pool: removing an upstream cuts
    none of its requests; shutdown (`close`) ends what is still running."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.")  # 5 of 10
        await writer.drain()
        await reader.read()  # until the gateway closes

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    runtime = Runtime(Metrics())
    try:
        first = runtime.build(parse(config(with_other=True)))
        client = first.pools["other"].client
        assert client is first.pools["app"].client
        async with asyncio.timeout(5):
            response = await client.request(
                "GET", "127.0.0.1", port, "/", [("Host", "x")], None, None, 5.0, 5.0
            )
            runtime.build(parse(config(with_other=False)))  # a reload removes `other`
            assert client.open_count == 1
            assert await response.read_chunk() == b"half."
            await runtime.close()  # shutdown does not wait for it
            assert client.open_count == 0
            with pytest.raises(H1Error):
                await response.read_chunk()
    finally:
        await runtime.close()
        server.close()
        await server.wait_closed()


async def test_a_reload_drops_the_metric_series_of_removed_routes_and_targets() -> None:
    metrics = Metrics()
    runtime = Runtime(metrics)

    def two_routes(second: bool) -> str:
        extra = (
            """
            [upstreams.b]
            targets = ["http://127.0.0.1:10"]
            [[routes]]
            name = "gone"
            path = "/gone"
            upstream = "b"
            """
            if second
            else ""
        )
        return config(with_other=False) + extra

    def samples() -> str:
        return "\n".join(
            f"{s.name}{s.labels}"
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name.startswith("gateway_")
        )

    try:
        snap = runtime.build(parse(two_routes(True)))
        snap.routes["gone"].count("GET", 200)
        snap.routes["gone"].duration.observe(0.01)
        snap.pools["b"].targets[0].ok_counter.inc()
        assert "'route': 'gone'" in samples()
        assert "http://127.0.0.1:10" in samples()
        snap = runtime.build(parse(two_routes(False)))
        assert "'route': 'gone'" not in samples()
        assert "http://127.0.0.1:10" not in samples()
        assert "'route': 'all'" in samples()  # the route that stays keeps its series
        # Added back: its series start again, from zero.
        runtime.build(parse(two_routes(True)))
        assert (
            metrics.registry.get_sample_value(
                "gateway_requests_total", {"route": "gone", "method": "GET", "code": "200"}
            )
            is None
        )
        assert (
            metrics.registry.get_sample_value(
                "gateway_request_duration_seconds_count", {"route": "gone"}
            )
            == 0.0
        )
    finally:
        await runtime.close()
