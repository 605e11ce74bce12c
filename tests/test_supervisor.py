"""The main process's pure helpers: merging the workers' /metrics and /status."""

from __future__ import annotations

from typing import Any

from gateway.core.config import parse
from gateway.supervisor import merge_metrics, merge_status, worker_count
from tests.gateway_process import metric_value

WORKER = """# HELP gateway_requests_total Requests.
# TYPE gateway_requests_total counter
gateway_requests_total{{route="all",method="GET",code="200"}} {n}
# HELP gateway_breaker_state Breaker.
# TYPE gateway_breaker_state gauge
gateway_breaker_state{{upstream="app",target="http://t"}} {breaker}
# HELP gateway_target_healthy Healthy.
# TYPE gateway_target_healthy gauge
gateway_target_healthy{{upstream="app",target="http://t"}} 0.0
# HELP process_cpu_seconds_total CPU.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 99.0
"""
MAIN = """# HELP gateway_target_healthy Healthy.
# TYPE gateway_target_healthy gauge
gateway_target_healthy{upstream="app",target="http://t"} 1.0
# HELP process_cpu_seconds_total CPU.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1.5
"""


def test_counters_sum_breakers_take_the_worst_and_probes_are_the_mains() -> None:
    text = merge_metrics(
        MAIN, [WORKER.format(n=3, breaker=0), WORKER.format(n=4, breaker=1)]
    ).decode()
    assert metric_value(text, "gateway_requests_total", route="all", method="GET", code="200") == 7
    assert metric_value(text, "gateway_breaker_state", upstream="app", target="http://t") == 1
    assert metric_value(text, "gateway_target_healthy", upstream="app", target="http://t") == 1
    assert metric_value(text, "process_cpu_seconds_total") == 1.5


def test_garbage_from_a_worker_does_not_break_the_merge() -> None:
    text = merge_metrics(MAIN, ["", "# just a comment\n"]).decode()
    assert metric_value(text, "gateway_target_healthy", upstream="app", target="http://t") == 1


def test_status_sums_in_flight_and_shows_the_worst_breaker() -> None:
    document: dict[str, Any] = {
        "upstreams": {
            "app": {"targets": [{"url": "http://t", "in_flight": 0, "breaker": "closed"}]}
        }
    }
    workers: list[dict[str, Any]] = [
        {"app http://t": [2, "closed"]},
        {"app http://t": [3, "half_open"]},
        {"app http://t": "not a list"},
        {},
    ]
    merge_status(document, workers)
    assert document["upstreams"]["app"]["targets"][0] == {
        "url": "http://t",
        "in_flight": 5,
        "breaker": "half_open",
    }


def test_workers_0_is_one_per_cpu() -> None:
    assert worker_count(parse("[server]\nworkers = 3\n")) == 3
    assert worker_count(parse("[server]\nworkers = 0\n")) >= 1
