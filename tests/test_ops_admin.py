"""The admin listener of the real gateway process: health, readiness, status, metrics."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import UpstreamFactory
from tests.gateway_process import metric_value, named_app, run_gateway, upstream_url

TIMEOUT = aiohttp.ClientTimeout(total=30)

# CONTRACT.md "Metrics", every name.
CONTRACT_METRICS = (
    "gateway_requests_total",
    "gateway_request_duration_seconds",
    "gateway_upstream_requests_total",
    "gateway_upstream_in_flight",
    "gateway_request_bytes_total",
    "gateway_response_bytes_total",
    "gateway_rate_limited_total",
    "gateway_breaker_state",
    "gateway_target_healthy",
    "gateway_config_reloads_total",
    "gateway_config_last_reload_success_timestamp_seconds",
)


def config(u1: str, u2: str, o1: str) -> str:
    return f"""
        [upstreams.users]
        balancer = "weighted"
        targets = ["{u1}", {{ url = "{u2}", weight = 3 }}]

        [upstreams.orders]
        targets = ["{o1}"]

        [[routes]]
        name = "users"
        path = "/users"
        methods = ["GET", "POST"]
        upstream = "users"

        [[routes]]
        name = "orders"
        path = "/orders"
        upstream = "orders"
        [routes.rate_limit]
        rate = 100.0
        burst = 200
    """


def orders_app(release: asyncio.Event, arrived: asyncio.Event) -> web.Application:
    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="slow")

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=f"O {request.path}")

    app = web.Application()
    app.router.add_get("/orders/slow", slow)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def label_values(text: str, label: str) -> set[str]:
    return set(re.findall(rf'{label}="([^"]*)"', text))


async def test_admin_endpoints_status_shape_and_every_contract_metric(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()
    u1 = upstream_url(await start_upstream(named_app("U1")))
    u2 = upstream_url(await start_upstream(named_app("U2")))
    o1 = upstream_url(await start_upstream(orders_app(release, arrived)))
    try:
        async with (
            run_gateway(tmp_path, config(u1, u2, o1)) as gw,
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
        ):

            async def admin(path: str, **headers: str) -> tuple[int, str, str]:
                async with session.get(gw.admin_url + path, headers=headers) as response:
                    return response.status, response.content_type, await response.text()

            assert (await admin("/healthz"))[0] == 200
            assert (await admin("/readyz"))[0] == 200

            # /status, exactly the contract's shape.
            status, content_type, body = await admin("/status")
            assert (status, content_type) == (200, "application/json")
            doc: dict[str, Any] = json.loads(body)
            assert set(doc) == {"config", "upstreams", "routes"}
            assert set(doc["config"]) == {"path", "sha256", "loaded_at"}
            assert doc["config"]["path"] == str(gw.config_path)
            assert (
                doc["config"]["sha256"] == hashlib.sha256(gw.config_path.read_bytes()).hexdigest()
            )
            loaded_at = datetime.datetime.fromisoformat(doc["config"]["loaded_at"])
            assert abs(loaded_at.timestamp() - time.time()) < 60
            assert set(doc["upstreams"]) == {"users", "orders"}
            for upstream in doc["upstreams"].values():
                assert set(upstream) == {"balancer", "panic_threshold", "panic", "targets"}
                for target in upstream["targets"]:
                    assert set(target) == {
                        "url",
                        "weight",
                        "healthy",
                        "breaker",
                        "breaker_failures",
                        "breaker_cooldown",
                        "breaker_retry_after",
                        "in_flight",
                    }
            closed = {
                "healthy": True,
                "breaker": "closed",
                "breaker_failures": 0,
                "breaker_cooldown": 5.0,
                "breaker_retry_after": 0.0,
                "in_flight": 0,
            }
            assert doc["upstreams"]["users"] == {
                "balancer": "weighted",
                "panic_threshold": 0.5,
                "panic": False,
                "targets": [
                    {"url": u1, "weight": 1, **closed},
                    {"url": u2, "weight": 3, **closed},
                ],
            }
            routes = {r["name"]: r for r in doc["routes"]}
            assert [r["name"] for r in doc["routes"]] == ["users", "orders"]
            assert routes["users"]["upstream"] == "users"
            assert routes["users"]["path"] == "/users"
            assert routes["users"]["methods"] == ["GET", "POST"]
            assert routes["orders"]["rate_limit"] == {
                "rate": 100.0,
                "burst": 200,
                "key": "client_ip",
                "store": "local",
            }

            # /metrics: every contract name, and a zero series for every route
            # and target from the moment the config is loaded.
            status, content_type, text = await admin("/metrics")
            assert (status, content_type) == (200, "text/plain")
            for name in CONTRACT_METRICS:
                assert re.search(rf"^# TYPE {name} ", text, re.M), name
            for upstream, url in (("users", u1), ("users", u2), ("orders", o1)):
                labels = {"upstream": upstream, "target": url}
                assert metric_value(text, "gateway_upstream_in_flight", **labels) == 0
                assert metric_value(text, "gateway_breaker_state", **labels) == 0
                assert metric_value(text, "gateway_target_healthy", **labels) == 1
                for outcome in ("ok", "error", "timeout"):
                    value = metric_value(
                        text, "gateway_upstream_requests_total", outcome=outcome, **labels
                    )
                    assert value == 0
            for route in ("users", "orders"):
                for name in (
                    "gateway_request_bytes_total",
                    "gateway_response_bytes_total",
                    "gateway_rate_limited_total",
                    "gateway_request_duration_seconds_count",
                ):
                    assert metric_value(text, name, route=route) == 0, (name, route)
            for result in ("success", "failure"):
                assert metric_value(text, "gateway_config_reloads_total", result=result) == 0
            loaded = metric_value(text, "gateway_config_last_reload_success_timestamp_seconds")
            assert loaded is not None
            assert abs(loaded - time.time()) < 60
            # The process collectors a Prometheus job expects of any exporter.
            assert metric_value(text, "process_open_fds") is not None

            # Traffic moves them.
            sizes = 0
            for path in ("/users/1", "/users/2", "/users/3"):
                async with session.get(gw.url + path) as response:
                    assert response.status == 200
                    sizes += len(await response.read())
            async with session.post(gw.url + "/users", data=b"x" * 1000) as response:
                assert response.status == 200
                sizes += len(await response.read())
            random_path = f"/nowhere-{uuid.uuid4().hex}"
            async with session.get(gw.url + random_path) as response:
                assert response.status == 404
            slow = asyncio.create_task(session.get(gw.url + "/orders/slow"))
            await asyncio.wait_for(arrived.wait(), 10)
            text = (await admin("/metrics"))[2]
            doc = json.loads((await admin("/status"))[2])
            release.set()
            async with await slow as response:
                assert await response.text() == "slow"

            in_flight = {"upstream": "orders", "target": o1}
            assert metric_value(text, "gateway_upstream_in_flight", **in_flight) == 1
            assert doc["upstreams"]["orders"]["targets"][0]["in_flight"] == 1
            get_ok = {"route": "users", "method": "GET", "code": "200"}
            assert metric_value(text, "gateway_requests_total", **get_ok) == 3
            post_ok = {"route": "users", "method": "POST", "code": "200"}
            assert metric_value(text, "gateway_requests_total", **post_ok) == 1
            not_found = {"route": "", "method": "GET", "code": "404"}
            assert metric_value(text, "gateway_requests_total", **not_found) == 1
            assert metric_value(text, "gateway_request_bytes_total", route="users") == 1000
            assert metric_value(text, "gateway_response_bytes_total", route="users") == sizes
            duration = "gateway_request_duration_seconds_count"
            assert metric_value(text, duration, route="users") == 4
            ok = sum(
                metric_value(
                    text,
                    "gateway_upstream_requests_total",
                    upstream="users",
                    target=t,
                    outcome="ok",
                )
                or 0
                for t in (u1, u2)
            )
            assert ok == 4
            # Labels stay bounded: no path, ever, only configured names.
            assert random_path.strip("/") not in text
            assert label_values(text, "route") == {"users", "orders", ""}
            assert label_values(text, "target") == {u1, u2, o1}

            # OpenMetrics for a scraper that asks for it.
            status, content_type, text = await admin(
                "/metrics", Accept="application/openmetrics-text; version=1.0.0"
            )
            assert content_type == "application/openmetrics-text"
            assert text.endswith("# EOF\n")
    finally:
        release.set()
