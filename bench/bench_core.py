"""Core benchmark: prints figures, asserts nothing (timing goals are read, not unit-tested).

    .venv/bin/python bench/bench_core.py [--jobs 2000] [--latency-samples 100]

Figures: submit-to-start latency on an idle daemon (p50, p99), drain throughput of no-op 1-GPU
jobs on 2 simulated GPUs, wall time of one `gpusched submit` CLI call, idle daemon CPU and RSS.
Targets (issue 2): p50 < 10 ms, drain > 300 jobs/s, submit < 150 ms, idle CPU < 1% of a core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpusched.models import JobSpec
from gpusched.store import Store
from gpusched.testing.harness import DaemonProcess, cpu_seconds, rss_mib, short_tmpdir


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]




def latency(d: DaemonProcess, samples: int) -> None:
    """Submit one no-op job at a time on an idle daemon; the job stamps its own start."""
    c = d.client()
    sched, proc = [], []
    for _ in range(samples):
        t0 = time.time()
        job = c.post("/v1/jobs", {"command": ["sh", "-c", "date +%s.%N"], "workdir": "/tmp"})
        jid = job["id"]
        while True:
            j = c.get(f"/v1/jobs/{jid}")
            if j["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.002)
        from gpusched.clock import parse_iso

        sched.append((parse_iso(j["started_at"]) - parse_iso(j["submitted_at"])) * 1000)
        stamp = float(Path(j["log_path"]).read_text().strip())
        proc.append((stamp - t0) * 1000)
    print(f"submit-to-start (daemon: submitted_at -> launched), {samples} jobs: "
          f"p50 {pct(sched, 50):.1f} ms, p99 {pct(sched, 99):.1f} ms")
    print(f"submit-to-first-instruction (client send -> job's own clock): "
          f"p50 {pct(proc, 50):.1f} ms, p99 {pct(proc, 99):.1f} ms")


def drain(n: int) -> None:
    state = short_tmpdir("gsbench")
    try:
        store = Store(state / "gpusched.db")
        spec = JobSpec(command=["true"], workdir="/tmp")
        for _ in range(n):
            store.submit(spec, owner_uid=os.getuid(), owner="bench", now=time.time())
        store.close()
        t0 = time.time()
        d = DaemonProcess(state, args=["--once"])
        d.start()
        assert d.proc is not None
        rc = d.proc.wait(600)
        wall = time.time() - t0
        store = Store(state / "gpusched.db")
        rows = store.query("SELECT min(started_at) AS a, max(ended_at) AS b, count(*) AS n,"
                           " sum(status = 'succeeded') AS ok FROM jobs")[0]
        store.close()
        span = rows["b"] - rows["a"]
        print(f"drain: {rows['ok']}/{rows['n']} no-op 1-GPU jobs on 2 simulated GPUs in "
              f"{span:.2f} s (first start to last end) = {rows['n'] / span:.0f} jobs/s; "
              f"daemon wall incl. start-up {wall:.2f} s, exit {rc}")
    finally:
        shutil.rmtree(state, ignore_errors=True)


def cli_submit(d: DaemonProcess, runs: int) -> None:
    exe = shutil.which("gpusched", path=str(Path(sys.executable).parent)) or "gpusched"
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([exe, "submit", "--hold", "--", "true"], env=d.env, check=True,
                       capture_output=True)
        times.append((time.perf_counter() - t0) * 1000)
    print(f"`gpusched submit` wall, {runs} calls: median {statistics.median(times):.0f} ms, "
          f"min {min(times):.0f} ms, max {max(times):.0f} ms")


def idle(d: DaemonProcess, seconds: float) -> None:
    assert d.proc is not None
    pid = d.proc.pid
    time.sleep(1.0)
    c0, t0 = cpu_seconds(pid), time.time()
    time.sleep(seconds)
    c1, t1 = cpu_seconds(pid), time.time()
    print(f"idle daemon over {seconds:.0f} s: CPU {(c1 - c0) / (t1 - t0) * 100:.2f}% of a core, "
          f"RSS {rss_mib(pid):.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--latency-samples", type=int, default=100)
    ap.add_argument("--cli-runs", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    args = ap.parse_args()
    print(f"gpusched core benchmark on {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}")
    state = short_tmpdir("gsbench")
    d = DaemonProcess(state)
    try:
        d.start()
        idle(d, args.idle_seconds)
        latency(d, args.latency_samples)
        cli_submit(d, args.cli_runs)
    finally:
        d.stop()
        shutil.rmtree(state, ignore_errors=True)
    drain(args.jobs)


if __name__ == "__main__":
    main()
