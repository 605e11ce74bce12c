"""Rolling-restart soak: how many requests fail while a two-target pool is redeployed?

    python bench/soak.py [--seconds 60] [--only gateway|nginx] [--out FILE] [--source DIR]

Two targets (tests/pool_target.py, one process each) behind one route with
`retries = 1`, `read_timeout = 2.0`, under steady load (wrk, 16 keep-alive
connections, small GETs). As a rolling deploy does, every 10 s one target is
faulted and comes back 3 s later, alternating between the two. Four scenarios:
SIGKILL then a restart on the same port, or SIGSTOP then SIGCONT, each with
active health checks and with passive checks (breakers) only. The gateway
(`python -m gateway run`, from `--source`, default this checkout) and nginx
(`max_fails=1 fail_timeout=10s`, `proxy_next_upstream error timeout http_50x`,
same timeouts; open-source nginx has no active checks, so it runs passive in
all four) take turns in front of the SAME target processes under the same
fault schedule, one after the other.

Failed = wrk's non-2xx responses (counted by a Lua script) + socket errors
(connect, read, write, timeout). Max latency comes from the same script; the
limit is a first attempt that waits `read_timeout` for nothing plus one retry
that may do the same: (1 + retries) x read_timeout.

Everything listens on 127.0.0.1; every child runs in its own process group,
stopped on any exit; each wrk run is bounded by `-d`, the whole run by a
deadline (SIGALRM).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from harness import (
    BENCH_DIR,
    HOST,
    NGINX,
    REPO_DIR,
    WRK,
    BenchError,
    Proc,
    Processes,
    WrkResult,
    child_env,
    free_port,
    http_get,
    nginx_argv,
    nginx_main,
    nginx_prefix,
    parse_wrk,
    start_gateway,
    wait_ready,
)

CONNECTIONS: Final = 16
RETRIES: Final = 1
READ_TIMEOUT: Final = 2.0
CONNECT_TIMEOUT: Final = 1.0
FIRST_FAULT: Final = 5.0  # seconds into the wrk run
FAULT_EVERY: Final = 10.0
FAULT_FOR: Final = 3.0
LATENCY_LIMIT_S: Final = (1 + RETRIES) * READ_TIMEOUT
WRK_TIMEOUT_S: Final = 10  # above the limit, so a slow request is measured, not dropped
# Active checks as a rolling deploy would set them: a dead target is out within
# about two intervals, a restarted one back after one pass.
HEALTH: Final = {"interval": 1.0, "timeout": 1.0, "healthy_threshold": 1, "unhealthy_threshold": 2}

# wrk's own counters do not separate 5xx from 2xx per request nor print the max
# latency in a parseable unit; this script does both, in one line at the end.
WRK_LUA: Final = """\
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) non2xx = 0; t0 = os.time(); bysecond = {} end
function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    local s = os.time() - t0
    bysecond[s] = (bysecond[s] or 0) + 1
  end
