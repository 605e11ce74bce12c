"""Shared pieces of the bench: processes, /proc readers, wrk, config files.

Every child runs in its own session (process group) and is registered with a
`Processes` registry whose `close()` (always reached through try/finally and the
signal handlers in run.py/profile.py) sends SIGTERM to each group, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_DIR: Final = BENCH_DIR.parent
HOST: Final = "127.0.0.1"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PIN_CPU: Final = "0"
MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB
NGINX: Final = "/usr/sbin/nginx"
WRK: Final = shutil.which("wrk") or "/usr/bin/wrk"


class BenchError(Exception):
    pass


Pin = bool | str  # True: CPU 0 (the bench layout); False: not pinned; "1": that CPU list


def pin_prefix(pin: Pin) -> list[str]:
    """`taskset -c 0` for every process under test when pinned (or the CPUs given)."""
    if pin is False:
        return []
    return ["taskset", "-c", PIN_CPU if pin is True else pin]


def pin_self(pin: Pin) -> str:
    """Keep the orchestrator (sampling, bookkeeping) off the measured core."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin and len(cpus) > 1:
        other = [cpu for cpu in cpus if str(cpu) != PIN_CPU]
        os.sched_setaffinity(0, {other[0]})
        return f"CPU {other[0]}"
    return "any CPU"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# -- processes ------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def group_pids(self) -> list[int]:
        """Every live process of this child's process group (nginx master + workers)."""
        return group_pids(self.pid)

    def log_tail(self, limit: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-limit:]

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the whole group, wait `grace` seconds, then SIGKILL it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        # Whatever is left of the group (children of a dead leader, a hung leader).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        return self.popen.returncode


@dataclass
class Processes:
    """Registry of started children; `close()` stops all of them, newest first."""

    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path | None = None,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log_file: IO[bytes] | None = None
        stderr: int | IO[bytes] = subprocess.DEVNULL
        if log_path is not None:
            log_file = log_path.open("wb")
            stderr = log_file
            if stdout is subprocess.DEVNULL:
                stdout = log_file
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> int | None:
        code = proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)
        return code

    def close(self) -> None:
        while self.procs:
            self.procs.pop().stop(grace=3.0)


def run_bounded(
    procs: Processes, name: str, argv: Sequence[str], timeout: float
) -> tuple[int | None, str, str]:
    """Run a child to completion in its own group, killed at `timeout` seconds."""
    proc = procs.start(name, argv, stdout=subprocess.PIPE)
    popen = proc.popen
    try:
        out, _ = popen.communicate(timeout=timeout)
        return popen.returncode, out.decode(errors="replace"), ""
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        return None, "", f"{name}: killed after {timeout:.0f}s"
    finally:
        if proc in procs.procs:
            procs.stop(proc)


# -- /proc ----------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def group_pids(pgid: int) -> list[int]:
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # fields[0] is state (stat field 3), fields[2] is pgrp (stat field 5).
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return sorted(pids)


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime (stat fields 14, 15; all threads) of `pids`, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def status_kib(pid: int, key: str) -> int | None:
    """A `kB` line of /proc/PID/status (VmRSS, VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def sum_status_mib(pids: Sequence[int], key: str) -> float | None:
    values = [status_kib(pid, key) for pid in pids]
    known = [value for value in values if value is not None]
    return sum(known) / 1024 if known else None


def reset_hwm(pids: Sequence[int]) -> bool:
    """Reset VmHWM to the current RSS ("5" > clear_refs, Linux >= 4.0; needs root or owner)."""
    ok = bool(pids)
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def cpu_busy(line: str) -> float:
    """Busy seconds (user+nice+system+irq+softirq) of one /proc/stat line ("cpu", "cpu0")."""
    for text in Path("/proc/stat").read_text().splitlines():
        fields = text.split()
        if fields and fields[0] == line:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
            return (user + nice + system + irq + softirq) / CLK_TCK
    return 0.0


class Interference:
    """CPU time that processes other than ours (other sessions' test runs on this shared
    2-core machine) took during a step, where it hurts.

    Pinned: busy time of CPU 0 (/proc/stat "cpu0", irq and softirq included, which the
    kernel also charges to the interrupted task) minus the CPU time of our children,
    all of which run on CPU 0 (reaped ones via os.times(), live ones via /proc). This
    orchestrator sits on the other CPU and is left out. Not pinned: the same for the
    whole machine, this process included.
    """

    def __init__(self, procs: Processes, pin: Pin) -> None:
        self.procs = procs
        single = PIN_CPU if pin is True else pin if isinstance(pin, str) and pin.isdigit() else ""
        self.line = f"cpu{single}"  # "cpu" = the whole machine
        self.include_self = not single
        self.others_s = 0.0
        self.wall_s = 0.0
        self._busy = 0.0
        self._ours = 0.0
        self._start = 0.0

    def _our_cpu(self) -> float:
        times = os.times()
        ours = times.children_user + times.children_system
        if self.include_self:
            ours += times.user + times.system
        return ours + sum(cpu_seconds(p.group_pids()) for p in self.procs.procs if p.alive())

    def __enter__(self) -> Interference:
        self._busy, self._ours = cpu_busy(self.line), self._our_cpu()
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, ours = cpu_busy(self.line), self._our_cpu()
        self.wall_s = time.monotonic() - self._start
        self.others_s = max(0.0, (busy - self._busy) - (ours - self._ours))

    @property
    def share(self) -> float:
        """Other processes' CPU as a fraction of one core over the step."""
        return self.others_s / self.wall_s if self.wall_s else 0.0


