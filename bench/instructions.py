"""Instructions per request, counted by valgrind: an A/B that noise cannot move.

    python bench/instructions.py [--requests 1000] [--path /] CHECKOUT [CHECKOUT ...]

Each CHECKOUT is a directory holding a `gateway/` package (e.g. `git archive
REV | tar -x -C DIR`). For each, a gateway process (uvloop, access log off, the
routes of bench/run.py) runs under `valgrind --tool=callgrind` with counting off;
one keep-alive client connection sends 300 warm-up requests, then counting is
switched on (`callgrind_control -i on`) for `--requests` more and off again.
The count is the user-space instructions the gateway process executed per
request (the kernel's part, two reads and two writes a request, is not in it).

Why: CPU microseconds per request (ab_small.py, run.py) move by 10-30 % from
run to run on a shared virtual machine, more than most changes to the request
path; this count repeats to 0.1 % whatever else runs on the host, so every
change can be measured on its own. It ranks changes, not wall time: a cache
miss costs more than an add, and a syscall counts nothing here.

Needs valgrind (Debian package `valgrind`). Each checkout takes about 30 s.
Bounded: one process per checkout, every request with a timeout.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from harness import HOST, Processes, start_gateway, start_upstream

WARM_UP: Final = 300
_TOTALS: Final = re.compile(rb"^totals:\s*(\d+)", re.M)


def count(
    procs: Processes,
    tmp: Path,
    upstream_port: int,
    source: Path,
    label: str,
    requests: int,
    path: str,
) -> float:
    """User-space instructions per request of a gateway importing `source`."""
    out = tmp / f"callgrind-{label}.out"
    callgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    gateway = start_gateway(
        procs,
        tmp,
        upstream_port,
        label=label,
        loop="uvloop",
        access_log="off",
        pin=False,
        source=source,
        wrap=[*callgrind, f"--callgrind-out-file={out}"],
        ready_timeout=300.0,
    )
    proc = gateway.proc
    try:
        conn = http.client.HTTPConnection(HOST, gateway.port, timeout=60.0)

        def send(n: int) -> None:
            for _ in range(n):
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise SystemExit(f"{source}: {path} answered {response.status}")

        send(WARM_UP)
        control = ["callgrind_control"]
        subprocess.run(
            [*control, "-i", "on", str(proc.pid)], check=True, capture_output=True, timeout=60
        )
        send(requests)
        subprocess.run(
            [*control, "-i", "off", str(proc.pid)], check=True, capture_output=True, timeout=60
        )
        conn.close()
    finally:
        procs.stop(proc)  # callgrind writes its totals as the process exits
    total = 0
    deadline = time.monotonic() + 30.0
    while not total and time.monotonic() < deadline:
        for dump in tmp.glob(f"callgrind-{label}.out*"):
            match = _TOTALS.search(dump.read_bytes())
            if match:
                total += int(match.group(1))
        if not total:
            time.sleep(0.5)
    if not total:
        raise SystemExit(f"{source}: callgrind wrote no totals (see {tmp})")
    return total / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--path", default="/")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("needs valgrind (apt install valgrind)")
    checkouts = [path.resolve() for path in args.checkouts]
    for path in checkouts:
        if not (path / "gateway" / "__init__.py").is_file():
            parser.error(f"{path} holds no gateway/ package")
    procs = Processes()
    results: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-instructions-") as tmpdir:
            tmp = Path(tmpdir)
            _, upstream_port = start_upstream(procs, tmp, False)
            for index, path in enumerate(checkouts):
                per_request = count(
                    procs, tmp, upstream_port, path, str(index), args.requests, args.path
                )
                results.append(per_request)
                print(
                    f"[{index}] {path}: {per_request:,.0f} instructions/request "
                    f"({per_request / results[0] - 1:+.1%})",
                    flush=True,
                )
    finally:
        procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
