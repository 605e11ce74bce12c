"""Runtime state across snapshots: what a reload keeps, replaces and closes."""

from __future__ import annotations

from gateway.config import parse
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


async def test_close_closes_sessions_of_removed_upstreams_still_in_use() -> None:
    runtime = Runtime(Metrics())
    first = runtime.build(parse(config(with_other=True)))
    handle = first.pools["other"].handle
    handle.enter()  # a request on `other` still runs ...
    runtime.build(parse(config(with_other=False)))  # ... when a reload removes it
    assert handle in runtime.retired
    assert not handle.session.closed
    await runtime.close()  # shutdown does not wait for it
    assert handle.session.closed
    assert not runtime.retired


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
