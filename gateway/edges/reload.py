"""SIGHUP: re-read the config off the hot path, swap the snapshot atomically.

Reloads are coalesced: a SIGHUP that arrives while one runs schedules exactly
one more, however many arrive, and that one reads the file as it is then, so
the last signal's file is always the one served. The file is read and
validated, the route table built and the new config compared with the old
one in a worker thread (`Reloadable.prepare`): with tens of thousands of
routes that is seconds of work the event loop must not wait for. Only the
swap and its incremental bookkeeping (new pools, the metric series of new or
removed routes, health probes) run on the loop (`Reloadable.apply`), with no
`await` in between, so every request sees either the old config or the new
one whole. The replaced snapshot is then freed in a worker thread too,
piecemeal (`state.snapshot.dismantle`): a million objects freed at once
would be one long pause of the loop.

systemd sees `RELOADING=1` (with `MONOTONIC_USEC=` in the same datagram) when
a reload starts and `READY=1` when it ends, valid or not (sd_notify(3),
Type=notify-reload); a reload cut short by shutdown ends in `STOPPING=1`
instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Final, Protocol

from msgspec import structs

from gateway.core.config import Config, ConfigError, RouteConfig, UpstreamConfig, load
from gateway.core.systemd import Notifier
from gateway.state.metrics import Metrics
from gateway.state.snapshot import Prepared, Snapshot, dismantle, gc_paused

log = logging.getLogger("gateway.reload")

RELOAD_SWITCH_INTERVAL: Final = 0.001  # seconds


def _route_key(route: RouteConfig) -> RouteConfig:
    # A route that only moved in the file is not "changed".
    return structs.replace(route, index=0)


def _upstream_key(upstream: UpstreamConfig) -> UpstreamConfig:
    # Target changes are reported per target, not as a changed upstream.
    return structs.replace(upstream, targets=())


def describe_changes(old: Config, new: Config) -> str:
    """One line: what a reload changed, by route name, upstream name and target URL.

    E.g. `routes added: b; routes changed: a; targets removed: users:http://10.0.0.2:80`.
    """
    old_routes = {r.name: r for r in old.routes}
    new_routes = {r.name: r for r in new.routes}
    common_routes = new_routes.keys() & old_routes.keys()
    common_upstreams = new.upstreams.keys() & old.upstreams.keys()
    # Targets of an added or removed upstream go without saying.
    old_targets = {
        (u.name, t.url): t
        for u in old.upstreams.values()
        if u.name in common_upstreams
        for t in u.targets
    }
    new_targets = {
        (u.name, t.url): t
        for u in new.upstreams.values()
        if u.name in common_upstreams
        for t in u.targets
    }
    common_targets = new_targets.keys() & old_targets.keys()
    sections = (
        ("routes added", sorted(new_routes.keys() - old_routes.keys())),
        ("routes removed", sorted(old_routes.keys() - new_routes.keys())),
        (
            "routes changed",
            sorted(
                n for n in common_routes if _route_key(new_routes[n]) != _route_key(old_routes[n])
            ),
        ),
        ("upstreams added", sorted(new.upstreams.keys() - old.upstreams.keys())),
        ("upstreams removed", sorted(old.upstreams.keys() - new.upstreams.keys())),
        (
            "upstreams changed",
            sorted(
                n
                for n in common_upstreams
                if _upstream_key(new.upstreams[n]) != _upstream_key(old.upstreams[n])
            ),
        ),
        ("targets added", sorted(f"{u}:{t}" for u, t in new_targets.keys() - old_targets.keys())),
        (
            "targets removed",
            sorted(f"{u}:{t}" for u, t in old_targets.keys() - new_targets.keys()),
        ),
        (
            "targets changed",
            sorted(f"{u}:{t}" for u, t in common_targets if new_targets[u, t] != old_targets[u, t]),
        ),
    )
    parts = [f"{label}: {', '.join(items)}" for label, items in sections if items]
    # Key files are part of their policy: a re-read JWKS or keys file shows here.
    auth_changed = sorted(
        name
        for name in new.auth.keys() | old.auth.keys()
        if new.auth.get(name) != old.auth.get(name)
    )
    if auth_changed:
        parts.append(f"auth policies changed: {', '.join(auth_changed)}")
    if old.server != new.server:
        parts.append("server settings changed")
    return "; ".join(parts) if parts else "no changes"


class Reloadable(Protocol):
    """What a reload needs of the running gateway (server.Gateway is one)."""

    notifier: Notifier
    metrics: Metrics

    @property
    def config(self) -> Config: ...

    def prepare(self, config: Config) -> Prepared:
        """The pure half of the new snapshot; called in a worker thread."""

    def apply(self, prepared: Prepared) -> None:
        """Serve `prepared` from the next request on (on the loop, no await: atomic)."""


@dataclass(frozen=True)
class ReloadResult:
    """How one reload ended, for the admin API and dashboard."""

    ok: bool
    at: float  # unix time it ended
    message: str  # the systemd STATUS= line, e.g. "serving 3 routes"
    errors: tuple[str, ...] = ()  # every config error of a rejected reload
    changes: str = ""  # describe_changes() of an applied one


def _prepare(gw: Reloadable, path: str, old: Config) -> list[tuple[Prepared, str]]:
    # Everything here is pure: it reads immutable configs and builds new
    # objects, so it runs beside the loop (see the module doc). In a list the
    # caller empties: the thread's future keeps its result for as long as it
    # lives, and the result must not keep the replaced snapshot alive
    # (Prepared.base) past `dismantle`.
    config = load(path)
    return [(gw.prepare(config), describe_changes(old, config))]


class Reloader:
    def __init__(self, gateway: Reloadable) -> None:
        self._gateway = gateway
        self._wanted = asyncio.Event()
        # One reload at a time: SIGHUP's and the admin API's (POST /reload).
        self._lock = asyncio.Lock()
        self.last: ReloadResult | None = None  # None until the first reload
        # What the reload under way found (read into `last` when it ends).
        self._errors: tuple[str, ...] = ()
        self._changes = ""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reloader")

    def request(self) -> None:
        """Ask for a reload; many requests before it starts make one reload."""
        self._wanted.set()

    async def close(self) -> None:
        """Stop reloading; a reload in progress is abandoned (the old config stays)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            # Cleared before the file is read: a SIGHUP from here on asks for
            # one more reload, which will see whatever was written meanwhile.
            self._wanted.clear()
            await self.reload_once()

    async def reload_once(self) -> bool:
        """One reload; True when the new config is serving (`last` says more).
        Raises only CancelledError (shutdown), and then sends no READY=1."""
        async with self._lock:
            return await self._reload_once()

    async def _reload_once(self) -> bool:
        gw = self._gateway
        path = gw.config.path
        # MONOTONIC_USEC travels with RELOADING=1 (systemd's notify-reload).
        gw.notifier.reloading(f"reloading {path}")
        try:
            ok, status = await self._reload(gw, path)
        except asyncio.CancelledError:
            # Shutdown: STOPPING=1 follows and supersedes RELOADING=1.
            raise
        except Exception:  # never let one bad reload end reloading
            gw.metrics.config_reloads.labels("failure").inc()
            log.exception("reload of %s failed unexpectedly; old config keeps serving", path)
            ok, status = False, "reload failed; old config serving"
            self._errors = ("unexpected error; see the log",)
        self.last = ReloadResult(ok, time.time(), status, self._errors, self._changes)
        # Every RELOADING=1 is followed by READY=1, success or not.
        gw.notifier.ready(status)
        return ok

    async def _reload(self, gw: Reloadable, path: str) -> tuple[bool, str]:
        self._errors = ()
        self._changes = ""
        old = gw.config
        retired: list[Snapshot] = []
        # While the worker thread runs, the loop gets the GIL back within
        # 1 ms of asking instead of 5 (sys.setswitchinterval's default): every
        # loop iteration waits that long once the thread holds it.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, RELOAD_SWITCH_INTERVAL))
        try:
            with gc_paused():
                result = await self._swap(gw, path, old, retired)
        finally:
            sys.setswitchinterval(interval)
        # The replaced snapshot (and so the old config) is freed in a worker
        # thread, a piece at a time: freed here, on the loop, a large one is
        # one long stall. This frame's reference goes first.
        del old
        if retired:
            await asyncio.to_thread(dismantle, retired)
        return result

    async def _swap(
        self,
        gw: Reloadable,
        path: str,
        old: Config,
        retired: list[Snapshot],
    ) -> tuple[bool, str]:
        try:
            prepared, changes = (await asyncio.to_thread(_prepare, gw, path, old)).pop()
        except ConfigError as error:
            gw.metrics.config_reloads.labels("failure").inc()
            log.error(
                "reload of %s rejected (%d error(s)), old config keeps serving:\n  %s",
                path,
                len(error.errors),
                "\n  ".join(error.errors),
            )
            self._errors = tuple(error.errors)
            return False, f"reload rejected ({len(error.errors)} errors); old config serving"
        config = prepared.config
        base = prepared.base
        try:
            gw.apply(prepared)
        except ConfigError as error:
            # A certificate or key replaced since the check read it.
            gw.metrics.config_reloads.labels("failure").inc()
            log.error(
                "reload of %s rejected, old config keeps serving:\n  %s",
                path,
                "\n  ".join(error.errors),
            )
            self._errors = tuple(error.errors)
            return False, "reload rejected; old config serving"
        if base is not None and base.config is old:
            retired.append(base)  # the snapshot just replaced
        del prepared, base
        gw.metrics.config_reloads.labels("success").inc()
        gw.metrics.config_last_reload_success.set(time.time())
        if config.server.listen != old.server.listen or config.server.admin != old.server.admin:
            log.warning("listen/admin address changes take effect on restart only")
        self._changes = changes
        log.info("reloaded %s: %s", path, changes)
        return True, f"serving {len(config.routes)} routes"
