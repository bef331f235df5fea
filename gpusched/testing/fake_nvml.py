"""A stand-in for the pynvml module: the functions, constants and errors that
``gpusched.gpus.NvmlInventory`` uses, over a list of fake devices with fault injection.

It does not import pynvml (``gpusched.gpus`` is the only module that does); its error classes
mirror pynvml's names and codes, so the inventory code cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

MIB = 1024 * 1024

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1  # pynvml's value
NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VALUE_NOT_AVAILABLE_ULL = 2**64 - 1


class NVMLError(Exception):
    value: ClassVar[int] = 999
    text: ClassVar[str] = "Unknown Error"

    def __str__(self) -> str:
        return self.text


class NVMLError_Uninitialized(NVMLError):  # pynvml spells its error classes so
    value = 1
    text = "Uninitialized"


class NVMLError_NotSupported(NVMLError):
    value = 3
    text = "Not Supported"


class NVMLError_NoPermission(NVMLError):
    value = 4
    text = "Insufficient Permissions"


class NVMLError_DriverNotLoaded(NVMLError):
    value = 9
    text = "Driver Not Loaded"


class NVMLError_LibraryNotFound(NVMLError):
    value = 12
    text = "NVML Shared Library Not Found"


class NVMLError_GpuIsLost(NVMLError):
    value = 15
    text = "GPU is lost"


class NVMLError_ResetRequired(NVMLError):
    value = 16
    text = "GPU requires restart"


class NVMLError_Unknown(NVMLError):
    value = 999
    text = "Unknown Error"


_NVMLError = NVMLError  # FakeNvml.NVMLError shadows the name inside the class body


@dataclass
class FakeProcess:
    pid: int
    used_bytes: int | None  # None: NVML could not tell (pynvml gives None then)


@dataclass
class FakeDevice:
    name: str
    uuid: str
    memory_total_mib: int
    memory_used_mib: int = 0
    pci_bus_id: str = "00000000:01:00.0"
    utilization_pct: int = 0
    temperature_c: int = 30
    power_mw: int = 70_000
    compute_capability: tuple[int, int] = (9, 0)
    mig_mode: int = NVML_DEVICE_MIG_DISABLE
    cuda_cores: int = 16896  # nvmlDeviceGetNumGpuCores (an H100/H200's count)
    max_sm_clock_mhz: int = 1980  # nvmlDeviceGetMaxClockInfo(NVML_CLOCK_SM)
    processes: list[FakeProcess] = field(default_factory=list)
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # corr, unc, pending, failure
    retired_pages_pending: int = NVML_FEATURE_DISABLED
    ecc_uncorrected_volatile: int = 0
    lost: bool = False  # every call, handle lookup included, raises GpuIsLost
    # function name -> error class that call raises (NotSupported, NoPermission, ...)
    errors: dict[str, type[NVMLError]] = field(default_factory=dict)


def default_devices() -> list[FakeDevice]:
    return [
        FakeDevice(
            name="NVIDIA H200",
            uuid="GPU-11111111-2222-3333-4444-555555555555",
            memory_total_mib=143771,
            pci_bus_id="00000000:19:00.0",
        ),
        FakeDevice(
            name="NVIDIA RTX A4000",
            uuid="GPU-66666666-7777-8888-9999-000000000000",
            memory_total_mib=16376,
            pci_bus_id="00000000:3B:00.0",
            compute_capability=(8, 6),
            cuda_cores=6144,
            max_sm_clock_mhz=1560,
        ),
    ]


class FakeNvml:
    """Module-like: pass an instance where ``pynvml`` is expected."""

    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_FEATURE_DISABLED = NVML_FEATURE_DISABLED
    NVML_FEATURE_ENABLED = NVML_FEATURE_ENABLED
    NVML_DEVICE_MIG_DISABLE = NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE
    NVML_VOLATILE_ECC = NVML_VOLATILE_ECC
    NVML_AGGREGATE_ECC = NVML_AGGREGATE_ECC
    NVML_MEMORY_ERROR_TYPE_CORRECTED = NVML_MEMORY_ERROR_TYPE_CORRECTED
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = NVML_MEMORY_ERROR_TYPE_UNCORRECTED

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_ResetRequired = NVMLError_ResetRequired
    NVMLError_Unknown = NVMLError_Unknown

    def __init__(
        self,
        devices: list[FakeDevice] | None = None,
        init_error: BaseException | None = None,
    ) -> None:
        self.devices = default_devices() if devices is None else devices
        self.init_error = init_error  # e.g. NVMLError_LibraryNotFound(), OSError(...)
        self.count_error: type[NVMLError] | None = None
        self.initialized = False
        self.init_calls = 0
        self.shutdown_calls = 0

    # -- fault injection ------------------------------------------------------------------
    def lose(self, index: int) -> None:
        self.devices[index].lost = True

    def fail(
        self, index: int, fn_name: str, error: type[_NVMLError] = NVMLError_NotSupported
    ) -> None:
        self.devices[index].errors[fn_name] = error

    def add_process(self, index: int, pid: int, used_mib: int | None) -> None:
        self.devices[index].processes.append(
            FakeProcess(pid, None if used_mib is None else used_mib * MIB)
        )

    # -- the pynvml surface ---------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._need_init()
        self.shutdown_calls += 1
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        self._need_init()
        if self.count_error is not None:
            raise self.count_error()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._need_init()
        if not 0 <= index < len(self.devices):
            raise NVMLError_Unknown()
        return self._dev(self.devices[index], "nvmlDeviceGetHandleByIndex")

    def nvmlDeviceGetUUID(self, h: FakeDevice) -> str:
        return self._dev(h, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, h: FakeDevice) -> str:
        return self._dev(h, "nvmlDeviceGetName").name

    def nvmlDeviceGetMemoryInfo(self, h: FakeDevice) -> Any:
        d = self._dev(h, "nvmlDeviceGetMemoryInfo")
        used = d.memory_used_mib + sum((p.used_bytes or 0) for p in d.processes) // MIB
        used = min(used, d.memory_total_mib)
        return SimpleNamespace(
            total=d.memory_total_mib * MIB,
            used=used * MIB,
            free=(d.memory_total_mib - used) * MIB,
        )

    def nvmlDeviceGetPciInfo(self, h: FakeDevice) -> Any:
        # Older pynvml returned bytes here; the inventory must accept both.
        return SimpleNamespace(busId=self._dev(h, "nvmlDeviceGetPciInfo").pci_bus_id.encode())

    def nvmlDeviceGetUtilizationRates(self, h: FakeDevice) -> Any:
        d = self._dev(h, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=d.utilization_pct, memory=0)

    def nvmlDeviceGetTemperature(self, h: FakeDevice, sensor: int) -> int:
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError_NotSupported()
        return self._dev(h, "nvmlDeviceGetTemperature").temperature_c

    def nvmlDeviceGetPowerUsage(self, h: FakeDevice) -> int:
        return self._dev(h, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeDevice) -> tuple[int, int]:
        return self._dev(h, "nvmlDeviceGetCudaComputeCapability").compute_capability

    def nvmlDeviceGetNumGpuCores(self, h: FakeDevice) -> int:
        return self._dev(h, "nvmlDeviceGetNumGpuCores").cuda_cores

    def nvmlDeviceGetMaxClockInfo(self, h: FakeDevice, clock: int) -> int:
        if clock != NVML_CLOCK_SM:
            raise NVMLError_NotSupported()
        return self._dev(h, "nvmlDeviceGetMaxClockInfo").max_sm_clock_mhz

    def nvmlDeviceGetMigMode(self, h: FakeDevice) -> list[int]:
        d = self._dev(h, "nvmlDeviceGetMigMode")
        return [d.mig_mode, d.mig_mode]

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeDevice) -> list[Any]:
        d = self._dev(h, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=p.used_bytes) for p in d.processes]

    def nvmlDeviceGetRemappedRows(self, h: FakeDevice) -> tuple[int, int, int, int]:
        return self._dev(h, "nvmlDeviceGetRemappedRows").remapped_rows

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: FakeDevice) -> int:
        return self._dev(h, "nvmlDeviceGetRetiredPagesPendingStatus").retired_pages_pending

    def nvmlDeviceGetTotalEccErrors(self, h: FakeDevice, error_type: int, counter: int) -> int:
        d = self._dev(h, "nvmlDeviceGetTotalEccErrors")
        if error_type == NVML_MEMORY_ERROR_TYPE_UNCORRECTED and counter == NVML_VOLATILE_ECC:
            return d.ecc_uncorrected_volatile
        return 0

    # -- helpers --------------------------------------------------------------------------
    def _need_init(self) -> None:
        if not self.initialized:
            raise NVMLError_Uninitialized()

    def _dev(self, d: FakeDevice, fn_name: str) -> FakeDevice:
        self._need_init()
        if d.lost:
            raise NVMLError_GpuIsLost()
        error = d.errors.get(fn_name)
        if error is not None:
            raise error()
        return d
