"""SIGHUP: re-read the config off the hot path, swap the snapshot atomically.

Reloads are coalesced: a SIGHUP that arrives while one runs schedules exactly
one more, however many arrive. The file is read and validated in a worker
thread; the snapshot is built and swapped on the loop without an `await` in
between, so every request sees either the old config or the new one whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from gateway.config import Config, ConfigError, load

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger("gateway.reload")


def describe_changes(old: Config, new: Config) -> str:
    """One line: what a reload changed, by route name and target URL."""
    old_routes = {r.name: r for r in old.routes}
    new_routes = {r.name: r for r in new.routes}
    old_targets = {(u.name, t.url) for u in old.upstreams.values() for t in u.targets}
    new_targets = {(u.name, t.url) for u in new.upstreams.values() for t in u.targets}

    def strip(route: object) -> object:
        # A route that only moved in the file is not "changed".
        from msgspec import structs

        return structs.replace(route, index=0)  # type: ignore[type-var]

    parts = []
    added = sorted(new_routes.keys() - old_routes.keys())
    removed = sorted(old_routes.keys() - new_routes.keys())
    changed = sorted(
        n
        for n in new_routes.keys() & old_routes.keys()
        if strip(new_routes[n]) != strip(old_routes[n])
    )
    t_added = sorted(f"{u}:{t}" for u, t in new_targets - old_targets)
    t_removed = sorted(f"{u}:{t}" for u, t in old_targets - new_targets)
    up_changed = sorted(
        n
        for n in new.upstreams.keys() & old.upstreams.keys()
        if new.upstreams[n] != old.upstreams[n]
    )
    for label, items in (
        ("routes added", added),
        ("routes removed", removed),
        ("routes changed", changed),
        ("targets added", t_added),
        ("targets removed", t_removed),
        ("upstreams changed", up_changed),
    ):
        if items:
            parts.append(f"{label}: {', '.join(items)}")
    if old.server != new.server:
        parts.append("server settings changed")
    return "; ".join(parts) if parts else "no changes"


class Reloader:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._wanted = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.completed = 0  # reloads attempted, for tests and /status

    def request(self) -> None:
        self._wanted.set()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.reload_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad reload end reloading
                log.exception("reload failed unexpectedly; old config keeps serving")
            self.completed += 1

    async def reload_once(self) -> bool:
        gw = self._gateway
        assert gw.box is not None
        notifier = gw.notifier
        # MONOTONIC_USEC travels with RELOADING=1 (systemd's notify-reload).
        notifier.reloading()
        old = gw.box.snapshot.config
        path = old.path
        try:
            try:
                config = await asyncio.to_thread(load, path)
            except ConfigError as error:
                gw.metrics.config_reloads.labels("failure").inc()
                log.error(
                    "reload of %s rejected, old config keeps serving:\n  %s",
                    path,
                    "\n  ".join(error.errors),
                )
                notifier.status(f"reload rejected ({len(error.errors)} errors); old config serving")
                return False
            # No await from here to the swap: atomic for every request.
            snapshot = gw.runtime.build(config)
            gw.box.snapshot = snapshot
            gw.health.sync(snapshot)
            gw.access_log.set_format(config.server.access_log)
            gw.metrics.config_reloads.labels("success").inc()
            gw.metrics.config_last_reload_success.set(time.time())
            if config.server.listen != old.server.listen or config.server.admin != old.server.admin:
                log.warning("listen/admin address changes take effect on restart only")
            log.info("reloaded %s: %s", path, describe_changes(old, config))
            notifier.status(f"serving {len(config.routes)} routes")
            return True
        finally:
            # Every RELOADING=1 is followed by READY=1, success or not.
            notifier.ready()
