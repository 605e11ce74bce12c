"""The real gateway as a subprocess, watched the way systemd watches it.

`run_gateway()` writes the config to a file, starts `python -m gateway run -c
FILE` with `$NOTIFY_SOCKET` pointing at a datagram socket the test owns, and
returns once `READY=1` arrived there (never after a sleep). stderr goes to a
file, so a chatty access log can never block the gateway on a full pipe. The
process is SIGKILLed on the way out if a test left it running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.test_utils import TestServer

REPO: Final = Path(__file__).resolve().parents[1]
# What a test must set itself, never inherit from the shell running pytest.
_SCRUBBED: Final = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "JOURNAL_STREAM",
    "GATEWAY_CONFIG",
    "GATEWAY_LOOP",
)
_LISTENING = re.compile(r"listening on (?P<proxy>.+?); admin on (?P<admin>\S+?);")
SERVER_HEADER: Final = '[server]\nlisten = ["127.0.0.1:0"]\nadmin = "127.0.0.1:0"\n'


class Notifications:
    """An AF_UNIX datagram socket standing in for systemd's `$NOTIFY_SOCKET`.

    Bound in the abstract namespace (sd_notify(3) "@name"), so tmp_path's length
    never matters. Every datagram is kept, in arrival order, in `messages`.
    """

    def __init__(self) -> None:
        name = f"gateway-test-{uuid.uuid4().hex}"
        self.address = "@" + name
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self._sock.bind("\0" + name)
        self.messages: list[str] = []
        self._seen = 0  # messages already handed out by next()

    def close(self) -> None:
        """Stop listening; `messages` then holds everything that was sent."""
        self._poll()
        self._sock.close()

    def _poll(self) -> None:
        while self._sock.fileno() != -1:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            self.messages.append(data.decode())

    async def _receive(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self._sock, 65536)
        self.messages.append(data.decode())

    async def next(self, line: str, within: float = 10.0) -> str:
        """The next datagram, after those returned before, that has `line` as a line."""
        async with asyncio.timeout(within):
            while True:
                self._poll()
                while self._seen < len(self.messages):
                    message = self.messages[self._seen]
                    self._seen += 1
                    if line in message.split("\n"):
                        return message
                await self._receive()

    def collect(self) -> list[str]:
        """Every datagram so far (reads what is queued without waiting)."""
        self._poll()
        return list(self.messages)

    def states(self) -> list[str]:
        """The datagrams so far without the WATCHDOG=1 pings."""
        return [m for m in self.collect() if m != "WATCHDOG=1"]


@dataclass
class GatewayProcess:
    proc: asyncio.subprocess.Process
    notify: Notifications
    config_path: Path
    stderr_path: Path
    url: str = ""  # http://HOST:PORT of the first proxy listener
    admin_url: str = ""  # http://HOST:PORT of the admin listener
    ready: str = ""  # the first READY=1 datagram

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def send(self, signum: signal.Signals) -> None:
        os.kill(self.proc.pid, signum)

    def write_config(self, toml: str) -> None:
        """Replace the config file atomically, as an editor or config manager
        should: a reload must never read a half-written file."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config_text(toml))
        tmp.replace(self.config_path)

    async def reload(self, toml: str | None = None, within: float = 10.0) -> str:
        """Optionally rewrite the config, SIGHUP, and wait for the reload's
        RELOADING=1 and then READY=1; returns the RELOADING=1 datagram."""
        if toml is not None:
            self.write_config(toml)
        self.send(signal.SIGHUP)
        reloading = await self.notify.next("RELOADING=1", within)
        await self.notify.next("READY=1", within)
        return reloading

    async def until_ready(self, within: float = 15.0) -> None:
        """Wait for READY=1 (failing with stderr if the process exits first),
        then read the listening addresses off the start-up log line."""
        ready = asyncio.ensure_future(self.notify.next("READY=1", within))
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
            if ready not in done:
                raise AssertionError(
                    f"gateway exited with {exited.result()} before READY=1:\n{self.stderr()}"
                )
            self.ready = ready.result()
        finally:
            for task in (ready, exited):
                task.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)
        match = _LISTENING.search(self.stderr())
        assert match is not None, self.stderr()
        self.url = "http://" + match["proxy"].split(", ")[0]
        if match["admin"] != "off":
            self.admin_url = "http://" + match["admin"]

    async def wait(self, within: float = 10.0) -> int:
        """The exit status (negative: killed by that signal)."""
        async with asyncio.timeout(within):
            return await self.proc.wait()


