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
