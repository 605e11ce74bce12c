"""gateway.systemd against real sockets; fd juggling only ever in a subprocess."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yarl

from gateway.core import systemd
from gateway.core.config import load
from gateway.core.systemd import Notifier

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "contrib" / "systemd"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and its $NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    if len(str(path)) >= 100:  # sockaddr_un.sun_path is 108 bytes
        pytest.skip("tmp_path too long for an AF_UNIX address")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def test_send_joins_lines_into_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.enabled
        notifier.send("A=1", "B=2")
        notifier.ready("serving on 1 listener")
        notifier.stopping()
        notifier.watchdog()
        notifier.status("draining\n3 in flight")
    assert sock.recv(4096) == b"A=1\nB=2"
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving on 1 listener"
    assert sock.recv(4096) == b"STOPPING=1"
    assert sock.recv(4096) == b"WATCHDOG=1"
    # A newline in STATUS= would start a new assignment: flattened.
    assert sock.recv(4096) == b"STATUS=draining 3 in flight"


def test_reloading_and_monotonic_usec_travel_together(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, address = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as notifier:
        notifier.reloading("reloading routes.toml")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[2] == "STATUS=reloading routes.toml"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_namespace_address() -> None:
    name = f"gateway-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        with Notifier.from_env({"NOTIFY_SOCKET": "@" + name}) as notifier:
            notifier.ready()
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "rel/path"}])
def test_without_a_usable_notify_socket_everything_is_a_no_op(environ: dict[str, str]) -> None:
    notifier = Notifier.from_env(environ)
    assert not notifier.enabled
    notifier.ready("x")
    notifier.reloading()
    notifier.stopping()
    notifier.status("x")
    notifier.watchdog()
    notifier.close()


def test_vanished_socket_warns_once_and_never_raises(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, address = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    sock.close()
    os.unlink(address)
    with caplog.at_level(logging.DEBUG, logger="gateway.systemd"):
        notifier.ready()
        notifier.watchdog()
        notifier.reloading()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sd_notify" in warnings[0].getMessage()
    notifier.close()


def test_close_is_idempotent_and_later_sends_are_no_ops(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, address = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    notifier.ready()
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


# --- watchdog -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "1500"}, 0.00075),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(
    environ: dict[str, str], expected: float | None
) -> None:
    assert systemd.watchdog_interval(environ) == expected


# --- socket activation ----------------------------------------------------------------

# Runs in a child: moves the inherited sockets onto 3, 4, ... as systemd would, claims
# them with LISTEN_PID = its own pid, and reports what listen_fds() made of them.
CHILD = r"""
import fcntl, json, os, socket, sys
from gateway.core import systemd

