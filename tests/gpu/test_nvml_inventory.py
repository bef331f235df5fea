"""NvmlInventory against the real driver: it must agree with nvidia-smi and recognise a process
that holds GPU memory as foreign, or as a gpusched job's by its GPUSCHED_JOB_ID."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from gpusched.gpus import NvmlInventory, job_of_pid
from gpusched.models import Gpu, GpuProcess

pytestmark = pytest.mark.gpu

HOLD_GIB = 2
CHILD = f"""
import time, torch
x = torch.empty({HOLD_GIB} * 1024**3, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("ready", flush=True)
time.sleep(120)
"""


def test_snapshot_matches_nvidia_smi(inventory: NvmlInventory, nvidia_smi: str) -> None:
    out = subprocess.run(
        [
            nvidia_smi,
            "--query-gpu=index,uuid,name,memory.total,pci.bus_id",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows = [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]
    gpus = inventory.snapshot(job_of_pid)
    assert len(gpus) == len(rows)
    for gpu, (index, uuid, name, total, bus_id) in zip(gpus, rows, strict=True):
        assert gpu.health == "ok", gpu.health_reason
        assert gpu.index == int(index)
        assert gpu.uuid == uuid
        assert gpu.name == name
        assert gpu.memory_total_mib == int(total)
        assert (gpu.pci_bus_id or "").upper() == bus_id.upper()
        assert gpu.memory_used_mib + gpu.memory_free_mib <= gpu.memory_total_mib
        assert gpu.compute_capability is not None
        assert not gpu.simulated


def test_prior_speed_is_cuda_cores_times_max_sm_clock(inventory: NvmlInventory,
                                                      nvidia_smi: str) -> None:
    """The placement prior from the real driver: cores × the maximum SM clock (nvidia-smi
    prints the clock; the core count only NVML has), the same for every GPU of one model."""
    out = subprocess.run([nvidia_smi, "--query-gpu=uuid,clocks.max.sm", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    clocks = {u.strip(): int(c) for u, c in (line.split(",") for line in out.splitlines() if line.strip())}
    by_name: dict[str, set[float | None]] = {}
    for gpu in inventory.snapshot(job_of_pid):
        assert gpu.speed is not None and gpu.speed > 0, gpu
        cores = gpu.speed * 1e6 / clocks[gpu.uuid]
        assert 1000 <= cores <= 50000, cores  # speed is rounded to 3 decimals
        by_name.setdefault(gpu.name, set()).add(gpu.speed)
        print(f"{gpu.name}: speed prior {gpu.speed} = {round(cores)} cores x {clocks[gpu.uuid]} MHz")
    assert all(len(v) == 1 for v in by_name.values())


def _hold_memory(
    python: str, gpu: Gpu, job_id: str | None, children: list[subprocess.Popen[str]]
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "GPUSCHED_JOB_ID"}
    env["CUDA_VISIBLE_DEVICES"] = gpu.uuid  # cuda:0 is then exactly the GPU we look at
    if job_id is not None:
        env["GPUSCHED_JOB_ID"] = job_id
    child = subprocess.Popen([python, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True)
    children.append(child)  # the fixture ends it even if it never gets ready
    assert child.stdout is not None
    line = child.stdout.readline()  # pytest-timeout ends a child that never gets ready
    assert line.strip() == "ready", f"child exited {child.poll()} before allocating"
    return child


@pytest.fixture
def holder_factory() -> Iterator[list[subprocess.Popen[str]]]:
    children: list[subprocess.Popen[str]] = []
    yield children
    for child in children:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()


def _find(inventory: NvmlInventory, gpu_uuid: str, pid: int) -> GpuProcess:
    deadline = time.monotonic() + 15
    seen: list[GpuProcess] = []
    while time.monotonic() < deadline:
        (gpu,) = [g for g in inventory.snapshot(job_of_pid) if g.uuid == gpu_uuid]
        seen = gpu.processes
        for p in seen:
            if p.pid == pid:
                return p
        time.sleep(0.2)
    raise AssertionError(f"pid {pid} not among NVML's processes on {gpu_uuid}: {seen}")


@pytest.mark.parametrize(("job_id", "foreign"), [(None, True), ("7", False)])
def test_process_holding_memory_is_seen(
    inventory: NvmlInventory,
    torch_python: str,
    holder_factory: list[subprocess.Popen[str]],
    job_id: str | None,
    foreign: bool,
) -> None:
    gpu = inventory.snapshot(job_of_pid)[0]
    child = _hold_memory(torch_python, gpu, job_id, holder_factory)
    proc = _find(inventory, gpu.uuid, child.pid)
    assert proc.used_memory_mib is not None and proc.used_memory_mib >= HOLD_GIB * 1000
    assert proc.foreign is foreign
    assert proc.job_id == (None if job_id is None else int(job_id))
