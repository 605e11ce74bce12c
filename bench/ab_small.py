"""A/B of small requests between gateway checkouts: CPU per request, fresh processes.

    python bench/ab_small.py [--rounds 5] [--seconds 5] [--connections 16]
                             [--path /] CHECKOUT [CHECKOUT ...]

Each CHECKOUT is a directory holding a `gateway/` package (e.g. `git archive
REV | tar -x -C DIR`). For each of `--rounds` rounds, each checkout in turn
gets a fresh gateway process (uvloop, access log off), `wrk -t1 -cN -dS`
against it, and the gateway's CPU seconds over the run (its process group,
from /proc) divided by the requests served: CPU microseconds per request,
the number that does not depend on how fast wrk and the upstream are. It
prints every round and, per checkout, the median over rounds and its ratio
to the first checkout's median. The order of checkouts rotates per round so
that neither always runs first on a warm (or cold) machine.

Made to measure the dashboard's per-request bookkeeping (gateway/state/stats.py)
against the same code without it; see docs/operator-tools.md for the numbers.
Layout as bench/run.py: everything measured on CPU 0, this script on CPU 1.
Bounded: rounds x checkouts wrk runs, each with its own deadline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from harness import Processes, pin_self, run_wrk, start_gateway, start_upstream


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--path", default="/")
    args = parser.parse_args()
    checkouts = [path.resolve() for path in args.checkouts]
    for path in checkouts:
        if not (path / "gateway" / "__init__.py").is_file():
            parser.error(f"{path} holds no gateway/ package")
    pin_self(True)
    cpu_us: dict[Path, list[float]] = {path: [] for path in checkouts}
    rps: dict[Path, list[float]] = {path: [] for path in checkouts}
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-ab-small-") as tmpdir:
            tmp = Path(tmpdir)
            _, upstream_port = start_upstream(procs, tmp, True)
            for round_no in range(args.rounds):
                line = [f"round {round_no}:"]
                shift = round_no % len(checkouts)
                order = checkouts[shift:] + checkouts[:shift]
                for path in order:
                    index = checkouts.index(path)
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
                        url = f"http://127.0.0.1:{gateway.port}{args.path}"
                        result = run_wrk(
                            procs, url, args.connections, args.seconds, True, gateway.proc.pid
                        )
                    finally:
                        procs.stop(gateway.proc)
                    per_request = result.cpu_us_per_request
                    if result.failed or per_request is None or result.errors:
                        print(f"{path}: wrk failed: {result.failed}", file=sys.stderr)
                        return 1
                    cpu_us[path].append(per_request)
                    rps[path].append(result.rps)
                    line.append(f"[{index}] {per_request:6.1f} us/req {result.rps:8.0f} req/s")
                print("  ".join(line), flush=True)
    finally:
        procs.close()
    base = statistics.median(cpu_us[checkouts[0]])
    print("\nCPU per request (median over rounds):")
    for index, path in enumerate(checkouts):
        middle = statistics.median(cpu_us[path])
        print(
            f"[{index}] {path}: {middle:.1f} us/req ({(middle / base - 1) * 100:+.1f} %), "
            f"{statistics.median(rps[path]):,.0f} req/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
