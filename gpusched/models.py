"""Pydantic models shared by every layer: what users submit and what the daemon reports."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpusched.units import parse_size_mib

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_ARGS = 4096
MAX_ARG_BYTES = 128 * 1024


def parse_size_bytes(text: str) -> int:
    return parse_size_mib(text) * 1024 * 1024


class GpuRequest(BaseModel):
    """Which GPUs a job needs: a count (any N), or exact GPUs by index or UUID."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(default=1, ge=0, le=64)
    # elastic (``--gpus 1-2``): any count from ``count`` to this; the scheduler picks at launch
    count_max: int | None = Field(default=None, ge=1, le=64)
    ids: tuple[str, ...] | None = None  # exact GPUs: indices ("0") or UUIDs ("GPU-...")
    gpu_type: str | None = None  # case-insensitive substring of the GPU name
    mem_mib: int | None = Field(default=None, ge=0)  # free memory needed on each GPU

    @model_validator(mode="after")
    def _ids_set_count(self) -> GpuRequest:
        if self.ids is not None:
            if not self.ids:
                raise ValueError("an explicit GPU list cannot be empty")
            if len(set(self.ids)) != len(self.ids):
                raise ValueError("the GPU list names a GPU twice")
            if self.count != len(self.ids):
                object.__setattr__(self, "count", len(self.ids))
            if self.count_max is not None:
                raise ValueError("a GPU list cannot be a range: give a count range (1-2) or GPUs")
        if self.count_max is not None:
            if self.count < 1 or self.count_max < self.count:
                raise ValueError(f"bad GPU range {self.count}-{self.count_max}: "
                                 "the first count must be at least 1 and not above the second")
            if self.count_max == self.count:
                object.__setattr__(self, "count_max", None)
        return self

    @property
    def counts(self) -> range:
        """The GPU counts this request accepts (one count unless elastic)."""
        return range(self.count, (self.count_max or self.count) + 1)

    def label(self) -> str:
        return f"{self.count}-{self.count_max}" if self.count_max else str(self.count)