def assert_clean_exit(log: str) -> None:
    """The log of a gateway that drained and exited with nothing left behind."""
    assert log.rstrip().endswith("gateway.server: exit"), log
    for sign in ("Traceback", "Unclosed", "ResourceWarning", "Task was destroyed", "never awaited"):
        assert sign not in log, log


def config_text(toml: str) -> str:
    """`toml` dedented, with a `[server]` on 127.0.0.1 port 0 when it has none."""
    text = textwrap.dedent(toml)
    return text if "[server]" in text else SERVER_HEADER + text


def gateway_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Unbuffered: whatever the gateway wrote is in the file when a test reads it.
    env["PYTHONUNBUFFERED"] = "1"
    # An unclosed socket or session says so on stderr (the in-process tests'
    # filterwarnings = error, as far as a subprocess allows).
    env["PYTHONWARNINGS"] = "default::ResourceWarning"
    env.update(extra or {})
    return env


def run_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "gateway", "run", "-c", str(config_path)]


async def spawn_gateway(
    directory: Path,
    toml: str,
    *,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    pass_fds: Sequence[int] = (),
) -> GatewayProcess:
    """Start the gateway process without waiting for it; see `start_gateway()`."""
    config_path = directory / "routes.toml"
    config_path.write_text(config_text(toml))
    stderr_path = directory / "gateway.stderr"
    notify = Notifications()
    environ = gateway_env({"NOTIFY_SOCKET": notify.address, **(env or {})})
    command = (
        [arg.replace("{config}", str(config_path)) for arg in argv]
        if argv is not None
        else run_command(config_path)
    )
    # Opened without truncation ("r+b" if it exists): a test may have handed
    # its inode to the gateway already ($JOURNAL_STREAM).
    stderr_path.touch()
    with stderr_path.open("r+b") as stderr:
        stderr.truncate()
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env=environ,
            cwd=directory,
            pass_fds=pass_fds,
        )
    return GatewayProcess(proc, notify, config_path, stderr_path)


async def start_gateway(
    directory: Path,
    toml: str,
    *,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    pass_fds: Sequence[int] = (),
    within: float = 15.0,
) -> GatewayProcess:
    """Start the gateway and wait for READY=1; see `run_gateway()`.

    `argv` replaces the command (`{config}` in it becomes the config path);
    `env` adds variables, and NOTIFY_SOCKET is set unless `env` sets it.
    """
    gw = await spawn_gateway(directory, toml, env=env, argv=argv, pass_fds=pass_fds)
    try:
        await gw.until_ready(within)
    except BaseException:
        await kill(gw)
        raise
    return gw


async def kill(gw: GatewayProcess) -> None:
    if gw.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            gw.proc.kill()
        await gw.proc.wait()
    gw.notify.close()


@contextlib.asynccontextmanager
async def run_gateway(
    directory: Path,
    toml: str,
    *,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
    pass_fds: Sequence[int] = (),
) -> AsyncIterator[GatewayProcess]:
    """A serving gateway (READY=1 received); SIGKILLed at the end if still running."""
    gw = await start_gateway(directory, toml, env=env, argv=argv, pass_fds=pass_fds)
    try:
        yield gw
    finally:
        await kill(gw)


async def run_to_exit(
    directory: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    within: float = 15.0,
) -> tuple[int, str, str]:
    """Run a command that is expected to exit: (status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=gateway_env(env),
        cwd=directory,
    )
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None when absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text))
        if found == labels:
            return float(value)
    return None


def free_port() -> int:
    """A loopback port nobody listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def named_app(name: str) -> web.Application:
    """An upstream that answers every request with `NAME PATH` (200)."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=f"{name} {request.path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def upstream_url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"