class RssSampler:
    """Samples the summed VmRSS of a process group every `interval` s in a thread.

    Bounded: stops at `stop()` or after `max_seconds`, whichever comes first.
    """

    def __init__(self, pgid: int, interval: float = 0.02, max_seconds: float = 300.0) -> None:
        self.pgid = pgid
        self.interval = interval
        self.max_seconds = max_seconds
        self.peak_mib = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        pids = group_pids(self.pgid)
        refreshed = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < deadline:
            if time.monotonic() - refreshed > 1.0:
                pids = group_pids(self.pgid)
                refreshed = time.monotonic()
            rss = sum_status_mib(pids, "VmRSS")
            if rss is not None:
                self.peak_mib = max(self.peak_mib, rss)
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


# -- readiness --------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET with Connection: close; returns (status, body)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise BenchError(f"bad response from :{port}{path}: {raw[:200]!r}") from None
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def wait_ready(proc: Proc, port: int, path: str, timeout: float) -> None:
    """Poll GET :port{path} until 200; fail early when the process dies."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} before it was ready\n"
                f"{proc.log_tail()}"
            )
        try:
            status, _ = http_get(port, path, timeout=1.0)
            if status == 200:
                return
            last = f"status {status}"
        except (OSError, BenchError) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise BenchError(f"{proc.name} not ready on :{port}{path} after {timeout}s ({last})")


# -- wrk ------------------------------------------------------------------------


@dataclass
class WrkResult:
    url: str
    connections: int
    duration: float
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    non_2xx: int = 0
    socket_errors: int = 0
    error_detail: str = ""
    failed: str = ""  # wrk itself did not run to the end
    cpu_s: float | None = None  # CPU of the measured process group during the run
    others_share: float = 0.0  # other processes' CPU during the run, fraction of a core

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors + (1 if self.failed else 0)

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.cpu_s is None or self.requests == 0:
            return None
        return self.cpu_s / self.requests * 1e6


_UNITS_US: Final = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_LATENCY: Final = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_REQUESTS: Final = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)")
_RPS: Final = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON2XX: Final = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET: Final = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(text: str, result: WrkResult) -> WrkResult:
    for pct, value, unit in _LATENCY.findall(text):
        micros = float(value) * _UNITS_US[unit]
        if pct == "50":
            result.p50_us = micros
        else:
            result.p99_us = micros
    if match := _REQUESTS.search(text):
        result.requests = int(match[1])
        result.seconds = float(match[2]) * _UNITS_US[match[3]] / 1e6
    if match := _RPS.search(text):
        result.rps = float(match[1])
    if match := _NON2XX.search(text):
        result.non_2xx = int(match[1])
    if match := _SOCKET.search(text):
        counts = [int(group) for group in match.groups()]
        result.socket_errors = sum(counts)
        result.error_detail = match[0]
    if not result.requests:
        result.failed = result.failed or "wrk reported no requests"
    return result


def run_wrk(
    procs: Processes,
    url: str,
    connections: int,
    duration: int,
    pin: Pin,
    cpu_pgid: int | None = None,
) -> WrkResult:
    """`wrk -t1 -cN -dS --latency URL`, bounded; CPU of `cpu_pgid`'s group around it."""
    argv = [
        *pin_prefix(pin),
        WRK,
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "--latency",
        url,
    ]
    result = WrkResult(url=url, connections=connections, duration=duration)
    pids = group_pids(cpu_pgid) if cpu_pgid is not None else []
    before = cpu_seconds(pids)
    with Interference(procs, pin) as noise:
        code, out, err = run_bounded(procs, "wrk", argv, timeout=duration + 20.0)
    result.others_share = noise.share
    if pids:
        result.cpu_s = cpu_seconds(pids) - before
    if code != 0:
        result.failed = err or f"wrk exited with {code}: {out[-300:]}"
    return parse_wrk(out, result)


