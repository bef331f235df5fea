"""The GPU inventory: NVML on a real host, a simulated list where there is none.

This is the only module that imports pynvml, and it imports it lazily so that CLI commands that
never look at a GPU start fast. As in nvitop, NVML's errors become values: an optional field that
NVML cannot read is None, and a GPU that is lost or reports fatal errors comes back with
``health`` set and a reason, so the daemon drains it instead of crashing.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Callable
from typing import Any, Literal, Protocol, cast

from gpusched.errors import ConfigError, NvmlUnavailable, SpecError
from gpusched.models import Gpu, GpuProcess, parse_size_mib
from gpusched.paths import process_uid

log = logging.getLogger(__name__)

MIB = 1024 * 1024
SIMULATE_EXAMPLE = "RTX A4000:16G,RTX 2070:8G"
SIMULATE_SPEED_EXAMPLE = "RTX A4000:16G:1.40,RTX 2070:8G:1.0"
# Fixed forever: simulated UUIDs derive from it, and the state database remembers them across
# daemon restarts.
SIM_NAMESPACE = uuid.UUID("6f1d8c1e-3b9a-5f4e-9c1a-2d7e0b4a8f31")
SIM_FOREIGN_PID = 999999
# NVML reports "not available" as the all-ones value of the field's C type.
_NOT_AVAILABLE = (2**64 - 1, 2**32 - 1)

JobOfPid = Callable[[int], int | None]
Health = Literal["ok", "lost", "error"]


class Inventory(Protocol):
    simulated: bool

    def snapshot(self, job_of_pid: JobOfPid) -> list[Gpu]: ...

    def close(self) -> None: ...


def parse_simulated(spec: str) -> list[tuple[str, int]]:
    """``"RTX A4000:16G,RTX 2070:8G"`` -> ``[("RTX A4000", 16384), ("RTX 2070", 8192)]``."""
    return [(name, mib) for name, mib, _ in parse_simulated_speeds(spec)]


_SPEED_RE = re.compile(r"^\s*\d+(\.\d*)?\s*$")


def parse_simulated_speeds(spec: str) -> list[tuple[str, int, float | None]]:
    """``"RTX A4000:16G:1.40,RTX 2070:8G:1.0"`` -> name, MiB and the optional prior speed
    (the placement model's starting point for that GPU: see speedmodel)."""
    syntax = (f'use NAME:SIZE[:SPEED][,NAME:SIZE[:SPEED]...], e.g. "{SIMULATE_EXAMPLE}" or '
              f'"{SIMULATE_SPEED_EXAMPLE}"')
    items = [part.strip() for part in spec.split(",")]
    if not spec.strip() or not all(items):
        raise ConfigError(f"bad simulated GPU list {spec!r}: {syntax}")
    gpus: list[tuple[str, int, float | None]] = []
    for item in items:
        speed: float | None = None
        head, sep, last = item.rpartition(":")
        if sep and _SPEED_RE.match(last) and ":" in head:
            # NAME:SIZE:SPEED (a bare SIZE is MiB, so a speed needs the size before it)
            speed = float(last)
            if speed <= 0:
                raise ConfigError(f"simulated GPU {item!r}: the speed must be above zero")
            item = head
        # rpartition: the size never holds a colon, a GPU name might.
        name, sep, size = item.rpartition(":")
        name = name.strip()
        if not sep or not name or not size.strip():
            raise ConfigError(f"bad simulated GPU {item!r} (in {spec!r}): {syntax}")
        try:
            mib = parse_size_mib(size.strip())
        except SpecError as err:
            raise ConfigError(f"bad simulated GPU size {size!r} (in {spec!r}): {syntax}") from err
        if mib <= 0:
            raise ConfigError(f"simulated GPU {name!r} needs a memory size above zero: {syntax}")
        gpus.append((name, mib, speed))
    return gpus


def simulated_uuid(index: int, name: str) -> str:
    return "GPU-" + str(uuid.uuid5(SIM_NAMESPACE, f"gpusched-sim:{index}:{name}"))


class SimulatedInventory:
    """GPUs from a spec string, for machines without NVIDIA GPUs, the demo and daemon tests.

    ``set_foreign`` and ``set_health`` let tests inject what NVML would report, behind the same
    interface as the real inventory."""

    simulated = True

    def __init__(self, spec: str) -> None:
        parsed = parse_simulated_speeds(spec)
        self._gpus = [
            (i, simulated_uuid(i, name), name, mib) for i, (name, mib, _) in enumerate(parsed)
        ]
        self._speeds = {simulated_uuid(i, name): sp for i, (name, _, sp) in enumerate(parsed)}
        self._foreign: dict[str, int] = {}
        self._health: dict[str, tuple[Health, str | None]] = {}
        self._lock = threading.Lock()

    @property
    def uuids(self) -> list[str]:
        return [g[1] for g in self._gpus]

    def _known(self, gpu_uuid: str) -> None:
        if gpu_uuid not in self.uuids:
            raise KeyError(f"no simulated GPU {gpu_uuid}; known: {', '.join(self.uuids)}")

    def set_foreign(self, gpu_uuid: str, used_mib: int) -> None:
        """Pretend a process outside gpusched holds ``used_mib`` on the GPU (0 removes it)."""
        self._known(gpu_uuid)
        with self._lock:
            if used_mib > 0:
                self._foreign[gpu_uuid] = used_mib
            else:
                self._foreign.pop(gpu_uuid, None)

    def set_health(self, gpu_uuid: str, health: str, reason: str | None = None) -> None:
        if health not in ("ok", "lost", "error"):
            raise ValueError(f"health must be ok, lost or error, not {health!r}")
        self._known(gpu_uuid)
        with self._lock:
            if health == "ok":
                self._health.pop(gpu_uuid, None)
            else:
                self._health[gpu_uuid] = (cast(Health, health), reason)

    def snapshot(self, job_of_pid: JobOfPid) -> list[Gpu]:
        out = []
        with self._lock:
            for index, gpu_uuid, name, total in self._gpus:
                used = min(self._foreign.get(gpu_uuid, 0), total)
                procs = (
                    [GpuProcess(pid=SIM_FOREIGN_PID, used_memory_mib=used, foreign=True)]
                    if used
                    else []
                )
                health, reason = self._health.get(gpu_uuid, ("ok", None))
                out.append(
                    Gpu(
                        index=index,
                        uuid=gpu_uuid,
                        name=name,
                        pci_bus_id=f"00000000:{index + 1:02X}:00.0",
                        memory_total_mib=total,
                        memory_used_mib=used,
                        memory_free_mib=total - used,
                        utilization_pct=0,
                        temperature_c=35,
                        power_w=20.0,
                        compute_capability=None,
                        mig_mode=False,
                        processes=procs,
                        health=health,
                        health_reason=reason,
                        simulated=True,
                        speed=self._speeds.get(gpu_uuid),
                    )
                )
        return out

    def close(self) -> None:
        pass


def _unavailable(detail: str) -> NvmlUnavailable:
    return NvmlUnavailable(
        f"NVML is not available: {detail}. Either install and load the NVIDIA driver so that "
        "libnvidia-ml.so.1 loads (`nvidia-smi` must work), or run on simulated GPUs: "
        f'`gpusched daemon --simulate-gpus "{SIMULATE_EXAMPLE}"`, or `simulate = '
        f'"{SIMULATE_EXAMPLE}"` under [gpus] in the config file (GPUSCHED_GPUS__SIMULATE).'
    )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class _Fatal(Exception):
    """A device call failed in a way that makes the GPU unusable."""

    def __init__(self, health: Health, reason: str) -> None:
        super().__init__(reason)
        self.health = health
        self.reason = reason


class NvmlInventory:
    """GPUs as NVML sees them. ``nvml`` is the pynvml module or a fake with the same names."""

    simulated = False

    def __init__(self, nvml: Any | None = None) -> None:
        if nvml is None:
            try:
                import pynvml
            except ImportError as err:
                raise _unavailable(f"the Python package nvidia-ml-py is missing ({err})") from err
            nvml = pynvml
        self._nvml = nvml
        self._speed: dict[str, float | None] = {}
        try:
            nvml.nvmlInit()
        except (nvml.NVMLError, OSError) as err:
            raise _unavailable(f"nvmlInit failed: {err}") from err
        self._closed = False
        self._lock = threading.Lock()
        names = ("NVMLError_GpuIsLost", "NVMLError_ResetRequired")
        self._fatal_errors = tuple(getattr(nvml, n) for n in names if hasattr(nvml, n))
        # The last good view of each GPU: a lost GPU often cannot even tell its UUID anymore,
        # and the daemon must still know which allocated GPU went away.
        self._last_by_index: dict[int, Gpu] = {}
        self._last_by_uuid: dict[str, Gpu] = {}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as err:
                log.warning("nvmlShutdown failed: %s", err)

    def snapshot(self, job_of_pid: JobOfPid) -> list[Gpu]:
        with self._lock:
            if self._closed:
                raise NvmlUnavailable("the NVML inventory is closed")
            return self._snapshot(job_of_pid)

    def _snapshot(self, job_of_pid: JobOfPid) -> list[Gpu]:
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as err:
            if not self._last_by_uuid:
                raise _unavailable(f"nvmlDeviceGetCount failed: {err}") from err
            # Keep the GPUs we knew, marked broken, so their jobs are seen and they are drained.
            return [
                _broken(g, "error", f"NVML cannot list GPUs anymore: {err}")
                for g in self._last_by_uuid.values()
            ]
        gpus: list[Gpu] = []
        for index in range(count):
            partial: dict[str, Any] = {}
            try:
                gpu = self._device(index, job_of_pid, partial)
            except _Fatal as fatal:
                last = self._last_by_index.get(index)
                if last is None or partial.get("uuid", last.uuid) != last.uuid:
                    # Never seen whole, or another GPU sits at this index now: use what was read.
                    last = Gpu(
                        index=index,
                        uuid=partial.get("uuid", f"GPU-unknown-index-{index}"),
                        name=partial.get("name", "unknown"),
                        memory_total_mib=partial.get("memory_total_mib", 0),
                        memory_free_mib=0,
                    )
                gpu = _broken(last, fatal.health, fatal.reason)
            else:
                self._last_by_index[index] = gpu
                self._last_by_uuid[gpu.uuid] = gpu
            gpus.append(gpu)
        seen = {g.uuid for g in gpus}
        for gone in self._last_by_uuid.values():
            if gone.uuid not in seen:
                gpus.append(_broken(gone, "lost", "NVML no longer lists this GPU"))
        return gpus

    def _fatal(self, err: Exception, what: str) -> _Fatal:
        lost = getattr(self._nvml, "NVMLError_GpuIsLost", None)
        if lost is not None and isinstance(err, lost):
            return _Fatal("lost", f"GPU is lost (fell off the bus): NVML {what}: {err}")
        return _Fatal("error", f"NVML {what} failed: {err}")

    def _required(self, fn_name: str, *args: Any) -> Any:
        try:
            return getattr(self._nvml, fn_name)(*args)
        except self._nvml.NVMLError as err:
            raise self._fatal(err, fn_name) from err

    def _optional(self, fn_name: str, *args: Any) -> Any:
        """The value, or None where NVML cannot give it (NotSupported, NoPermission, Unknown, an
        older driver or pynvml without the function). Lost or reset-needing GPUs still raise."""
        nvml = self._nvml
        fn = getattr(nvml, fn_name, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except nvml.NVMLError as err:
            if self._fatal_errors and isinstance(err, self._fatal_errors):
                raise self._fatal(err, fn_name) from err
            return None

    def _device(self, index: int, job_of_pid: JobOfPid, partial: dict[str, Any]) -> Gpu:
        """One GPU; ``partial`` collects the identity read so far, for when a later call fails."""
        nvml = self._nvml
        h = self._required("nvmlDeviceGetHandleByIndex", index)
        gpu_uuid = partial["uuid"] = _text(self._required("nvmlDeviceGetUUID", h))
        name = partial["name"] = _text(self._required("nvmlDeviceGetName", h))
        mem = self._required("nvmlDeviceGetMemoryInfo", h)
        partial["memory_total_mib"] = int(mem.total) // MIB
        pci = self._optional("nvmlDeviceGetPciInfo", h)
        util = self._optional("nvmlDeviceGetUtilizationRates", h)
        temp = self._optional("nvmlDeviceGetTemperature", h, nvml.NVML_TEMPERATURE_GPU)
        power_mw = self._optional("nvmlDeviceGetPowerUsage", h)
        cc = self._optional("nvmlDeviceGetCudaComputeCapability", h)
        mig = self._optional("nvmlDeviceGetMigMode", h)
        procs = self._optional("nvmlDeviceGetComputeRunningProcesses", h) or []
        health, reason = self._health(h)
        if gpu_uuid not in self._speed:  # static: read once per GPU
            self._speed[gpu_uuid] = self._nvml_speed(h)
        return Gpu(
            index=index,
            uuid=gpu_uuid,
            name=name,
            pci_bus_id=_text(pci.busId) if pci is not None else None,
            memory_total_mib=int(mem.total) // MIB,
            memory_used_mib=int(mem.used) // MIB,
            memory_free_mib=int(mem.free) // MIB,
            utilization_pct=int(util.gpu) if util is not None else None,
            temperature_c=int(temp) if temp is not None else None,
            power_w=round(power_mw / 1000.0, 1) if power_mw is not None else None,
            compute_capability=f"{cc[0]}.{cc[1]}" if cc is not None else None,
            mig_mode=bool(mig[0] == nvml.NVML_DEVICE_MIG_ENABLE) if mig is not None else None,
            processes=_processes(procs, job_of_pid),
            health=health,
            health_reason=reason,
            speed=self._speed[gpu_uuid],
        )

    def _nvml_speed(self, h: Any) -> float | None:
        """A prior speed for placement before anything was timed: CUDA cores × the maximum
        SM clock, in units of 10^6 core-MHz (an RTX A4000: 9.6, an RTX 2070: 3.7, an H200:
        33). Only ratios matter; measured epochs correct it (speedmodel)."""
        cores = self._optional("nvmlDeviceGetNumGpuCores", h)
        clock = self._optional("nvmlDeviceGetMaxClockInfo", h,
                               getattr(self._nvml, "NVML_CLOCK_SM", 1))
        if not cores or not clock:
            return None
        return round(int(cores) * int(clock) / 1e6, 3)

    def _health(self, h: Any) -> tuple[Health, str | None]:
        """Memory faults that make results untrustworthy until the GPU is reset or serviced."""
        nvml = self._nvml
        rows = self._optional("nvmlDeviceGetRemappedRows", h)
        if rows is not None:
            _corr, _unc, pending, failure = rows
            if failure:
                return "error", "row remapping failed: the GPU needs service"
            if pending:
                return "error", "row remapping pending: reset the GPU"
        pages = self._optional("nvmlDeviceGetRetiredPagesPendingStatus", h)
        if pages:
            return "error", "page retirement pending: reset the GPU"
        dbe = self._optional(
            "nvmlDeviceGetTotalEccErrors",
            h,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        if dbe:
            return "error", f"{dbe} uncorrectable (double-bit) ECC errors since the driver loaded"
        return "ok", None


def _broken(last: Gpu, health: Health, reason: str) -> Gpu:
    """A failed GPU as last seen: its identity stays, its live readings do not."""
    return last.model_copy(
        update={
            "memory_free_mib": 0,
            "utilization_pct": None,
            "temperature_c": None,
            "power_w": None,
            "health": health,
            "health_reason": reason,
        }
    )


def _processes(procs: list[Any], job_of_pid: JobOfPid) -> list[GpuProcess]:
    out: list[GpuProcess] = []
    seen: set[int] = set()
    for p in procs:
        pid = int(p.pid)
        # With MIG NVML can list one process once per instance; one row per pid is enough here.
        if pid in seen:
            continue
        seen.add(pid)
        used = getattr(p, "usedGpuMemory", None)
        used_mib = None if used is None or used in _NOT_AVAILABLE else int(used) // MIB
        job_id = job_of_pid(pid)
        out.append(
            GpuProcess(pid=pid, used_memory_mib=used_mib, job_id=job_id, foreign=job_id is None)
        )
    return out


def open_inventory(simulate: str | None) -> Inventory:
    """Simulated GPUs when ``simulate`` is set (``gpus.simulate``), else NVML."""
    if simulate:
        return SimulatedInventory(simulate)
    return NvmlInventory()


def job_of_pid(pid: int, owners: dict[int, int] | None = None) -> int | None:
    """The gpusched job a process belongs to, from the GPUSCHED_JOB_ID that gpusched puts in every
    job's environment (local and container alike); None when absent or unreadable.

    Anyone can put GPUSCHED_JOB_ID in their own environment: with ``owners`` (job id -> the
    owner's uid, for the jobs that hold GPUs) a process counts as job N's only if it runs as
    N's owner, so nobody can pass their process off as another user's job (which would drain
    that job's GPU when it ends, or hide a foreign process). Reading another user's environ
    needs root or the same uid, which the daemon has."""
    job = _job_in_environ(pid)
    if job is None or owners is None:
        return job
    return job if owners.get(job) is not None and owners.get(job) == process_uid(pid) else None


def _job_in_environ(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"GPUSCHED_JOB_ID="):
            try:
                return int(entry.split(b"=", 1)[1])
            except ValueError:
                return None
    return None
