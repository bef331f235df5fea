"""Run a real gpusched daemon as a subprocess (acceptance tests, benchmarks, the demo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpusched.client import Client
from gpusched.errors import DaemonUnavailable

SIM_GPUS = "RTX A4000:16G,RTX 2070:8G"


def fake_tao_env(mount_roots: list[str] | None = None) -> dict[str, str]:
    """Daemon settings that run TAO stages as local processes of the fake TAO entrypoint."""
    return {"GPUSCHED_TAO__RUNNER": "local",
            "GPUSCHED_TAO__LOCAL_COMMAND": json.dumps([sys.executable, "-m",
                                                       "gpusched.testing.fake_tao"]),
            "GPUSCHED_DOCKER__MOUNT_ROOTS": json.dumps(mount_roots or ["/tmp"])}


def short_tmpdir(prefix: str = "gs") -> Path:
    """A short directory under /tmp: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class DaemonProcess:
    def __init__(self, state_dir: Path, *, simulate: str | None = SIM_GPUS,
                 env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.state_dir = state_dir
        self.socket = state_dir / "gpusched.sock"
        self.simulate = simulate
        self.extra_env = env or {}
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir / "daemon.log"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCHED_")}
        env.update(GPUSCHED_STATE_DIR=str(self.state_dir), GPUSCHED_SOCKET=str(self.socket),
                   GPUSCHED_DOCKER__ENABLED="false", GPUSCHED_CONFIG="/dev/null",
                   PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 20.0) -> DaemonProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "gpusched.cli", "daemon", *self.args]
        if self.simulate:
            argv += ["--simulate-gpus", self.simulate]
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        finally:
            logf.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.client().get("/v1/health")
                return
            except DaemonUnavailable:
                time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def client(self) -> Client:
        return Client(self.socket, timeout=30)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def cli(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpusched.cli", *args], env=self.env,
                              capture_output=True, text=True, check=check, timeout=timeout)

    def show(self, job: int) -> dict[str, Any]:
        """`gpusched show JOB --json` through the real CLI."""
        r = self.cli("show", str(job), "--json")
        if r.returncode != 0:
            raise RuntimeError(f"gpusched show {job} failed: {r.stderr}")
        return json.loads(r.stdout)

    def wait_status(self, job: int, statuses: Iterable[str], timeout: float = 30) -> dict[str, Any]:
        """Poll until the job is in one of ``statuses``; its last view, or AssertionError."""
        want = set(statuses)
        deadline = time.monotonic() + timeout
        while True:
            row = self.show(job)
            if row["status"] in want:
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} stayed {row['status']}, not {sorted(want)}, "
                                     f"after {timeout:.0f}s; daemon log:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> DaemonProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def database_at(path: Path, version: int) -> None:
    """A state database as an older gpusched left it: migrated up to ``version`` only (the
    migration tests open it with today's Store)."""
    import sqlite_utils

    from gpusched.store import MIGRATIONS

    db = sqlite_utils.Database(path)
    for migrate in MIGRATIONS[:version]:
        migrate(db)
    db.execute(f"PRAGMA user_version = {int(version)}")
    db.conn.close()
