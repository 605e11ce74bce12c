"""`workers = N`: one main process, N worker processes (gunicorn's arbiter model).

The main process binds (or inherits from systemd) every listener, starts the
workers with the listening sockets inherited (fork + exec of this module, each
worker in its own session so that a terminal's Ctrl-C reaches the main only),
and is the only process that talks to systemd (`NotifyAccess=main` stays
correct). Workers accept and proxy; the main process keeps, for the whole
gateway:

- the admin listener (gateway/edges/admin.py's app): `/metrics` sums the
  workers' series, `/status` is one view (in-flight summed, the worst
  breaker state) plus `"workers"`, `/stats` and the dashboard sum the
  workers' rolling minutes; `POST /breakers/reset` and `/cache/purge` are
  broadcast (breakers and caches are per worker) and answer the sum,
  `POST /reload` is the SIGHUP path below;
- the health probes: each target is probed once per interval, and every
  change is pushed to every worker (at most `_HEALTH_PUSH` seconds later);
- the rate-limit buckets of `store = "local"` routes: a worker asks the main
  for each token over its socketpair (one round trip, as nginx's
  shared-memory zones take a lock), so N workers do not multiply a limit;
  `store = "redis"` routes go to Redis from each worker directly.

A worker that dies is restarted with a backoff (0.5 s doubling to 30 s, back
to 0.5 s once one ran for 30 s), logged as an ERROR with its exit status.
SIGHUP: the main reads and validates the file once, builds its own view of
it, and sends the same bytes to every worker, which build the same config
(all or none: the bytes were valid, and building is deterministic). A file
that does not validate leaves every process on the old config. SIGTERM /
SIGINT: the main stops every worker (each drains for `drain_timeout`), then
exits 0; a second signal is passed on (the workers exit at once) and the
main exits 128 + the signal.

The wire between main and a worker is a socketpair carrying one JSON object
per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.config import Config, ConfigError, parse, parse_listen_address
from gateway.core.limits import BucketStore, TokenBucket, shared_bucket
from gateway.core.systemd import Notifier, listen_fds, watchdog_interval
from gateway.edges.admin import AdminOps, admin_app, status_document
from gateway.edges.reload import ReloadResult, describe_changes
from gateway.server import EXIT_FORCED_BASE, Gateway, StartupError
from gateway.state.discovery import Discovery
from gateway.state.health import HealthMonitor
from gateway.state.log import AccessLog, configure_logging, journald_mode
from gateway.state.metrics import Metrics
from gateway.state.snapshot import Runtime, Snapshot, SnapshotBox
from gateway.state.stats import merge_exports

log = logging.getLogger("gateway.supervisor")

_BACKOFF_FIRST: Final = 0.5
_BACKOFF_MAX: Final = 30.0
_STABLE_AFTER: Final = 30.0  # a worker that ran this long resets the backoff
_HEALTH_PUSH: Final = 0.1  # seconds between health-change pushes to workers
_ASK_TIMEOUT: Final = 2.0  # a worker's answer to /metrics or /status
_TAKE_TIMEOUT: Final = 0.05  # a token from the main; past it, the local bucket
_READY_TIMEOUT: Final = 60.0
# The longest line on a main-worker link: a worker's /metrics text grows with
# routes and targets, far past asyncio's default 64 KiB line limit.
_LINE_LIMIT: Final = 256 * 1024 * 1024
_ENV_IPC: Final = "GATEWAY_WORKER_IPC"
_ENV_FDS: Final = "GATEWAY_WORKER_FDS"
_ENV_PARENT: Final = "GATEWAY_WORKER_PARENT"
# Families the main process alone answers for: probes, reloads and its own
# process (a worker's copies would be stale or counted N times).
_MAIN_ONLY: Final = frozenset(
    (
        "gateway_target_healthy",
        "gateway_health_probe_duration_seconds",
        "gateway_config_reloads",
        "gateway_config_last_reload_success_timestamp_seconds",
    )
)
_WORST: Final = frozenset(("gateway_breaker_state",))  # max, not sum, across workers
_BREAKER_RANK: Final = {"closed": 0, "half_open": 1, "open": 2}


def worker_count(config: Config) -> int:
    """`server.workers`, with 0 as one per CPU this process may run on."""
    if config.server.workers:
        return config.server.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# -- the line protocol ---------------------------------------------------------


class _Channel:
    """One JSON object per line over a stream; requests matched by `id`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def ask(self, message: dict[str, Any], within: float) -> dict[str, Any]:
        self._next += 1
        ident = self._next
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        try:
            self.send({**message, "id": ident})
            async with asyncio.timeout(within):
                return await future
        finally:
            # Cancelled or timed out: a late answer finds no one and is dropped.
            self._waiting.pop(ident, None)

    def answered(self, message: dict[str, Any]) -> bool:
        """Hand an answer to its asker; False when `message` is no answer."""
        future = self._waiting.get(message.get("re", -1))
        if future is None:
            return "re" in message
        if not future.done():
            future.set_result(message)
        return True

    async def messages(self) -> Any:
        while line := await self.reader.readline():
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict):
                    yield message

    def close(self) -> None:
        self.writer.close()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("worker link closed"))


