"""GPU benchmark on a host with NVIDIA GPUs: prints figures, asserts nothing.

    python3 bench/bench_gpu.py [--latency-runs 3] [--cpu-seconds 10] [--json-out FILE]

Figures:
- NVML inventory: ``NvmlInventory()`` (nvmlInit) and the first snapshot; then the poll cost,
  the mean of 50 snapshots divided by the GPU count (what the daemon pays per GPU every
  ``gpus.poll_interval_s``; process attribution through /proc included).
- Submit-to-start of a real GPU job (``examples/train_synthetic.py --epochs 1``) on an idle
  daemon with real NVML and default settings: ``submitted_at`` -> ``started_at`` (the daemon's
  own record: plan, claim, shim launched), -> the job process's start (from /proc), and -> the
  job's own first line (``GPUSCHED_SEES``, printed after ``import torch`` and CUDA init).
- The daemon's CPU (% of one core, from /proc/<pid>/stat) over ``--cpu-seconds`` while a GPU
  job runs and prints epochs, and, for comparison, with nothing running.

Every job gets NCCL_NVLS_ENABLE=0 (and the other NVLink-multicast switches) in its environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpusched.clock import parse_iso  # noqa: E402
from gpusched.gpus import NvmlInventory, job_of_pid  # noqa: E402
from gpusched.testing.harness import DaemonProcess, cpu_seconds, rss_mib, short_tmpdir  # noqa: E402

TRAIN = str(REPO / "examples" / "train_synthetic.py")
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
TERMINAL = {"succeeded", "failed", "cancelled", "lost"}




def nvml(snapshots: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    inv = NvmlInventory()
    t1 = time.perf_counter()
    first = inv.snapshot(job_of_pid)
    t2 = time.perf_counter()
    times = []
    for _ in range(snapshots):
        s = time.perf_counter()
        inv.snapshot(job_of_pid)
        times.append(time.perf_counter() - s)
    inv.close()
    n = len(first)
    mean = statistics.mean(times)
    out = {"gpus": n, "names": sorted({g.name for g in first}),
           "processes": sum(len(g.processes) for g in first),
           "init_ms": (t1 - t0) * 1000, "first_snapshot_ms": (t2 - t1) * 1000,
           "poll_mean_ms": mean * 1000, "poll_median_ms": statistics.median(times) * 1000,
           "poll_per_gpu_ms": mean * 1000 / max(n, 1)}
    print(f"NVML: {n} GPU(s) {', '.join(out['names'])}, {out['processes']} process(es) on them")
    print(f"  inventory: nvmlInit {out['init_ms']:.1f} ms, first snapshot "
          f"{out['first_snapshot_ms']:.1f} ms (total {out['init_ms'] + out['first_snapshot_ms']:.1f} ms)")
    print(f"  poll: mean {out['poll_mean_ms']:.2f} ms (median {out['poll_median_ms']:.2f}) over "
          f"{snapshots} snapshots = {out['poll_per_gpu_ms']:.2f} ms per GPU")
    return out


def _wait_job(d: DaemonProcess, jid: int, timeout: float) -> dict[str, Any]:
    c = d.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = c.get(f"/v1/jobs/{jid}")
        if j["status"] in TERMINAL:
            return dict(j)
        time.sleep(0.02)
    raise TimeoutError(f"job {jid} did not end in {timeout} s")


def _wait_idle(d: DaemonProcess, timeout: float = 60) -> None:
    """All GPUs released (the daemon frees a GPU at the NVML poll after the job's exit)."""
    c = d.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(g["state"] in ("idle", "foreign") for g in c.get("/v1/gpus")):
            return
        time.sleep(0.05)
    raise TimeoutError("GPUs not idle")


def _sees(log_path: str) -> dict[str, Any]:
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if line.startswith("GPUSCHED_SEES "):
            return dict(json.loads(line.split(" ", 1)[1]))
    raise RuntimeError(f"no GPUSCHED_SEES line in {log_path}")


def _spec(python: str, *args: str, name: str) -> dict[str, Any]:
    return {"command": [python, TRAIN, *args], "workdir": str(REPO), "name": name,
            "env": {**SAFE_ENV, "PATH": os.environ.get("PATH", "")}}


def latency(d: DaemonProcess, python: str, runs: int) -> dict[str, Any]:
    c = d.client()
    rows = []
    for i in range(runs):
        _wait_idle(d)
        t_send = time.time()
        jid = c.post("/v1/jobs", _spec(python, "--epochs", "1", "--steps", "5", name="bench-latency"))["id"]
        j = _wait_job(d, jid, 180)
        if j["status"] != "succeeded":
            raise RuntimeError(f"job {jid} {j['status']}: {j['reason']}")
        sub, start = parse_iso(j["submitted_at"]), parse_iso(j["started_at"])
        sees = _sees(j["log_path"])
        row = {"job": jid, "send_to_submitted_ms": (sub - t_send) * 1000,
               "submit_to_start_ms": (start - sub) * 1000,
               "submit_to_process_ms": ((sees["process_started"] - sub) * 1000
                                        if sees.get("process_started") else None),
               "submit_to_first_line_ms": (sees["time"] - sub) * 1000}
        rows.append(row)
        print(f"  run {i + 1} (job {jid}): submitted_at->started_at {row['submit_to_start_ms']:.1f} ms; "
              f"->job process start {row['submit_to_process_ms'] or float('nan'):.0f} ms; "
              f"->first line {row['submit_to_first_line_ms']:.0f} ms")

    def med(key: str) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.median(vals) if vals else None

    out = {"runs": rows, **{f"median_{k}": med(k) for k in
                            ("submit_to_start_ms", "submit_to_process_ms", "submit_to_first_line_ms")}}
    print(f"submit-to-start, GPU job, median of {runs}: daemon {out['median_submit_to_start_ms']:.1f} ms; "
          f"job process {out['median_submit_to_process_ms'] or float('nan'):.0f} ms; first line "
          f"(after import torch + CUDA init) {out['median_submit_to_first_line_ms']:.0f} ms")
    return out


def cpu(d: DaemonProcess, python: str, seconds: float) -> dict[str, Any]:
    assert d.proc is not None
    pid = d.proc.pid
    c = d.client()
    _wait_idle(d)
    time.sleep(1.0)
    c0, t0 = cpu_seconds(pid), time.time()
    time.sleep(seconds)
    idle = (cpu_seconds(pid) - c0) / (time.time() - t0) * 100

    jid = c.post("/v1/jobs", _spec(python, "--epochs", "1000", "--steps", "100", name="bench-cpu"))["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # running and printing epochs (progress is followed)
        j = c.get(f"/v1/jobs/{jid}")
        if j["status"] in TERMINAL:
            raise RuntimeError(f"job {jid} ended early: {j['status']} {j['reason']}")
        if j["status"] == "running" and (j.get("progress") or {}).get("epoch"):
            break
        time.sleep(0.2)
    c0, t0 = cpu_seconds(pid), time.time()
    time.sleep(seconds)
    busy = (cpu_seconds(pid) - c0) / (time.time() - t0) * 100
    j = c.get(f"/v1/jobs/{jid}")
    epoch = (j.get("progress") or {}).get("epoch")
    c.post(f"/v1/jobs/{jid}/cancel")
    _wait_job(d, jid, 60)
    out = {"idle_cpu_pct": idle, "busy_cpu_pct": busy, "rss_mib": rss_mib(pid),
           "seconds": seconds, "job_epoch_reached": epoch}
    print(f"daemon CPU over {seconds:.0f} s (% of one core): idle {idle:.2f}%, while a GPU job "
          f"runs {busy:.2f}% (job at epoch {epoch}); RSS {out['rss_mib']:.0f} MiB")
    return out


def _kill_tagged(tag: str) -> None:
    needle = f"GPUSCHED_BENCH_TAG={tag}".encode()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                if needle in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                    os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=50)
    ap.add_argument("--latency-runs", type=int, default=3)
    ap.add_argument("--cpu-seconds", type=float, default=10.0)
    ap.add_argument("--python", default=sys.executable, help="a Python that imports torch")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    print(f"gpusched GPU benchmark on {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}")
    result: dict[str, Any] = {"nvml": nvml(args.snapshots)}
    state = short_tmpdir("gsbgpu")
    SAFE_ENV["GPUSCHED_BENCH_TAG"] = state.name
    d = DaemonProcess(state, simulate=None, env={"GPUSCHED_DOCKER__ENABLED": "false"})
    try:
        d.start(timeout=60)
        result["latency"] = latency(d, args.python, args.latency_runs)
        result["cpu"] = cpu(d, args.python, args.cpu_seconds)
    except BaseException:
        print(f"--- daemon log ---\n{d.log()}")
        raise
    finally:
        _kill_tagged(state.name)
        d.stop()
        shutil.rmtree(state, ignore_errors=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