src = [int(a) for a in sys.argv[1:]]
# Out of the way first: one of the inherited fds may itself be 3 or 4.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in src]
for fd in src:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, systemd.SD_LISTEN_FDS_START + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(src))
found = systemd.listen_fds()
report = {"fds": [], "env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}
for fd, name in found:
    cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    sock = systemd.socket_from_fd(fd)
    entry = {"fd": fd, "name": name, "cloexec": cloexec, "family": int(sock.family),
             "type": int(sock.type), "addr": sock.getsockname()}
    if name in ("http", "admin"):  # the parent queued a connection on these
        sock.settimeout(5)
        conn, _ = sock.accept()
        entry["accepted"] = conn.recv(16).decode()
        conn.close()
    report["fds"].append(entry)
print(json.dumps(report))
"""


def _run_child(socks: list[socket.socket], names: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    fds = [s.fileno() for s in socks]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, fds)],
        pass_fds=fds,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, object] = json.loads(proc.stdout)
    return report


def test_listen_fds_returns_named_inherited_sockets(tmp_path: Path) -> None:
    http = socket.create_server(("127.0.0.1", 0))
    admin = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_path = str(tmp_path / "u.sock")
    unix.bind(unix_path)
    unix.listen()
    http_addr = http.getsockname()
    # Queued before the child starts: accepting it proves the fd is the live listener.
    clients = [socket.create_connection(s.getsockname(), timeout=5) for s in (http, admin)]
    for client, text in zip(clients, ("to-http", "to-admin"), strict=True):
        client.sendall(text.encode())
    try:
        report = _run_child([http, admin, unix], "http:admin")
    finally:
        for s in (http, admin, unix, *clients):
            s.close()
    fds = report["fds"]
    assert isinstance(fds, list)
    assert [(f["fd"], f["name"]) for f in fds] == [(3, "http"), (4, "admin"), (5, "unknown")]
    assert all(f["cloexec"] for f in fds)
    assert [f["family"] for f in fds] == [socket.AF_INET, socket.AF_INET, socket.AF_UNIX]
    assert all(f["type"] == socket.SOCK_STREAM for f in fds)
    assert tuple(fds[0]["addr"]) == http_addr
    assert fds[0]["accepted"] == "to-http"
    assert fds[1]["accepted"] == "to-admin"
    assert fds[2]["addr"] == unix_path
    # Removed so children of the gateway don't think the sockets are theirs.
    assert report["env"] == []


def test_listen_fds_without_names_calls_them_unknown() -> None:
    a = socket.create_server(("127.0.0.1", 0))
    b = socket.create_server(("127.0.0.1", 0))
    try:
        report = _run_child([a, b], None)
    finally:
        a.close()
        b.close()
    fds = report["fds"]
    assert isinstance(fds, list)
    assert [f["name"] for f in fds] == ["unknown", "unknown"]


# Safe in-process: none of these reach the point of touching an fd.


@pytest.mark.parametrize(
    "environ",
    [
        {"LISTEN_PID": "1", "LISTEN_FDS": "2"},
        {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:admin"},
        {"LISTEN_FDS": "2"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "2"},
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"},
        {"LISTEN_PID": str(os.getpid())},
        {},
    ],
)
def test_listen_fds_meant_for_another_process_or_none_are_ignored(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert systemd.listen_fds(dict(environ)) == []
    # sd_listen_fds(3) unsets the variables whether or not they were for us.
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & os.environ.keys()


def test_listen_fds_keeps_the_environment_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds(os.environ, unset=False) == []
    assert os.environ["LISTEN_PID"] == "1"


def test_listen_fds_rejects_a_malformed_count_meant_for_us() -> None:
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"}, unset=False)
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "-1"}, unset=False)


def test_socket_from_fd_detects_family_and_type(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as original:
        sock = systemd.socket_from_fd(os.dup(original.fileno()))
        with sock:
            assert sock.family == socket.AF_INET6
            assert sock.type == socket.SOCK_DGRAM
    not_a_socket = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        with pytest.raises(OSError, match="non-socket"):  # ENOTSOCK
            systemd.socket_from_fd(not_a_socket)
    finally:
        os.close(not_a_socket)


# --- journald -------------------------------------------------------------------------


def test_under_journald_compares_journal_stream_with_the_fd(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as f:
        st = os.fstat(f.fileno())
        match = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert systemd.under_journald(match, fd=f.fileno())
        other = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
        assert not systemd.under_journald(other, fd=f.fileno())
    assert systemd.under_journald({"JOURNAL_STREAM": "garbled"})
    assert not systemd.under_journald({"JOURNAL_STREAM": ""})
    assert not systemd.under_journald({})


# --- unit files -----------------------------------------------------------------------


def _directives(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def test_service_unit_follows_the_contract() -> None:
    service = _directives(UNITS / "gateway.service")
    assert ("Type", "notify") in service
    reloads = [v for k, v in service if k == "ExecReload"]
    # `gateway check` gates the SIGHUP: ExecReload= commands run in order, stop on failure.
    assert len(reloads) == 2
    assert re.fullmatch(r"\S*gateway check -c \S+", reloads[0])
    assert reloads[1] == "/bin/kill -HUP $MAINPID"
    drain_timeout = 30.0  # server.drain_timeout default, CONTRACT.md
    assert float(dict(service)["TimeoutStopSec"]) > drain_timeout
    names = {
        dict(_directives(UNITS / unit))["FileDescriptorName"]
        for unit in ("gateway.socket", "gateway-admin.socket")
    }
    assert names == {"http", "admin"}


VENV_GATEWAY = "/opt/gateway/bin/gateway"


def test_the_service_runs_the_gateway_from_its_venv() -> None:
    # Debian 12 and Ubuntu refuse `pip install .` into the system Python (PEP 668),
    # so the gateway lives in a venv at /opt/gateway, and every command uses it.
    service = _directives(UNITS / "gateway.service")
    commands = [v for k, v in service if k in ("ExecStartPre", "ExecStart", "ExecReload")]
    gateway_commands = [command for command in commands if "gateway " in command]
    assert len(gateway_commands) == 3
    assert all(command.startswith(f"{VENV_GATEWAY} ") for command in gateway_commands)
    assert "/usr/local/bin" not in (UNITS / "gateway.service").read_text()


def test_the_service_writes_no_core_dumps_of_credentials() -> None:
    # The token cache and the remembered API keys hold credentials as sent.
    assert ("LimitCORE", "0") in _directives(UNITS / "gateway.service")


def test_the_socket_units_listen_on_loopback_only() -> None:
    # Shipped units expose nothing an operator did not ask for; the comments say how
    # to open the proxy port up (a drop-in).
    for unit in ("gateway.socket", "gateway-admin.socket"):
        listens = [v for k, v in _directives(UNITS / unit) if k == "ListenStream"]
        assert listens, unit
        for listen in listens:
            host, _, port = listen.rpartition(":")
            assert ipaddress.ip_address(host.strip("[]")).is_loopback, (unit, listen)
            assert port.isdigit()


def test_the_systemd_example_config_proxies_nothing_to_the_admin_listener() -> None:
    config = load(str(UNITS / "routes.toml"))
    admin_sockets = [
        v for k, v in _directives(UNITS / "gateway-admin.socket") if k == "ListenStream"
    ]
    admin_ports = {
        int(address.rpartition(":")[2]) for address in [*admin_sockets, config.server.admin]
    }
    for upstream in config.upstreams.values():
        for target in upstream.targets:
            assert yarl.URL(target.url).port not in admin_ports, target.url
    assert ipaddress.ip_address(config.server.admin.rpartition(":")[0]).is_loopback
    for listen in config.server.listen:
        assert ipaddress.ip_address(listen.rpartition(":")[0]).is_loopback


def test_nothing_in_contrib_refers_to_the_quick_start_routes_toml() -> None:
    # The top-level routes.toml proxies / to the admin listener for the README's demo;
    # a deployment must start from contrib/systemd/routes.toml instead.
    # Every path to a routes.toml (prose may name the file bare) is one of these.
    allowed = {
        "/etc/gateway/routes.toml",
        "contrib/systemd/routes.toml",
        "$CONF_DIR/routes.toml",
        "$HERE/routes.toml",
    }
    for path in UNITS.iterdir():
        for token in re.findall(r"[\w$./-]*routes\.toml", path.read_text()):
            assert "/" not in token or token.strip('"') in allowed, (path.name, token)


def test_install_script_dry_run_uses_a_venv_under_opt_gateway() -> None:
    script = UNITS / "install.sh"
    proc = subprocess.run(
        [script, "--dry-run"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "python3 -m venv /opt/gateway"
    assert lines[1] == f"/opt/gateway/bin/pip install --upgrade {REPO}"
    assert f"install -m 0644 {UNITS}/routes.toml /etc/gateway/routes.toml" in lines
    assert f"{VENV_GATEWAY} check -c /etc/gateway/routes.toml" in lines
    assert lines[-1] == "systemctl enable --now gateway.service"
    # Never pip outside the venv (PEP 668), never the quick-start config.
    assert not [line for line in lines if "pip" in line and not line.startswith("/opt/gateway/")]
    assert f"{REPO}/routes.toml" not in proc.stdout


def test_install_script_refuses_unknown_arguments() -> None:
    proc = subprocess.run(
        [UNITS / "install.sh", "--yes"], capture_output=True, text=True, timeout=30, check=False
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert "usage:" in proc.stderr


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    units = sorted(UNITS.glob("*.s[eo][rc]*"))  # .service and .socket, not the rest
    assert [unit.name for unit in units] == [
        "gateway-admin.socket",
        "gateway.service",
        "gateway.socket",
    ]
    for unit in units:
        text = unit.read_text()
        if unit.name == "gateway.service":
            # verify insists that ExecStart= binaries exist; the venv is made at install
            # time, so point it at an executable that surely does.
            assert VENV_GATEWAY in text
            text = text.replace(VENV_GATEWAY, sys.executable)
        (tmp_path / unit.name).write_text(text)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # Unknown or misspelt keys are only warnings ("Unknown key ..., ignoring"), exit 0.
    complaints = [line for line in proc.stderr.splitlines() if "gateway" in line]
    assert complaints == []