# -- the main process ----------------------------------------------------------


@dataclass
class _Worker:
    slot: int
    process: asyncio.subprocess.Process | None = None
    channel: _Channel | None = None
    started_at: float = 0.0  # unix time
    started_mono: float = 0.0
    restarts: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    """The main process of a gateway with `workers > 1`."""

    def __init__(self, config: Config, *, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.config = config
        self.metrics = Metrics()
        self.runtime = Runtime(self.metrics)
        self.snapshot: Snapshot | None = None
        self.health = HealthMonitor()
        # The main resolves dns/srv targets too: they are probed here, and
        # shown in /status. (Each worker resolves for itself as well.)
        self.discovery = Discovery(self.runtime.discovered, self._rediscovered)
        self.notifier = Notifier.from_env(self.environ)
        self.workers = [_Worker(slot) for slot in range(worker_count(config))]
        self.sockets: list[tuple[socket.socket, str]] = []
        self.addresses: list[str] = []
        self.admin_addresses: list[str] = []
        self.draining = False
        self.ready = False
        self.stopping = asyncio.Event()
        self._signals = 0
        self._admin: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reloading = asyncio.Lock()
        self._health_sent: dict[tuple[str, str], bool] = {}
        self._text = ""  # the config file's text, as every worker gets it
        self.box: SnapshotBox | None = None  # self.snapshot, for the admin app
        self.last_reload: ReloadResult | None = None

    # -- start-up --

    async def start(self) -> None:
        # The file read once here; the workers get these very bytes.
        self._text, config = _read(self.config.path)
        await self.discovery.prime(config)
        self._build(config)
        self.metrics.config_last_reload_success.set(time.time())
        inherited = self._inherited()
        admin_fds = [fd for fd, name in inherited if name == "admin"]
        if inherited:
            for fd, name in inherited:
                if name != "admin":
                    sock = socket.socket(fileno=fd)
                    self.sockets.append((sock, name))
                    self.addresses.append(_sockname(sock))
        else:
            for position, address in enumerate(self.config.server.listen):
                sock = _bind(address)
                # Named as systemd would: a worker serves TLS on the "tls" ones.
                tls = position in self.config.server.tls_listen
                self.sockets.append((sock, "tls" if tls else "proxy"))
                self.addresses.append(_sockname(sock))
        if admin_fds or self.config.server.admin:
            self._admin = web.AppRunner(self._admin_app(), access_log=None, shutdown_timeout=1.0)
            await self._admin.setup()
            if admin_fds:
                site: web.BaseSite = web.SockSite(self._admin, socket.socket(fileno=admin_fds[0]))
            else:
                admin = parse_listen_address(self.config.server.admin)
                assert isinstance(admin, tuple)  # config.py refuses unix: for admin
                host, port = admin
                site = web.TCPSite(self._admin, host, port, reuse_address=True)
            await site.start()
            server = site._server
            for sock in getattr(server, "sockets", None) or []:
                self.admin_addresses.append(_sockname(sock))
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            self._tasks.append(loop.create_task(self._keep(worker)))
        self._tasks.append(loop.create_task(self._push_health()))
        interval = watchdog_interval(self.environ)
        if interval is not None and self.notifier.enabled:
            self._tasks.append(loop.create_task(self._watchdog(interval)))
        async with asyncio.timeout(_READY_TIMEOUT):
            await asyncio.gather(*(w.ready.wait() for w in self.workers))
        self.ready = True
        log.info(
            "listening on %s; admin on %s; %d routes, %d upstreams from %s; %d workers",
            ", ".join(self.addresses) or "-",
            ", ".join(self.admin_addresses) or "off",
            len(self.config.routes),
            len(self.config.upstreams),
            self.config.path,
            len(self.workers),
        )
        self.notifier.ready(
            f"serving {len(self.config.routes)} routes, {len(self.workers)} workers"
        )

    def _inherited(self) -> list[tuple[int, str]]:
        if "LISTEN_FDS" not in self.environ:
            return []
        try:
            return listen_fds(dict(self.environ))
        except (ValueError, OSError) as error:
            raise StartupError(f"unusable LISTEN_FDS from the service manager: {error}") from None

    def _build(self, config: Config, *, rebuild: bool = False) -> None:
        """The main's own view of `config`: buckets, probes, /status."""
        self.snapshot = self.runtime.build(config, rebuild=rebuild)
        self.config = config
        if self.box is None:
            self.box = SnapshotBox(self.snapshot)
        else:
            self.box.snapshot = self.snapshot
        self.health.sync(self.snapshot)
        self.discovery.sync(config)

    def _rediscovered(self) -> None:
        self._build(self.config, rebuild=True)

    # -- workers --

    async def _keep(self, worker: _Worker) -> None:
        """Run one worker slot: start, wait for its exit, restart with backoff."""
        backoff = _BACKOFF_FIRST
        while not self.draining:
            try:
                await self._spawn(worker)
            except OSError as error:
                log.error("worker %d: cannot start: %s", worker.slot, error)
            else:
                assert worker.process is not None
                code = await worker.process.wait()
                if worker.channel is not None:
                    worker.channel.close()
                    worker.channel = None
                if self.draining:
                    return
                if time.monotonic() - worker.started_mono >= _STABLE_AFTER:
                    backoff = _BACKOFF_FIRST
                log.error(
                    "worker %d (pid %d) %s; restarting in %gs",
                    worker.slot,
                    worker.process.pid,
                    _exit_text(code),
                    backoff,
                )
            worker.restarts += 1
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(backoff):
                    await self.stopping.wait()
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _spawn(self, worker: _Worker) -> None:
        parent, child = socket.socketpair()
        fds = [(sock.fileno(), name) for sock, name in self.sockets]
        env = {
            k: v
            for k, v in self.environ.items()
            if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
            and not k.startswith("WATCHDOG_")
        }
        env[_ENV_IPC] = str(child.fileno())
        env[_ENV_FDS] = json.dumps(fds)
        env[_ENV_PARENT] = str(os.getpid())
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.supervisor",
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=[child.fileno(), *(fd for fd, _ in fds)],
                env=env,
                start_new_session=True,
            )
        finally:
            child.close()
        worker.started_at = time.time()
        worker.started_mono = time.monotonic()
        worker.ready.clear()
        reader, writer = await asyncio.open_connection(sock=parent, limit=_LINE_LIMIT)
        channel = worker.channel = _Channel(reader, writer)
        # The config as bytes (all workers and the main build the same one).
        channel.send({"op": "config", "path": self.config.path, "text": self._text})
        self._tasks.append(
            asyncio.get_running_loop().create_task(self._serve_worker(worker, channel))
        )

    async def _serve_worker(self, worker: _Worker, channel: _Channel) -> None:
        async for message in channel.messages():
            if channel.answered(message):
                continue
            op = message.get("op")
            if op == "take":
                try:
                    channel.send(self._take(message))
                except (TypeError, ValueError):  # a malformed take: no answer,
                    log.exception("worker %d: bad message", worker.slot)  # it times out
            elif op == "ready":
                # Every target's current health first: a new worker starts
                # with all targets healthy, the main may know better.
                for (up, url), healthy in self._health_now().items():
                    channel.send({"op": "health", "upstream": up, "target": url, "ok": healthy})
                worker.ready.set()

    def _take(self, message: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = {"re": message.get("id")}
        snap = self.snapshot
        route = snap.routes.get(str(message.get("route"))) if snap is not None else None
        if route is None or route.buckets is None:
            return answer  # a reload race: the worker uses its local bucket
        allowed, bucket = route.buckets.take(str(message.get("key")))
        answer["ok"] = allowed
        answer["debt"] = bucket.seconds_until_full(route.buckets.clock())
        return answer

    def _health_now(self) -> dict[tuple[str, str], bool]:
        snap = self.snapshot
        if snap is None:
            return {}
        return {(p.name, t.url): t.healthy for p in snap.pools.values() for t in p.targets}

    async def _push_health(self) -> None:
        while True:
            now = self._health_now()
            for key, healthy in now.items():
                if self._health_sent.get(key, True) != healthy:
                    message = {"op": "health", "upstream": key[0], "target": key[1], "ok": healthy}
                    for worker in self.workers:
                        if worker.channel is not None:
                            worker.channel.send(message)
            self._health_sent = now
            await asyncio.sleep(_HEALTH_PUSH)

    async def _ask_all(self, op: str, **args: Any) -> list[dict[str, Any]]:
        channels = [w.channel for w in self.workers if w.channel is not None and w.ready.is_set()]
        answers = await asyncio.gather(
            *(c.ask({**args, "op": op}, _ASK_TIMEOUT) for c in channels), return_exceptions=True
        )
        return [a for a in answers if isinstance(a, dict)]

    # -- admin --

    def _admin_app(self) -> web.Application:
        """gateway/edges/admin.py's app (the same handlers, token and CORS
        rules as with one process), its views gathered from every worker."""
        assert self.box is not None
        ops = AdminOps(
            environ=self.environ,
            reload=self._admin_reload,
            last_reload=lambda: self.last_reload,
            metrics=self._admin_metrics,
            status=self._admin_status,
            gathered=self._admin_gathered,
            reset_breakers=self._admin_reset_breakers,
            purge_cache=self._admin_purge_cache,
        )
        return admin_app(self.box, self.metrics, lambda: self.ready and not self.draining, ops)

    async def _admin_metrics(self, accept: str) -> tuple[bytes, str]:
        texts = [str(a.get("text", "")) for a in await self._ask_all("metrics")]
        return merge_metrics(generate_latest(self.metrics.registry).decode(), texts), (
            CONTENT_TYPE_LATEST
        )

    async def _admin_status(self) -> dict[str, Any]:
        assert self.snapshot is not None
        document = status_document(self.snapshot)
        merge_status(document, [a.get("targets", {}) for a in await self._ask_all("status")])
        document["workers"] = [
            {
                "pid": w.process.pid if w.process is not None else None,
                "started_at": datetime.datetime.fromtimestamp(w.started_at, datetime.UTC)
                .isoformat(timespec="seconds")
                .replace("+00:00", "Z"),
                "restarts": w.restarts,
            }
            for w in self.workers
        ]
        return document

    async def _admin_gathered(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Every route's last minute, summed over the workers (counts and
        latency buckets add, then rates and quantiles are computed once), and
        the optional /stats sections (cache, tunnels) with their counts summed."""
        assert self.snapshot is not None
        answers = await self._ask_all("stats")
        exports = [a["routes"] for a in answers if isinstance(a.get("routes"), dict)]
        windows = {
            name: merge_exports([e[name] for e in exports if name in e])
            for name in self.snapshot.routes
        }
        sections: dict[str, Any] = {}
        for answer in answers:
            found = answer.get("sections")
            for name, value in found.items() if isinstance(found, dict) else ():
                if isinstance(value, dict):
                    into = sections.setdefault(str(name), {})
                    for key, count in value.items():
                        into[str(key)] = into.get(str(key), 0) + _count(count)
        return windows, sections

    async def _admin_reset_breakers(self, upstream: str, target: str | None) -> int:
        answers = await self._ask_all("breakers", upstream=upstream, target=target)
        return sum(_count(a.get("reset")) for a in answers)

    async def _admin_purge_cache(self, route: str, path: str) -> int:
        answers = await self._ask_all("purge", route=route, path=path)
        return sum(_count(a.get("purged")) for a in answers)

    async def _admin_reload(self) -> ReloadResult | None:
        if self.draining or not self.ready:
            return None
        return await self.reload_result()

    # -- signals --

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGTERM, self._on_stop, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._on_stop, signal.SIGINT)

    def _on_sighup(self) -> None:
        if self.draining:
            log.info("SIGHUP ignored: draining")
            return
        self._tasks.append(asyncio.get_running_loop().create_task(self._reload_task()))

    def _on_stop(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            log.warning("second %s: stopping the workers now", name)
            self._signal_workers(signal.SIGTERM)  # their second: they exit at once
            os._exit(EXIT_FORCED_BASE + signum)
        log.info("%s: draining %d workers", name, len(self.workers))
        self.draining = True
        self.stopping.set()

    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    async def _reload_task(self) -> None:
        await self.reload()

    async def reload(self) -> bool:
        return (await self.reload_result()).ok

    async def reload_result(self) -> ReloadResult:
        """Validate once, build the main's view, then send the bytes to every
        worker (SIGHUP and POST /reload)."""
        async with self._reloading:
            self.notifier.reloading("reloading")
            path = self.config.path
            old_config = self.config
            old = self.config.server
            try:
                text, config = _read(path)
                self._build(config)
            except (OSError, ConfigError, ValueError) as error:
                errors = error.errors if isinstance(error, ConfigError) else [str(error)]
                log.error(
                    "reload failed, keeping the old config: %d error(s):\n  %s",
                    len(errors),
                    "\n  ".join(errors),
                )
                self.metrics.config_reloads.labels("failure").inc()
                message = "reload failed; old config serving"
                self.notifier.ready(message)
                self.last_reload = ReloadResult(False, time.time(), message, tuple(errors))
                return self.last_reload
            if (config.server.workers, config.server.listen) != (old.workers, old.listen):
                log.warning("server.workers and server.listen take effect at the next start")
            self._text = text
            for worker in self.workers:
                if worker.channel is not None:
                    worker.channel.send({"op": "reload", "path": path, "text": text})
            self.metrics.config_reloads.labels("success").inc()
            self.metrics.config_last_reload_success.set(time.time())
            log.info("reloaded %s in the main process and %d workers", path, len(self.workers))
            message = f"serving {len(config.routes)} routes, {len(self.workers)} workers"
            self.notifier.ready(message)
            changes = describe_changes(old_config, config)
            self.last_reload = ReloadResult(True, time.time(), message, changes=changes)
            return self.last_reload

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # -- shutdown --

    async def drain(self) -> None:
        self.draining = True
        self.notifier.stopping("draining")
        self._signal_workers(signal.SIGTERM)
        grace = self.config.server.drain_timeout + 10.0
        processes = [w.process for w in self.workers if w.process is not None]
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in processes))
        except TimeoutError:
            log.warning("workers still running %gs after SIGTERM: killed", grace)
            self._signal_workers(signal.SIGKILL)
        await self.close()

    async def close(self) -> None:
        self.draining = True
        self._signal_workers(signal.SIGTERM)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
            if worker.channel is not None:
                worker.channel.close()
        for sock, _ in self.sockets:
            sock.close()
        self.sockets.clear()
        await self.health.close()
        await self.discovery.close()
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        await self.runtime.close()
        self.notifier.close()

    async def serve(self) -> int:
        self.install_signal_handlers()
        await self.start()
        await self.stopping.wait()
        await self.drain()
        log.info("exit")
        return 0


def merge_metrics(main_text: str, worker_texts: list[str]) -> bytes:
    """One exposition for the gateway: the workers' series summed (the worst
    for breaker state), the main's for probes, reloads and its process."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in worker_texts:
        for family in text_string_to_metric_families(text):
            if family.name in _MAIN_ONLY or family.name.startswith(("process_", "python_")):
                continue
            families.setdefault(family.name, family)
            into = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if family.name in _WORST:
                    into[key] = max(into.get(key, sample.value), sample.value)
                else:
                    into[key] = into.get(key, 0.0) + sample.value
    for family in text_string_to_metric_families(main_text):
        if family.name in _MAIN_ONLY or family.name.startswith(("process_", "python_")):
            families[family.name] = family
            values[family.name] = {
                (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples
            }
    merged: list[Metric] = []
    for name, family in families.items():
        out = Metric(name, family.documentation, family.type)
        for (sample_name, labels), value in values.get(name, {}).items():
            out.add_sample(sample_name, dict(labels), value)
        merged.append(out)

    class _Merged:
        def collect(self) -> list[Metric]:
            return merged

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def merge_status(document: dict[str, Any], workers: list[dict[str, Any]]) -> None:
    """In-flight summed over the workers, the worst breaker state shown."""
    for name, upstream in document.get("upstreams", {}).items():
        for target in upstream.get("targets", []):
            key = f"{name} {target['url']}"
            seen = [w[key] for w in workers if isinstance(w.get(key), list)]
            if not seen:
                continue
            target["in_flight"] = sum(int(s[0]) for s in seen)
            target["breaker"] = max(
                (str(s[1]) for s in seen), key=lambda state: _BREAKER_RANK.get(state, 0)
            )


# -- the worker process --------------------------------------------------------


class _MainBuckets:
    """A worker's rate-limit store: tokens from the main process's buckets."""

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    async def take(self, route: str, key: str, local: BucketStore) -> tuple[bool, TokenBucket]:
        try:
            answer = await self._channel.ask(
                {"op": "take", "route": route, "key": key}, _TAKE_TIMEOUT
            )
        except (TimeoutError, ConnectionError):
            return local.take(key)
        if "ok" not in answer:
            return local.take(key)
        debt = float(answer.get("debt", 0.0))
        return bool(answer["ok"]), shared_bucket(local.rate, local.burst, debt, local.clock())


@dataclass
class _Link:
    sockets: list[tuple[int, str]]
    buckets: _MainBuckets


async def _worker(channel: _Channel, first: dict[str, Any]) -> int:
    config = parse(str(first["text"]), str(first["path"]))
    environ = {k: v for k, v in os.environ.items() if k not in (_ENV_IPC, _ENV_FDS, _ENV_PARENT)}
    fds = [(int(fd), str(name)) for fd, name in json.loads(os.environ[_ENV_FDS])]
    gateway = Gateway(
        config,
        environ=environ,
        access_log=AccessLog(config.server.access_log, journald=journald_mode(environ)),
        worker=_Link(fds, _MainBuckets(channel)),
    )
    gateway.install_signal_handlers()
    # SIGHUP reaches the main only; a stray one must not make a worker reload
    # on its own (all or none).
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: None)
    await gateway.start()
    channel.send({"op": "ready"})

    async def listen() -> None:
        try:
            async for message in channel.messages():
                if channel.answered(message):
                    continue
                try:
                    _worker_message(gateway, channel, message)
                except (KeyError, TypeError, ValueError, ConfigError):
                    log.exception("worker %d: bad message from the main process", os.getpid())
        finally:
            # Whatever ended the link (the main gone, or a bug here), nothing
            # supervises this worker any more: it must not live on unseen.
            log.error("worker %d: main process gone; draining", os.getpid())
            gateway.stopping.set()

    task = asyncio.get_running_loop().create_task(listen())
    await gateway.stopping.wait()
    await gateway.drain()
    task.cancel()
    return 0


