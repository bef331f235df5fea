"""Slurm runner benchmark: submit-to-start latency through gpusched and Slurm. Prints figures,
asserts nothing.

    .venv/bin/python bench/bench_slurm.py [--samples 30] [--slurm-dir DIR]

Runs as root: it creates the test users (Slurm jobs never run as root), uses the one-node
Slurm of ``scripts/slurm-test`` in DIR (started, and stopped afterwards, when DIR is not given),
and a real daemon with the Slurm runner. One no-op 1-GPU job at a time on an idle cluster:
the job stamps its own start; the latency is from the daemon accepting the submission
(``submitted_at``) to that stamp, and from the moment the CLI was called (its start-up
included). Slurm's own figure on this kind of machine: sbatch to start, median 290 ms with
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0 (measured on a 2-core Debian 12 VM, Slurm 22.05).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpusched.clock import parse_iso
from gpusched.testing.harness import DaemonProcess, short_tmpdir
from gpusched.testing.users import as_user, real_users

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-test"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def figures(name: str, ms: list[float]) -> None:
    print(f"{name:44s} median {pct(ms, 50):7.0f} ms   p90 {pct(ms, 90):7.0f} ms   "
          f"min {min(ms):6.0f}   max {max(ms):6.0f}   (n={len(ms)})")


def run(conf: str, samples: int) -> None:
    with real_users() as users:
        state = short_tmpdir("gsbs")
        os.chmod(state, 0o755)
        d = DaemonProcess(state, env={"GPUSCHED_SLURM__ENABLED": "true",
                                      "GPUSCHED_SLURM__CONF": conf,
                                      "GPUSCHED_SLURM__INSTANCE": "bench"}).start()
        accepted, called = [], []
        try:
            for _ in range(samples):
                t0 = time.time()
                r = as_user(d, users["gsuser1"], "submit", "--runner", "slurm", "--gpus", "1",
                            "--", "sh", "-c", "date +%s.%N", cwd=Path("/tmp"))
                job = int(r.stdout)
                while (row := d.show(job))["status"] not in ("succeeded", "failed"):
                    time.sleep(0.02)
                stamp = float(Path(row["log_path"]).read_text().split()[0])
                accepted.append((stamp - parse_iso(row["submitted_at"])) * 1000)
                called.append((stamp - t0) * 1000)
        finally:
            d.stop()
            shutil.rmtree(state, ignore_errors=True)
        raw = sbatch_alone(conf, users["gsuser1"].pw_uid, samples)
    figures("daemon accepted -> job running (Slurm)", accepted)
    figures("`gpusched submit` called -> job running", called)
    figures("sbatch alone -> job running, same cluster now", raw)
    print("Slurm alone (measured before, 2-core VM, Slurm 22.05): sbatch -> start median "
          "290 ms (tuned scheduler)")


def sbatch_alone(conf: str, uid: int, samples: int) -> list[float]:
    """The same no-op job through sbatch directly, for the machine's load at the time."""
    env = {**os.environ, "SLURM_CONF": conf}
    out_dir = Path(tempfile.mkdtemp(prefix="gsbsr", dir="/tmp"))
    os.chmod(out_dir, 0o1777)
    ms = []
    try:
        for i in range(samples):
            out = out_dir / f"{i}.out"
            t0 = time.time()
            sid = subprocess.run(["sbatch", "--parsable", f"--uid={uid}", "--gpus=1",
                                  "--chdir=/tmp", f"--output={out}", "--wrap", "date +%s.%N"],
                                 env=env, check=True, capture_output=True, text=True).stdout
            while not out.exists() or not out.read_text().strip():
                time.sleep(0.01)
            ms.append((float(out.read_text().split()[0]) - t0) * 1000)
            # as for gpusched's jobs: the next one only once Slurm has this one COMPLETED
            while "COMPLETED" not in subprocess.run(
                    ["squeue", "-h", "-t", "all", "-j", sid.strip().split(";")[0], "-o", "%T"],
                    env=env, capture_output=True, text=True).stdout:
                time.sleep(0.02)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--slurm-dir", help="a Slurm that scripts/slurm-test start DIR started")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_slurm needs root (test users, sbatch --uid)")
    if a.slurm_dir:
        run(str(Path(a.slurm_dir) / "slurm.conf"), a.samples)
        return
    base = tempfile.mkdtemp(prefix="gsbsl", dir="/tmp")
    try:
        subprocess.run([str(SCRIPT), "start", base], check=True, capture_output=True)
        run(f"{base}/slurm.conf", a.samples)
    finally:
        subprocess.run([str(SCRIPT), "stop", base], capture_output=True)


if __name__ == "__main__":
    main()
