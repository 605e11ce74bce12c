"""The admin listener: /healthz, /readyz, /metrics, /status.

Kept off the proxy listener so that an operator's scrape or probe never
competes with (or is routed like) client traffic.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from gateway.core.config import RouteConfig
from gateway.state.metrics import Metrics
from gateway.state.snapshot import Snapshot, SnapshotBox

_encoder = msgspec.json.Encoder()


def _route_status(route: RouteConfig) -> dict[str, Any]:
    out = msgspec.to_builtins(route)
    out.pop("index", None)
    out["headers"] = dict(route.headers)
    return dict(out)


def status_document(snap: Snapshot) -> dict[str, Any]:
    config = snap.config
    upstreams: dict[str, Any] = {}
    for name, pool in snap.pools.items():
        upstreams[name] = {
            "balancer": pool.config.balancer,
            "panic_threshold": pool.config.panic_threshold,
            "panic": pool.panic.active,
            "targets": [
                {
                    "url": t.url,
                    "weight": t.weight,
                    "healthy": t.healthy,
                    "breaker": t.breaker.state,
                    # Consecutive failures counted while closed; the cooldown
                    # the breaker opens (or is open) for, doubled per failed
                    # trial; the seconds of it left.
                    "breaker_failures": t.breaker.consecutive_failures,
                    "breaker_cooldown": t.breaker.current_cooldown,
                    "breaker_retry_after": round(t.breaker.retry_after(), 3),
                    "in_flight": t.in_flight,
                }
                for t in pool.targets
            ],
        }
    loaded_at = datetime.datetime.fromtimestamp(snap.loaded_at, datetime.UTC)
    return {
        "config": {
            "path": config.path,
            "sha256": config.sha256,
            "loaded_at": loaded_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        },
        "upstreams": upstreams,
        "routes": [_route_status(r) for r in config.routes],
    }


def _admin_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def admin_app(box: SnapshotBox, metrics: Metrics, ready: Callable[[], bool]) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def metrics_handler(request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encode(metrics.registry))
        response.headers["Content-Type"] = content_type
        return response

    async def status(request: web.Request) -> web.Response:
        body = _encoder.encode(status_document(box.snapshot))
        return web.Response(body=body, content_type="application/json")

    async def cache_purge(request: web.Request) -> web.Response:
        """POST /cache/purge?route=NAME[&path=/prefix]: drop stored responses."""
        snap = box.snapshot
        route = request.query.get("route")
        if not route:
            return _admin_error(400, "bad_request", "route=NAME is required")
        if route not in snap.routes:
            return _admin_error(404, "unknown_route", f"no route named {route!r}")
        prefix = request.query.get("path", "")
        if prefix and not prefix.startswith("/"):
            return _admin_error(400, "bad_request", 'path must start with "/"')
        purged = snap.cache.purge(route, prefix) if snap.cache is not None else 0
        return web.json_response({"purged": purged})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/status", status)
    app.router.add_post("/cache/purge", cache_purge)
    return app
