"""Assembly: listeners, admin, signals, systemd, reload and drain.

Signal handlers only set state; the loop acts (uvicorn's order): SIGHUP asks
the reloader for a reload, the first SIGTERM/SIGINT sets `stopping` (and turns
/readyz 503 at once), the second exits at once.

Shutdown order (`drain()`): close the proxy listeners, send STOPPING=1, stop
reloading, let running requests finish for `server.drain_timeout`, abort what
is left, then close the admin listener, health probes and upstream sessions.
The admin listener outlives the drain so that a load balancer or an operator
can watch /readyz (503) and /metrics while requests finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import stat
import time
from collections.abc import Mapping
from typing import Final, Protocol

from aiohttp import web

from gateway.core.config import Config, ConfigError, ServerConfig, parse_listen_address
from gateway.core.limits import SharedStore
from gateway.core.systemd import Notifier, listen_fds, socket_from_fd, watchdog_interval
from gateway.edges.admin import AdminOps, admin_app
from gateway.edges.proxy import ProxyHandler
from gateway.edges.reload import Reloader, ReloadResult
from gateway.state.discovery import Discovery
from gateway.state.health import HealthMonitor
from gateway.state.log import AccessLog, journald_mode
from gateway.state.metrics import Metrics
from gateway.state.snapshot import Prepared, Runtime, SnapshotBox, gc_paused
from gateway.wire.h1server import H1Server, sweep_slow_heads
from gateway.wire.tls import Certificate, ServerTLS

log = logging.getLogger("gateway.server")

# A second SIGTERM/SIGINT cuts the drain short: the process exits with
# 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the status a
# shell reports for a process that signal killed. Non-zero on purpose: requests
# were cut off, and systemd should record the stop as unclean.
EXIT_FORCED_BASE: Final = 128
# Once drain_timeout has passed and the remaining connections were aborted,
# how long their handlers get to unwind (they are cancelled, so this is short).
_ABORT_GRACE: Final = 5.0


class WorkerLink(Protocol):
    """What a worker process gets from its main process (gateway.supervisor)."""

    @property
    def sockets(self) -> list[tuple[int, str]]: ...

    @property
    def buckets(self) -> SharedStore: ...


class StartupError(Exception):
    """The gateway cannot start (bad LISTEN_FDS, unusable inherited socket)."""


class Gateway:
    """One gateway: the proxy listener(s), the admin listener, their state."""

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        access_log: AccessLog | None = None,
        worker: WorkerLink | None = None,
    ) -> None:
        self.environ = os.environ if environ is None else environ
        # A worker of gateway.supervisor: its listeners come from the main
        # process, which also owns the admin listener, the health probes and
        # the rate-limit buckets (the link reaches them).
        self.worker = worker
        self.metrics = Metrics()
        self.runtime = Runtime(self.metrics)
        self.health = HealthMonitor()
        self.discovery = Discovery(self.runtime.discovered, self._rediscovered)
        self.notifier = Notifier.from_env(self.environ)
        self.access_log = access_log or AccessLog(
            config.server.access_log, journald=journald_mode(self.environ)
        )
        self.box: SnapshotBox | None = None
        # Dropped once started: the first config must not outlive its
        # snapshot (a reload frees the replaced one, see Reloader).
        self._initial_config: Config | None = config
        self.ready = False
        self.draining = False
        self.stopping = asyncio.Event()
        self.addresses: list[str] = []
        self.admin_addresses: list[str] = []
        self._admin_runner: web.AppRunner | None = None
        self._proxy_server: H1Server | None = None
        self._handler: ProxyHandler | None = None
        self._listeners: list[asyncio.AbstractServer] = []
        # The TLS listeners' certificates (None: no TLS listener).
        self.tls: ServerTLS | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.reloader: Reloader | None = None
        # The admin API's reach (docs/operator-tools.md); features that exist
        # register their /stats sections in `admin_ops.sections`.
        self.admin_ops = AdminOps(
            environ=self.environ,
            reload=self._admin_reload,
            last_reload=lambda: self.reloader.last if self.reloader is not None else None,
        )
        self.admin_ops.sections["cache"] = self._cache_section
        self.admin_ops.sections["tunnels"] = self._tunnel_section
        self._reload_pending = False  # SIGHUP before the reloader existed
        self._signals = 0
        self._closed = False

    @property
    def config(self) -> Config:
        assert self.box is not None
        return self.box.snapshot.config

    def prepare(self, config: Config) -> Prepared:
        """The pure half of a reload's snapshot (route table, comparisons);
        thread-safe, so the reloader runs it off the event loop."""
        return self.runtime.prepare(config)

    def apply(self, prepared: Prepared) -> None:
        """Serve `prepared` from the next request on (a reload's swap).

        No await from the commit to the swap: every request sees either the
        old snapshot or the new one, whole. The commit is incremental (see
        `Runtime.commit`), so a large config does not stall the loop here.
        """
        assert self.box is not None
        config = prepared.config
        table = None
        if self.tls is not None and config.server.certificates:
            # Loaded whole before anything is swapped: a pair that fails
            # rejects the reload and the old certificates keep serving.
            try:
                table = self.tls.build(*_certificates(config.server))
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError([f"server.certificates: cannot load: {exc}"]) from exc
        # The commit may still reject the reload (upstream TLS files load
        # here), so the certificates are swapped only after it: a rejected
        # reload changes nothing.
        snapshot = self.runtime.commit(prepared)
        if table is not None:
            assert self.tls is not None
            self.tls.swap(table, config.server.tls.min_version)
        self.box.snapshot = snapshot
        self.runtime.auth.start()  # JWKS URL fetchers of new policies
        if self.worker is None:
            self.health.sync(snapshot)
        self.discovery.sync(prepared.config)
        self.access_log.set_format(prepared.config.server.access_log)

    async def _admin_reload(self) -> ReloadResult | None:
        """POST /reload: the SIGHUP path, awaited; None while starting or draining."""
        if self.reloader is None or self.draining:
            return None
        await self.reloader.reload_once()
        return self.reloader.last

    def _cache_section(self) -> dict[str, int] | None:
        """/stats "cache": the response store's figures, when [cache] is set."""
        store = self.box.snapshot.cache if self.box is not None else None
        if store is None:
            return None
        held, entries = store.stats()
        return {"bytes": held, "entries": entries, "max_bytes": store.max_bytes}

    def _tunnel_section(self) -> dict[str, int] | None:
        """/stats "tunnels": open WebSocket tunnels per route, when any is open."""
        if self.box is None:
            return None
        open_now = {
            name: int(route.tunnels.value)  # the gauge's own count, no second one
            for name, route in self.box.snapshot.routes.items()
        }
        open_now = {name: n for name, n in open_now.items() if n}
        return {"active": sum(open_now.values()), **open_now} if open_now else None

    def _rediscovered(self) -> None:
        """DNS changed a target set: the same config, rebuilt with it (targets
        that stayed keep their state; requests running finish on theirs)."""
        if self.box is None:
            return
        snapshot = self.runtime.build(self.config, rebuild=True)
        self.box.snapshot = snapshot
        if self.worker is None:
            self.health.sync(snapshot)

    def _client_timeout(self) -> float:
        return self.config.server.client_timeout

    def _inherited_sockets(self) -> list[tuple[int, str]]:
        """Sockets passed by systemd (sd_listen_fds(3)); [] outside socket activation."""
        if self.worker is not None:
            return list(self.worker.sockets)
        if "LISTEN_FDS" not in self.environ:
            return []
        try:
            return listen_fds(dict(self.environ))
        except (ValueError, OSError) as error:
            # Falling back to server.listen would serve on other ports than the
            # socket units name: refuse to start instead.
            raise StartupError(f"unusable LISTEN_FDS from the service manager: {error}") from None

    async def start(self) -> None:
        config = self._initial_config
        assert config is not None, "started twice"
        self._initial_config = None
        await self.discovery.prime(config)
        if self.worker is not None:
            self.runtime.local_shared = self.worker.buckets
        with gc_paused():
            self.box = SnapshotBox(self.runtime.build(config))
        # JWKS URLs are fetched in the background: start-up does not wait (CONTRACT.md).
        self.runtime.auth.start()
        self.metrics.config_last_reload_success.set(time.time())
        if self.worker is None:
            self.health.sync(self.box.snapshot)
        self.discovery.sync(config)
        handler = ProxyHandler(self.box, self.metrics, self.access_log)
        self._handler = handler
        self._proxy_server = H1Server(handler, on_refusal=handler.record_refusal)
        inherited = self._inherited_sockets()
        admin_fds = [fd for fd, name in inherited if name == "admin"]
        proxy_fds = [(fd, name == "tls") for fd, name in inherited if name != "admin"]
        if config.server.tls_listen or any(tls for _, tls in proxy_fds):
            if not config.server.certificates:
                raise StartupError("a TLS listener needs [[server.certificates]]")
            try:
                self.tls = ServerTLS(*_certificates(config.server))
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise StartupError(f"cannot load the certificates: {exc}") from exc
        if proxy_fds:
            for fd, tls in proxy_fds:
                await self._listen_on_socket(self._proxy_server, self._socket(fd), tls)
        else:
            for position, address in enumerate(config.server.listen):
                tls = position in config.server.tls_listen
                await self._listen(self._proxy_server, address, tls)
        if self.worker is None and (admin_fds or config.server.admin):
            self._admin_runner = web.AppRunner(
                admin_app(
                    self.box,
                    self.metrics,
                    lambda: self.ready and not self.draining,
                    self.admin_ops,
                ),
                access_log=None,
                shutdown_timeout=1.0,
            )
            await self._admin_runner.setup()
            if admin_fds:
                for fd in admin_fds:
                    sock = self._socket(fd)
                    await self._add_sock_site(self._admin_runner, sock, self.admin_addresses)
            else:
                await self._add_site(self._admin_runner, config.server.admin, self.admin_addresses)
        self.reloader = Reloader(self)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(sweep_slow_heads(self._servers, self._client_timeout)))
        interval = watchdog_interval(self.environ)
        if interval is not None and self.notifier.enabled:
            self._tasks.append(loop.create_task(self._watchdog(interval)))
        self.ready = True
        if self.worker is not None:
            # The main process logs the gateway's own line (gateway.supervisor).
            log.info("worker %d serving on %s", os.getpid(), ", ".join(self.addresses))
        else:
            log.info(
                "listening on %s; admin on %s; %d routes, %d upstreams from %s%s",
                ", ".join(self.addresses) or "-",
                ", ".join(self.admin_addresses) or "off",
                len(config.routes),
                len(config.upstreams),
                config.path,
                " (sockets from the service manager)" if inherited else "",
            )
        self.notifier.ready(f"serving {len(config.routes)} routes")
        if self._reload_pending:
            self._reload_pending = False
            self.reloader.request()

    def _servers(self) -> list[H1Server]:
        return [self._proxy_server] if self._proxy_server is not None else []

    @staticmethod
    def _socket(fd: int) -> socket.socket:
        try:
            sock = socket_from_fd(fd)
        except OSError as error:
            raise StartupError(f"inherited fd {fd} is not a socket: {error}") from None
        if sock.type != socket.SOCK_STREAM:
            sock.detach()  # not ours to close
            raise StartupError(f"inherited fd {fd} is not a stream socket")
        return sock

    async def _add_site(self, runner: web.BaseRunner, address: str, out: list[str]) -> None:
        from aiohttp import web

        parsed = parse_listen_address(address)
        site: web.BaseSite
        if isinstance(parsed, str):
            site = web.UnixSite(runner, parsed)
            await site.start()
            out.append(f"unix:{parsed}")
            return
        host, port = parsed
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        for sock in sockets:
            out.append(_format_sockname(sock))

    def _tls_options(self, tls: bool) -> tuple[ssl.SSLContext | None, float | None]:
        """create_server's TLS arguments for a listener (none for plain TCP).

        A handshake must end within client_timeout (the value at start-up),
        as a request head must: a client that opens and stalls costs one
        socket until then, and nothing else (no task, no request).
        """
        if not tls or self.tls is None:
            return None, None
        return self.tls.front, self._client_timeout()

    async def _listen(self, server: H1Server, address: str, tls: bool = False) -> None:
        loop = asyncio.get_running_loop()
        parsed = parse_listen_address(address)
        listener: asyncio.AbstractServer
        if isinstance(parsed, str):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(parsed).st_mode):
                    os.unlink(parsed)  # a stale socket file from an earlier run
            listener = await loop.create_unix_server(server, parsed, backlog=1024)
            self.addresses.append(f"unix:{parsed}")
        else:
            host, port = parsed
            context, handshake_timeout = self._tls_options(tls)
            listener = await loop.create_server(
                server,
                host,
                port,
                reuse_address=True,
                backlog=1024,
                ssl=context,
                ssl_handshake_timeout=handshake_timeout,
            )
            self.addresses.extend(_format_sockname(sock) for sock in listener.sockets)
        self._listeners.append(listener)

    async def _listen_on_socket(
        self, server: H1Server, sock: socket.socket, tls: bool = False
    ) -> None:
        loop = asyncio.get_running_loop()
        context, timeout = self._tls_options(tls)
        if sock.family == socket.AF_UNIX:
            listener = await loop.create_unix_server(
                server, sock=sock, backlog=1024, ssl=context, ssl_handshake_timeout=timeout
            )
        else:
            listener = await loop.create_server(
                server, sock=sock, backlog=1024, ssl=context, ssl_handshake_timeout=timeout
            )
        self._listeners.append(listener)
        self.addresses.append(_format_sockname(sock))

    async def _add_sock_site(
        self, runner: web.BaseRunner, sock: socket.socket, out: list[str]
    ) -> None:
        from aiohttp import web

        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        out.append(_format_sockname(sock))

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the loop itself: a wedged loop stops the pings and
        # systemd kills and restarts the service (sd_watchdog_enabled(3)).
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # -- signals ---------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, signal.SIGINT)

    def _on_sighup(self) -> None:
        if self.draining:
            log.info("SIGHUP ignored: draining")
        elif self.reloader is None:
            self._reload_pending = True  # still starting: reload once serving
        else:
            self.reloader.request()

    def _on_stop_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            # stderr is line-buffered (and logging flushes each record), so
            # nothing already logged is lost by skipping interpreter shutdown.
            # The requests still running get their access-log line here: their
            # handlers will never unwind to write it.
            cut = self._handler.log_in_flight("shutdown") if self._handler is not None else 0
            log.warning(
                "second %s: exiting now, without finishing the drain (%d request(s) cut)",
                name,
                cut,
            )
            os._exit(EXIT_FORCED_BASE + signum)
        log.info("%s: draining", name)
        # /readyz answers 503 from this moment, before the loop gets to drain().
        self.draining = True
        self.stopping.set()

    # -- shutdown --------------------------------------------------------------

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish within drain_timeout."""
        self.draining = True
        # The current config's value: a reload may have changed it.
        timeout = self.config.server.drain_timeout
        started = time.monotonic()
        # Stop accepting at once: close every proxy listener first (this
        # closes the listening sockets only; connections go on).
        self._close_listeners()
        self.notifier.stopping(f"draining (up to {timeout:g}s)")
        if self.reloader is not None:
            await self.reloader.close()
        aborted = await self._drain_connections(timeout)
        if aborted:
            log.warning(
                "drain_timeout (%gs) passed: aborted %d request(s) still running", timeout, aborted
            )
        log.info("drained in %.3fs", time.monotonic() - started)
        await self.close()

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    async def _drain_connections(self, grace: float) -> int:
        """Wait up to `grace` seconds for running requests; abort the rest. Returns how many."""
        server = self._proxy_server
        if server is None:
            return 0
        # Let connections accepted just before the listeners closed start
        # their request first.
        await asyncio.sleep(0)
        # Idle keep-alive connections close now, busy ones after their response.
        server.pre_shutdown()
        aborted = 0
        try:
            async with asyncio.timeout(grace):
                await server.shutdown()
        except TimeoutError:
            # abort(), not close(): close() would wait to flush to a client
            # that may not be reading. connection_lost then cancels the
            # handler, which cancels its upstream request.
            aborted = server.abort_all("drain")
            try:
                async with asyncio.timeout(_ABORT_GRACE):
                    await server.shutdown()
            except TimeoutError:
                log.warning("request handlers still running %gs after abort", _ABORT_GRACE)
        self._proxy_server = None
        return aborted

    async def close(self) -> None:
        """Release everything; idempotent. Without drain(), running requests get
        drain_timeout, then are aborted."""
        if self._closed:
            return
        self._closed = True
        self.draining = True
        if self.reloader is not None:
            await self.reloader.close()
        # The watchdog stops here: after this, only the exit tells systemd.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.health.close()
        await self.discovery.close()
        self._close_listeners()
        if self._proxy_server is not None:
            # Without drain(): running requests get drain_timeout, then end.
            await self._drain_connections(self.config.server.drain_timeout)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self.runtime.close()
        self.notifier.close()

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT, then drain; the process exit status."""
        # Before start(): a signal during start-up must reach our handlers,
        # not the default action (SIGHUP's would kill the process).
        self.install_signal_handlers()
        await self.start()
        await self.stopping.wait()
        await self.drain()
        log.info("exit")
        return 0


def _certificates(server: ServerConfig) -> tuple[list[Certificate], str]:
    certificates = [Certificate(c.cert, c.key, c.hosts) for c in server.certificates]
    return certificates, server.tls.min_version


def _format_sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    if isinstance(name, bytes):
        return f"unix:{name.decode(errors='replace')}"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
