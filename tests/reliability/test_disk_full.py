"""Scenario 10: the disk holding the state directory fills up.

The state directory is an 8 MiB tmpfs (root only: the test skips otherwise). With a job running,
a filler file takes every free byte. Proves: ``gpusched submit`` fails with one clear line
("state storage full", non-zero exit, no traceback) and nothing is stored; reads (``ls``,
``show``, ``health``) keep working; the daemon keeps running and so does the job; once the
filler is gone the job finishes SUCCEEDED, submissions work again and ``PRAGMA
integrity_check`` is ok.

The end of a job on a full disk: the shim cannot write its exit file and the daemon cannot
commit the end. The job must not be recorded ``lost``: the shim exits with the command's
status, the runner keeps reporting that end until the daemon has committed it, and once space
is freed the job is recorded ``succeeded`` with exit code 0 (synchronised on states: the job
waits for a file, the shim's pid leaving /proc means the daemon reaped it inside a tick, and
``health``, which takes the daemon's lock, returns only once that tick is over).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusched.errors import StorageFull
from gpusched.testing.faults import check_invariants, fill_filesystem, tmpfs
from gpusched.testing.harness import DaemonProcess, short_tmpdir

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="needs root (and mount) to put the state directory on a "
                                       "small tmpfs")


@pytest.fixture
def small_state_dir() -> Iterator[Path]:
    base = short_tmpdir("gsfull")
    try:
        with tmpfs(base / "s", size="8m") as d:
            yield d
    finally:
        shutil.rmtree(base, ignore_errors=True)


def show(d: DaemonProcess, job: int) -> dict[str, Any]:
    r = d.cli("show", str(job), "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def wait_status(d: DaemonProcess, job: int, want: set[str], timeout: float) -> dict[str, Any]:
    return d.wait_status(job, want, timeout)


@needs_root
def test_disk_full_refuses_submissions_and_keeps_jobs_running(small_state_dir: Path,
                                                              tmp_path: Path) -> None:
    d = DaemonProcess(small_state_dir)
    d.log_path = tmp_path / "daemon.log"  # the daemon's log (the journal) is elsewhere
    go = tmp_path / "go"
    d.start()
    filler: Path | None = None
    try:
        # the job waits until told to go, and writes nothing to its log meanwhile
        r = d.cli("submit", "--workdir", str(tmp_path), "--", "sh", "-c",
                  f"while [ ! -e {go} ]; do sleep 0.1; done; echo finished", timeout=30)
        assert r.returncode == 0, r.stderr
        job = int(r.stdout)
        wait_status(d, job, {"running"}, 30)
        pid = show(d, job)["attempts"][0]["pid"]

        filler = fill_filesystem(small_state_dir)
        assert shutil.disk_usage(small_state_dir).free < 64 * 1024
        r = d.cli("submit", "--workdir", str(tmp_path), "--", "true", timeout=30)
        assert r.returncode != 0, f"a submission was accepted on a full disk: {r.stdout}"
        assert "state storage full" in r.stderr.lower(), r.stderr
        assert "Traceback" not in r.stderr + r.stdout
        assert r.stderr.startswith("gpusched: State storage full"), r.stderr

        # reads still work, the daemon and the job are alive
        r = d.cli("ls", "--json", timeout=30)
        assert r.returncode == 0, r.stderr
        assert [j["id"] for j in json.loads(r.stdout)] == [job]
        time.sleep(1.5)  # a few ticks on a full disk
        assert d.proc is not None and d.proc.poll() is None, d.log()
        assert show(d, job)["status"] == "running"
        os.kill(pid, 0)

        filler.unlink()
        filler = None
        go.touch()
        row = wait_status(d, job, {"succeeded", "failed", "lost", "cancelled"}, 30)
        assert row["status"] == "succeeded", row
        r = d.cli("submit", "--workdir", str(tmp_path), "--", "true", timeout=30)
        assert r.returncode == 0, r.stderr
        again = int(r.stdout)
        assert again == job + 1, "the refused submission left a row behind"
        assert wait_status(d, again, {"succeeded", "failed"}, 30)["status"] == "succeeded"
        r = d.cli("logs", str(job), timeout=30)
        assert r.stdout.strip() == "finished"
    finally:
        if filler is not None:
            filler.unlink()
        go.touch()
        d.stop()
    db = small_state_dir / "gpusched.db"
    conn = sqlite3.connect(str(db))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [r[0] for r in conn.execute("SELECT id FROM jobs ORDER BY id")] == [job, again]
    finally:
        conn.close()
    assert check_invariants(db, drained=True) == []
    assert "Traceback" not in d.log_path.read_text(errors="replace")


def test_storage_full_message_is_one_clean_line() -> None:
    message = StorageFull().message
    assert "state storage full" in message.lower()
    assert "\n" not in message and "  " not in message, repr(message)


@needs_root
def test_a_job_that_ends_on_a_full_disk_is_recorded_with_its_real_exit_code(
        small_state_dir: Path, tmp_path: Path) -> None:
    d = DaemonProcess(small_state_dir)
    d.log_path = tmp_path / "daemon.log"  # the daemon's log (the journal) is elsewhere
    go = tmp_path / "go"
    d.start()
    filler: Path | None = None
    try:
        # silent until told to go: nothing it does needs the full disk
        r = d.cli("submit", "--workdir", str(tmp_path), "--", "sh", "-c",
                  f"while [ ! -e {go} ]; do sleep 0.1; done", timeout=30)
        assert r.returncode == 0, r.stderr
        job = int(r.stdout)
        d.wait_status(job, {"running"}, 30)
        pid = show(d, job)["attempts"][0]["pid"]

        filler = fill_filesystem(small_state_dir)
        go.touch()
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}"):  # gone once the daemon reaped the shim
            assert time.monotonic() < deadline, f"the shim was never reaped\n{d.log()}"
            time.sleep(0.05)
        r = d.cli("health", timeout=30)  # waits for the tick that reaped it to finish
        assert d.proc is not None and d.proc.poll() is None, d.log()
        exit_file = small_state_dir / "logs" / str(job) / "1.exit"
        assert not exit_file.exists() or exit_file.read_text() == "", \
            "the exit file was written: the disk was not full"
        assert show(d, job)["status"] != "lost"

        filler.unlink()
        filler = None
        row = d.wait_status(job, {"succeeded", "failed", "lost", "cancelled"}, 30)
        assert row["status"] == "succeeded", row
        assert row["exit_code"] == 0, row
    finally:
        if filler is not None:
            filler.unlink()
        go.touch()
        d.stop()
    db = small_state_dir / "gpusched.db"
    assert check_invariants(db, drained=True) == []
    assert "Traceback" not in d.log_path.read_text(errors="replace")
