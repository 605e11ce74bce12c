"""Active health checks: one probe task per target of every upstream with a
`[upstreams.NAME.health]` table.

Each task sends `GET {target base}{health.path}` every `interval` seconds. A
2xx or 3xx answer within `timeout` passes (redirects are not followed: the
target answered, which is all a probe asks). Any other status, a connection
error or a timeout fails. `unhealthy_threshold` failures in a row take the
target out of rotation (`Target.set_healthy(False)`, gauge
`gateway_target_healthy` 0); `healthy_threshold` passes in a row bring it
back. The first probe waits a random part of one interval and every later wait
is jittered by +-10%, so the targets of a large config do not all get probed
(and the gateway does not open all those sockets) in the same instant.

Probes go through a `ClientSession` of the monitor's own, never the pool's:
they must not show up in `gateway_upstream_requests_total`, hold `in_flight`,
feed the breaker, or take connections from the proxy's keep-alive pool. That
session opens a fresh connection per probe (`force_close=True`, so requests
carry `Connection: close`): each probe then exercises connect (and TLS) the
way a new proxy connection would, and a keep-alive connection the target
closed between two probes (gunicorn's keep-alive is 2 s, shorter than
typical intervals) cannot fail a probe spuriously.

A passing probe also ends the cooldown of the target's open breaker at once
(`Target.pass_probe`): the target answers again, so its next request is the
breaker's trial instead of waiting out a cooldown that outlasted the restart.

**When too few targets of an upstream are available, the pool panics**
(upstream.py, `panic_threshold`): health verdicts are then ignored, as in
Envoy, so a wrong `health.path` or a probe-only outage cannot take a whole
upstream dark. The monitor still logs a WARNING on "gateway.health" when the
last healthy target of an upstream goes out, and `/status` and
`gateway_target_healthy` show it.

`HealthMonitor.sync(snapshot)` runs right after each config load and keeps
exactly one task per (upstream name, target URL) whose upstream has checks.
A task whose HealthConfig changed, or whose key now maps to a new `Target`
object, is restarted with the consecutive pass/fail counts and the healthy
flag it had. Tasks of targets gone from the config stop; targets whose
upstream lost its health table stop being probed and are put back in
rotation (passive checks, the breaker, only).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Final

from gateway.core.config import HealthConfig
from gateway.state.snapshot import Snapshot
from gateway.state.upstream import Target
from gateway.wire.tls import ClientTLS

if TYPE_CHECKING:
    import aiohttp

# aiohttp (0.15 s and some 25 MiB to import) is imported where first used:
# start-up and memory do not pay for it unless this feature runs.

log = logging.getLogger("gateway.health")

USER_AGENT: Final = "gateway-health/1"
# Each sleep after the first is interval * (1 +- JITTER).
JITTER: Final = 0.1

_Key = tuple[str, str]  # (upstream name, target URL as written)


class _Probe:
    """One target's probe task and the consecutive counts it acts on."""

    def __init__(
        self, upstream: str, target: Target, config: HealthConfig, tls: ClientTLS | None = None
    ) -> None:
        self.upstream = upstream
        self.target = target
        self.config = config
        # The upstream's [tls] settings: probes verify as requests do.
        self.tls = tls
        self.passes = 0
        self.failures = 0
        self.task: asyncio.Task[None] | None = None


