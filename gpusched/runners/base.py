"""The runner interface the daemon drives: launch, poll, cancel, clean up, reconcile.

Runners never touch the store; the daemon records what they report. Everything a runner must
remember across a daemon restart is either in the attempt row (pid, container id) or in the
attempt's run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gpusched.models import Gpu, JobSpec


@dataclass(frozen=True)
class AttemptRef:
    """What identifies a live attempt to its runner (built from the attempts row)."""

    job_id: int
    n: int
    runner: str
    gpus: tuple[str, ...]
    log_path: Path
    run_dir: Path
    started_at: float
    pid: int | None = None
    pid_start: int | None = None
    container_id: str | None = None
    container_name: str | None = None
    slurm_job_id: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AttemptRef:
        return cls(
            job_id=int(row["job_id"]), n=int(row["n"]), runner=str(row["runner"]),
            gpus=tuple(json.loads(row["gpus"])), log_path=Path(row["log_path"]),
            run_dir=Path(row["run_dir"]), started_at=float(row["started_at"]),
            pid=row.get("pid"), pid_start=row.get("pid_start"),
            container_id=row.get("container_id"), container_name=row.get("container_name"),
            slurm_job_id=row.get("slurm_job_id"),
        )

    @property
    def key(self) -> tuple[int, int]:
        return (self.job_id, self.n)


@dataclass(frozen=True)
class LaunchRequest:
    job_id: int
    attempt: int
    spec: JobSpec
    gpus: tuple[Gpu, ...]  # in the order the job will see them (0..n-1)
    simulated: bool  # simulated inventory: no device requests, environment only
    env: dict[str, str]  # the daemon's environment for the job (CUDA_*, GPUSCHED_*)
    log_path: Path
    run_dir: Path
    owner_uid: int
    owner: str


@dataclass(frozen=True)
class Launched:
    pid: int | None = None
    pid_start: int | None = None
    container_id: str | None = None
    container_name: str | None = None
    slurm_job_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended. ``exit_code`` None with ``lost`` means nobody knows."""

    exit_code: int | None
    ended_at: float
    oom: bool = False
    lost: bool = False
    reason: str | None = None
    cancelled: bool = False  # stopped outside gpusched (scancel, preemption): not a failure


@dataclass
class Orphan:
    """Something the runner found that no live attempt owns (a container, a shim)."""

    description: str
    gpus: tuple[str, ...] = ()
    job_id: int | None = None
    attempt: int | None = None
    handle: Any = field(default=None, compare=False)
    # False when it exists but never started (a container still "created" after a crash
    # between create and start): reconcile removes it and queues the attempt again
    adoptable: bool = True
    # the uid it runs as, where the runner knows it: a process that only looks like one of our
    # shims (anyone can copy its command line) must run as the job's user to be adopted
    uid: int | None = None


class Runner(Protocol):
    """What the daemon asks of a runner. Optional extras, looked up with getattr:
    ``confirm(launched) -> Launched`` (complete a launch record with what is cheap to learn
    once the process runs, e.g. the local shim's /proc start time; called before the launch
    is recorded) and ``close()``."""

    name: str

    def launch(self, req: LaunchRequest) -> Launched:
        """Start the attempt. Raises LaunchRefused (hold the job), RunnerUnavailable (requeue
        without burning a retry) or RunnerError."""
        ...

    def poll(self, ref: AttemptRef, now: float) -> Outcome | None:
        """None while the attempt is alive; its Outcome once it ended. Raises RunnerUnavailable
        when the backend cannot be asked."""
        ...

    def signal_cancel(self, ref: AttemptRef, *, kill: bool) -> None:
        """Ask the attempt to stop (SIGTERM / docker stop), or kill it."""
        ...

    def cleanup(self, ref: AttemptRef) -> None:
        """Forget the attempt after its end is committed (remove the container)."""
        ...

    def orphans(self, live: set[tuple[int, int]]) -> list[Orphan]:
        """Attempts this runner sees that are not in ``live`` (job, attempt) keys."""
        ...

    def remove_orphan(self, orphan: Orphan) -> bool:
        """Stop and remove an orphan; True once it is gone."""
        ...

    def wait_fds(self) -> list[int]:
        """File descriptors that become readable when an attempt may have ended."""
        ...

    def health(self) -> tuple[bool, str]:
        ...
