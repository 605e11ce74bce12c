"""CPU seconds per GiB of a bulk transfer, per process: direct vs through fresh gateways.

    python bench/upload_cpu.py [--op upload|download] [--gateways 3] [--tries 3]
                               [--size BYTES] CHECKOUT [CHECKOUT ...]

On one shared core, wall-clock MB/s scatters with whatever else runs (other
processes took 35-60 % of CPU 0 in bench/run.py's upload rows while this was
written). The CPU time each process of the path spends per GiB scatters much
less, and on one core the sum bounds the ratio: gateway MB/s / direct MB/s
cannot beat direct CPU s/GiB / gateway-path CPU s/GiB. This prints, per
transfer, the client's CPU (the bulk client's rusage), the upstream's and the
gateway's (utime+stime from /proc, 10 ms ticks), and per path the medians.

Layout as bench/ab_bulk.py: a fresh gateway per round and checkout, all on
CPU 0, this script on CPU 1. Bounded: rounds x (1 + checkouts) x tries
transfers, each with a deadline.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import (
    GIB,
    Processes,
    cpu_seconds,
    group_pids,
    pin_self,
    run_bulk,
    start_gateway,
    start_upstream,
)

DEADLINE = 120.0


@dataclass
class Sample:
    mb_per_s: float
    client: float
    gateway: float
    upstream: float

    @property
    def total(self) -> float:
        return self.client + self.gateway + self.upstream


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _one(
    procs: Processes, op: str, port: int, size: int, upstream_pgid: int, gateway_pgid: int | None
) -> Sample:
    up_pids = group_pids(upstream_pgid)
    gw_pids = group_pids(gateway_pgid) if gateway_pgid is not None else []
    up0, gw0, cl0 = cpu_seconds(up_pids), cpu_seconds(gw_pids), _children_cpu()
    result = run_bulk(procs, op, port, size, True, deadline=DEADLINE)
    if not result.ok:
        raise SystemExit(f"{op} via port {port} failed: {result.error}")
    per_gib = GIB / size
    return Sample(
        result.mb_per_s,
        (_children_cpu() - cl0) * per_gib,
        (cpu_seconds(gw_pids) - gw0) * per_gib,
        (cpu_seconds(up_pids) - up0) * per_gib,
    )


def _summary(name: str, samples: list[Sample], direct_mb: float, direct_cpu: float) -> str:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    mb = med([s.mb_per_s for s in samples])
    total = med([s.total for s in samples])
    return (
        f"{name}: n={len(samples)}, MB/s median {mb:,.0f} ({mb / direct_mb:.2f}x), "
        f"CPU s/GiB client {med([s.client for s in samples]):.3f} "
        f"gateway {med([s.gateway for s in samples]):.3f} "
        f"upstream {med([s.upstream for s in samples]):.3f} "
        f"total {total:.3f} (one-core bound {direct_cpu / total:.2f}x)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--op", choices=("upload", "download"), default="upload")
    parser.add_argument("--gateways", type=int, default=3, help="fresh processes per checkout")
    parser.add_argument("--tries", type=int, default=3, help="transfers per process")
    parser.add_argument("--size", type=int, default=GIB)
    args = parser.parse_args()
    if not 1 <= args.gateways <= 50 or not 1 <= args.tries <= 20 or args.size < 1:
        parser.error("--gateways 1..50, --tries 1..20, --size >= 1")
    checkouts = [path.resolve() for path in args.checkouts]
    for path in checkouts:
        if not (path / "gateway" / "__init__.py").is_file():
            parser.error(f"{path} holds no gateway/ package")
    pin_self(True)
    samples: dict[str, list[Sample]] = {"direct": []}
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-cpu-") as tmpdir:
            tmp = Path(tmpdir)
            upstream, upstream_port = start_upstream(procs, tmp, True)
            upstream_pgid = upstream.pid
            for round_no in range(args.gateways):
                for _ in range(args.tries):
                    sample = _one(procs, args.op, upstream_port, args.size, upstream_pgid, None)
                    samples["direct"].append(sample)
                for index, path in enumerate(checkouts):
                    gateway = start_gateway(
                        procs,
                        tmp,
                        upstream_port,
                        label=f"{round_no}-{index}",
                        loop="uvloop",
                        access_log="off",
                        pin=True,
                        source=path,
                    )
                    try:
                        for _ in range(args.tries):
                            sample = _one(
                                procs, args.op, gateway.port, args.size, upstream_pgid,
                                gateway.proc.pid,
                            )  # fmt: skip
                            samples.setdefault(f"[{index}] {path}", []).append(sample)
                            print(
                                f"round {round_no} [{index}]: {sample.mb_per_s:6.0f} MB/s, "
                                f"CPU s/GiB gateway {sample.gateway:.2f} total {sample.total:.2f}",
                                flush=True,
                            )
                    finally:
                        procs.stop(gateway.proc)
    finally:
        procs.close()
    direct = samples["direct"]
    direct_mb = statistics.median(s.mb_per_s for s in direct)
    direct_cpu = statistics.median(s.total for s in direct)
    print()
    for name, values in samples.items():
        print(_summary(name, values, direct_mb, direct_cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