class HealthMonitor:
    """Runs the probe tasks for the current snapshot; `close()` on shutdown."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._probes: dict[_Key, _Probe] = {}
        # Cancelled tasks not finished yet; close() awaits them too.
        self._stopping: set[asyncio.Task[None]] = set()
        # Targets per checked upstream, to notice when the last one goes out.
        self._pools: dict[str, tuple[Target, ...]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def sync(self, snapshot: Snapshot) -> None:
        """Match the running probes to `snapshot`. Must run on the event loop.

        Nothing here awaits, so it takes effect atomically with the snapshot
        swap the caller just made. After `close()` it does nothing: a reload
        that races shutdown must not start probes again.
        """
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        present: dict[_Key, Target] = {}
        wanted: dict[_Key, tuple[Target, HealthConfig, ClientTLS | None]] = {}
        self._pools = {}
        for pool in snapshot.pools.values():
            health = pool.config.health
            for target in pool.targets:
                present[(pool.name, target.url)] = target
                if health is not None:
                    wanted[(pool.name, target.url)] = (target, health, pool.tls)
            if health is not None:
                self._pools[pool.name] = pool.targets

        for key in [k for k in self._probes if k not in wanted]:
            self._stop(self._probes.pop(key))
            kept = present.get(key)
            if kept is not None and not kept.healthy:
                # Checks removed from the upstream: passive checks only, so
                # the last probe verdict must not keep the target out forever.
                kept.set_healthy(True)
                log.info("upstream %s target %s is now healthy: health checks removed", *key)

        for key, (target, health, tls) in wanted.items():
            old = self._probes.get(key)
            if (
                old is not None
                and old.target is target
                and old.config == health
                and old.tls is tls
                and old.task is not None
                and not old.task.done()
            ):
                continue
            probe = _Probe(key[0], target, health, tls)
            if old is not None:
                self._stop(old)
                # Same URL, same history: a changed interval or breaker
                # setting is no reason to forget that the target was failing.
                probe.passes, probe.failures = old.passes, old.failures
                if old.target is not target and target.healthy != old.target.healthy:
                    target.set_healthy(old.target.healthy)
            probe.task = loop.create_task(self._run(probe), name=f"health {key[0]} {key[1]}")
            self._probes[key] = probe

    async def close(self) -> None:
        """Cancel and await every probe task, then close the probe session."""
        self._closed = True
        tasks = [p.task for p in self._probes.values() if p.task is not None]
        tasks.extend(self._stopping)
        self._probes.clear()
        self._stopping.clear()
        for task in tasks:
            task.cancel()
        # return_exceptions: one task's CancelledError must not leave the
        # others un-awaited ("Task was destroyed but it is pending").
        await asyncio.gather(*tasks, return_exceptions=True)
        # Only now: a task cancelled mid-request releases its connection
        # while unwinding, so the session must outlive every task.
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _stop(self, probe: _Probe) -> None:
        task = probe.task
        if task is None or task.done():
            return
        # cancel() is delivered at the task's next await, and a probe updates
        # its counts and the target without awaiting in between, so a stopped
        # task never half-applies a result.
        task.cancel()
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    force_close=True,  # a fresh connection per probe, see module docstring
                    limit=0,  # a pool cap would queue probes and fail them by timeout
                    ttl_dns_cache=10,  # as the proxy's sessions: both follow DNS changes
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                raise_for_status=False,
                trust_env=False,  # an HTTP(S)_PROXY variable must not reroute probes
            )
        return self._session

    async def _run(self, probe: _Probe) -> None:
        health = probe.config
        # [0, interval): spread the first probes of many targets over one interval.
        delay = self._rng.random() * health.interval
        while True:
            await asyncio.sleep(delay)
            try:
                # Timed whole, timeouts, refusals and errors included (as
                # prometheus-async's aio.time did): how slow the health
                # endpoint answers is an early sign a target is in trouble.
                started = time.perf_counter()
                try:
                    reason = await self._check(probe.target, health, probe.tls)
                finally:
                    probe.target.probe_duration.observe(time.perf_counter() - started)
            except Exception as exc:
                # The task's outer edge: an unexpected error must count as a
                # failure, not end the probes of this target silently.
                log.exception(
                    "upstream %s target %s: health probe error", probe.upstream, probe.target.url
                )
                reason = f"probe error: {exc!r}"
            self._record(probe, reason)
            delay = health.interval * self._rng.uniform(1 - JITTER, 1 + JITTER)

    async def _check(
        self, target: Target, health: HealthConfig, tls: ClientTLS | None = None
    ) -> str | None:
        """One probe: None when it passes, else why it failed."""
        import aiohttp

        url = target.url_for(target.base_path + health.path)
        https = tls is not None and url.scheme == "https"
        try:
            async with self._client().get(
                url,
                ssl=tls.context if https and tls is not None else True,
                server_hostname=tls.server_name if https and tls is not None else None,
                headers={"Host": target.host_header, "User-Agent": USER_AGENT},
                timeout=aiohttp.ClientTimeout(total=health.timeout),
                # A 3xx already passes; following it would probe another host.
                allow_redirects=False,
            ) as response:
                status = response.status
                # The body is not read: the status decides, and leaving the
                # block releases the connection, which force_close closes.
        except TimeoutError:
            return f"no answer within {health.timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= status < 400:
            return None
        return f"HTTP {status}"

    def _record(self, probe: _Probe, reason: str | None) -> None:
        target = probe.target
        health = probe.config
        if reason is None:
            probe.failures = 0
            probe.passes += 1
            target.pass_probe()
            if not target.healthy and probe.passes >= health.healthy_threshold:
                target.set_healthy(True)
                log.info(
                    "upstream %s target %s is now healthy: %d consecutive passes",
                    probe.upstream,
                    target.url,
                    probe.passes,
                )
            return
        probe.passes = 0
        probe.failures += 1
        log.debug(
            "upstream %s target %s failed a health probe (%d in a row): %s",
            probe.upstream,
            target.url,
            probe.failures,
            reason,
        )
        if target.healthy and probe.failures >= health.unhealthy_threshold:
            target.set_healthy(False)
            log.info(
                "upstream %s target %s is now unhealthy: %s (%d consecutive failures)",
                probe.upstream,
                target.url,
                reason,
                probe.failures,
            )
            targets = self._pools.get(probe.upstream, ())
            if targets and not any(t.healthy for t in targets):
                log.warning(
                    "upstream %s has no healthy target left: the pool panics unless "
                    "panic_threshold is 0, then its requests get 503 no_healthy_target "
                    "until a target passes %d probes in a row",
                    probe.upstream,
                    health.healthy_threshold,
                )
