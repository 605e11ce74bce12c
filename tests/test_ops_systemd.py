"""The real gateway process under (a stand-in for) systemd: sd_notify, the
watchdog, socket activation and journald."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import UpstreamFactory
from tests.gateway_process import (
    assert_clean_exit,
    free_port,
    kill,
    named_app,
    run_command,
    run_gateway,
    run_to_exit,
    spawn_gateway,
    upstream_url,
)

TIMEOUT = aiohttp.ClientTimeout(total=30)
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def one_route(target: str, server: str = "") -> str:
    return f"""
        {server}
        [upstreams.app]
        targets = ["{target}"]

        [[routes]]
        name = "all"
        path = "/"
        upstream = "app"
    """


def with_own_pid(variable: str, command: list[str]) -> list[str]:
    """`command` exec'd by a shell that first exports `variable` as its own
    pid, which after exec is the gateway's pid (what systemd does for
    WATCHDOG_PID and LISTEN_PID)."""
    return ["sh", "-c", f'export {variable}=$$; exec "$@"', "sh", *command]


async def test_notify_sequence_and_watchdog_pings_at_half_watchdog_usec(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    target = upstream_url(await start_upstream(named_app("A")))
    argv = with_own_pid("WATCHDOG_PID", run_command(Path("{config}")))
    async with run_gateway(
        tmp_path, one_route(target), env={"WATCHDOG_USEC": "200000"}, argv=argv
    ) as gw:
        # Pings start with serving and come every WATCHDOG_USEC / 2 = 0.1 s.
        async with asyncio.timeout(2):
            await gw.notify.next("WATCHDOG=1")
            first = time.monotonic()
            for _ in range(4):
                await gw.notify.next("WATCHDOG=1")
            per_ping = (time.monotonic() - first) / 4
        assert 0.07 <= per_ping <= 0.15, per_ping
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reloading = await gw.reload()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        gw.send(signal.SIGTERM)
        assert await gw.wait() == 0
    assert_clean_exit(gw.stderr())
    # Every notification, the pings left out, in order; each with a STATUS=.
    states = [m.split("\n") for m in gw.notify.states()]
    assert [lines[0] for lines in states] == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    for lines in states:
        assert lines[-1].startswith("STATUS="), lines
    # MONOTONIC_USEC= rides in the RELOADING=1 datagram, on the same clock.
    assert reloading.split("\n")[0] == "RELOADING=1"
    usec = int(reloading.split("\n")[1].removeprefix("MONOTONIC_USEC="))
    assert before <= usec <= after
    assert states[0][1] == "STATUS=serving 1 routes"
    assert states[3][1].startswith("STATUS=draining")


async def test_no_watchdog_pings_when_watchdog_pid_names_another_process(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    target = upstream_url(await start_upstream(named_app("A")))
    env = {"WATCHDOG_USEC": "20000", "WATCHDOG_PID": str(os.getpid())}
    async with run_gateway(tmp_path, one_route(target), env=env) as gw:
        # 20 ms pings would have sent several by the time a reload is done.
        await gw.reload()
        await gw.reload()
        gw.send(signal.SIGTERM)
        assert await gw.wait() == 0
    assert_clean_exit(gw.stderr())
    assert "WATCHDOG=1" not in gw.notify.collect()


# Prints, at exit, which LISTEN_* variables a child process would inherit.
LEAK_CHECK = """\
import atexit, os, sys
from gateway.cli import main
atexit.register(lambda: print(
    "LISTEN_ left:", sorted(k for k in os.environ if k.startswith("LISTEN_")), file=sys.stderr))
