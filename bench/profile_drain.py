"""Where a drain's time goes inside the daemon: section 1 of bench_perf.py (N no-op 1-GPU jobs
behind a 2-GPU blocker on 2 simulated GPUs, then released) with py-spy sampling the real daemon
process, and the samples summed two ways: by function (inclusive), and by the last gpusched
frame with the leaf it was in (self time). Prints figures, asserts nothing.

    .venv/bin/pip install py-spy      # not a dependency of gpusched: only this script needs it
    .venv/bin/python bench/profile_drain.py [--jobs 900] [--rate 400] [--top 40] [--raw FILE]

The same command with ``--floor`` samples bench/floor_loop.py instead (the least a durable
Python scheduler does per job), for a side-by-side of the same operations. py-spy samples only
threads that run (not those waiting on a poll or a lock); on this kind of VM file creation and
fsync cost more after many recent deletions, so compare figures from one run.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_perf  # this folder, after the path above


def py_spy() -> str:
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy, then run this again")
    return exe


def summarize(raw: Path, top: int, mine: str) -> None:
    """Print the collapsed stacks in ``raw`` by function and by (last ``mine`` frame, leaf)."""
    total, inclusive, leaf = 0, collections.Counter[str](), collections.Counter[str]()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        for name in {re.sub(r":\d+\)$", ")", f) for f in frames[1:]}:
            inclusive[name] += n
        own = [f for f in frames if mine in f]
        leaf[f"{own[-1] if own else '-'}  <- {frames[-1]}"] += n
    if not total:
        print("no samples (the process ended before py-spy attached?)")
        return
    print(f"\n{total} samples")
    for title, counts in (("by function, inclusive", inclusive),
                          (f"by last {mine} frame <- leaf (self time)", leaf)):
        print(f"\n== {title}")
        # the frames under everything (the CLI, the service loop) say nothing: left out
        shown = [(name, n) for name, n in counts.most_common() if n < 0.9 * total][:top]
        for name, n in shown:
            print(f"{n:7d} {100 * n / total:5.1f}%  {name}")


def profile_daemon(jobs: int, rate: int, raw: Path) -> None:
    b = bench_perf.Bench().start()
    try:
        blocker = b.blocker("2")
        b.prefill(jobs, "1")
        time.sleep(1.5)  # planned (and waiting) before the release, as in bench_perf
        spy = subprocess.Popen([py_spy(), "record", "--pid", str(b.pid), "-r", str(rate), "-f",
                                "raw", "-o", str(raw), "--threads", "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached
        cpu0, t0 = b.cpu(), time.time()
        b.c.post(f"/v1/jobs/{blocker}/cancel")
        while b.active() > 0:
            time.sleep(0.01)
        wall, cpu = time.time() - t0, b.cpu() - cpu0
        spy.send_signal(2)  # py-spy writes its file on SIGINT
        spy.wait(timeout=60)
        print(f"gpusched: {jobs / wall:.0f} jobs/s under py-spy ({wall:.1f} s), daemon CPU "
              f"{cpu / jobs * 1000:.2f} ms/job")
    finally:
        b.close()


def profile_floor(jobs: int, rate: int, raw: Path) -> None:
    state = tempfile.mkdtemp(prefix="gsfloor", dir="/tmp")
    bench_perf.remove_later(Path(state))  # by close_all, after the profile (see bench_perf)
    out = subprocess.run([py_spy(), "record", "-r", str(rate), "-f", "raw", "-o", str(raw),
                          "--", sys.executable, str(Path(__file__).with_name("floor_loop.py")),
                          str(jobs), state], capture_output=True, text=True, check=True)
    print("floor:", out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=900)
    ap.add_argument("--rate", type=int, default=400, help="samples per second")
    ap.add_argument("--top", type=int, default=40, help="lines per table")
    ap.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks in this file")
    ap.add_argument("--floor", action="store_true", help="profile bench/floor_loop.py instead")
    args = ap.parse_args()
    try:
        run(args)
    finally:
        bench_perf.close_all()  # daemons stopped, state folders removed once all is done
    return 0


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="gsprof") as tmp:
        raw = args.raw or Path(tmp) / "stacks.txt"
        if args.floor:
            profile_floor(args.jobs, args.rate, raw)
            summarize(raw, args.top, "floor_loop")
        else:
            profile_daemon(args.jobs, args.rate, raw)
            summarize(raw, args.top, "gpusched/")


if __name__ == "__main__":
    sys.exit(main())
