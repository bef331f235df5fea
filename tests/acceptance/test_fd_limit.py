"""At the open-files limit a launch fails for the host's reasons, not the job's (issue 11, 5).

The real daemon runs as a subprocess; ``prlimit --pid`` lowers its RLIMIT_NOFILE to the fds it
holds, so the next launch meets EMFILE, and raises it again later. The job must be queued
again without using a retry, and run once the limit is back.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.testing.harness import DaemonProcess, short_tmpdir

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")


@pytest.fixture
def daemon_dir() -> Iterator[Path]:
    d = short_tmpdir("gsfd")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _fds(pid: int) -> list[int]:
    return sorted(int(p.name) for p in (Path("/proc") / str(pid) / "fd").iterdir())


def _nofile(pid: int, soft: int) -> None:
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:"], check=True, timeout=30)


def _job(db: Path, job: int) -> dict[str, object]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT status, retries_left, reason FROM jobs WHERE id = ?",
                           (job,)).fetchone()
        attempts = conn.execute("SELECT reason FROM attempts WHERE job_id = ? AND state = "
                                "'ended'", (job,)).fetchall()
        return {**dict(row), "ended_attempts": [a["reason"] for a in attempts]}
    finally:
        conn.close()


def test_emfile_at_launch_requeues_without_using_a_retry(daemon_dir: Path) -> None:
    trigger = daemon_dir / "go"
    with DaemonProcess(daemon_dir) as d:
        assert d.proc is not None
        pid = d.proc.pid
        first = int(d.cli("submit", "--", "sh", "-c",
                          f"while [ ! -e {trigger} ]; do sleep 0.05; done", check=True).stdout)
        second = int(d.cli("submit", "--after", str(first), "--", "echo", "ran",
                           check=True).stdout)
        d.wait_status(first, {"running"})
        # no fd number left: the first job's end frees one (its pidfd), the launch needs more
        _nofile(pid, max(_fds(pid)) + 1)
        trigger.touch()
        deadline = time.monotonic() + 60
        while not (row := _job(d.state_dir / "gpusched.db", second))["ended_attempts"]:
            assert time.monotonic() < deadline, f"no launch was tried: {row}\n{d.log()}"
            time.sleep(0.05)
        assert row["status"] == "queued", row
        assert row["retries_left"] == 0
        assert "short of resources" in str(row["ended_attempts"][0]), row
        _nofile(pid, 1024)
        done = d.wait_status(second, {"succeeded", "failed", "lost"}, timeout=60)
        assert done["status"] == "succeeded", done
        assert d.cli("logs", str(second), check=True).stdout.strip() == "ran"