# -- bulk transfers ----------------------------------------------------------------


@dataclass
class BulkResult:
    op: str
    size: int
    ok: bool = False
    mb_per_s: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    verified: bool | None = None
    cpu_s: float | None = None
    others_share: float = 0.0
    attempts: list[float] = field(default_factory=list)  # MB/s of every try (best kept)

    @property
    def cpu_s_per_gib(self) -> float | None:
        if self.cpu_s is None or not self.size:
            return None
        return self.cpu_s / (self.size / GIB)


def bulk_argv(
    op: str,
    port: int,
    size: int,
    pin: Pin,
    prefix: str = "",
    verify: bool = False,
    deadline: float = 120.0,
) -> list[str]:
    argv = [
        *pin_prefix(pin),
        sys.executable,
        str(BENCH_DIR / "bulk.py"),
        op,
        "--port",
        str(port),
        "--size",
        str(size),
        "--deadline",
        f"{deadline:g}",
    ]
    if prefix:
        argv += ["--path-prefix", prefix]
    if verify:
        argv.append("--verify")
    return argv


def parse_bulk(op: str, size: int, code: int | None, out: str, err: str) -> BulkResult:
    import json

    result = BulkResult(op=op, size=size)
    line = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        data = json.loads(line)
    except ValueError:
        result.error = err or f"bulk client exited with {code}: {out[-300:]!r}"
        return result
    result.ok = bool(data["ok"])
    result.mb_per_s = float(data["mb_per_s"])
    result.seconds = float(data["seconds"])
    result.error = data.get("error")
    result.verified = data.get("verified")
    return result


def run_bulk(
    procs: Processes,
    op: str,
    port: int,
    size: int,
    pin: Pin,
    *,
    prefix: str = "",
    verify: bool = False,
    deadline: float = 120.0,
    cpu_pgid: int | None = None,
) -> BulkResult:
    pids = group_pids(cpu_pgid) if cpu_pgid is not None else []
    before = cpu_seconds(pids)
    argv = bulk_argv(op, port, size, pin, prefix, verify, deadline)
    with Interference(procs, pin) as noise:
        code, out, err = run_bounded(procs, f"bulk-{op}", argv, timeout=deadline + 10.0)
    result = parse_bulk(op, size, code, out, err)
    result.others_share = noise.share
    if pids:
        result.cpu_s = cpu_seconds(pids) - before
    return result


def run_bulk_best(
    procs: Processes,
    op: str,
    port: int,
    size: int,
    pin: Pin,
    tries: int,
    *,
    deadline: float,
    cpu_pgid: int | None = None,
) -> BulkResult:
    """Best of `tries` transfers (others' load on a shared machine only ever slows one
    down); stops early after a failure. `attempts` keeps every try's MB/s."""
    results: list[BulkResult] = []
    for _ in range(tries):
        result = run_bulk(procs, op, port, size, pin, deadline=deadline, cpu_pgid=cpu_pgid)
        results.append(result)
        if not result.ok:
            return result
    best = max(results, key=lambda r: r.mb_per_s)
    best.attempts = [r.mb_per_s for r in results]
    return best


def run_bulk_pair(
    procs: Processes,
    port: int,
    size: int,
    pin: Pin,
    *,
    verify: bool = False,
    deadline: float = 120.0,
) -> tuple[BulkResult, BulkResult]:
    """A download and an upload of `size` bytes at the same time."""
    down = procs.start(
        "bulk-download",
        bulk_argv("download", port, size, pin, "", verify, deadline),
        stdout=subprocess.PIPE,
    )
    up = procs.start(
        "bulk-upload",
        bulk_argv("upload", port, size, pin, "", verify, deadline),
        stdout=subprocess.PIPE,
    )
    results: list[BulkResult] = []
    for op, proc in (("download", down), ("upload", up)):
        try:
            out, _ = proc.popen.communicate(timeout=deadline + 10.0)
            results.append(parse_bulk(op, size, proc.popen.returncode, out.decode(), ""))
        except subprocess.TimeoutExpired:
            results.append(BulkResult(op=op, size=size, error="killed at deadline"))
        finally:
            procs.stop(proc)
    return results[0], results[1]


# -- configs --------------------------------------------------------------------


def gateway_toml(port: int, admin_port: int, upstream_port: int, access_log: str) -> str:
    return f"""\
# Generated by bench/run.py: the gateway under test.
[server]
listen = ["{HOST}:{port}"]
admin = "{HOST}:{admin_port}"
access_log = "{access_log}"
drain_timeout = 2.0

[upstreams.bench]
targets = ["http://{HOST}:{upstream_port}"]

[[routes]]
name = "root"
path = "/"
upstream = "bench"

# The policy-cost row: a token bucket that never runs dry + the default breaker.
[[routes]]
name = "policy"
path = "/policy"
upstream = "bench"
strip_prefix = true

[routes.rate_limit]
rate = 1e9
burst = 1000000000
key = "client_ip"
"""


