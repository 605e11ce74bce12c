"""Runtime state across snapshots: what a reload keeps, replaces and closes."""

from __future__ import annotations

import asyncio

import pytest

from gateway.core.config import parse
from gateway.state.metrics import Metrics
from gateway.state.snapshot import Runtime
from gateway.wire.h1client import H1Error


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


def config_with_other_at(port: int | None) -> str:
    """Upstream `app` (port 9), and `other` at 127.0.0.1:`port` unless None."""
    text = config(with_other=False)
    if port is not None:
        text += f"""
        [upstreams.other]
        targets = ["http://127.0.0.1:{port}"]
        """
    return text


async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Per request: a head and 5 of 10 body bytes, the rest on the next line."""
    for _ in range(10):
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"rest.")
        await writer.drain()


async def test_a_reload_removing_a_target_closes_its_connection_once_its_request_ends() -> None:
    """Every snapshot shares one connection pool: a reload that removes a
    target cuts none of its requests, and pools none of its connections."""
    server = await asyncio.start_server(half_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    runtime = Runtime(Metrics())
    try:
        first = runtime.build(parse(config_with_other_at(port)))
        client = first.pools["other"].client
        assert client is first.pools["app"].client
        async with asyncio.timeout(5):
            response = await client.request(
                "GET", "127.0.0.1", port, "/", [("Host", "x")], None, None, 5.0, 5.0
            )
            runtime.build(parse(config_with_other_at(None)))  # a reload removes `other`
            assert client.open_count == 1
            assert await response.read_chunk() == b"half."
            assert await response.read_chunk() == b"rest."
            assert await response.read_chunk() == b""
            response.release()
        assert client.open_count == 0
        assert client.idle_count == 0
    finally:
        await runtime.close()
        server.close()
        await server.wait_closed()


async def test_close_ends_a_running_request_of_a_removed_target() -> None:
    server = await asyncio.start_server(half_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    runtime = Runtime(Metrics())
    try:
        client = runtime.build(parse(config_with_other_at(port))).pools["other"].client
        async with asyncio.timeout(5):
            response = await client.request(
                "GET", "127.0.0.1", port, "/", [("Host", "x")], None, None, 5.0, 5.0
            )
            runtime.build(parse(config_with_other_at(None)))
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


def _routes_config(first: str, port: int) -> str:
    limited = """
        [[routes]]
        name = "limited"
        path = "/limited"
        upstream = "app"
        rate_limit = { rate = 1, burst = 2, key = "route" }
        """
    plain = """
        [[routes]]
        name = "plain"
        path = "/plain"
        upstream = "app"
        """
    return f"""
        [server]
        listen = ["127.0.0.1:0"]
        [upstreams.app]
        targets = ["http://127.0.0.1:{port}"]
        {first}
        {limited}
        {plain}
        """


async def test_a_route_that_only_moved_in_the_file_keeps_its_runtime_buckets_and_series() -> None:
    metrics = Metrics()
    runtime = Runtime(metrics)
    moved_in = """
        [[routes]]
        name = "new"
        path = "/new"
        upstream = "app"
        """
    try:
        before = runtime.build(parse(_routes_config("", 10)))
        limited = before.routes["limited"]
        assert limited.buckets is not None
        limited.duration.observe(0.5)
        positions = {name: rt.config.index for name, rt in before.routes.items()}
        # A reload that inserts a route above both: every position shifts.
        after = runtime.build(parse(_routes_config(moved_in, 10)))
        for name in ("limited", "plain"):
            kept, was = after.routes[name], before.routes[name]
            # Its series, counters and buckets, not new ones...
            assert kept is was
            assert kept.count == was.count  # the same RequestCounter
            assert kept.duration is was.duration
            assert kept.buckets is was.buckets
            # ...with its new position.
            assert kept.config is next(r for r in after.config.routes if r.name == name)
            assert kept.config.index == positions[name] + 1
        assert after.table.match("GET", "x", "/new/", {}).name == "new"
        assert after.routes["new"].pool is after.pools["app"]
        # The target changed: a new pool, and the unchanged routes move to it
        # with their buckets and series.
        moved = runtime.build(parse(_routes_config(moved_in, 11)))
        assert moved.pools["app"] is not after.pools["app"]
        for name in ("limited", "plain", "new"):
            assert moved.routes[name].pool is moved.pools["app"]
        assert moved.routes["limited"].buckets is limited.buckets
        assert moved.routes["limited"].duration is limited.duration
        assert (
            metrics.registry.get_sample_value(
                "gateway_request_duration_seconds_count", {"route": "limited"}
            )
            == 1.0
        )
    finally:
        await runtime.close()


# Each route carries one field the auth step reads (edges/auth.py): none of
# them may be `plain`, or the proxy would skip the step for it.
_AUTH_STEP_ROUTES: dict[str, str] = {
    "policy": 'auth = "p"',
    "stripping": 'auth = "p"\nstrip_credentials = true',
    "allow": '[routes.access]\nallow_ips = ["10.0.0.0/8"]',
    "deny": '[routes.access]\ndeny_ips = ["10.0.0.0/8"]',
    "rewrite": '[routes.rewrite]\npattern = "^/(.*)$"\nreplace = "/v1/\\\\1"',
    "request-transform": '[routes.request_headers]\nset = { X-Route = "{route}" }',
    "response-transform": '[routes.response_headers]\nremove = ["Server"]',
}
# Fields of other steps (CORS, rate limit, cache, retries) leave a route plain.
_PLAIN_ROUTES: dict[str, str] = {
    "bare": "",
    "limited": 'rate_limit = { rate = 1, burst = 2, key = "client_ip" }',
    "cors": '[routes.cors]\nallow_origins = ["https://app.test"]',
    "cached": "[routes.cache]\nttl = 5.0",
    "retrying": "retries = 2",
}


def _auth_step_config() -> str:
    routes = []
    for index, (name, extra) in enumerate({**_AUTH_STEP_ROUTES, **_PLAIN_ROUTES}.items()):
        routes.append(
            f'[[routes]]\nname = "{name}"\npath = "/{index}"\nupstream = "app"\n{extra}\n'
        )
    return (
        '[server]\nlisten = ["127.0.0.1:0"]\n'
        '[auth.p]\ntype = "jwt"\nalgorithms = ["HS256"]\nsecret_env = "GW_PLAIN_TEST_SECRET"\n'
        "[cache]\n"
        '[upstreams.app]\ntargets = ["http://127.0.0.1:10"]\n'
        '[[routes]]\nname = "moved"\npath = "/moved"\nredirect = "https://{host}{path}"\n'
        + "\n".join(routes)
    )


async def test_only_routes_without_anything_for_the_auth_step_are_plain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GW_PLAIN_TEST_SECRET", "s" * 32)
    runtime = Runtime(Metrics())
    try:
        snap = runtime.build(parse(_auth_step_config()))
        not_plain = {name for name, route in snap.routes.items() if not route.plain}
        assert not_plain == {*_AUTH_STEP_ROUTES, "moved"}
    finally:
        await runtime.close()