end
function done(summary, latency, requests)
  local bad, seconds = 0, {}
  for _, t in ipairs(threads) do
    bad = bad + t:get("non2xx")
    for s, n in pairs(t:get("bysecond")) do seconds[#seconds + 1] = s .. ":" .. n end
  end
  table.sort(seconds, function(x, y) return tonumber(x:match("%d+")) < tonumber(y:match("%d+")) end)
  local e = summary.errors
  io.write(string.format(
    "SOAK requests=%d non2xx=%d connect=%d read=%d write=%d timeout=%d latency_max_us=%d\\n",
    summary.requests, bad, e.connect, e.read, e.write, e.timeout, latency.max))
  io.write("SOAKSECONDS " .. table.concat(seconds, " ") .. "\\n")
end
"""
_SOAK_LINE: Final = re.compile(r"^SOAK (.*)$", re.M)
_SECONDS_LINE: Final = re.compile(r"^SOAKSECONDS ?(.*)$", re.M)


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Scenario:
    key: str
    fault: str  # "kill" | "stop"
    active: bool

    @property
    def label(self) -> str:
        what = "SIGKILL, restart" if self.fault == "kill" else "SIGSTOP, SIGCONT"
        checks = "active checks" if self.active else "passive only"
        return f"{what} after {FAULT_FOR:g} s, {checks}"


SCENARIOS: Final = (
    Scenario("kill-active", "kill", True),
    Scenario("kill-passive", "kill", False),
    Scenario("stop-active", "stop", True),
    Scenario("stop-passive", "stop", False),
)


# -- targets -------------------------------------------------------------------------


@dataclass
class Target:
    """One tests/pool_target.py process on a fixed port (kept across restarts)."""

    procs: Processes
    tmp: Path
    name: str
    port: int = field(default_factory=free_port)
    proc: Proc | None = None
    frozen: bool = False
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self.starts += 1
        argv = [sys.executable, "-m", "tests.pool_target", str(self.port), self.name]
        self.proc = self.procs.start(
            f"target-{self.name}",
            argv,
            log_path=self.tmp / f"target-{self.name}-{self.starts}.log",
            env=child_env(REPO_DIR),
            cwd=REPO_DIR,
        )

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.procs.stop(self.proc)  # reaps it (the group is already gone)
        self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.proc is not None and self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def ensure_up(self) -> None:
        """Running, not stopped, answering /healthz (before each proxy's run)."""
        self.thaw()
        if self.proc is None or not self.proc.alive():
            if self.proc is not None:
                self.procs.stop(self.proc)
            self.start()
        assert self.proc is not None
        wait_ready(self.proc, self.port, "/healthz", timeout=15.0)


def close_targets(targets: list[Target]) -> None:
    for target in targets:
        target.thaw()  # a stopped process would sit on SIGTERM until SIGKILL
        if target.proc is not None:
            target.procs.stop(target.proc)
            target.proc = None


# -- one run: wrk + the fault schedule --------------------------------------------------


@dataclass
class RunResult:
    proxy: str
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    socket_detail: str = ""
    timeouts: int = 0
    latency_max_s: float | None = None
    error: str = ""
    events: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.non_2xx + self.socket_errors

    @property
    def total(self) -> int:
        # A connect/read/write error is a request that never completed (not in
        # wrk's count); a timeout is a completed one that was too slow.
        return self.requests + self.socket_errors - self.timeouts

    def cell(self) -> str:
        if self.error:
            return f"error: {self.error}"
        per = self.failed / self.total * 1e5 if self.total else 0.0
        return f"{self.failed:,} / {self.total:,} ({per:.1f})"

    def latency_cell(self) -> str:
        if self.error or self.latency_max_s is None:
            return "—"
        verdict = "ok" if self.latency_max_s <= LATENCY_LIMIT_S else "OVER"
        return f"{self.latency_max_s:.3f} s ({verdict})"


def fault_schedule(seconds: int) -> list[tuple[float, int, str]]:
    """(time into the run, target index, "fault" | "back"), alternating targets;
    only faults whose target is back at least 1 s before wrk stops."""
    events: list[tuple[float, int, str]] = []
    at, index = FIRST_FAULT, 0
    while at + FAULT_FOR <= seconds - 1.0:
        events += [(at, index % 2, "fault"), (at + FAULT_FOR, index % 2, "back")]
        at += FAULT_EVERY
        index += 1
    return events


def run_soak(
    procs: Processes, tmp: Path, url: str, seconds: int, scenario: Scenario, targets: list[Target]
) -> RunResult:
    """wrk for `seconds` against `url` while the schedule faults the targets."""
    result = RunResult(proxy="")
    script = tmp / "soak.lua"
    script.write_text(WRK_LUA)
    argv = [WRK, "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", f"{WRK_TIMEOUT_S}s"]
    argv += ["-s", str(script), url]
    wrk = procs.start("wrk", argv, stdout=subprocess.PIPE)
    started = time.monotonic()
    try:
        for at, index, what in fault_schedule(seconds):
            delay = started + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not wrk.alive():
                break
            target = targets[index]
            if what == "fault" and scenario.fault == "kill":
                target.kill()
            elif what == "fault":
                target.freeze()
            elif scenario.fault == "kill":
                target.start()
            else:
                target.thaw()
            verb = {
                ("fault", "kill"): "SIGKILL",
                ("fault", "stop"): "SIGSTOP",
                ("back", "kill"): "restarted",
                ("back", "stop"): "SIGCONT",
            }[(what, scenario.fault)]
            result.events.append(f"{time.monotonic() - started:.2f}s {target.name} {verb}")
        try:
            out, _ = wrk.popen.communicate(timeout=seconds + 15.0)
        except subprocess.TimeoutExpired:
            result.error = "wrk killed at its deadline"
            return result
    finally:
        procs.stop(wrk)
    text = out.decode(errors="replace")
    if wrk.popen.returncode != 0:
        result.error = f"wrk exited with {wrk.popen.returncode}: {text[-300:]}"
        return result
    parsed = parse_wrk(text, WrkResult(url=url, connections=CONNECTIONS, duration=seconds))
    result.requests = parsed.requests
    result.non_2xx = parsed.non_2xx
    result.socket_errors = parsed.socket_errors
    result.socket_detail = parsed.error_detail
    if match := _SOAK_LINE.search(text):
        fields = dict(item.split("=", 1) for item in match[1].split())
        counts = {key: int(value) for key, value in fields.items()}
        result.requests = counts["requests"]
        result.non_2xx = counts["non2xx"]
        result.socket_errors = sum(counts[k] for k in ("connect", "read", "write", "timeout"))
        result.timeouts = counts["timeout"]
        result.latency_max_s = counts["latency_max_us"] / 1e6
    else:
        result.error = f"no SOAK line from the wrk script: {text[-300:]}"
    if match := _SECONDS_LINE.search(text):
        result.details.append(
            "non-2xx by second of the run (wrk's clock, 1 s resolution): "
            + (match[1].strip() or "none")
        )
    return result


# -- the proxies ------------------------------------------------------------------------


def gateway_config(scenario: Scenario, targets: list[Target]) -> Callable[[int, int], str]:
    def toml(port: int, admin_port: int) -> str:
        # Breaker and panic settings are left at the checkout's defaults: what a
        # user gets (the old code: cooldown 30 s, no panic; see the report header).
        health = ""
        if scenario.active:
            health = '\n[upstreams.pool.health]\npath = "/healthz"\n' + "".join(
                f"{key} = {value}\n" for key, value in HEALTH.items()
            )
        urls = ", ".join(f'"{target.url}"' for target in targets)
        return f"""\
# Generated by bench/soak.py ({scenario.key}).
[server]
listen = ["{HOST}:{port}"]
admin = "{HOST}:{admin_port}"
access_log = "json"
drain_timeout = 2.0

[upstreams.pool]
targets = [{urls}]
{health}
[[routes]]
name = "soak"
path = "/"
upstream = "pool"
retries = {RETRIES}
read_timeout = {READ_TIMEOUT}
connect_timeout = {CONNECT_TIMEOUT}
"""

    return toml


def nginx_config(prefix: Path, port: int, targets: list[Target]) -> str:
    servers = "".join(
        f"        server {HOST}:{t.port} max_fails=1 fail_timeout=10s;\n" for t in targets
    )
    return nginx_main(prefix, "Generated by bench/soak.py: nginx in front of the same pool.") + (
        f"""\
    keepalive_requests 1000000;

    upstream pool {{
{servers}        keepalive 32;
        keepalive_requests 1000000;
    }}

    server {{
        listen {HOST}:{port};

        location / {{
            proxy_pass http://pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout {CONNECT_TIMEOUT:g}s;
            proxy_read_timeout {READ_TIMEOUT:g}s;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries {1 + RETRIES};
        }}
    }}
}}
"""
    )


def summarize_gateway_log(path: Path) -> list[str]:
    """What the gateway's own log says about the requests that did not get a 2xx
    (grouped by status/error/aborted/attempts/upstream_status) and its breaker/panic
    lines. The 499s at the very end are wrk stopping with requests in flight."""
    if not path.exists():
        return ["(no gateway log)"]
    groups: Counter[str] = Counter()
    slow: Counter[str] = Counter()
    retried: Counter[str] = Counter()
    first_last: dict[str, list[str]] = {}
    lifecycle: list[str] = []
    with path.open(errors="replace") as file:
        for line in file:
            if not line.startswith("{"):
                low = line.lower()
                if "breaker" in low or "panic" in low or "health" in low:
                    lifecycle.append(line.strip())
                continue
            # A 200 the client got whole (`aborted` is null, or absent in older logs).
            if '"status":200,' in line and '"aborted":"' not in line:
                if '"attempts":1,' in line and '"duration_ms":' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("attempts", 1) > 1:
                        retried[f"200 after {entry['attempts']} attempts, upstream_status="
                                f"{entry.get('upstream_status')}"] += 1  # fmt: skip
                    if entry.get("duration_ms", 0) > LATENCY_LIMIT_S * 1000:
                        slow[f"200 slower than {LATENCY_LIMIT_S:g} s"] += 1
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            key = (
                f"status={entry.get('status')} error={entry.get('error')} "
                f"aborted={entry.get('aborted')} attempts={entry.get('attempts')} "
                f"upstream_status={entry.get('upstream_status')}"
            )
            groups[key] += 1
            stamps = first_last.setdefault(key, [])
            stamp = str(entry.get("ts", "?"))
            stamps[1:] = [stamp] if stamps else []
            if not stamps:
                stamps.append(stamp)
    lines = [
        f"{count} x {key} (logged {' .. '.join(first_last[key])})"
        for key, count in groups.most_common(12)
    ]
    lines += [f"{count} x {key}" for key, count in retried.most_common(6)]
    lines += [f"{count} x {key}" for key, count in slow.items()]
    if lifecycle:
        lines.append(f"{len(lifecycle)} breaker/health/panic log lines; first 12:")
        lines += ["  " + text[:200] for text in lifecycle[:12]]
    return lines or ["every request got a 2xx"]


def metrics_lines(admin_port: int) -> list[str]:
    try:
        _status, body = http_get(admin_port, "/metrics", timeout=3.0)
    except (OSError, BenchError) as exc:
        return [f"/metrics: {exc!r}"]
    keep = ("gateway_breaker_transitions_total", "gateway_upstream_panic_total")
    text = body.decode(errors="replace").splitlines()
    return [
        line
        for line in text
        if line.startswith(keep) and line.rsplit(" ", 1)[-1] not in ("0", "0.0")
    ]


def soak_gateway(
    procs: Processes,
    tmp: Path,
    seconds: int,
    scenario: Scenario,
    targets: list[Target],
    source: Path,
) -> RunResult:
    for target in targets:
        target.ensure_up()
    label = f"{scenario.key}"
    run = start_gateway(
        procs,
        tmp,
        0,
        label=label,
        loop="uvloop",
        access_log="json",
        pin=False,
        source=source,
        toml=gateway_config(scenario, targets),
    )
    try:
        result = run_soak(procs, tmp, f"http://{HOST}:{run.port}/", seconds, scenario, targets)
        result.details += metrics_lines(run.admin_port)
    finally:
        code = procs.stop(run.proc)
    result.proxy = "gateway"
    result.details.append(f"gateway exit code after SIGTERM: {code}")
    result.details += summarize_gateway_log(tmp / f"gateway-{label}.log")
    return result


def soak_nginx(
    procs: Processes, tmp: Path, seconds: int, scenario: Scenario, targets: list[Target]
) -> RunResult:
    for target in targets:
        target.ensure_up()
    port = free_port()
    prefix = nginx_prefix(tmp, f"nginx-{scenario.key}")
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(prefix, port, targets))
    proc = procs.start("nginx", nginx_argv(prefix, conf, False), log_path=prefix / "stderr.log")
    try:
        wait_ready(proc, port, "/", timeout=10.0)
        result = run_soak(procs, tmp, f"http://{HOST}:{port}/", seconds, scenario, targets)
    finally:
        procs.stop(proc)
    result.proxy = "nginx"
    error_log = prefix / "error.log"
    if error_log.exists():
        text = error_log.read_text(errors="replace").splitlines()
        kinds = Counter(re.sub(r"^.*?\[(\w+)\].*?\*\d+ ([^,]*).*$", r"[\1] \2", t) for t in text)
        result.details += [f"{n} x {kind[:160]}" for kind, n in kinds.most_common(8)]
    return result


# -- report -----------------------------------------------------------------------------


def git_head(source: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out[:100] or "?"


def report(
    seconds: int,
    source: Path,
    results: dict[str, dict[str, RunResult]],
    proxies: list[str],
) -> str:
    lines = [
        f"# Rolling-restart soak, {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"gateway from `{source}` ({git_head(source)}); nginx {NGINX}; wrk -t1 "
        f"-c{CONNECTIONS} keep-alive GET /; targets: 2 x tests/pool_target.py. Route: "
        f"retries = {RETRIES}, read_timeout = {READ_TIMEOUT:g}, connect_timeout = "
        f"{CONNECT_TIMEOUT:g}; breaker/panic at the checkout's defaults; active checks: "
        + ", ".join(f"{k} = {v:g}" for k, v in HEALTH.items())
        + ". nginx: max_fails=1 fail_timeout=10s, proxy_next_upstream error timeout "
        f"http_502 http_503 http_504, tries {1 + RETRIES}, same timeouts, keepalive 32 "
        "(no active checks in open-source nginx: it runs passive in every row).",
        "",
        f"Faults: from {FIRST_FAULT:g} s into each run, every {FAULT_EVERY:g} s one target "
        f"(alternating) is faulted for {FAULT_FOR:g} s. Failed = non-2xx + socket errors; "
        "per 100k in parentheses.",
        "",
        f"| fault, {seconds} s | gateway: failed / total (per 100k) "
        "| nginx: failed / total (per 100k) |",
        "|---|---|---|",
    ]
    for scenario in SCENARIOS:
        row = results.get(scenario.key, {})
        cells = [row[p].cell() if p in row else "not run" for p in ("gateway", "nginx")]
        lines.append(f"| {scenario.label} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        f"Max latency (limit: (1 + retries) x read_timeout = {LATENCY_LIMIT_S:g} s):",
        "",
        f"| fault, {seconds} s | gateway | nginx |",
        "|---|---|---|",
    ]
    for scenario in SCENARIOS:
        row = results.get(scenario.key, {})
        cells = [row[p].latency_cell() if p in row else "not run" for p in ("gateway", "nginx")]
        lines.append(f"| {scenario.label} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Details", ""]
    for scenario in SCENARIOS:
        for proxy in proxies:
            result = results.get(scenario.key, {}).get(proxy)
            if result is None:
                continue
            lines.append(f"### {scenario.key}, {proxy}")
            lines.append("")
            lines.append(f"- wrk: {result.requests:,} responses, non-2xx {result.non_2xx}, "
                         f"{result.socket_detail or 'no socket errors'}")  # fmt: skip
            lines.append("- faults: " + "; ".join(result.events))
            lines += [f"- {text}" for text in result.details]
            lines.append("")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="wrk run per scenario and proxy")
    parser.add_argument("--only", choices=("gateway", "nginx"), help="run one proxy only")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "soak.md")
    parser.add_argument(
        "--source", type=Path, default=REPO_DIR, help="checkout the gateway is run from"
    )
    parser.add_argument(
        "--keep", type=Path, help="keep configs and logs (gateway access logs) in this directory"
    )
    args = parser.parse_args()
    if not 10 <= args.seconds <= 3600:
        parser.error("--seconds must be between 10 and 3600")
    source = args.source.resolve()
    if not (source / "gateway" / "__main__.py").exists():
        parser.error(f"--source {source}: no gateway/ package there")
    proxies = [args.only] if args.only else ["gateway", "nginx"]
    if "nginx" in proxies and not Path(NGINX).exists():
        parser.error(f"{NGINX} not found (use --only gateway)")
    # The whole run's deadline: every wrk run plus start-up and shutdown slack.
    deadline = len(SCENARIOS) * len(proxies) * (args.seconds + 60) + 60
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    signal.signal(signal.SIGALRM, _on_signal)
    signal.alarm(deadline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    results: dict[str, dict[str, RunResult]] = {}
    targets: list[Target] = []
    try:
        with contextlib.ExitStack() as stack:
            if args.keep is None:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-soak-")))
            else:
                tmp = args.keep.resolve()
                tmp.mkdir(parents=True, exist_ok=True)
            log(f"deadline {deadline} s; gateway from {source}")
            for scenario in SCENARIOS:
                targets = [Target(procs, tmp, "a"), Target(procs, tmp, "b")]
                row = results.setdefault(scenario.key, {})
                try:
                    for proxy in proxies:
                        log(f"{scenario.key}: {proxy}, {args.seconds} s")
                        try:
                            if proxy == "gateway":
                                result = soak_gateway(
                                    procs, tmp, args.seconds, scenario, targets, source
                                )
                            else:
                                result = soak_nginx(procs, tmp, args.seconds, scenario, targets)
                        except BenchError as exc:
                            result = RunResult(proxy=proxy, error=str(exc)[:300])
                        row[proxy] = result
                        log(f"{scenario.key}: {proxy}: {result.cell()}, max "
                            f"{result.latency_cell()}")  # fmt: skip
                finally:
                    close_targets(targets)
            text = report(args.seconds, source, results, proxies)
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); stopping every child")
        text = report(args.seconds, source, results, proxies) + f"\n\nINTERRUPTED: {exc}\n"
        return_code = 130
    else:
        return_code = 0
    finally:
        signal.alarm(0)
        close_targets(targets)
        procs.close()
    args.out.write_text(text + "\n")
    print(text)
    log(f"written to {args.out}")
    return return_code


if __name__ == "__main__":
    sys.exit(main())
