"""One Settings object: the TOML file, then ``GPUSCHED_*`` environment variables, then flags.

The file is ``$GPUSCHED_CONFIG`` or ``/etc/gpusched/gpusched.toml`` (missing is fine). Nested keys
come from the environment with a double underscore: ``GPUSCHED_GPUS__SIMULATE="RTX A4000:16G"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gpusched.errors import ConfigError, explain_validation
from gpusched.paths import config_path, default_socket, default_state_dir


class GpusSettings(BaseModel):
    simulate: str | None = None  # "RTX A4000:16G,RTX 2070:8G": simulated GPUs instead of NVML
    poll_interval_s: float = Field(default=5.0, gt=0)
    foreign_policy: Literal["memory", "exclusive"] = "memory"
    release_timeout_s: float = Field(default=60.0, ge=0)
    # prior speed per GPU model for placement before anything was timed ("RTX A4000" = 1.4;
    # a key matches a GPU whose name contains it); overrides NVML's and the simulated spec's
    speed: dict[str, float] = Field(default_factory=dict)

    @field_validator("speed")
    @classmethod
    def _speeds(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if not (x > 0 and x < 1e6) or not k.strip()]
        if bad:
            raise ValueError(f"gpus.speed: each GPU model needs a name and a speed above 0 "
                             f"(bad: {', '.join(map(repr, bad))})")
        return v


class SchedulerSettings(BaseModel):
    tick_interval_s: float = Field(default=1.0, gt=0)
    # "throughput": each job on the GPU set the measured speeds say finishes it soonest (see
    # README, Placement); "fifo": best fit by free memory, elastic requests at their maximum
    policy: Literal["throughput", "fifo"] = "throughput"
    efficiency_prior: float = Field(default=0.85, gt=0, le=1.2)  # N-GPU scaling before data
    model_refresh_s: float = Field(default=60.0, gt=0)  # refit the speed model this often
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    kill_grace_s: float = Field(default=10.0, ge=0)


class DockerSettings(BaseModel):
    enabled: bool = True
    base_url: str | None = None  # None: DOCKER_HOST or the default socket
    instance: str = "default"  # gpusched.instance label: daemons sharing a dockerd differ here
    images: list[str] = Field(default_factory=lambda: ["nvcr.io/nvidia/tao/*"])
    mount_roots: list[str] = Field(default_factory=lambda: ["/home", "/data", "/srv", "/tmp"])
    allow_host_network: bool = False  # needed for network = "host"; never per job
    network: str = "bridge"
    shm_size: str = "16G"
    user: str | None = None  # "uid:gid"; None: the submitting user's uid:gid
    # May the admin group choose another container uid/gid than their own (--user)? Root
    # always may, plain users never: uid 0 in a container with a bind mount is host root, so
    # turning this on makes the admin group root-equivalent.
    allow_user_override: bool = False
    ulimits: dict[str, int] = Field(default_factory=lambda: {"memlock": -1, "stack": 67108864})
    log_max_size: str = "50m"
    log_max_file: int = Field(default=3, ge=1)
    # gpusched's own copy of a container attempt's output (as root, past user quotas): the
    # rest is dropped with a note, so one job cannot fill the state disk for everyone
    log_max_bytes: str = "2G"
    stop_grace_s: float = Field(default=10.0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0)


class SlurmSettings(BaseModel):
    """The Slurm runner: jobs with ``runner = "slurm"`` are handed to a Slurm cluster."""

    enabled: bool = False
    instance: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # in --comment
    partition: str | None = None
    account: str | None = None
    extra_sbatch_args: list[str] = Field(default_factory=list)
    # run folders (exit status, output) on a filesystem every node mounts at the same path;
    # None: <state_dir>/slurm-runs, enough for a one-host cluster
    shared_dir: Path | None = None
    conf: str | None = None  # SLURM_CONF for the commands; None: theirs (/etc/slurm/slurm.conf)
    sbatch: str = "sbatch"
    squeue: str = "squeue"
    scancel: str = "scancel"
    scontrol: str = "scontrol"
    timeout_s: float = Field(default=20.0, gt=0)  # a Slurm command slower than this: unavailable


class TaoSettings(BaseModel):
    runner: Literal["docker", "local", "slurm"] = "docker"
    image: str = "nvcr.io/nvidia/tao/tao-toolkit:5.0.0-tf1.15.5"
    local_command: list[str] = Field(default_factory=list)  # prepended to `ssd TASK ...`


class MetricsSettings(BaseModel):
    port: int | None = Field(default=None, ge=0, le=65535)  # None: no Prometheus endpoint


class ApiSettings(BaseModel):
    admin_group: str = "gpusched-admin"
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    max_connections: int = Field(default=256, ge=1)  # open API connections, all users
    max_connections_per_user: int = Field(default=32, ge=1)  # open API connections of one uid
    idle_timeout_s: float = Field(default=10.0, gt=0)  # a read or write stalled this long drops it
    socket_check_interval_s: float = Field(default=5.0, gt=0)  # recreate a deleted socket


class BackupSettings(BaseModel):
    interval_s: float = Field(default=3600.0, gt=0)
    keep: int = Field(default=24, ge=1)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class NotifySettings(BaseModel):
    url: str | None = None  # POSTed every job's end when the job names no --notify-url
    # hosts (glob patterns) a --notify-url may name; empty: any host. The daemon (root) makes
    # the POST, so this keeps users' URLs off internal services
    allowed_hosts: list[str] = Field(default_factory=list)
    timeout_s: float = Field(default=10.0, gt=0)  # one POST
    retries: int = Field(default=3, ge=0, le=100)  # more POSTs after a failed one
    retry_backoff_s: float = Field(default=5.0, gt=0)  # doubled after each failure
    command_timeout_s: float = Field(default=60.0, gt=0)  # a --notify command, an --output copy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GPUSCHED_", env_nested_delimiter="__", extra="forbid"
    )

    state_dir: Path = Field(default_factory=lambda: default_state_dir())
    socket: Path = Field(default_factory=lambda: default_socket())
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR or CRITICAL, any case
    gpus: GpusSettings = GpusSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    docker: DockerSettings = DockerSettings()
    slurm: SlurmSettings = SlurmSettings()
    tao: TaoSettings = TaoSettings()
    metrics: MetricsSettings = MetricsSettings()
    api: ApiSettings = ApiSettings()
    backup: BackupSettings = BackupSettings()
    notify: NotifySettings = NotifySettings()

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        if v.upper() not in LOG_LEVELS:
            raise ValueError("unknown log level")
        return v.upper()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, config_path()))

    @model_validator(mode="after")
    def _socket_beside_state(self) -> Settings:
        # A state directory given without a socket keeps its socket beside it, so two daemons
        # (tests, the demo) never share /run/gpusched or $XDG_RUNTIME_DIR by accident.
        if "state_dir" in self.model_fields_set and "socket" not in self.model_fields_set:
            self.socket = self.state_dir / "gpusched.sock"
        return self

    @property
    def db_path(self) -> Path:
        return self.state_dir / "gpusched.db"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def slurm_runs_dir(self) -> Path:
        return self.slurm.shared_dir or self.state_dir / "slurm-runs"

    @property
    def backups_dir(self) -> Path:
        return self.state_dir / "backups"


def load_settings(**overrides: Any) -> Settings:
    """Settings from file, environment and the given overrides (flags); None overrides ignored."""
    path = config_path()
    if os.environ.get("GPUSCHED_CONFIG") and not path.exists():
        raise ConfigError(f"config file {path} (from GPUSCHED_CONFIG) does not exist")
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as err:
        raise ConfigError(explain_validation(
            err, f"bad configuration (file {path}, GPUSCHED_* variables, flags)")) from err
    except (OSError, ValueError) as err:  # unreadable file, TOML syntax
        raise ConfigError(f"cannot read configuration {path}: {err}") from err
