"""A/B of the bulk path between gateway checkouts, on fresh gateway processes.

    python bench/ab_bulk.py [--op upload|download] [--gateways 5] [--tries 3]
                            [--size BYTES] CHECKOUT [CHECKOUT ...]

Each CHECKOUT is a directory holding a `gateway/` package (a clone or a
`git worktree` at another commit). For each of `--gateways` rounds: the best
of `--tries` direct transfers, then for each checkout in turn a fresh gateway
process, the best of `--tries` transfers through it, and the process stopped.
It prints every round and, per checkout, the median and the worst of its
gateways' best transfers as a ratio of the median direct one.

Why fresh processes: a gateway keeps one keep-alive connection to the
upstream, whose receive window the upstream's kernel autotunes once and
keeps, so the transfers through one process share one speed, and comparing
one process per variant compares those windows rather than the code.
Layout as bench/run.py: everything measured on CPU 0, this script on CPU 1.
Bounded: rounds x (1 + checkouts) x tries transfers, each with a deadline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from harness import GIB, Processes, pin_self, run_bulk_best, start_gateway, start_upstream

DEADLINE = 120.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--op", choices=("upload", "download"), default="upload")
    parser.add_argument("--gateways", type=int, default=5, help="fresh processes per checkout")
    parser.add_argument("--tries", type=int, default=3, help="transfers per process, best kept")
    parser.add_argument("--size", type=int, default=GIB)
    args = parser.parse_args()
    checkouts = [path.resolve() for path in args.checkouts]
    if len(set(checkouts)) != len(checkouts):
        parser.error("a checkout is named twice; copy it to compare it with itself")
    for path in checkouts:
        if not (path / "gateway" / "__init__.py").is_file():
            parser.error(f"{path} holds no gateway/ package")
    pin_self(True)
    direct: list[float] = []
    best: dict[Path, list[float]] = {path: [] for path in checkouts}
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-ab-") as tmpdir:
            tmp = Path(tmpdir)
            _, upstream_port = start_upstream(procs, tmp, True)
            for round_no in range(args.gateways):
                result = run_bulk_best(
                    procs, args.op, upstream_port, args.size, True, args.tries, deadline=DEADLINE
                )
                if not result.ok:
                    print(f"direct {args.op} failed: {result.error}", file=sys.stderr)
                    return 1
                direct.append(result.mb_per_s)
                line = [f"round {round_no}: direct {result.mb_per_s:6.0f}"]
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
                        result = run_bulk_best(
                            procs, args.op, gateway.port, args.size, True, args.tries,
                            deadline=DEADLINE,
                        )  # fmt: skip
                    finally:
                        procs.stop(gateway.proc)
                    if not result.ok:
                        print(f"{path} {args.op} failed: {result.error}", file=sys.stderr)
                        return 1
                    best[path].append(result.mb_per_s)
                    line.append(f"[{index}] {result.mb_per_s:6.0f}")
                print("  ".join(line), flush=True)
    finally:
        procs.close()
    middle = statistics.median(direct)
    print(f"\n{args.op}, MB/s: direct median {middle:,.0f}")
    for index, path in enumerate(checkouts):
        values = best[path]
        typical, worst = statistics.median(values), min(values)
        print(
            f"[{index}] {path}: median {typical:,.0f} ({typical / middle:.2f}x), "
            f"worst {worst:,.0f} ({worst / middle:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