sys.exit(main())
"""


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def raw_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    try:
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_socket_activation_serves_on_the_inherited_sockets_not_the_configured_ones(
    tmp_path: Path, start_upstream: UpstreamFactory
) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    target = upstream_url(await start_upstream(named_app("A")))
    http_port, admin_port = free_port(), free_port()
    # The config names ports the test holds: binding them would fail the start.
    with listening_socket() as busy, listening_socket() as busy_admin:
        server = f"""
            [server]
            listen = ["127.0.0.1:{busy.getsockname()[1]}"]
            admin = "127.0.0.1:{busy_admin.getsockname()[1]}"
        """
        script = tmp_path / "leak_check.py"
        script.write_text(LEAK_CHECK)
        gw = await spawn_gateway(
            tmp_path,
            one_route(target, server),
            argv=[
                activate,
                f"--listen=127.0.0.1:{http_port}",
                f"--listen=127.0.0.1:{admin_port}",
                "--fdname=http:admin",
                # systemd-socket-activate passes on only what -E names.
                "-E",
                "NOTIFY_SOCKET",
                "-E",
                "PYTHONPATH",
                "-E",
                "PYTHONUNBUFFERED",
                sys.executable,
                str(script),
                "run",
                "-c",
                "{config}",
            ],
        )
        try:
            # Without --accept, systemd-socket-activate starts the service on
            # the first connection; that connection waits in the backlog and
            # the gateway, once up, serves it.
            first = await until_accepting(http_port)
            assert first.startswith(b"HTTP/1.1 200 OK\r\n"), first
            assert first.endswith(b"\r\n\r\nA /first")
            await gw.until_ready()
            assert gw.url == f"http://127.0.0.1:{http_port}"
            assert gw.admin_url == f"http://127.0.0.1:{admin_port}"
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                async with session.get(gw.url + "/again") as response:
                    assert (response.status, await response.text()) == (200, "A /again")
                async with session.get(gw.admin_url + "/readyz") as response:
                    assert response.status == 200
            gw.send(signal.SIGTERM)
            assert await gw.wait() == 0
        finally:
            await kill(gw)
    log = gw.stderr()
    assert_clean_exit(log.replace("LISTEN_ left: []", ""))
    assert "(sockets from the service manager)" in log
    # The gateway's own environment no longer hands the fds to children.
    assert "LISTEN_ left: []" in log


async def until_accepting(port: int) -> bytes:
    """GET /first once something listens on `port` (systemd-socket-activate
    binds a moment after it starts; it has no readiness signal of its own)."""
    async with asyncio.timeout(10):
        while True:
            try:
                return await raw_get(port, "/first")
            except ConnectionRefusedError:
                await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("export LISTEN_FDS=two", "LISTEN_FDS='two' is not a number"),
        ('exec 3<"$0"; export LISTEN_FDS=1', "inherited fd 3 is not a socket"),
    ],
    ids=["not-a-number", "not-a-socket"],
)
async def test_unusable_listen_fds_fail_the_start_cleanly(
    tmp_path: Path, setup: str, message: str
) -> None:
    config = tmp_path / "routes.toml"
    config.write_text(one_route("http://127.0.0.1:9"))
    command = " ".join(run_command(config))
    status, _, err = await run_to_exit(
        tmp_path, ["sh", "-c", f"export LISTEN_PID=$$; {setup}; exec {command}", str(config)]
    )
    assert status == 1
    assert "cannot start: " in err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("stream_is_stderr", [True, False], ids=["journal", "elsewhere"])
async def test_under_journald_no_stderr_line_carries_a_timestamp(
    tmp_path: Path, start_upstream: UpstreamFactory, stream_is_stderr: bool
) -> None:
    target = upstream_url(await start_upstream(named_app("A")))
    stderr = tmp_path / "gateway.stderr"
    stderr.touch()
    st = os.stat(stderr)
    journal = f"{st.st_dev}:{st.st_ino}" if stream_is_stderr else "8:12345"
    async with (
        run_gateway(tmp_path, one_route(target), env={"JOURNAL_STREAM": journal}) as gw,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        async with session.get(gw.url + "/x") as response:
            assert response.status == 200
        await gw.reload("this is not toml")  # an ERROR line
        gw.send(signal.SIGTERM)
        assert await gw.wait() == 0
    assert_clean_exit(gw.stderr())
    lines = gw.stderr().splitlines()
    access = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(access) == 1
    assert "ts" not in access[0]
    lifecycle = [line for line in lines if not line.startswith("{")]
    assert any("gateway.server: listening on" in line for line in lifecycle)
    assert any("gateway.reload: reload of" in line for line in lifecycle)
    for line in lines:
        assert not TIMESTAMP.search(line), line
    if stream_is_stderr:
        # sd-daemon(3) priority prefixes, so journald files each line at its level.
        assert any(line.startswith("<6>INFO gateway.server: listening on") for line in lines)
        assert any(line.startswith("<3>ERROR gateway.reload: reload of") for line in lines)
    else:
        assert any(line.startswith("INFO gateway.server: listening on") for line in lines)
