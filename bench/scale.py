"""Scale-out benchmarks: the Redis store's cost and the limit's accuracy.

    python bench/scale.py redis     [--seconds 10]   # CPU/request and latency, local vs redis store
    python bench/scale.py accuracy  [--seconds 10]   # 200/s over two gateways sharing Redis
    python bench/scale.py accuracy --store workers   # 200/s over one gateway with 2 workers
    python bench/scale.py workers   [--seconds 10]   # small requests, workers = 1 vs 2

Layout (redis, accuracy): everything under test (gateway(s), upstream, redis-server, wrk) on
CPU 0 (`taskset -c 0`), the orchestrator on CPU 1, as bench/run.py does; so
req/s are "one core doing client + proxy + server + Redis", while CPU µs per
request (the gateway's process group only, from /proc) does not depend on the
layout. The machine is shared with other jobs: each result prints the share of
a core other processes used meanwhile. Needs wrk and redis-server.
`workers` runs unpinned instead (2 workers need both cores): wrk (-t1), the
upstream and the gateway processes share the 2 cores as the scheduler puts
them, and CPU per request sums the main process and every worker.
Everything on 127.0.0.1; every step bounded; children stopped on any exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    HOST,
    Processes,
    WrkResult,
    cpu_seconds,
    free_port,
    http_get,
    pin_prefix,
    pin_self,
    run_wrk,
    start_gateway,
    start_upstream,
)

REDIS = shutil.which("redis-server")


def start_redis(procs: Processes, tmp: Path) -> int:
    assert REDIS is not None, "redis-server is not installed"
    port = free_port()
    argv = [*pin_prefix(True), REDIS, "--port", str(port), "--bind", HOST, "--save", ""]
    procs.start("redis", [*argv, "--appendonly", "no"], log_path=tmp / "redis.log")
    deadline = time.monotonic() + 10.0
    import socket

    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def limited_toml(
    upstream_port: int, redis_port: int, store: str, rate: float, burst: int, workers: int = 1
) -> object:
    def toml(port: int, admin_port: int) -> str:
        return f"""
[server]
listen = ["{HOST}:{port}"]
admin = "{HOST}:{admin_port}"
access_log = "off"
drain_timeout = 2.0
workers = {workers}

[redis]
url = "redis://{HOST}:{redis_port}/0"
timeout = 0.05

[upstreams.bench]
targets = ["http://{HOST}:{upstream_port}"]

[[routes]]
name = "limited"
path = "/"
upstream = "bench"

