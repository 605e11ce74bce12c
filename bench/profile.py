"""Where does the gateway's time go? py-spy under the 50-connection small-request load.

    python bench/profile.py [--seconds 15] [--layout split|shared|none] [--native] [--top 25]
    python bench/profile.py --collapsed FILE   # only re-aggregate an earlier recording

Starts the bench upstream and the gateway (same generated routes.toml as bench/run.py;
by default the gateway alone on CPU 0 and everything else on CPU 1, see --layout),
warms up, then runs `py-spy record --format raw --function` on the gateway process
while `wrk -t1 -c50` loads it, and prints:

- the top N functions by *self* samples (the frame on top of the stack),
- the top N functions by *inclusive* samples (anywhere on the stack, once per sample),
- self samples summed per source file.

The collapsed stacks are kept in bench/results/profile-<loop>.txt; open them in
https://www.speedscope.app or feed them to flamegraph.pl. py-spy runs on CPU 1 with
--nonblocking (the gateway is not paused to sample), unless --native (C frames of
uvloop/aiohttp's extensions) is asked for, which pauses it and slows it down ~3x.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path
from typing import Final

from harness import (
    BENCH_DIR,
    HOST,
    REPO_DIR,
    BenchError,
    Pin,
    Processes,
    pin_self,
    run_wrk,
    start_gateway,
    start_upstream,
)

PY_SPY: Final = shutil.which("py-spy") or "py-spy"
_LINE: Final = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FILE: Final = re.compile(r"\((?P<file>[^():]+)(?::\d+)?\)$")


def aggregate(text: str) -> tuple[int, Counter[str], Counter[str]]:
    """Collapsed stacks ("f1;f2;f3 COUNT" per line) -> total, self, inclusive counts."""
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match is None:
            continue
        count = int(match["count"])
        frames = match["stack"].split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):  # recursion counts once per sample
            inclusive[frame] += count
    return total, own, inclusive


def shorten(frame: str) -> str:
    """Trim site-packages / stdlib prefixes so the table stays readable."""
    for marker in ("site-packages/", "lib/python3", f"{REPO_DIR}/"):
        idx = frame.find(marker)
        if idx >= 0:
            start = frame.rfind("(", 0, idx) + 1
            rest = frame[idx + len(marker) :]
            if marker == "lib/python3":
                rest = "stdlib/" + rest.split("/", 1)[-1]
            frame = frame[:start] + rest
    return frame


def table(title: str, counts: Counter[str], total: int, top: int) -> str:
    lines = [f"## {title}", "", "| # | samples | % | function (file:first line) |"]
    lines.append("|---:|---:|---:|---|")
    for rank, (frame, count) in enumerate(counts.most_common(top), 1):
        pct = 100.0 * count / total if total else 0.0
        lines.append(f"| {rank} | {count} | {pct:.1f} | `{shorten(frame)}` |")
    return "\n".join(lines) + "\n"


def per_file(own: Counter[str]) -> Counter[str]:
    files: Counter[str] = Counter()
    for frame, count in own.items():
        match = _FILE.search(frame)
        files[shorten(f"({match['file']})")[1:-1] if match else frame] += count
    return files


def report(text: str, top: int) -> str:
    total, own, inclusive = aggregate(text)
    if not total:
        return "no samples recorded (is the gateway busy? is py-spy allowed to attach?)\n"
    out = [f"{total} samples (idle excluded)\n"]
    out.append(table(f"top {top} by self time", own, total, top))
    out.append(table(f"top {top} by inclusive time", inclusive, total, top))
    out.append(table("self time by file", per_file(own), total, 15))
    return "\n".join(out)


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=15, help="load/profile duration")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--path", default="/", help="request path (e.g. /policy/)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--lines", action="store_true", help="one entry per source line, not per function"
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--access-log", choices=("off", "json", "text"), default="off")
    parser.add_argument("--native", action="store_true", help="include C frames (pauses)")
    parser.add_argument(
        "--layout",
        choices=("split", "shared", "none"),
        default="split",
        help="split: gateway alone on CPU 0, upstream + wrk + py-spy on CPU 1 (default); "
        "shared: everything under test on CPU 0 as in run.py --pin; none: not pinned",
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--collapsed", type=Path, help="aggregate this file, record nothing")
    args = parser.parse_args()
    if args.collapsed is not None:
        print(report(args.collapsed.read_text(), args.top))
        return 0
    if not 1 <= args.seconds <= 120:
        parser.error("--seconds must be 1..120")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    # py-spy samples wall-clock time of a thread that is not idle, and a thread that is
    # runnable but preempted counts as busy. Sharing CPU 0 with wrk and the upstream,
    # the gateway is preempted inside send() each time it wakes one of them, so the
    # shared layout inflates aiohttp's StreamWriter._write several times over (perf
    # puts the whole kernel at ~21 % of the gateway's CPU, py-spy said 36 % in _write).
    # The split layout gives the gateway its own core, so busy ~ on-CPU.
    layouts: dict[str, tuple[Pin, Pin]] = {
        "split": ("0", "1"),
        "shared": (True, True),
        "none": (False, False),
    }
    gateway_pin, others_pin = layouts[args.layout]
    spy_cpu = pin_self(args.layout != "none")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    collapsed = args.out_dir / f"profile-{args.loop}.txt"
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-profile-") as tmpdir:
            tmp = Path(tmpdir)
            _, upstream_port = start_upstream(procs, tmp, others_pin)
            gateway = start_gateway(
                procs,
                tmp,
                upstream_port,
                label="profile",
                loop=args.loop,
                access_log=args.access_log,
                pin=gateway_pin,
                quiet=args.access_log != "off",
            )
            url = f"http://{HOST}:{gateway.port}{args.path}"
            run_wrk(procs, url, args.connections, 1, others_pin)  # warm-up
            spy = [PY_SPY, "record", "--pid", str(gateway.proc.pid), "--rate", str(args.rate)]
            spy += ["--duration", str(args.seconds + 2), "--format", "raw"]
            spy += [] if args.lines else ["--function"]
            spy += ["--output", str(collapsed)]
            spy += ["--native"] if args.native else ["--nonblocking"]
            print(f"py-spy on {spy_cpu}: {' '.join(spy)}", file=sys.stderr)
            spy_proc = procs.start("py-spy", spy, log_path=tmp / "py-spy.log")
            time.sleep(1.0)  # attach before the load starts
            if not spy_proc.alive():
                raise BenchError(f"py-spy exited early:\n{spy_proc.log_tail()}")
            pid = gateway.proc.pid
            result = run_wrk(procs, url, args.connections, args.seconds, others_pin, pid)
            print(
                f"layout {args.layout}: wrk -c{args.connections} -d{args.seconds}s {args.path}: "
                f"{result.rps:,.0f} req/s under the profiler, "
                f"{result.cpu_us_per_request or 0:.1f} CPU us/request, errors {result.errors}",
                file=sys.stderr,
            )
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy_proc.popen.wait(timeout=args.seconds + 30)  # bounded; stopped below anyway
            procs.stop(spy_proc)
            if not collapsed.exists():
                raise BenchError(f"py-spy wrote nothing:\n{spy_proc.log_tail()}")
    except KeyboardInterrupt:
        print("interrupted; stopping every child process", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"profile failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.close()
    print(report(collapsed.read_text(), args.top))
    print(f"collapsed stacks: {collapsed} (speedscope.app or flamegraph.pl)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