def _worker_message(gateway: Gateway, channel: _Channel, message: dict[str, Any]) -> None:
    op = message.get("op")
    if op == "health":
        target = gateway.runtime.targets.get((str(message["upstream"]), str(message["target"])))
        if target is not None and target.healthy != bool(message["ok"]):
            target.set_healthy(bool(message["ok"]))
    elif op == "reload":
        config = parse(str(message["text"]), str(message["path"]))
        gateway.apply(gateway.prepare(config))
        gateway.metrics.config_reloads.labels("success").inc()
    elif op == "metrics":
        text = generate_latest(gateway.metrics.registry).decode()
        channel.send({"re": message.get("id"), "text": text})
    elif op == "stats":
        snap = gateway.box.snapshot  # type: ignore[union-attr]
        routes = {name: route.stats.export() for name, route in snap.routes.items()}
        sections = {name: provider() for name, provider in gateway.admin_ops.sections.items()}
        channel.send({"re": message.get("id"), "routes": routes, "sections": sections})
    elif op == "breakers":
        pool = gateway.box.snapshot.pools.get(str(message["upstream"]))  # type: ignore[union-attr]
        wanted = message.get("target")
        reset = 0
        if pool is not None:
            reset = sum(
                t.breaker.reset("reset through the admin API")
                for t in pool.targets
                if wanted is None or t.url == wanted
            )
        channel.send({"re": message.get("id"), "reset": reset})
    elif op == "purge":
        store = gateway.box.snapshot.cache  # type: ignore[union-attr]
        purged = store.purge(str(message["route"]), str(message["path"])) if store else 0
        channel.send({"re": message.get("id"), "purged": purged})
    elif op == "status":
        targets = {
            f"{pool.name} {t.url}": [t.in_flight, t.breaker.state]
            for pool in gateway.box.snapshot.pools.values()  # type: ignore[union-attr]
            for t in pool.targets
        }
        channel.send({"re": message.get("id"), "targets": targets})


