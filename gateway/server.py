"""Assembly: listeners, admin, signals, systemd, reload and drain.

Signal handlers only set state; the loop acts (uvicorn's order): SIGHUP asks
the reloader for a reload, the first SIGTERM/SIGINT sets `stopping`, the
second exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from typing import Final

from aiohttp import web

from gateway.admin import admin_app
from gateway.config import Config, parse_listen_address
from gateway.health import HealthMonitor
from gateway.log import AccessLog, journald_mode
from gateway.metrics import Metrics
from gateway.protocol import (
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    GatewayServer,
    sweep_silent_heads,
)
from gateway.proxy import ProxyHandler, SnapshotBox
from gateway.reload import Reloader
from gateway.snapshot import Runtime
from gateway.systemd import Notifier, listen_fds, socket_from_fd, watchdog_interval

log = logging.getLogger("gateway.server")

# nginx's keepalive_timeout default: idle client connections between requests.
KEEPALIVE_TIMEOUT: Final = 75.0
# Exit status when a second signal cuts the drain short.
EXIT_FORCED: Final = 1


class Gateway:
    """One gateway: the proxy listener(s), the admin listener, their state."""

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.environ = os.environ if environ is None else environ
        self.metrics = Metrics()
        self.runtime = Runtime(self.metrics)
        self.health = HealthMonitor()
        self.notifier = Notifier.from_env(self.environ)
        self.access_log = access_log or AccessLog(
            config.server.access_log, journald=journald_mode(self.environ)
        )
        self.box: SnapshotBox | None = None
        self._initial_config = config
        self.ready = False
        self.draining = False
        self.stopping = asyncio.Event()
        self.addresses: list[str] = []
        self.admin_addresses: list[str] = []
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._proxy_server: GatewayServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.reloader: Reloader | None = None
        self._signals = 0

    @property
    def config(self) -> Config:
        assert self.box is not None
        return self.box.snapshot.config

    def _client_timeout(self) -> float:
        return self.config.server.client_timeout

    async def start(self) -> None:
        config = self._initial_config
        self.box = SnapshotBox(self.runtime.build(config))
        self.metrics.config_last_reload_success.set(time.time())
        self.health.sync(self.box.snapshot)
        handler = ProxyHandler(self.box, self.metrics, self.access_log, self._client_timeout)
        self._proxy_server = GatewayServer(
            handler,
            handler_cancellation=True,  # a vanished client must cancel its upstream request
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
            access_log=None,
            lingering_time=2.0,
        )
        self._proxy_runner = web.ServerRunner(
            self._proxy_server, shutdown_timeout=config.server.drain_timeout
        )
        await self._proxy_runner.setup()
        inherited = listen_fds(dict(self.environ)) if "LISTEN_FDS" in self.environ else []
        admin_socks = [fd for fd, name in inherited if name == "admin"]
        proxy_socks = [fd for fd, name in inherited if name != "admin"]
        if inherited:
            for fd in proxy_socks:
                await self._add_sock_site(self._proxy_runner, socket_from_fd(fd), self.addresses)
        else:
            for address in config.server.listen:
                await self._add_site(self._proxy_runner, address, self.addresses)
        if admin_socks or config.server.admin:
            self._admin_runner = web.AppRunner(
                admin_app(self.box, self.metrics, lambda: self.ready and not self.draining),
                access_log=None,
                shutdown_timeout=1.0,
            )
            await self._admin_runner.setup()
            if admin_socks:
                for fd in admin_socks:
                    sock = socket_from_fd(fd)
                    await self._add_sock_site(self._admin_runner, sock, self.admin_addresses)
            else:
                await self._add_site(self._admin_runner, config.server.admin, self.admin_addresses)
        self.reloader = Reloader(self)
        loop = asyncio.get_running_loop()
        self._tasks.append(
            loop.create_task(sweep_silent_heads(self._servers, self._client_timeout))
        )
        interval = watchdog_interval(self.environ)
        if interval is not None and self.notifier.enabled:
            self._tasks.append(loop.create_task(self._watchdog(interval)))
        self.ready = True
        log.info(
            "listening on %s; admin on %s; %d routes, %d upstreams from %s",
            ", ".join(self.addresses) or "-",
            ", ".join(self.admin_addresses) or "off",
            len(config.routes),
            len(config.upstreams),
            config.path,
        )
        self.notifier.ready(f"serving {len(config.routes)} routes")

    def _servers(self) -> list[web.Server]:
        return [self._proxy_server] if self._proxy_server is not None else []

    async def _add_site(self, runner: web.BaseRunner, address: str, out: list[str]) -> None:
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

    async def _add_sock_site(
        self, runner: web.BaseRunner, sock: socket.socket, out: list[str]
    ) -> None:
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        out.append(_format_sockname(sock))

    async def _watchdog(self, interval: float) -> None:
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
        if self.reloader is not None and not self.draining:
            self.reloader.request()

    def _on_stop_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(EXIT_FORCED)
        log.info("%s: draining", signal.Signals(signum).name)
        self.stopping.set()

    # -- shutdown --------------------------------------------------------------

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish within drain_timeout."""
        self.draining = True
        timeout = self.config.server.drain_timeout
        self.notifier.stopping()
        self.notifier.status(f"draining (up to {timeout:g}s)")
        if self.reloader is not None:
            await self.reloader.close()
        started = time.monotonic()
        if self._proxy_runner is not None:
            # Closes the listeners at once, then idle keep-alive connections,
            # then waits up to shutdown_timeout for running handlers and
            # cancels what is left.
            await self._proxy_runner.cleanup()
        log.info("drained in %.3fs", time.monotonic() - started)
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.health.close()
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()
            self._proxy_runner = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self.runtime.close()
        self.notifier.close()

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT, then drain; the process exit status."""
        await self.start()
        self.install_signal_handlers()
        await self.stopping.wait()
        await self.drain()
        log.info("exit")
        return 0


def _format_sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    if isinstance(name, bytes):
        return f"unix:{name.decode(errors='replace')}"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