_NGINX_TEMPS: Final = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_main(prefix: Path, comment: str) -> str:
    """The top of an nginx.conf under `prefix`: one worker in the foreground, no access
    log, every temp path inside `prefix`; ends inside an open `http {` block."""
    temp = {name: prefix / name for name in _NGINX_TEMPS}
    return f"""\
# {comment}
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
"""


def nginx_conf(prefix: Path, port: int, upstream_port: int) -> str:
    comment = "Generated by bench/run.py: nginx as a streaming reverse proxy, for comparison."
    return (
        nginx_main(prefix, comment)
        + f"""\
    # wrk keeps its 50 connections for the whole run; nginx would otherwise close
    # each one after 1000 requests (the gateway does not).
    keepalive_requests 1000000;

    upstream bench {{
        server {HOST}:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen {HOST}:{port} reuseport;
        client_max_body_size 0;

        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""
    )


def nginx_argv(prefix: Path, conf: Path, pin: Pin) -> list[str]:
    error_log = str(prefix / "error.log")
    return [*pin_prefix(pin), NGINX, "-p", f"{prefix}/", "-c", str(conf), "-e", error_log]


def nginx_prefix(root: Path, name: str = "nginx") -> Path:
    """`root/name` with nginx's temp dirs, writable by its workers."""
    prefix = root / name
    prefix.mkdir(parents=True, exist_ok=True)
    for temp in _NGINX_TEMPS:
        (prefix / temp).mkdir(exist_ok=True)
        # Workers drop to "nobody" when the master runs as root.
        (prefix / temp).chmod(0o777)
    prefix.chmod(0o755)
    root.chmod(0o755)
    return prefix


def prepare_nginx(root: Path, port: int, upstream_port: int) -> tuple[Path, Path]:
    prefix = nginx_prefix(root)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, upstream_port))
    return prefix, conf


# -- the processes under test -------------------------------------------------------


def child_env(source: Path = REPO_DIR) -> dict[str, str]:
    """The environment for a child that imports `gateway` from `source` (a checkout)."""
    env = dict(os.environ)
    for name in (
        "JOURNAL_STREAM", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
        "WATCHDOG_USEC", "GATEWAY_CONFIG", "GATEWAY_LOOP",
    ):  # fmt: skip
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    return env


def start_upstream(procs: Processes, tmp: Path, pin: Pin) -> tuple[Proc, int]:
    port = free_port()
    argv = [*pin_prefix(pin), sys.executable, str(BENCH_DIR / "upstream.py"), "--port", str(port)]
    proc = procs.start("upstream", [*argv, "--max-seconds", "900"], log_path=tmp / "upstream.log")
    wait_ready(proc, port, "/", timeout=15.0)
    return proc, port


@dataclass
class GatewayRun:
    proc: Proc
    port: int
    admin_port: int


def start_gateway(
    procs: Processes,
    tmp: Path,
    upstream_port: int,
    *,
    label: str,
    loop: str,
    access_log: str,
    pin: Pin,
    quiet: bool = False,
    source: Path = REPO_DIR,
    toml: Callable[[int, int], str] | None = None,
    wrap: Sequence[str] = (),
    ready_timeout: float = 30.0,
) -> GatewayRun:
    """A gateway process on a generated routes.toml, importing `gateway` from `source`.

    `toml(port, admin_port)` writes the config instead of `gateway_toml` (then
    `upstream_port` and `access_log` are the caller's business). `wrap` goes
    in front of the Python command (e.g. valgrind, which also needs a longer
    `ready_timeout` for the start-up)."""
    port, admin_port = free_port(), free_port()
    config = tmp / f"routes-{label}.toml"
    if toml is None:
        config.write_text(gateway_toml(port, admin_port, upstream_port, access_log))
    else:
        config.write_text(toml(port, admin_port))
    argv = [*pin_prefix(pin), *wrap, sys.executable, "-m", "gateway", "run", "-c", str(config)]
    argv += ["--loop", loop]
    # quiet: the access-log cost run sends stderr (the log) to /dev/null.
    log_path = None if quiet else tmp / f"gateway-{label}.log"
    env = child_env(source)
    proc = procs.start(f"gateway-{label}", argv, log_path=log_path, env=env, cwd=source)
    wait_ready(proc, admin_port, "/readyz", timeout=ready_timeout)
    wait_ready(proc, port, "/", timeout=10.0)
    return GatewayRun(proc, port, admin_port)
