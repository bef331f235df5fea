"""A real Slurm cluster for tests: the one ``scripts/slurm-test`` starts, and the daemon
with the Slurm runner on it (helpers of tests/integration/slurm; never imported by library
code)."""

from __future__ import annotations

import os
import pwd
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpusched.testing.harness import DaemonProcess
from gpusched.testing.users import as_user

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm-test"


@dataclass
class Cluster:
    conf: str
    dir: Path | None  # where scripts/slurm-test runs it (None: not ours to stop and start)

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": self.conf}

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env={**os.environ, **self.env()}, capture_output=True,
                              text=True, timeout=60)

    def ctld(self, action: str) -> None:
        """Stop or start slurmctld alone (a controller outage)."""
        if self.dir is None:
            raise RuntimeError("GPUSCHED_TEST_SLURM_DIR is not set: the cluster's slurmctld "
                               "cannot be stopped and started")
        r = subprocess.run([str(SCRIPT), f"ctld-{action}", str(self.dir)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr

    def settle(self) -> None:
        """After a controller restart: Slurm 22.05 keeps the GPUs of a job that ended during
        the outage counted as used (GresUsed) until ``scontrol reconfigure``."""
        assert self.run("scontrol", "reconfigure").returncode == 0
        wait_until("Slurm's GPUs free", lambda: re.search(
            r"GresUsed=gpu:a4000:0\(IDX:N/A\),gpu:rtx2070:0", self.run(
                "scontrol", "-d", "show", "node", "-o").stdout) is not None)

    def job(self, slurm_id: str) -> dict[str, str]:
        """squeue's id, state and reason of one Slurm job ({} once Slurm forgot it)."""
        r = self.run("squeue", "-h", "-a", "-t", "all", "-j", slurm_id, "-o", "%i|%T|%r|%k")
        for line in r.stdout.splitlines():
            i, state, reason, comment = line.split("|", 3)
            if i == slurm_id:
                return {"state": state, "reason": reason, "comment": comment}
        return {}

    def with_comment(self, comment: str, *, prefix: bool = False) -> list[str]:
        """Ids of the Slurm jobs (ended ones too) with this comment (or comment prefix)."""
        r = self.run("squeue", "-h", "-a", "-t", "all", "-o", "%i|%k")
        rows = [ln.split("|", 1) for ln in r.stdout.splitlines() if "|" in ln]
        return [i for i, c in rows if (c.startswith(comment) if prefix else c == comment)]


class SlurmDaemon(DaemonProcess):
    """The real daemon as root with the Slurm runner on, and helpers for its Slurm jobs."""

    cluster: Cluster
    user: pwd.struct_passwd

    def submit(self, *args: str, user: pwd.struct_passwd | None = None,
               cwd: Path | None = None) -> int:
        r = as_user(self, user or self.user, "submit", "--runner", "slurm", *args,
                    cwd=cwd or Path("/tmp"))
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip())

    def attempt(self, job: int, n: int = 1) -> dict[str, Any]:
        return next(a for a in self.show(job)["attempts"] if a["n"] == n)

    def slurm_id(self, job: int, n: int = 1) -> str:
        return str(self.attempt(job, n)["slurm_job_id"])

    def output(self, job: int, n: int = 1) -> str:
        return Path(self.attempt(job, n)["log_path"]).read_text(errors="replace")

    def wait_slurm(self, job: int, states: set[str], timeout: float = 60) -> dict[str, str]:
        """Until the job's Slurm job is in one of ``states`` (squeue)."""
        deadline = time.monotonic() + timeout
        while True:
            sid = self.attempt(job).get("slurm_job_id") if self.show(job)["attempts"] else None
            found = self.cluster.job(str(sid)) if sid else {}
            if found.get("state") in states:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"Slurm job {sid} of job {job} is {found}, not {states}; "
                                     f"daemon log:\n{self.log()}")
            time.sleep(0.1)

    def running(self, tmp: Path, then: str = "true", gpus: int = 1) -> tuple[int, str, Path]:
        """A slurm job that runs until its go file appears, then runs ``then``: (job id,
        Slurm job id, go file), once Slurm runs it."""
        go, wait = go_file(tmp, f"go{time.monotonic_ns()}")
        job = self.submit("--gpus", str(gpus), "--", "sh", "-c", f"{wait}; {then}")
        self.wait_slurm(job, {"RUNNING"})
        return job, self.slurm_id(job), go

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.state_dir / "gpusched.db")


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def go_file(tmp: Path, name: str = "go") -> tuple[Path, str]:
    """A file a job waits for: (its path, a shell loop that waits for it)."""
    path = tmp / name
    return path, f"while [ ! -e {path} ]; do sleep 0.1; done"


def events(d: DaemonProcess, job: int) -> list[str]:
    return [f"{e['to_status']}: {e['reason']}" for e in d.show(job)["events"]]



