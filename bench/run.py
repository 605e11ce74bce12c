"""One-shot benchmark: the gateway vs a direct connection (and nginx) to one upstream.

    python bench/run.py [--quick] [--pin | --no-pin] [--out bench/results/latest.md]

Prints a markdown report and writes it to --out (raw numbers go next to it as .json,
the gateway's /metrics after the run as .metrics.txt). See bench/README.md for what
every number means. Everything listens on 127.0.0.1 only; every load step is bounded
in time; every child process is stopped on any exit.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from harness import (
    BENCH_DIR,
    GIB,
    HOST,
    MIB,
    NGINX,
    REPO_DIR,
    WRK,
    BenchError,
    BulkResult,
    GatewayRun,
    Interference,
    Proc,
    Processes,
    RssSampler,
    WrkResult,
    free_port,
    http_get,
    nginx_argv,
    pin_self,
    prepare_nginx,
    reset_hwm,
    run_bulk_best,
    run_bulk_pair,
    run_wrk,
    start_gateway,
    start_upstream,
    sum_status_mib,
    wait_ready,
)

T = TypeVar("T")

# Targets from the performance issue.
TARGET_CPU_US: Final = 100.0
TARGET_ADDED_P50_US: Final = 120.0
TARGET_DOWNLOAD_RATIO: Final = 0.55
TARGET_UPLOAD_RATIO: Final = 0.5
TARGET_PEAK_RSS_MIB: Final = 64.0
TARGET_10MIB_DELTA_MIB: Final = 10.0
TARGET_POLICY_COST: Final = 0.10
NOISY: Final = 0.05  # flag steps where other processes used > 5 % of a core

_START: Final = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    quick: bool
    pin: bool
    small_seconds: int  # wrk -c50 (wrk takes whole seconds only)
    c1_seconds: int  # wrk -c1
    warmup_seconds: int
    bulk_size: int
    ten_mib_rounds: int
    bulk_tries: int  # best of N for the single download / upload
    bulk_deadline: float  # per transfer
    budget_seconds: float  # soft limit for the whole run: optional steps are skipped after

    @classmethod
    def make(cls, quick: bool, pin: bool) -> Settings:
        if quick:
            return cls(quick, pin, 3, 2, 1, GIB, 2, 2, 20.0, 100.0)
        return cls(quick, pin, 10, 5, 1, GIB, 3, 3, 45.0, 300.0)

    def left(self) -> float:
        return self.budget_seconds - (time.monotonic() - _START)


@dataclass
class TargetResult:
    name: str
    error: str | None = None
    small: WrkResult | None = None
    c1: WrkResult | None = None
    policy: WrkResult | None = None
    small_again: WrkResult | None = None  # `/` once more after `/policy/`: drift check
    # Further alternating `/policy/`, `/` rounds: the cost is a few percent, the
    # same size as run-to-run noise, so one A-B-A triple is not enough.
    policy_rounds: list[WrkResult] = field(default_factory=list)
    root_rounds: list[WrkResult] = field(default_factory=list)
    download: BulkResult | None = None
    upload: BulkResult | None = None
    pair_download: BulkResult | None = None
    pair_upload: BulkResult | None = None
    pair_peak_rss_mib: float | None = None
    pair_hwm_mib: float | None = None
    hwm_was_reset: bool = False
    idle_rss_mib: float | None = None
    baseline_hwm_mib: float | None = None
    ten_mib_hwm_mib: float | None = None
    ten_mib: list[BulkResult] = field(default_factory=list)
    exit_code: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    warmup_errors: int = 0

    def wrk_runs(self) -> list[WrkResult]:
        runs = (self.small, self.c1, self.policy, self.small_again)
        return [run for run in runs if run is not None] + self.policy_rounds + self.root_rounds

    def bulk_runs(self) -> list[BulkResult]:
        runs = [self.download, self.upload, self.pair_download, self.pair_upload]
        return [run for run in runs if run is not None] + self.ten_mib


# -- measuring one path -------------------------------------------------------------


class Target:
    """One path under test: its listen port and (if any) the process group doing the work."""

    def __init__(self, name: str, port: int, proc: Proc | None) -> None:
        self.name = name
        self.port = port
        self.proc = proc
        self.result = TargetResult(name)

    @property
    def pgid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def url(self, path: str = "/") -> str:
        return f"http://{HOST}:{self.port}{path}"

    def alive(self) -> bool:
        return self.proc is None or self.proc.alive()

    def hwm_mib(self) -> float | None:
        return None if self.proc is None else sum_status_mib(self.proc.group_pids(), "VmHWM")

    def rss_mib(self) -> float | None:
        return None if self.proc is None else sum_status_mib(self.proc.group_pids(), "VmRSS")


def wrk(procs: Processes, settings: Settings, target: Target, path: str, conns: int) -> WrkResult:
    seconds = settings.small_seconds if conns > 1 else settings.c1_seconds
    log(f"{target.name}: wrk -t1 -c{conns} -d{seconds:g}s {path}")
    result = run_wrk(procs, target.url(path), conns, seconds, settings.pin, target.pgid)
    log(
        f"{target.name}:   {result.rps:,.0f} req/s, p50 {result.p50_us:.0f}us, "
        f"p99 {result.p99_us:.0f}us, errors {result.errors}"
        + (f", {result.cpu_us_per_request:.1f} CPU us/req" if result.cpu_us_per_request else "")
    )
    return result


def warmup(procs: Processes, settings: Settings, target: Target, path: str = "/") -> None:
    result = run_wrk(procs, target.url(path), 50, settings.warmup_seconds, settings.pin)
    target.result.warmup_errors += result.errors


# Extra `/policy/`, `/` pairs after the first A-B-A triple.
POLICY_ROUNDS = 2


def measure_small(
    procs: Processes, settings: Settings, target: Target, *, c1: bool = True, policy: bool = False
) -> None:
    res = target.result
    warmup(procs, settings, target)
    res.small = wrk(procs, settings, target, "/", 50)
    if c1:
        res.c1 = wrk(procs, settings, target, "/", 1)
    if policy:
        # A-B-A: `/`, `/policy/`, `/` again, so drift shows instead of posing as cost.
        warmup(procs, settings, target, "/policy/")
        res.policy = wrk(procs, settings, target, "/policy/", 50)
        res.small_again = wrk(procs, settings, target, "/", 50)
        for _ in range(POLICY_ROUNDS):
            res.policy_rounds.append(wrk(procs, settings, target, "/policy/", 50))
            res.root_rounds.append(wrk(procs, settings, target, "/", 50))


def measure_bulk(
    procs: Processes,
    settings: Settings,
    target: Target,
    *,
    upload: bool = True,
    extras: bool = True,
) -> None:
    """Bulk transfers; `extras`: the 10 MiB rounds and the simultaneous down + up."""
    res = target.result
    size = settings.bulk_size
    if extras:
        # (b) 10 MiB bodies, both directions at once, content verified end to end.
        res.baseline_hwm_mib = target.hwm_mib()
        log(f"{target.name}: {settings.ten_mib_rounds} x (10 MiB down + 10 MiB up), verified")
        for _ in range(settings.ten_mib_rounds):
            down, up = run_bulk_pair(
                procs, target.port, 10 * MIB, settings.pin, verify=True, deadline=20.0
            )
            res.ten_mib += [down, up]
        res.ten_mib_hwm_mib = target.hwm_mib()

    def best_of(op: str) -> BulkResult:
        log(f"{target.name}: {op} {size / GIB:g} GiB, best of {settings.bulk_tries}")
        result = run_bulk_best(
            procs,
            op,
            target.port,
            size,
            settings.pin,
            settings.bulk_tries,
            deadline=settings.bulk_deadline,
            cpu_pgid=target.pgid,
        )
        log_bulk(target, result)
        return result

    res.download = best_of("download")
    if upload:
        res.upload = best_of("upload")
    if extras:
        # (a) a download and an upload of bulk_size at once, RSS sampled every 20 ms.
        log(f"{target.name}: download + upload {size / GIB:g} GiB at the same time")
        if target.proc is None:
            res.pair_download, res.pair_upload = run_bulk_pair(
                procs, target.port, size, settings.pin, deadline=settings.bulk_deadline
            )
        else:
            res.hwm_was_reset = reset_hwm(target.proc.group_pids())
            with RssSampler(target.proc.pid, max_seconds=settings.bulk_deadline + 15) as sampler:
                res.pair_download, res.pair_upload = run_bulk_pair(
                    procs, target.port, size, settings.pin, deadline=settings.bulk_deadline
                )
            res.pair_peak_rss_mib = sampler.peak_mib or None
            res.pair_hwm_mib = target.hwm_mib()
            peak = f"{sampler.peak_mib:.1f} MiB ({sampler.samples} samples)"
            log(f"{target.name}:   peak VmRSS {peak}")
        log_bulk(target, res.pair_download)
        log_bulk(target, res.pair_upload)


def log_bulk(target: Target, result: BulkResult) -> None:
    cpu = f", {result.cpu_s_per_gib:.2f} CPU s/GiB" if result.cpu_s_per_gib is not None else ""
    state = "ok" if result.ok else f"FAILED: {result.error}"
    tries = ", tries " + "/".join(f"{v:,.0f}" for v in result.attempts) if result.attempts else ""
    log(f"{target.name}:   {result.op} {result.mb_per_s:,.0f} MB/s{cpu} ({state}{tries})")


def guarded(target: Target, step: str, fn: Callable[[], T]) -> T | None:
    """Run one step; a failure is recorded on the target instead of ending the bench."""
    try:
        return fn()
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        message = f"{step}: {exc}"
        log(f"{target.name}: {message}")
        target.result.error = (target.result.error + "; " if target.result.error else "") + message
        return None


# -- starting the processes under test -------------------------------------------


def stop_gateway(procs: Processes, run: GatewayRun, target: Target, out: Path | None) -> None:
    """Scrape /metrics, then SIGTERM and record the exit code (the contract says 0)."""
    try:
        status, body = http_get(run.admin_port, "/metrics", timeout=5.0)
        if status == 200:
            text = body.decode(errors="replace")
            target.result.metrics = summarize_metrics(text)
            if out is not None:
                out.write_text(text)
    except (OSError, BenchError) as exc:
        log(f"{target.name}: /metrics: {exc}")
    target.result.exit_code = procs.stop(run.proc)


_REQUESTS_TOTAL: Final = re.compile(
    r"^gateway_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.eE+-]+)$", re.M
)
_CODE: Final = re.compile(r'code="(\d+)"')


def summarize_metrics(text: str) -> dict[str, float]:
    """gateway_requests_total summed by status code over routes and methods."""
    totals: dict[str, float] = {}
    for match in _REQUESTS_TOTAL.finditer(text):
        code = _CODE.search(match["labels"])
        key = code[1] if code else "unknown"
        totals[key] = totals.get(key, 0.0) + float(match["value"])
    return totals


def start_nginx(procs: Processes, tmp: Path, upstream_port: int, pin: bool) -> Target:
    port = free_port()
    prefix, conf = prepare_nginx(tmp, port, upstream_port)
    proc = procs.start("nginx", nginx_argv(prefix, conf, pin), log_path=tmp / "nginx.stderr")
    wait_ready(proc, port, "/", timeout=10.0)
    return Target("nginx", port, proc)


# -- the report ----------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{unit}"


def ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "—"
    return f"{num / den:.2f}x"


def versions() -> dict[str, str]:
    info: dict[str, str] = {"python": platform.python_version()}
    for module in ("aiohttp", "uvloop", "msgspec"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = "not installed"
    for name, argv in (("wrk", [WRK, "-v"]), ("nginx", [NGINX, "-v"])):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
            text = (done.stdout + done.stderr).strip().splitlines()
            info[name] = text[0] if text else "?"
        except (OSError, subprocess.SubprocessError):
            info[name] = "not installed"
    info["kernel"] = platform.release()
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = f"{cpu}, {os.cpu_count()} CPUs"
    digest = hashlib.sha256()
    for path in sorted((REPO_DIR / "gateway").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    info["gateway_src"] = digest.hexdigest()[:12]
    return info


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |")
        self.add("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        for row in rows:
            self.add("| " + " | ".join(row) + " |")
        self.add()

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def bulk_row(
    label: str,
    getter: Callable[[TargetResult], BulkResult | None],
    value: Callable[[BulkResult], float | None],
    columns: list[TargetResult | None],
    digits: int = 0,
    with_ratio: bool = True,
) -> list[str]:
    cells: list[float | None] = []
    for res in columns:
        run = getter(res) if res is not None else None
        cells.append(value(run) if run is not None else None)
    row = [label] + [
        fmt(cell, digits)
        + (" (partial)" if res and (run := getter(res)) is not None and not run.ok else "")
        for cell, res in zip(cells, columns, strict=True)
    ]
    direct = cells[0]
    row += [ratio(cells[1], direct) if with_ratio else "—"]
    row += [ratio(cells[2], direct) if with_ratio else "—"]
    return row


def build_report(
    settings: Settings,
    info: dict[str, str],
    layout: str,
    background: str,
    direct: TargetResult,
    gateway: TargetResult,
    nginx: TargetResult | None,
    variants: dict[str, TargetResult],
) -> str:
    rep = Report()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = "quick" if settings.quick else "full"
    rep.add(f"# gateway benchmark, {now} ({mode})")
    rep.add()
    rep.add(f"- **layout**: {layout}")
    rep.add(
        f"- **versions**: Python {info['python']}, aiohttp {info['aiohttp']}, "
        f"uvloop {info['uvloop']}, msgspec {info['msgspec']}; {info['wrk'].split(' [')[0]}; "
        f"{info['nginx']}"
    )
    rep.add(
        f"- **gateway**: `gateway run --loop uvloop`, access_log off, source sha256 "
        f"{info['gateway_src']}; upstream: bench/upstream.py (raw asyncio.Protocol on uvloop)"
    )
    rep.add(f"- **machine**: {info['cpu']}, Linux {info['kernel']}")
    rep.add(f"- **background**: {background}")
    rep.add(
        f"- **load**: wrk -t1 -c50 -d{settings.small_seconds:g}s and -c1 "
        f"-d{settings.c1_seconds:g}s (after a {settings.warmup_seconds:g}s warm-up), "
        f"bulk {settings.bulk_size / GIB:g} GiB per transfer (raw-socket client, 1 MiB "
        f"buffers; single download/upload best of {settings.bulk_tries}), "
        f"{settings.ten_mib_rounds} rounds of 10 MiB up+down verified"
    )
    rep.add()
    for res in (direct, gateway, nginx, *variants.values()):
        if res is not None and res.error:
            rep.add(f"> **{res.name}**: {res.error}")
            rep.add()

    cols: list[TargetResult | None] = [direct, gateway, nginx]
    header = ["metric", "direct", "gateway", "nginx", "gateway/direct", "nginx/direct"]
    rows: list[list[str]] = []

    def wrk_row(
        label: str,
        getter: Callable[[TargetResult], WrkResult | None],
        value: Callable[[WrkResult], float | None],
        digits: int = 0,
        with_ratio: bool = True,
    ) -> None:
        cells: list[float | None] = []
        for res in cols:
            run = getter(res) if res is not None else None
            cells.append(value(run) if run is not None and not run.failed else None)
        row = [label] + [fmt(cell, digits) for cell in cells]
        row += [ratio(cells[1], cells[0]) if with_ratio else "—"]
        row += [ratio(cells[2], cells[0]) if with_ratio else "—"]
        rows.append(row)

    def small(r: TargetResult) -> WrkResult | None:
        return r.small

    def one(r: TargetResult) -> WrkResult | None:
        return r.c1

    wrk_row("small GET, req/s (50 conns)", small, lambda w: w.rps)
    wrk_row("small GET, p50 µs (50 conns)", small, lambda w: w.p50_us)
    wrk_row("small GET, p99 µs (50 conns)", small, lambda w: w.p99_us)
    wrk_row("small GET, p50 µs (1 conn)", one, lambda w: w.p50_us)
    wrk_row("small GET, p99 µs (1 conn)", one, lambda w: w.p99_us)
    base_p50 = direct.c1.p50_us if direct.c1 and not direct.c1.failed else None
    base_p99 = direct.c1.p99_us if direct.c1 and not direct.c1.failed else None
    added_rows: list[tuple[str, float | None, Callable[[WrkResult], float]]] = [
        ("added p50 µs at 1 conn (x - direct)", base_p50, lambda w: w.p50_us),
        ("added p99 µs at 1 conn (x - direct)", base_p99, lambda w: w.p99_us),
    ]
    for label, floor, pick in added_rows:
        cells = ["0" if floor is not None else "—"]
        for res in (gateway, nginx):
            c1 = res.c1 if res is not None else None
            cells.append(
                fmt(pick(c1) - floor, 0) if c1 and not c1.failed and floor is not None else "—"
            )
        rows.append([label, *cells, "—", "—"])
    wrk_row(
        "CPU µs per small request (50 conns)",
        small,
        lambda w: w.cpu_us_per_request,
        1,
        with_ratio=False,
    )
    if gateway.small and nginx and nginx.small:
        rows[-1][4] = ratio(gateway.small.cpu_us_per_request, nginx.small.cpu_us_per_request)
        rows[-1][4] += " of nginx"
    wrk_row("CPU µs per small request (1 conn)", one, lambda w: w.cpu_us_per_request, 1, False)
    size = f"{settings.bulk_size / GIB:g} GiB"

    def rate(b: BulkResult) -> float | None:
        return b.mb_per_s

    def cpu(b: BulkResult) -> float | None:
        return b.cpu_s_per_gib

    rows.append(bulk_row(f"{size} download, MB/s", lambda r: r.download, rate, cols))
    rows.append(bulk_row(f"{size} upload, MB/s", lambda r: r.upload, rate, cols))
    rows.append(
        bulk_row("download CPU s per GiB", lambda r: r.download, cpu, cols, 2, with_ratio=False)
    )
    rows.append(
        bulk_row("upload CPU s per GiB", lambda r: r.upload, cpu, cols, 2, with_ratio=False)
    )
    rows.append(
        bulk_row(f"{size} down ‖ up at once: down MB/s", lambda r: r.pair_download, rate, cols)
    )
    rows.append(bulk_row(f"{size} down ‖ up at once: up MB/s", lambda r: r.pair_upload, rate, cols))

    def mem_row(label: str, pick: Callable[[TargetResult], float | None]) -> None:
        cells = [pick(r) if r is not None else None for r in cols]
        rows.append([label, "—", fmt(cells[1], 1), fmt(cells[2], 1), "—", "—"])

    mem_row("RSS MiB, idle after start-up", lambda r: r.idle_rss_mib)
    mem_row("peak VmRSS MiB, sampled, during down ‖ up", lambda r: r.pair_peak_rss_mib)
    mem_row(
        "VmHWM MiB after down ‖ up" + (" (reset before)" if gateway.hwm_was_reset else ""),
        lambda r: r.pair_hwm_mib,
    )
    mem_row("VmHWM MiB after small requests (baseline)", lambda r: r.baseline_hwm_mib)
    mem_row("VmHWM MiB after 10 MiB up+down", lambda r: r.ten_mib_hwm_mib)
    mem_row(
        "10 MiB bodies: VmHWM - baseline, MiB",
        lambda r: (
            r.ten_mib_hwm_mib - r.baseline_hwm_mib
            if r.ten_mib_hwm_mib is not None and r.baseline_hwm_mib is not None
            else None
        ),
    )
    errors: list[str] = ["errors: wrk non-2xx + socket errors"]
    bulk_fail: list[str] = ["errors: failed/unverified bulk transfers"]
    for res in cols:
        if res is None:
            errors.append("—")
            bulk_fail.append("—")
            continue
        errors.append(str(sum(run.errors for run in res.wrk_runs())))
        bulk_fail.append(
            str(sum(1 for run in res.bulk_runs() if not run.ok or run.verified is False))
        )
    rows += [[*errors, "—", "—"], [*bulk_fail, "—", "—"]]
    rep.add("## gateway vs direct vs nginx")
    rep.add()
    rep.table(header, rows)

    # Variants of the gateway itself.
    base = gateway
    vrows: list[list[str]] = []

    def vrow(label: str, run: WrkResult | None, bulk: BulkResult | None) -> None:
        ok = run is not None and not run.failed
        vrows.append(
            [
                label,
                fmt(run.rps if ok and run else None),
                ratio(run.rps if ok and run else None, base.small.rps if base.small else None),
                fmt(run.p50_us if ok and run else None),
                fmt(run.p99_us if ok and run else None),
                fmt(run.cpu_us_per_request if ok and run else None, 1),
                str(run.errors) if run else "—",
                fmt(bulk.mb_per_s if bulk else None),
                fmt(bulk.cpu_s_per_gib if bulk else None, 2),
            ]
        )

    vrow("`/` uvloop, access_log off (base)", base.small, base.download)
    vrow("`/policy/` (rate limit + breaker, strip_prefix)", base.policy, None)
    vrow("`/` again, right after `/policy/`", base.small_again, None)
    for label, res in variants.items():
        vrow(label, res.small, res.download)
    rep.add("## gateway variants (50 conns; download = the same bulk size)")
    rep.add()
    rep.table(
        [
            "variant",
            "req/s",
            "vs base",
            "p50 µs",
            "p99 µs",
            "CPU µs/req",
            "errors",
            "download MB/s",
            "CPU s/GiB",
        ],
        vrows,
    )

    # Targets.
    trows: list[list[str]] = []

    def target(name: str, value: float | None, text: str, limit: str, passed: bool) -> None:
        verdict = "n/a" if value is None else ("PASS" if passed else "FAIL")
        trows.append([name, text if value is not None else "—", limit, f"**{verdict}**"])

    cpu_us = gateway.small.cpu_us_per_request if gateway.small else None
    target(
        "gateway CPU per small request",
        cpu_us,
        fmt(cpu_us, 1, " µs"),
        f"≤ {TARGET_CPU_US:g} µs",
        cpu_us is not None and cpu_us <= TARGET_CPU_US,
    )
    added = (
        gateway.c1.p50_us - base_p50
        if gateway.c1 and not gateway.c1.failed and base_p50 is not None
        else None
    )
    target(
        "added p50 latency, 1 connection",
        added,
        fmt(added, 0, " µs"),
        f"≤ {TARGET_ADDED_P50_US:g} µs",
        added is not None and added <= TARGET_ADDED_P50_US,
    )
    ratio_targets: list[tuple[str, Callable[[TargetResult], BulkResult | None], float]] = [
        ("download", lambda r: r.download, TARGET_DOWNLOAD_RATIO),
        ("upload", lambda r: r.upload, TARGET_UPLOAD_RATIO),
    ]
    for name, get, limit in ratio_targets:
        mine, theirs = get(gateway), get(direct)
        value = (
            mine.mb_per_s / theirs.mb_per_s
            if mine and theirs and theirs.mb_per_s and mine.ok and theirs.ok
            else None
        )
        target(
            f"{size} {name} vs direct",
            value,
            f"{fmt(value, 2)}x ({fmt(mine.mb_per_s if mine else None)} MB/s)",
            f"≥ {limit:g}x",
            value is not None and value >= limit,
        )
    peaks = [v for v in (gateway.pair_peak_rss_mib, gateway.pair_hwm_mib) if v is not None]
    peak = max(peaks) if peaks else None
    pair_ok = bool(
        gateway.pair_download
        and gateway.pair_upload
        and gateway.pair_download.ok
        and gateway.pair_upload.ok
    )
    target(
        f"peak RSS, {size} down ‖ up at once",
        peak,
        fmt(peak, 1, " MiB") + ("" if pair_ok else " (transfers failed)"),
        f"< {TARGET_PEAK_RSS_MIB:g} MiB",
        peak is not None and peak < TARGET_PEAK_RSS_MIB and pair_ok,
    )
    delta = (
        gateway.ten_mib_hwm_mib - gateway.baseline_hwm_mib
        if gateway.ten_mib_hwm_mib is not None and gateway.baseline_hwm_mib is not None
        else None
    )
    target(
        "10 MiB bodies: VmHWM over baseline",
        delta,
        fmt(delta, 1, " MiB"),
        f"≤ {TARGET_10MIB_DELTA_MIB:g} MiB",
        delta is not None and delta <= TARGET_10MIB_DELTA_MIB,
    )
    roots = [
        run.rps
        for run in (gateway.small, gateway.small_again, *gateway.root_rounds)
        if run and not run.failed
    ]
    policies = [
        run.rps for run in (gateway.policy, *gateway.policy_rounds) if run and not run.failed
    ]
    cost = (
        1 - (sum(policies) / len(policies)) / (sum(roots) / len(roots))
        if policies and roots
        else None
    )
    target(
        f"policy layer throughput cost (mean of {len(policies)} `/policy/` runs vs "
        f"{len(roots)} interleaved `/` runs)",
        cost,
        fmt(cost * 100 if cost is not None else None, 1, " %"),
        f"< {TARGET_POLICY_COST * 100:g} %",
        cost is not None and cost < TARGET_POLICY_COST,
    )
    all_runs = [r for r in (direct, gateway, nginx, *variants.values()) if r is not None]
    wrk_errors = sum(run.errors for r in all_runs for run in r.wrk_runs())
    bulk_errors = sum(
        1 for r in all_runs for run in r.bulk_runs() if not run.ok or run.verified is False
    )
    target(
        "errors (all wrk runs, all transfers)",
        float(wrk_errors + bulk_errors),
        f"{wrk_errors} wrk, {bulk_errors} transfers",
        "0",
        wrk_errors + bulk_errors == 0,
    )
    rep.add("## targets")
    rep.add()
    rep.table(["target", "measured", "limit", "result"], trows)

    # Details for reading the numbers.
    rep.add("## details")
    rep.add()
    for res in all_runs:
        for run in res.wrk_runs():
            if run.errors:
                rep.add(
                    f"- {res.name} `{run.url}` -c{run.connections}: non-2xx {run.non_2xx}, "
                    f"{run.error_detail or 'no socket errors'}"
                    + (f", wrk failed: {run.failed}" if run.failed else "")
                )
        for transfer in res.bulk_runs():
            if not transfer.ok or transfer.verified is False:
                rep.add(f"- {res.name} {transfer.op} {transfer.size} bytes: {transfer.error}")
        for single in (res.download, res.upload):
            if single is not None and len(single.attempts) > 1:
                tries = ", ".join(f"{v:,.0f}" for v in single.attempts)
                rep.add(f"- {res.name} {single.op}: best of MB/s {tries}")
        noisy = [
            f"{run.connections}-conn `{run.url.split('/', 3)[-1] or '/'}` "
            f"{run.others_share * 100:.0f} %"
            for run in res.wrk_runs()
            if run.others_share > NOISY
        ] + [
            f"{t.op} {t.others_share * 100:.0f} %"
            for t in (res.download, res.upload)
            if t is not None and t.others_share > NOISY
        ]
        if noisy:
            steps = ", ".join(noisy)
            rep.add(f"- {res.name}: other processes took this share of the measured CPU: {steps}")
        if res.warmup_errors:
            rep.add(f"- {res.name}: {res.warmup_errors} errors during warm-up runs")
        if res.metrics:
            counts = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(res.metrics.items()))
            note = " (499: wrk stopped with requests in flight)" if "499" in res.metrics else ""
            rep.add(f"- {res.name} /metrics gateway_requests_total by code: {counts}{note}")
        if res.exit_code is not None and res.name.startswith("gateway"):
            rep.add(f"- {res.name}: exit code after SIGTERM = {res.exit_code}")
    rep.add(
        "- CPU µs/request = (utime+stime of the process group, /proc/PID/stat, after - before "
        "the 50-conn wrk run) / requests wrk completed; nginx = master + worker."
    )
    rep.add(
        "- MB/s = 10^6 bytes/s, client-side wall time from connect to the last byte "
        "(download) or to the upstream's answer (upload)."
    )
    return rep.text()


# -- main ------------------------------------------------------------------------------


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 1-2 minutes)")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="taskset -c 0 for load generator, upstream, gateway, nginx (default: on)",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "latest.md")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx column")
    parser.add_argument(
        "--no-variants", action="store_true", help="skip the asyncio-loop and json-log runs"
    )
    args = parser.parse_args()
    settings = Settings.make(args.quick, args.pin)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    orchestrator = pin_self(settings.pin)
    if settings.pin:
        layout = (
            f"pinned: wrk, bulk clients, upstream, gateway and nginx all on CPU 0 "
            f"(`taskset -c 0`); this orchestrator (/proc sampling) on {orchestrator}"
        )
    else:
        layout = "not pinned: every process free to use any CPU (scheduler decides)"
    info = versions()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_at_start = Path("/proc/loadavg").read_text().split()[0]
    procs = Processes()
    whole_run = Interference(procs, settings.pin).__enter__()
    direct_t: Target | None = None
    gateway_t = Target("gateway", 0, None)
    gateway_t.result.error = "not run"
    nginx_t: Target | None = None
    variants: dict[str, TargetResult] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmpdir:
            tmp = Path(tmpdir)
            log(f"layout: {layout}")
            _, upstream_port = start_upstream(procs, tmp, settings.pin)
            log(f"upstream on :{upstream_port}")

            direct_t = Target("direct", upstream_port, None)
            measure_small(procs, settings, direct_t)
            measure_bulk(procs, settings, direct_t)

            if not args.no_nginx and Path(NGINX).exists():
                try:
                    nginx_t = start_nginx(procs, tmp, upstream_port, settings.pin)
                except BenchError as exc:
                    nginx_t = Target("nginx", 0, None)
                    nginx_t.result.error = f"start: {exc}"
                else:
                    nt = nginx_t
                    nt.result.idle_rss_mib = nt.rss_mib()
                    measure_small(procs, settings, nt)
                    measure_bulk(procs, settings, nt)
                    if nt.proc is not None:
                        nt.result.exit_code = procs.stop(nt.proc)

            gateway_t = run_gateway_main(procs, settings, tmp, upstream_port, args.out)

            if not args.no_variants:
                for label, loop, access_log, quiet, bulk in (
                    ("gateway --loop asyncio", "asyncio", "off", False, True),
                    ("gateway access_log json → /dev/null", "uvloop", "json", True, False),
                ):
                    if settings.left() < settings.small_seconds + 15:
                        log(f"{label}: skipped (time budget)")
                        continue
                    variants[label] = run_gateway_variant(
                        procs, settings, tmp, upstream_port, label, loop, access_log, quiet, bulk
                    )
    except KeyboardInterrupt:
        log("interrupted; stopping every child process")
        procs.close()
        return 130
    finally:
        procs.close()

    assert direct_t is not None
    whole_run.__exit__(None, None, None)
    background = (
        f"other processes (other sessions on this machine) used {whole_run.others_s:.1f} "
        f"CPU-s {'of CPU 0 ' if settings.pin else ''}during the {whole_run.wall_s:.0f} s "
        f"run ({whole_run.share * 100:.0f} % of one core); load average at start "
        f"{load_at_start}. Steps where they took > {NOISY * 100:.0f} % of a core are listed "
        "under details"
    )
    report = build_report(
        settings,
        info,
        layout,
        background,
        direct_t.result,
        gateway_t.result,
        nginx_t.result if nginx_t is not None else None,
        variants,
    )
    print(report)
    args.out.write_text(report)
    raw = {
        "settings": asdict(settings),
        "info": info,
        "layout": layout,
        "direct": asdict(direct_t.result),
        "gateway": asdict(gateway_t.result),
        "nginx": asdict(nginx_t.result) if nginx_t else None,
        "variants": {k: asdict(v) for k, v in variants.items()},
    }
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str))
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def run_gateway_main(
    procs: Processes, settings: Settings, tmp: Path, upstream_port: int, out: Path
) -> Target:
    try:
        run = start_gateway(
            procs,
            tmp,
            upstream_port,
            label="main",
            loop="uvloop",
            access_log="off",
            pin=settings.pin,
        )
    except BenchError as exc:
        target = Target("gateway", 0, None)
        target.result.error = f"start: {exc}"
        log(f"gateway: {target.result.error}")
        return target
    target = Target("gateway", run.port, run.proc)
    res = target.result
    res.idle_rss_mib = target.rss_mib()
    guarded(target, "small requests", lambda: measure_small(procs, settings, target, policy=True))
    res.baseline_hwm_mib = target.hwm_mib()
    if target.alive():
        guarded(target, "bulk", lambda: measure_bulk(procs, settings, target))
    if not target.alive():
        code = run.proc.popen.returncode
        res.error = (res.error or "") + f" gateway died (exit {code}): {run.proc.log_tail(500)}"
    stop_gateway(procs, run, target, out.with_suffix(".metrics.txt"))
    return target


def run_gateway_variant(
    procs: Processes,
    settings: Settings,
    tmp: Path,
    upstream_port: int,
    label: str,
    loop: str,
    access_log: str,
    quiet: bool,
    bulk: bool,
) -> TargetResult:
    try:
        run = start_gateway(
            procs,
            tmp,
            upstream_port,
            label=loop + "-" + access_log,
            loop=loop,
            access_log=access_log,
            pin=settings.pin,
            quiet=quiet,
        )
    except BenchError as exc:
        result = TargetResult(label, error=f"start: {exc}")
        log(f"{label}: {result.error}")
        return result
    target = Target(label, run.port, run.proc)
    guarded(target, "small requests", lambda: measure_small(procs, settings, target, c1=False))
    if bulk and target.alive():
        guarded(
            target,
            "download",
            lambda: measure_bulk(procs, settings, target, upload=False, extras=False),
        )
    stop_gateway(procs, run, target, None)
    return target.result


if __name__ == "__main__":
    sys.exit(main())
