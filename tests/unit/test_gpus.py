"""The GPU inventory without a GPU: the simulated list, NVML through FakeNvml, job_of_pid."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gpusched import gpus
from gpusched.errors import ConfigError, NvmlUnavailable
from gpusched.gpus import (
    NvmlInventory,
    SimulatedInventory,
    job_of_pid,
    open_inventory,
    parse_simulated,
)
from gpusched.testing.fake_nvml import (
    FakeDevice,
    FakeNvml,
    NVMLError_GpuIsLost,
    NVMLError_LibraryNotFound,
    NVMLError_NoPermission,
    NVMLError_Unknown,
)

H200 = "GPU-11111111-2222-3333-4444-555555555555"
A4000 = "GPU-66666666-7777-8888-9999-000000000000"


def no_jobs(pid: int) -> int | None:
    return None


# -- parse_simulated ----------------------------------------------------------------------------


def test_parse_simulated_names_with_spaces_and_units() -> None:
    assert parse_simulated("RTX A4000:16G,RTX 2070:8G") == [
        ("RTX A4000", 16384),
        ("RTX 2070", 8192),
    ]
    assert parse_simulated(" NVIDIA H200 : 141GiB ") == [("NVIDIA H200", 141 * 1024)]
    assert parse_simulated("tiny:512M,bare:2048") == [("tiny", 512), ("bare", 2048)]


@pytest.mark.parametrize(
    "spec",
    ["", " ", "RTX A4000", "RTX A4000:", ":16G", "A:16G,,B:8G", "A:lots", "A:0", "A:16G,"],
)
def test_parse_simulated_rejects_bad_specs_showing_the_syntax(spec: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_simulated(spec)
    assert "NAME:SIZE" in exc.value.message
    assert "RTX A4000:16G,RTX 2070:8G" in exc.value.message


# -- SimulatedInventory -------------------------------------------------------------------------


def test_simulated_uuids_are_stable_across_restarts() -> None:
    a = SimulatedInventory("RTX A4000:16G,RTX 2070:8G").snapshot(no_jobs)
    b = SimulatedInventory("RTX A4000:16G,RTX 2070:8G").snapshot(no_jobs)
    assert [g.uuid for g in a] == [g.uuid for g in b]
    assert len({g.uuid for g in a}) == 2
    assert all(g.uuid.startswith("GPU-") for g in a)
    # Same name at another index is another GPU.
    twins = SimulatedInventory("X:1G,X:1G").snapshot(no_jobs)
    assert twins[0].uuid != twins[1].uuid


def test_simulated_snapshot_fields() -> None:
    inv = SimulatedInventory("RTX A4000:16G,RTX 2070:8G")
    assert inv.simulated is True
    g0, g1 = inv.snapshot(no_jobs)
    assert (g0.index, g0.name, g0.memory_total_mib, g0.memory_free_mib) == (
        0,
        "RTX A4000",
        16384,
        16384,
    )
    assert (g1.index, g1.name, g1.memory_total_mib) == (1, "RTX 2070", 8192)
    assert g0.pci_bus_id == "00000000:01:00.0" and g1.pci_bus_id == "00000000:02:00.0"
    assert (g0.memory_used_mib, g0.utilization_pct, g0.temperature_c, g0.power_w) == (
        0,
        0,
        35,
        20.0,
    )
    assert g0.simulated and g0.health == "ok" and g0.processes == []
    inv.close()


def test_simulated_foreign_process_and_health_injection() -> None:
    inv = SimulatedInventory("RTX A4000:16G,RTX 2070:8G")
    u0, u1 = inv.uuids
    inv.set_foreign(u0, 3000)
    inv.set_health(u1, "lost", "fell off the bus")
    g0, g1 = inv.snapshot(no_jobs)
    assert g0.memory_used_mib == 3000 and g0.memory_free_mib == 16384 - 3000
    assert [(p.pid, p.used_memory_mib, p.foreign) for p in g0.processes] == [(999999, 3000, True)]
    assert g0.foreign_processes == g0.processes
    assert (g1.health, g1.health_reason) == ("lost", "fell off the bus")
    inv.set_foreign(u0, 0)
    inv.set_health(u1, "ok")
    g0, g1 = inv.snapshot(no_jobs)
    assert g0.processes == [] and g0.memory_used_mib == 0
    assert g1.health == "ok" and g1.health_reason is None
    with pytest.raises(KeyError):
        inv.set_foreign("GPU-nope", 1)
    with pytest.raises(ValueError):
        inv.set_health(u0, "sad")


def test_open_inventory_simulated() -> None:
    inv = open_inventory("RTX A4000:16G")
    assert isinstance(inv, SimulatedInventory) and inv.simulated


# -- NvmlInventory over FakeNvml ----------------------------------------------------------------


def test_nvml_snapshot_fills_every_field() -> None:
    nvml = FakeNvml()
    nvml.devices[0].utilization_pct = 87
    nvml.devices[0].temperature_c = 61
    nvml.devices[0].power_mw = 412_345
    nvml.add_process(0, 1234, 2048)
    nvml.add_process(0, 5678, None)
    inv = NvmlInventory(nvml)
    assert inv.simulated is False and nvml.init_calls == 1
    jobs = {1234: 7}
    g0, g1 = inv.snapshot(jobs.get)
    assert (g0.index, g0.uuid, g0.name) == (0, H200, "NVIDIA H200")
    assert g0.pci_bus_id == "00000000:19:00.0"
    assert (g0.memory_total_mib, g0.memory_used_mib, g0.memory_free_mib) == (143771, 2048, 141723)
    assert (g0.utilization_pct, g0.temperature_c, g0.power_w) == (87, 61, 412.3)
    assert (g0.compute_capability, g0.mig_mode, g0.health, g0.simulated) == (
        "9.0",
        False,
        "ok",
        False,
    )
    ours, theirs = g0.processes
    assert (ours.pid, ours.used_memory_mib, ours.job_id, ours.foreign) == (1234, 2048, 7, False)
    assert (theirs.pid, theirs.used_memory_mib, theirs.job_id, theirs.foreign) == (
        5678,
        None,
        None,
        True,
    )
    assert (g1.uuid, g1.compute_capability, g1.processes) == (A4000, "8.6", [])
    inv.close()
    inv.close()
    assert nvml.shutdown_calls == 1
    with pytest.raises(NvmlUnavailable):
        inv.snapshot(no_jobs)


def test_nvml_optional_fields_become_none() -> None:
    nvml = FakeNvml()
    for fn in (
        "nvmlDeviceGetPciInfo",
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetCudaComputeCapability",
        "nvmlDeviceGetMigMode",
        "nvmlDeviceGetRemappedRows",
        "nvmlDeviceGetRetiredPagesPendingStatus",
        "nvmlDeviceGetTotalEccErrors",
    ):
        nvml.fail(0, fn)  # NotSupported
    nvml.fail(0, "nvmlDeviceGetComputeRunningProcesses", NVMLError_NoPermission)
    nvml.fail(1, "nvmlDeviceGetPowerUsage", NVMLError_Unknown)
    g0, g1 = NvmlInventory(nvml).snapshot(no_jobs)
    assert g0.health == "ok" and g0.memory_total_mib == 143771
    assert (g0.pci_bus_id, g0.utilization_pct, g0.temperature_c, g0.power_w) == (None,) * 4
    assert (g0.compute_capability, g0.mig_mode, g0.processes) == (None, None, [])
    assert g1.power_w is None and g1.temperature_c == 30


def test_nvml_without_newer_functions() -> None:
    """An older pynvml lacks some functions: those fields are None, nothing breaks."""
    nvml = FakeNvml()
    nvml.nvmlDeviceGetRemappedRows = None  # type: ignore[assignment,method-assign]
    (g0, _g1) = NvmlInventory(nvml).snapshot(no_jobs)
    assert g0.health == "ok"


def test_nvml_mig_mode_enabled() -> None:
    nvml = FakeNvml()
    nvml.devices[0].mig_mode = nvml.NVML_DEVICE_MIG_ENABLE
    assert NvmlInventory(nvml).snapshot(no_jobs)[0].mig_mode is True


def test_nvml_lost_gpu_keeps_the_uuid_seen_last() -> None:
    nvml = FakeNvml()
    inv = NvmlInventory(nvml)
    inv.snapshot(no_jobs)
    nvml.lose(1)
    g0, g1 = inv.snapshot(no_jobs)
    assert g0.health == "ok"
    assert (g1.uuid, g1.name, g1.health) == (A4000, "NVIDIA RTX A4000", "lost")
    assert g1.health_reason is not None
    assert g1.health_reason.startswith("GPU is lost (fell off the bus): NVML")


def test_nvml_gpu_lost_on_an_optional_call_is_still_lost() -> None:
    nvml = FakeNvml()
    nvml.fail(0, "nvmlDeviceGetPowerUsage", NVMLError_GpuIsLost)
    g0, g1 = NvmlInventory(nvml).snapshot(no_jobs)
    assert g0.health == "lost" and g0.uuid == H200 and g1.health == "ok"


def test_nvml_lost_before_ever_seen_gets_a_placeholder() -> None:
    nvml = FakeNvml()
    nvml.lose(0)
    g0, g1 = NvmlInventory(nvml).snapshot(no_jobs)
    assert g0.health == "lost" and g0.uuid == "GPU-unknown-index-0" and g1.uuid == A4000


def test_nvml_error_on_a_required_field_is_health_error() -> None:
    nvml = FakeNvml()
    inv = NvmlInventory(nvml)
    inv.snapshot(no_jobs)
    nvml.fail(0, "nvmlDeviceGetMemoryInfo", NVMLError_Unknown)
    g0, _ = inv.snapshot(no_jobs)
    assert (g0.uuid, g0.health) == (H200, "error")
    assert "nvmlDeviceGetMemoryInfo" in (g0.health_reason or "")


def test_nvml_gpu_that_vanishes_from_the_list_is_lost() -> None:
    nvml = FakeNvml()
    inv = NvmlInventory(nvml)
    inv.snapshot(no_jobs)
    del nvml.devices[1]
    gpus_now = inv.snapshot(no_jobs)
    assert [(g.uuid, g.health) for g in gpus_now] == [(H200, "ok"), (A4000, "lost")]


def test_nvml_count_failure_marks_known_gpus_broken() -> None:
    nvml = FakeNvml()
    inv = NvmlInventory(nvml)
    inv.snapshot(no_jobs)
    nvml.count_error = NVMLError_Unknown
    assert [(g.uuid, g.health) for g in inv.snapshot(no_jobs)] == [
        (H200, "error"),
        (A4000, "error"),
    ]
    with pytest.raises(NvmlUnavailable):
        NvmlInventory(nvml).snapshot(no_jobs)


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        (
            FakeDevice("G", "GPU-a", 1000, remapped_rows=(0, 1, 1, 0)),
            "row remapping pending: reset the GPU",
        ),
        (FakeDevice("G", "GPU-a", 1000, remapped_rows=(0, 1, 0, 1)), "row remapping failed"),
        (FakeDevice("G", "GPU-a", 1000, retired_pages_pending=1), "page retirement pending"),
        (FakeDevice("G", "GPU-a", 1000, ecc_uncorrected_volatile=2), "2 uncorrectable"),
    ],
)
def test_nvml_memory_faults_are_health_error(device: FakeDevice, reason: str) -> None:
    (g,) = NvmlInventory(FakeNvml([device])).snapshot(no_jobs)
    assert g.health == "error"
    assert reason in (g.health_reason or "")


@pytest.mark.parametrize(
    "error",
    [NVMLError_LibraryNotFound(), OSError("libnvidia-ml.so.1: cannot open shared object file")],
)
def test_nvml_init_failure_says_both_ways_forward(error: BaseException) -> None:
    with pytest.raises(NvmlUnavailable) as exc:
        NvmlInventory(FakeNvml(init_error=error))
    msg = exc.value.message
    assert "--simulate-gpus" in msg and "gpus" in msg
    assert "driver" in msg and "libnvidia-ml.so.1" in msg
    assert exc.value.__cause__ is error


def test_nvml_lazy_import_failure_is_nvml_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(NvmlUnavailable, match="--simulate-gpus"):
        NvmlInventory()


def test_gpus_module_does_not_import_pynvml_at_import_time() -> None:
    code = "import sys, gpusched.gpus; print('pynvml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert "pynvml" not in gpus.__dict__


# -- job_of_pid ---------------------------------------------------------------------------------


def test_job_of_pid_reads_the_environment_of_a_child() -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GPUSCHED_JOB_ID": "42"}
    child = subprocess.Popen(["sleep", "30"], env=env)
    try:
        deadline = time.monotonic() + 5
        # Right after fork the child still has our environment until it execs sleep.
        while job_of_pid(child.pid) != 42 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert job_of_pid(child.pid) == 42
    finally:
        child.kill()
        child.wait()


def test_job_of_pid_on_ourselves_and_on_nothing() -> None:
    expected = os.environ.get("GPUSCHED_JOB_ID")
    assert job_of_pid(os.getpid()) == (int(expected) if expected is not None else None)
    assert job_of_pid(2**22 + 12345) is None  # above pid_max's default: no such process


def test_job_of_pid_ignores_garbage() -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GPUSCHED_JOB_ID": "not-a-number"}
    child = subprocess.Popen(["sleep", "30"], env=env)
    try:
        time.sleep(0.05)
        assert job_of_pid(child.pid) is None
    finally:
        child.kill()
        child.wait()


# -- the placement prior ----------------------------------------------------------------------


def test_prior_speed_from_nvml_and_from_a_simulated_spec() -> None:
    """Cores × max SM clock / 10^6, read once per GPU; a driver without the calls gives none
    (the model then uses the config or 1). A simulated spec may carry SPEED after the size."""
    from gpusched.gpus import SimulatedInventory, parse_simulated_speeds
    from gpusched.testing.fake_nvml import NVMLError_NotSupported

    nvml = FakeNvml()
    nvml.fail(0, "nvmlDeviceGetNumGpuCores", NVMLError_NotSupported)
    inv = NvmlInventory(nvml)
    h200, a4000 = inv.snapshot(job_of_pid)
    assert h200.speed is None
    assert a4000.speed == round(6144 * 1560 / 1e6, 3)
    assert parse_simulated_speeds("RTX A4000:16G:1.40,RTX 2070:8G") == [
        ("RTX A4000", 16384, 1.4), ("RTX 2070", 8192, None)]
    assert parse_simulated_speeds("odd:name:16G:2") == [("odd:name", 16384, 2.0)]
    assert parse_simulated_speeds("RTX 2070:8192") == [("RTX 2070", 8192, None)]  # MiB, no speed
    with pytest.raises(ConfigError, match="speed must be above zero"):
        parse_simulated_speeds("A:16G:0")
    sim = SimulatedInventory("RTX A4000:16G:1.40,RTX 2070:8G:1.0").snapshot(job_of_pid)
    assert [g.speed for g in sim] == [1.4, 1.0]
