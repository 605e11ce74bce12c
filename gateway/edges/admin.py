"""The admin listener: /healthz, /readyz, /metrics, /status, and the
operator tools: the dashboard (/), its JSON (/stats) and the POST actions
(/breakers/reset, /cache/purge, /reload). See docs/operator-tools.md.

Kept off the proxy listener so that an operator's scrape or probe never
competes with (or is routed like) client traffic.

Every POST is guarded by `server.admin_token_env` when it names a variable:
`Authorization: Bearer <token>`, compared in constant time (hmac); a
variable that is named but unset or empty refuses every POST (403) rather
than letting an empty token through, since "the token is empty" is far more
likely a deployment slip than a wish for an open admin API. GETs stay open,
as /metrics and /status always were: the listener's address is the access
control for reading (bind it to loopback or a private network).

Without a token, a POST a browser sends for another site's page is refused
(403 cross_site): all arguments are in the query string, so any page an
operator opens could otherwise POST /reload or /cache/purge (CSRF). Browsers
send Origin on every POST and Sec-Fetch-Site on modern ones; curl and
scripts send neither and are let through.
"""

from __future__ import annotations

import datetime
import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from gateway.core.config import RouteConfig
from gateway.core.headers import new_request_id
from gateway.edges.dashboard import render_dashboard
from gateway.edges.reload import ReloadResult
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


# An optional /stats section (tunnels, cache): a JSON-able value, or None
# when there is nothing to show right now.
SectionProvider = Callable[[], Any]

_BEARER: Final = "bearer"


@dataclass
class AdminOps:
    """What the admin actions reach beyond the snapshot.

    `reload` runs one reload (the SIGHUP path, `Reloader.reload_once`) and
    answers its result, None when no reloader is running (starting, draining);
    `last_reload` is the latest result. `sections` are optional /stats
    sections by name: a feature that exists registers a provider (e.g.
    `sections["tunnels"]`), and the dashboard shows it when present.
    """

    environ: Mapping[str, str]
    reload: Callable[[], Awaitable[ReloadResult | None]] | None = None
    last_reload: Callable[[], ReloadResult | None] = lambda: None
    sections: dict[str, SectionProvider] = field(default_factory=dict)
    # The whole gateway's views when the traffic is served by other processes
    # (workers = N: supervisor.py fills these in by asking every worker);
    # None: this process's own, read from the snapshot and registry.
    metrics: Callable[[str], Awaitable[tuple[bytes, str]]] | None = None
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None
    # Per route windows and the optional sections, both over every process.
    gathered: Callable[[], Awaitable[tuple[dict[str, dict[str, Any]], dict[str, Any]]]] | None = (
        None
    )
    reset_breakers: Callable[[str, str | None], Awaitable[int]] | None = None
    purge_cache: Callable[[str, str], Awaitable[int]] | None = None


def _reload_document(result: ReloadResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "ok": result.ok,
        "at": _iso(result.at),
        "message": result.message,
        "errors": list(result.errors),
        "changes": result.changes,
    }