class Mount(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    target: str
    read_only: bool = False



class JobSpec(BaseModel):
    """What a user submits. Validated by the daemon; the owner comes from the socket."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1)
    name: str | None = Field(default=None, max_length=200)
    gpus: GpuRequest = GpuRequest()
    priority: int = Field(default=0, ge=-1000, le=1000)
    after: list[int] = Field(default_factory=list, max_length=1000)
    workdir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    runner: Literal["local", "docker", "slurm"] = "local"
    image: str | None = None
    mounts: list[Mount] = Field(default_factory=list, max_length=100)
    shm_size: str | None = None
    user: str | None = None
    use_tao_mounts: bool = False
    retries: int = Field(default=0, ge=0, le=100)
    retry_on: list[int] | None = Field(default=None, max_length=100)  # only these exit codes
    hold: bool = False
    est_runtime_s: float | None = Field(default=None, gt=0)
    # --time: the daemon stops the attempt past it (SIGTERM, SIGKILL after the grace) and the
    # planner's backfill estimate is never longer, so a backfilled job cannot hold a reserved
    # GPU past it
    time_limit_s: float | None = Field(default=None, gt=0)
    after_any: list[int] = Field(default_factory=list, max_length=1000)  # ended in any state
    output: str | None = Field(default=None, max_length=4096)  # --output: a copy of the log
    notify_cmd: str | None = Field(default=None, max_length=4096)  # run as the owner at the end
    notify_url: str | None = Field(default=None, max_length=2048)  # POSTed the job's JSON
    host_mem_mib: int | None = Field(default=None, gt=0)  # --host-mem: containers' RAM limit
    kind: str = "job"  # "job", or a TAO stage ("tao:train", ...)
    stage: dict[str, Any] | None = None  # TAO stage details (later issues)
    pipeline_id: int | None = None

    @field_validator("command")
    @classmethod
    def _command_sane(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_ARGS:
            raise ValueError(f"the command has more than {MAX_ARGS} arguments")
        if sum(len(a) for a in v) > MAX_ARG_BYTES:
            raise ValueError("the command is longer than 128 KiB")
        if any("\x00" in a for a in v):
            raise ValueError("the command contains a NUL byte")
        if not v[0]:
            raise ValueError("the command's program is empty")
        return v

    @field_validator("env")
    @classmethod
    def _env_sane(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if not ENV_KEY_RE.match(k):
                raise ValueError(f"bad environment variable name {k!r}")
            if "\x00" in val:
                raise ValueError(f"environment variable {k} contains a NUL byte")
        return v

    @field_validator("output", "notify_cmd", "notify_url")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None and ("\x00" in v or not v.strip()):
            raise ValueError("must be non-empty and free of NUL bytes")
        return v

    @field_validator("notify_url")
    @classmethod
    def _http_only(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("--notify-url takes an http:// or https:// URL with a host")
        return v

    @model_validator(mode="after")
    def _limit_bounds_estimate(self) -> JobSpec:
        # a job backfills on its estimate; the limit is what makes that estimate safe
        if self.time_limit_s is None and self.est_runtime_s is not None:
            self.time_limit_s = self.est_runtime_s
        if self.time_limit_s is not None and (self.est_runtime_s is None
                                              or self.est_runtime_s > self.time_limit_s):
            self.est_runtime_s = self.time_limit_s
        return self

    @model_validator(mode="after")
    def _runner_fields(self) -> JobSpec:
        if self.runner == "docker" and not self.image:
            raise ValueError("a docker job needs --image")
        if self.runner != "docker" and (self.image or self.mounts or self.shm_size):
            raise ValueError("--image, --mount and --shm-size need the docker runner")
        if self.runner == "local" and self.host_mem_mib:
            raise ValueError("--host-mem is enforced for containers only (docker's memory "
                             "limit); a local job's host memory is not limited")
        return self


class GpuProcess(BaseModel):
    pid: int
    used_memory_mib: int | None = None
    job_id: int | None = None  # set when the process belongs to a gpusched job
    foreign: bool = True


class Gpu(BaseModel):
    """One GPU as the inventory last saw it."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str | None = None
    memory_total_mib: int
    memory_used_mib: int = 0
    memory_free_mib: int
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    compute_capability: str | None = None
    mig_mode: bool | None = None
    processes: list[GpuProcess] = Field(default_factory=list)
    health: Literal["ok", "lost", "error"] = "ok"
    health_reason: str | None = None
    simulated: bool = False
    # prior speed for placement (a simulated spec's, or CUDA cores × max SM clock from NVML)
    speed: float | None = None

    @property
    def foreign_processes(self) -> list[GpuProcess]:
        return [p for p in self.processes if p.foreign]


class GpuState(BaseModel):
    """A GPU as the daemon reports it: the inventory plus scheduling state."""

    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    pci_bus_id: str | None = None
    compute_capability: str | None = None
    mig_mode: bool | None = None
    state: Literal["idle", "busy", "foreign", "drained", "lost"]
    job_id: int | None = None
    drain_reason: str | None = None
    processes: list[GpuProcess] = Field(default_factory=list)
    health: str = "ok"
    simulated: bool = False
    speed: float | None = None  # the prior placement starts from (config, else inventory)


class Placement(BaseModel):
    model_config = ConfigDict(frozen=True)

    job_id: int
    gpu_uuids: tuple[str, ...]
    reason: str | None = None  # why these GPUs (throughput policy): estimates per choice


class JobView(BaseModel):
    """A job as the API and ``--json`` output show it (times ISO 8601 UTC)."""

    id: int
    name: str | None
    status: str
    exit_code: int | None
    reason: str | None
    attempt: int
    gpus: list[str]
    gpu_indices: list[int] = Field(default_factory=list)
    owner: str
    owner_uid: int
    submitted_at: str
    started_at: str | None
    ended_at: str | None
    priority: int
    runner: str
    command: list[str]
    after: list[int]
    request: GpuRequest
    kind: str = "job"
    progress: dict[str, Any] | None = None
    log_path: str | None = None
    # True when the caller is not the job's owner (nor root or the admin group): command,
    # log_path and free-text reasons are left out
    redacted: bool = False