def worker_main() -> int:
    """Entry point of a worker (`python -m gateway.supervisor`, started by the main)."""
    configure_logging()
    ipc = socket.socket(fileno=int(os.environ[_ENV_IPC]))
    ipc.setblocking(True)
    first_line = b""
    _die_with_parent()
    while b"\n" not in first_line:  # the config, before any loop runs
        chunk = ipc.recv(1 << 20)
        if not chunk:
            return 1
        first_line += chunk
    line, _, rest = first_line.partition(b"\n")
    first = json.loads(line)

    async def main() -> int:
        ipc.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=ipc, limit=_LINE_LIMIT)
        reader.feed_data(rest)
        return await _worker(_Channel(reader, writer), first)

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


# -- helpers -------------------------------------------------------------------


def _bind(address: str) -> socket.socket:
    parsed = parse_listen_address(address)
    if isinstance(parsed, str):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(parsed).st_mode):
                os.unlink(parsed)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(parsed)
    else:
        host, port = parsed
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    if isinstance(name, bytes):
        return f"unix:{name.decode(errors='replace')}"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _die_with_parent() -> None:
    """SIGTERM this worker when the main process dies, even by SIGKILL
    (prctl(2) PR_SET_PDEATHSIG, Linux): a worker never outlives its main."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if str(os.getppid()) != os.environ.get(_ENV_PARENT):  # it died before the line above
        sys.exit(1)


def _read(path: str) -> tuple[str, Config]:
    """The config file's text and the config it makes (ConfigError if invalid)."""
    if path == "<string>":
        raise StartupError("workers need a config file (this config came from a string)")
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    config = parse(data, path)  # parse() checked that it is UTF-8
    return data.decode("utf-8"), config


def _count(value: object) -> int:
    """A worker's count, or 0 for anything that is not a count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


if __name__ == "__main__":
    sys.exit(worker_main())