[routes.rate_limit]
rate = {rate}
burst = {burst}
key = "route"
store = "{store}"
"""

    return toml


def row(name: str, result: WrkResult) -> str:
    cpu = result.cpu_us_per_request
    return (
        f"| {name} | {result.connections} | {result.rps:,.0f} | "
        f"{'-' if cpu is None else f'{cpu:.0f}'} | {result.p50_us:.0f} | {result.p99_us:.0f} | "
        f"{result.non_2xx + result.socket_errors} | {result.others_share:.2f} |"
    )


def bench_redis(procs: Processes, tmp: Path, seconds: int) -> None:
    _, upstream_port = start_upstream(procs, tmp, True)
    redis_port = start_redis(procs, tmp)
    print("| store | conns | req/s | gateway CPU µs/req | p50 µs | p99 µs | errors | others' CPU |")
    print("|---|---|---|---|---|---|---|---|")
    results: dict[str, dict[int, WrkResult]] = {}
    for store in ("local", "redis"):
        toml = limited_toml(upstream_port, redis_port, store, 1e9, 1_000_000_000)
        gw = start_gateway(
            procs,
            tmp,
            upstream_port,
            label=store,
            loop="uvloop",
            access_log="off",
            pin=True,
            toml=toml,  # type: ignore[arg-type]
        )
        results[store] = {}
        for conns in (1, 16):
            run_wrk(procs, f"http://{HOST}:{gw.port}/", conns, 2, True)  # warm-up
            result = run_wrk(
                procs, f"http://{HOST}:{gw.port}/", conns, seconds, True, cpu_pgid=gw.proc.pid
            )
            results[store][conns] = result
            print(row(store, result), flush=True)
        procs.stop(gw.proc)
    local, redis = results["local"], results["redis"]
    added_cpu = (redis[16].cpu_us_per_request or 0) - (local[16].cpu_us_per_request or 0)
    added_p50 = redis[1].p50_us - local[1].p50_us
    print(f"\nadded gateway CPU per request (16 conns): {added_cpu:.1f} µs")
    print(f"added p50 latency at 1 connection: {added_p50:.0f} µs")


def store_errors(admin_port: int) -> int:
    _, body = http_get(admin_port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith("gateway_ratelimit_store_errors_total "):
            return int(float(line.split()[1]))
    return 0


def admitted(admin_port: int) -> int:
    status, body = http_get(admin_port, "/metrics")
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("gateway_requests_total{") and 'code="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def bench_accuracy(procs: Processes, tmp: Path, seconds: int, burst: int, store: str) -> None:
    import threading

    _, upstream_port = start_upstream(procs, tmp, True)
    redis_port = start_redis(procs, tmp)
    rate = 200.0
    workers = 2 if store == "workers" else 1
    store = "local" if store == "workers" else store
    toml = limited_toml(upstream_port, redis_port, store, rate, burst, workers)
    gws = []
    for i in range(2 if store == "redis" else 1):
        gws.append(
            start_gateway(
                procs,
                tmp,
                upstream_port,
                label=f"acc{i}",
                loop="uvloop",
                access_log="off",
                pin=True,
                toml=toml,  # type: ignore[arg-type]
            )
        )
    results: list[WrkResult] = []

    def load(port: int) -> None:
        results.append(run_wrk(procs, f"http://{HOST}:{port}/", 8, seconds, True))

    threads = [threading.Thread(target=load, args=(gw.port,)) for gw in gws]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 60)
    counts = [admitted(gw.admin_port) for gw in gws]
    total = sum(counts)
    measured = sum(r.seconds for r in results) / max(1, len(results))
    expected = burst + rate * measured
    print(
        json.dumps(
            {
                "store": store,
                "workers": workers,
                "gateways": len(gws),
                "rate": rate,
                "burst": burst,
                "seconds": round(measured, 3),
                "admitted_per_gateway": counts,
                "admitted": total,
                "expected": round(expected),
                "error_pct": round((total - expected) / expected * 100, 2),
                "offered": sum(r.requests for r in results),
                "store_errors": [store_errors(gw.admin_port) for gw in gws],
                "others_cpu_share": [round(r.others_share, 2) for r in results],
            },
            indent=2,
        )
    )


def family(pid: int) -> list[int]:
    """`pid` and its descendants (workers run in sessions of their own)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(text[text.rindex(")") + 2 :].split()[1])
    found, frontier = [pid], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def bench_workers(procs: Processes, tmp: Path, seconds: int) -> None:
    _, upstream_port = start_upstream(procs, tmp, False)
    print(
        "| workers | conns | req/s | gateway CPU µs/req | p50 µs | p99 µs | errors | others' CPU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for workers, path in ((1, "/"), (2, "/"), (1, "/limited"), (2, "/limited")):

        def toml(port: int, admin_port: int, workers: int = workers) -> str:
            return f"""
[server]
listen = ["{HOST}:{port}"]
admin = "{HOST}:{admin_port}"
access_log = "off"
drain_timeout = 2.0
workers = {workers}

[upstreams.bench]
targets = ["http://{HOST}:{upstream_port}"]

[[routes]]
name = "root"
path = "/"
upstream = "bench"

[[routes]]
name = "limited"
path = "/limited"
upstream = "bench"
strip_prefix = true

[routes.rate_limit]
rate = 1e9
burst = 1000000000
key = "client_ip"
"""

        gw = start_gateway(
            procs, tmp, upstream_port, label=f"w{workers}", loop="uvloop", access_log="off",
            pin=False, toml=toml,
        )  # fmt: skip
        url = f"http://{HOST}:{gw.port}{path}"
        run_wrk(procs, url, 64, 2, False)  # warm-up
        pids = family(gw.proc.pid)
        before = cpu_seconds(pids)
        result = run_wrk(procs, url, 64, seconds, False)
        result.cpu_s = cpu_seconds(pids) - before
        print(row(f"{workers} `{path}`", result), flush=True)
        procs.stop(gw.proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("redis", "accuracy", "workers"))
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--burst", type=int, default=20, help="accuracy: the bucket size")
    parser.add_argument(
        "--store", choices=("redis", "local", "workers"), default="redis",
        help="accuracy: two gateways on Redis, one on its local bucket, or one with 2 workers",
    )  # fmt: skip
    args = parser.parse_args()
    if REDIS is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    pin_self(True)
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-scale-") as tmpdir:
            tmp = Path(tmpdir)
            if args.what == "redis":
                bench_redis(procs, tmp, args.seconds)
            elif args.what == "workers":
                bench_workers(procs, tmp, args.seconds)
            else:
                bench_accuracy(procs, tmp, args.seconds, args.burst, args.store)
    finally:
        procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