def _iso(unix: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def stats_document(
    snap: Snapshot,
    metrics: Metrics,
    ops: AdminOps,
    status: dict[str, Any] | None = None,
    windows: Mapping[str, dict[str, Any]] | None = None,
    sections: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """/stats: the dashboard's data (see docs/operator-tools.md for the shape).

    `status`, `windows` (per route) and `sections` are the whole gateway's
    when given (workers = N); otherwise this process's own."""
    status = status if status is not None else status_document(snap)
    routes = {}
    for route in snap.config.routes:
        if windows is not None and route.name in windows:
            window = windows[route.name]
        else:
            window = snap.routes[route.name].stats.window()
        routes[route.name] = {"upstream": route.upstream, "path": _route_match(route), **window}
    doc: dict[str, Any] = {
        "time": _iso(time.time()),
        "window": 60,
        "config": {**status["config"], "last_reload": _reload_document(ops.last_reload())},
        "admin_token_required": bool(snap.config.server.admin_token_env),
        "cache_purge": snap.cache is not None,
        "routes": routes,
        "upstreams": status["upstreams"],
    }
    if sections is None:
        sections = {name: provider() for name, provider in ops.sections.items()}
    for name, value in sections.items():
        if value is not None:
            doc[name] = value
    return doc


def _route_match(route: RouteConfig) -> str:
    where = route.path if route.path is not None else f"~{route.path_regex}"
    return f"{route.host}{where}" if route.host else str(where)


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    # CONTRACT.md: every new error is JSON {"error", "message", "request_id"}.
    body = {"error": code, "message": message, "request_id": new_request_id()}
    return web.json_response(body, status=status, headers=headers or None)


#: Sec-Fetch-Site values of a request the admin listener's own page (or the
#: user typing it) sent. "same-site" is refused: a page served by the
#: proxy listener of the same host is same-site with the admin listener.
_OWN_FETCH_SITES: Final = frozenset({"same-origin", "none"})
_DEFAULT_PORTS: Final = {"http": ":80", "https": ":443"}


def _cross_site_problem(request: web.Request, allowed: frozenset[str]) -> web.Response | None:
    """The refusal of a browser's cross-site POST, or None.

    With no token, this is what keeps a web page from driving the admin API
    through the operator's browser. Origin, when sent (browsers send it on
    every POST), must be the listener's own or one of admin_cors_origins;
    without it, Sec-Fetch-Site (if any) must say the request is not
    another site's. Requests with neither (curl, scripts) pass.
    """
    origin = request.headers.get("Origin")
    if origin is not None:
        scheme = request.scheme.lower()
        host = request.host.lower()
        default = _DEFAULT_PORTS.get(scheme)
        if default is not None and host.endswith(default):
            host = host[: -len(default)]  # RFC 6454 6.1: the default port is omitted
        if origin == f"{scheme}://{host}" or origin in allowed:
            return None
        shown = origin[:100].encode("ascii", "backslashreplace").decode("ascii")
        return _error(
            403, "cross_site", f"admin actions refuse a request from another origin: {shown!r}"
        )
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in _OWN_FETCH_SITES:
        shown = site[:40].encode("ascii", "backslashreplace").decode("ascii")
        return _error(
            403,
            "cross_site",
            f"admin actions refuse a cross-site request (Sec-Fetch-Site {shown!r})",
        )
    return None


def _token_problem(
    box: SnapshotBox, ops: AdminOps, request: web.Request, allowed: frozenset[str] = frozenset()
) -> web.Response | None:
    """None when the request may act; else the refusal (see the module docstring)."""
    env_name = box.snapshot.config.server.admin_token_env
    if not env_name:
        # No token: a browser would send a cross-site POST with the
        # operator's network position; only the listener's own pages act.
        return _cross_site_problem(request, allowed)
    expected = ops.environ.get(env_name, "")
    if not expected:
        return _error(
            403,
            "admin_token_unset",
            f"admin actions are disabled: ${env_name} is unset or empty",
        )
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    # Auth schemes are case-insensitive (RFC 9110 §11.1); the token is not.
    given = credentials.strip().encode("utf-8", "surrogateescape")
    ok = hmac.compare_digest(given, expected.encode("utf-8", "surrogateescape"))
    if scheme.lower() != _BEARER or not ok:
        return _error(
            401,
            "unauthorized",
            "admin actions need Authorization: Bearer <token>",
            **{"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
        )
    return None


def admin_app(
    box: SnapshotBox,
    metrics: Metrics,
    ready: Callable[[], bool],
    ops: AdminOps | None = None,
) -> web.Application:
    ops = ops if ops is not None else AdminOps(environ={})
    # Read at start-up, as the CORS setup below.
    allowed = frozenset(box.snapshot.config.server.admin_cors_origins)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def metrics_handler(request: web.Request) -> web.Response:
        accept = request.headers.get("Accept", "")
        if ops.metrics is not None:
            body, content_type = await ops.metrics(accept)
        else:
            encode, content_type = choose_encoder(accept)
            body = encode(metrics.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def status_now() -> dict[str, Any]:
        if ops.status is not None:
            return await ops.status()
        return status_document(box.snapshot)

    async def stats_now() -> dict[str, Any]:
        snap = box.snapshot
        windows = sections = None
        if ops.gathered is not None:
            windows, sections = await ops.gathered()
        return stats_document(snap, metrics, ops, await status_now(), windows, sections)

    async def status(request: web.Request) -> web.Response:
        body = _encoder.encode(await status_now())
        return web.Response(body=body, content_type="application/json")

    async def dashboard(request: web.Request) -> web.Response:
        page = render_dashboard(await stats_now())
        return web.Response(
            text=page,
            content_type="text/html",
            charset="utf-8",
            # The page's own script and styles only (CONTRACT.md: no external
            # assets); refuses framing (clickjacking the POST buttons).
            headers={
                "Content-Security-Policy": (
                    "default-src 'none'; script-src 'unsafe-inline'; "
                    "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
                    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
                ),
                "X-Frame-Options": "DENY",
                "Cache-Control": "no-store",
            },
        )

    async def stats(request: web.Request) -> web.Response:
        body = _encoder.encode(await stats_now())
        return web.Response(
            body=body, content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    async def breakers_reset(request: web.Request) -> web.Response:
        refused = _token_problem(box, ops, request, allowed)
        if refused is not None:
            return refused
        upstream = request.query.get("upstream")
        target = request.query.get("target")
        if not upstream:
            return _error(400, "bad_request", "upstream=NAME is required")
        pool = box.snapshot.pools.get(upstream)
        if pool is None:
            return _error(404, "not_found", f"no upstream {upstream!r}")
        targets = [t for t in pool.targets if target is None or t.url == target]
        if not targets:
            return _error(404, "not_found", f"upstream {upstream!r} has no target {target!r}")
        if ops.reset_breakers is not None:
            # Breakers live in the processes that proxy (one set per worker).
            return web.json_response({"reset": await ops.reset_breakers(upstream, target)})
        reset = sum(t.breaker.reset("reset through the admin API") for t in targets)
        return web.json_response({"reset": reset})

    async def cache_purge(request: web.Request) -> web.Response:
        refused = _token_problem(box, ops, request, allowed)
        if refused is not None:
            return refused
        route = request.query.get("route")
        path = request.query.get("path")
        if not route:
            return _error(400, "bad_request", "route=NAME is required")
        if path is not None and not path.startswith("/"):
            return _error(400, "bad_request", "path must start with /")
        if route not in box.snapshot.routes:
            return _error(404, "not_found", f"no route {route!r}")
        store = box.snapshot.cache
        if store is None:
            # Nothing to purge is not success: a script purging after a
            # deploy should learn that no cache is configured.
            return _error(409, "no_cache", "no response cache is configured ([cache] is absent)")
        if ops.purge_cache is not None:
            # One response store per worker: each is purged.
            return web.json_response({"purged": await ops.purge_cache(route, path or "")})
        return web.json_response({"purged": store.purge(route, path or "")})

    async def reload(request: web.Request) -> web.Response:
        refused = _token_problem(box, ops, request, allowed)
        if refused is not None:
            return refused
        result = await ops.reload() if ops.reload is not None else None
        if result is None:
            return _error(503, "not_ready", "no reload now: the gateway is starting or draining")
        # 422: the file was read and refused; the old config keeps serving.
        return web.json_response(_reload_document(result), status=200 if result.ok else 422)

    app = web.Application()
    app.router.add_get("/", dashboard)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/status", status)
    app.router.add_get("/stats", stats)
    app.router.add_post("/breakers/reset", breakers_reset)
    app.router.add_post("/cache/purge", cache_purge)
    app.router.add_post("/reload", reload)
    origins = box.snapshot.config.server.admin_cors_origins
    if origins:
        # Imported only when asked for (1.6 MiB at start-up otherwise).
        import aiohttp_cors

        # Read at start-up (like the admin address): aiohttp-cors fixes its
        # routes when the app is built.
        options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
            allow_headers=("Authorization", "Content-Type"),
            allow_methods=("GET", "POST"),
            max_age=600,
        )
        cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
        for route in list(app.router.routes()):
            if route.method in ("GET", "POST"):
                cors.add(route)
    return app
