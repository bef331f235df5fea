"""Multi-GPU acceptance (issue 8): needs a host with two or more NVIDIA GPUs and PyTorch with
NCCL; skipped, with the reason, everywhere else (CI, single-GPU hosts)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusched.testing.harness import DaemonProcess, short_tmpdir

ROOT = Path(__file__).resolve().parents[2]
ENV = {"GPUSCHED_DOCKER__ENABLED": "false", "NCCL_NVLS_ENABLE": "0",
       "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _gpu_count() -> int:
    try:
        from gpusched.gpus import NvmlInventory

        inv = NvmlInventory()
    except Exception:
        return 0
    try:
        return len(inv.snapshot(lambda pid: None))
    finally:
        inv.close()


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    if _gpu_count() < 2:
        pytest.skip("needs a host with at least two NVIDIA GPUs")
    pytest.importorskip("torch")
    state = short_tmpdir()
    d = DaemonProcess(state, simulate=None, env=ENV).start()
    yield d
    d.stop()
    shutil.rmtree(state, ignore_errors=True)


def submit(d: DaemonProcess, *args: str) -> int:
    r = d.cli("submit", "--env", "NCCL_NVLS_ENABLE=0", "--env",
              "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "--env", "NVSHMEM_DISABLE_NVLS=1", *args)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def show(d: DaemonProcess, job: int) -> dict[str, Any]:
    return json.loads(d.cli("show", str(job), "--json", check=True).stdout)


def wait(d: DaemonProcess, jobs: list[int], timeout: float = 300) -> None:
    r = d.cli("wait", *map(str, jobs), "--timeout", str(timeout), timeout=timeout + 30)
    assert r.returncode == 0, r.stdout + r.stderr + d.log()


def sees(d: DaemonProcess, job: int) -> list[dict[str, Any]]:
    out = d.cli("logs", str(job)).stdout
    return [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
            if line.startswith("GPUSCHED_SEES ")]


def test_two_gpu_ddp_job_sees_exactly_its_gpus_beside_one_gpu_jobs(daemon: DaemonProcess) -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        torchrun = shutil.which("torchrun") or "torchrun"
    ddp = submit(daemon, "--gpus", "2", "--name", "ddp", "--", torchrun, "--standalone",
                 "--nproc_per_node", "2", str(ROOT / "examples" / "train_ddp.py"),
                 "--epochs", "4")
    singles = [submit(daemon, "--name", f"single{i}", "--", sys.executable,
                      str(ROOT / "examples" / "train_synthetic.py"), "--epochs", "3")
               for i in range(_gpu_count() - 2)]
    wait(daemon, [ddp, *singles])
    j = show(daemon, ddp)
    assert len(set(j["gpus"])) == 2
    ranks = sees(daemon, ddp)
    assert len(ranks) == 2 and all(r["device_count"] == 2 for r in ranks)
    assert all(sorted(r["uuids"]) == sorted(j["gpus"]) for r in ranks)
    used = set(j["gpus"])
    for s in singles:
        g = show(daemon, s)["gpus"]
        assert len(g) == 1 and not used & set(g)


def test_all_or_nothing_with_one_gpu_busy(daemon: DaemonProcess) -> None:
    if _gpu_count() != 2:
        pytest.skip("the all-or-nothing check is written for exactly two GPUs")
    busy = submit(daemon, "--", "sleep", "8")
    while show(daemon, busy)["status"] != "running":
        time.sleep(0.1)
    pair = submit(daemon, "--gpus", "2", "--", "true")
    stream = [submit(daemon, "--", "sleep", "1") for _ in range(4)]
    time.sleep(2)
    assert show(daemon, pair)["status"] == "queued"
    wait(daemon, [busy, pair, *stream])
    started = {x: show(daemon, x)["started_at"] for x in [pair, *stream]}
    assert started[pair] <= min(started[x] for x in stream)


def test_epoch_timing_on_one_and_two_gpus(daemon: DaemonProcess) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    one = submit(daemon, "--gpus", "1", "--name", "ddp-bench", "--", torchrun, "--standalone",
                 "--nproc_per_node", "1", str(ROOT / "examples" / "train_ddp.py"),
                 "--epochs", "5", "--steps", "400")
    two = submit(daemon, "--gpus", "2", "--name", "ddp-bench", "--", torchrun, "--standalone",
                 "--nproc_per_node", "2", str(ROOT / "examples" / "train_ddp.py"),
                 "--epochs", "5", "--steps", "400")
    wait(daemon, [one, two])
    report = json.loads(daemon.cli("report", "throughput", "--format", "json",
                                   "--workload", "ddp-bench").stdout)
    counts = sorted(s["gpu_count"] for s in report["sets"])
    assert counts == [1, 2], report
    two_set = next(s for s in report["sets"] if s["gpu_count"] == 2)
    assert two_set["scaling_efficiency"] is not None
    print("multi-GPU throughput:", json.dumps(report["sets"], indent=1))
