"""Issue 11, the daemon's side: a loop that survives fd numbers above 1023, a start-up that fails
closed on a missing or empty database, a restore that checks before it touches anything,
impossible GPU requests refused at submission, and a deleted socket brought back.

Real daemons (``DaemonProcess``) and the real CLI throughout; no sleeps for timing: every wait
polls a state with a deadline."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpusched import admin
from gpusched.config import Settings
from gpusched.testing.harness import DaemonProcess

LAUNCHER = """
import os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
# 1,100 idle fds (what ~1,100 idle API connections hold) before the daemon opens its own
filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
sys.argv[0] = "gpusched"
from gpusched.cli import main
main()
"""


class HighFdDaemon(DaemonProcess):
    """The daemon started after 1,100 fds are taken, so its wake pipe and pidfds get numbers
    above 1023 (select()'s FD_SETSIZE)."""

    def start(self, timeout: float = 20.0) -> HighFdDaemon:
        argv = [sys.executable, "-c", LAUNCHER, "daemon", "--simulate-gpus", str(self.simulate)]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.wait_ready(timeout)
        return self


def _link(path: Path) -> str:
    """What an fd points to; "" when it closed since the listing (an API connection)."""
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return ""


def submit(d: DaemonProcess, *args: str) -> int:
    r = d.cli("submit", *args)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def start_fails(d: DaemonProcess) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "gpusched.cli", "daemon", "--simulate-gpus",
                        "A:1G"], env=d.env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r


def settings_of(d: DaemonProcess) -> Settings:
    return Settings(state_dir=d.state_dir, socket=d.socket)


# -- 1. the loop past fd 1023 ------------------------------------------------------------------

def test_loop_ticks_and_wakes_on_a_job_end_with_fds_above_1023(state_dir: Path) -> None:
    slow = {"GPUSCHED_SCHEDULER__TICK_INTERVAL_S": "3600",  # only a wake-up can end the wait
            "GPUSCHED_SCHEDULER__RECONCILE_INTERVAL_S": "3600",
            "GPUSCHED_GPUS__POLL_INTERVAL_S": "3600"}
    d = HighFdDaemon(state_dir, env=slow).start()
    try:
        assert d.proc is not None
        fd_dir = Path(f"/proc/{d.proc.pid}/fd")
        pipes = [int(n) for n in os.listdir(fd_dir) if _link(fd_dir / n).startswith("pipe:")]
        assert max(pipes) > 1023, pipes  # the wake pipe
        job = submit(d, "--", "true")  # the submission wakes the loop, the job's end (pidfd) too
        assert d.wait_status(job, {"succeeded", "failed", "lost"}, timeout=30)["status"] == \
            "succeeded"
        second = submit(d, "--", "sh", "-c", "exit 3")
        row = d.wait_status(second, {"succeeded", "failed", "lost"}, timeout=30)
        assert row["status"] == "failed" and row["exit_code"] == 3, row
        assert d.proc.poll() is None, d.log()
    finally:
        d.stop()


# -- 3. fail closed on a missing or empty database ---------------------------------------------

def test_missing_database_with_backups_refuses_to_start(state_dir: Path) -> None:
    d = DaemonProcess(state_dir).start()
    job = submit(d, "--", "echo", "first life")
    d.wait_status(job, {"succeeded"})
    newest = d.cli("admin", "backup", check=True).stdout.strip()
    d.stop()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state_dir / 'gpusched.db'}{suffix}").unlink(missing_ok=True)
    r = start_fails(d)
    assert "gpusched.db is missing" in r.stderr, r.stderr
    assert newest in r.stderr and f"gpusched admin restore {newest}" in r.stderr, r.stderr
    assert "gpusched admin init" in r.stderr, r.stderr
    assert not (state_dir / "gpusched.db").exists()  # nothing created behind the refusal
    # the way back: restore the named backup; the old job is there again
    restored = d.cli("admin", "restore", newest)
    assert restored.returncode == 0, restored.stderr
    d.start()
    try:
        assert d.show(job)["status"] == "succeeded"
    finally:
        d.stop()


def test_empty_database_with_old_job_logs_refuses_to_start(state_dir: Path) -> None:
    d = DaemonProcess(state_dir).start()
    job = submit(d, "--", "echo", "old output")
    d.wait_status(job, {"succeeded"})
    d.stop()
    for suffix in ("-wal", "-shm"):
        Path(f"{state_dir / 'gpusched.db'}{suffix}").unlink(missing_ok=True)
    (state_dir / "gpusched.db").write_bytes(b"")  # truncated to zero length
    r = start_fails(d)
    assert "is empty (0 bytes)" in r.stderr and "earlier job" in r.stderr, r.stderr
    assert "No backup exists" in r.stderr and "gpusched admin init" in r.stderr, r.stderr
    assert (state_dir / "gpusched.db").stat().st_size == 0
    log = state_dir / "logs" / str(job) / "1.log"
    assert log.read_text() == "old output\n"


def test_admin_init_starts_afresh_on_purpose_without_reusing_old_logs(state_dir: Path) -> None:
    d = DaemonProcess(state_dir).start()
    job = submit(d, "--", "echo", "old output")
    d.wait_status(job, {"succeeded"})
    d.stop()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state_dir / 'gpusched.db'}{suffix}").unlink(missing_ok=True)
    start_fails(d)
    moved = admin.init_fresh(settings_of(d))
    # a local job's log and exit file are in logs/<job>/: runs/ stays empty, and is not moved
    assert {p.name.split(".")[0] for p in moved} == {"logs"}
    assert (moved[0] / str(job) / "1.log").read_text() == "old output\n"
    d.start()
    try:
        new = submit(d, "--", "echo", "new output")
        d.wait_status(new, {"succeeded"})
        assert (state_dir / "logs" / str(new) / "1.log").read_text() == "new output\n"
    finally:
        d.stop()
    with pytest.raises(Exception, match="not empty"):
        admin.init_fresh(settings_of(d))  # never over a live database


# -- 3. restore checks before it touches anything ----------------------------------------------

@pytest.fixture
def stopped(state_dir: Path) -> tuple[DaemonProcess, int, str]:
    """A stopped daemon's state with one held job and one backup of it."""
    d = DaemonProcess(state_dir).start()
    job = submit(d, "--hold", "--", "true")
    backup = d.cli("admin", "backup", check=True).stdout.strip()
    d.stop()
    return d, job, backup


def state_listing(d: DaemonProcess) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.state_dir.iterdir()
            if p.name.startswith("gpusched.db")}


def assert_refused_and_untouched(d: DaemonProcess, job: int, candidate: Path | str,
                                 words: str) -> None:
    before = state_listing(d)
    r = d.cli("admin", "restore", str(candidate))
    assert r.returncode != 0, r.stdout
    assert words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert state_listing(d) == before  # the live database is where it was, nothing new beside it
    d.start()
    try:
        assert d.show(job)["status"] == "held"
    finally:
        d.stop()


def test_restore_refuses_the_live_database(stopped: tuple[DaemonProcess, int, str]) -> None:
    d, job, _ = stopped
    assert_refused_and_untouched(d, job, d.state_dir / "gpusched.db", "is the live database")


def corrupt_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as fh:
        fh.seek(4096)
        fh.write(b"\xde\xad\xbe\xef" * 4096)


def newer_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with sqlite3.connect(dst) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()


def no_jobs_copy(src: Path, dst: Path) -> None:
    with sqlite3.connect(dst) as conn:
        conn.execute("CREATE TABLE other (x)")
        conn.execute("PRAGMA user_version = 1")
    conn.close()


@pytest.mark.parametrize(("make", "words"), [
    (lambda src, dst: dst.write_bytes(b"not a database at all" * 300), "not a usable database"),
    (lambda src, dst: dst.write_bytes(b""), "not a gpusched database"),
    (corrupt_copy, "backup"),
    (newer_copy, "newer than this gpusched knows"),
    (no_jobs_copy, "no jobs table"),
], ids=["not-sqlite", "zero-length", "fails-quick-check", "newer-schema", "no-jobs-table"])
def test_restore_refuses_an_unusable_file(stopped: tuple[DaemonProcess, int, str], make: object,
                                          words: str) -> None:
    d, job, backup = stopped
    candidate = d.state_dir / "backups" / "candidate.db"
    make(Path(backup), candidate)  # type: ignore[operator]
    assert_refused_and_untouched(d, job, candidate, words)


def test_restore_refuses_while_the_daemon_runs(stopped: tuple[DaemonProcess, int, str]) -> None:
    d, job, backup = stopped
    d.start()
    try:
        before = state_listing(d)
        r = d.cli("admin", "restore", backup)
        assert r.returncode != 0 and "stop it first" in r.stderr, r.stderr
        assert set(state_listing(d)) == set(before)
        assert d.show(job)["status"] == "held"
    finally:
        d.stop()


def test_restore_keeps_the_old_database_and_skips_used_job_ids(
        stopped: tuple[DaemonProcess, int, str]) -> None:
    d, job, backup = stopped
    d.start()
    later = submit(d, "--", "echo", "after the backup")  # its log outlives the restore
    d.wait_status(later, {"succeeded"})
    d.stop()
    r = d.cli("admin", "restore", backup)
    assert r.returncode == 0, r.stderr
    kept = [p for p in d.state_dir.iterdir() if p.name.startswith("gpusched.db.pre-restore-")
            and not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == 1 and str(kept[0]) in r.stdout, r.stdout
    with sqlite3.connect(f"file:{kept[0]}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2
    conn.close()
    assert not (d.state_dir / "gpusched.db.restoring").exists()
    assert (d.state_dir / "gpusched.db").stat().st_mode & 0o777 == 0o600
    d.start()
    try:
        assert d.show(job)["status"] == "held"
        with pytest.raises(RuntimeError):
            d.show(later)  # not in the backup
        new = submit(d, "--", "echo", "new")
        assert new > later  # a fresh id: the later job's log is not appended to
        d.wait_status(new, {"succeeded"})
        assert (d.state_dir / "logs" / str(later) / "1.log").read_text() == "after the backup\n"
    finally:
        d.stop()


# -- 4. impossible GPU requests are refused at submission --------------------------------------

def test_impossible_gpu_requests_are_refused_with_the_inventory(daemon: DaemonProcess) -> None:
    d = daemon  # "RTX A4000:16G,RTX 2070:8G"
    refused = {
        ("--gpu-type", "H100"): "no GPU matches --gpu-type H100",
        ("--mem", "100G"): "more than the largest GPU has (GPU 0, RTX A4000: 16384 MiB)",
        ("--gpus", "1,7"): "GPU 7 does not exist",
        ("--gpus", "5"): "asks for 5 GPUs; this host has 2",
        ("--gpus", "2", "--gpu-type", "A4000"): "asks for 2 GPUs of type A4000; this host has 1",
        ("--gpus", "2", "--mem", "10G"): "asks for 2 GPUs with 10240 MiB each; this host has 1",
        ("--gpu-type", "2070", "--mem", "10G"): "largest 2070 GPU has (GPU 1, RTX 2070: 8192",
        ("--gpus", "0,1", "--gpu-type", "A4000"): "GPU 1 is a RTX 2070, not --gpu-type A4000",
        ("--gpus", "1,", "--mem", "9G"): "GPU 1 (RTX 2070) has 8192 MiB in all",
    }
    for args, words in refused.items():
        r = d.cli("submit", *args, "--", "true")
        assert r.returncode == 2, (args, r.returncode, r.stdout, r.stderr)
        assert words in r.stderr, (args, r.stderr)
        assert "GPU 0 (RTX A4000, 16384 MiB), GPU 1 (RTX 2070, 8192 MiB)" in r.stderr, r.stderr
    assert json.loads(d.cli("ls", "--all", "--json", check=True).stdout) == []
    # possible requests still go in; a drained GPU still exists (an admin may resume it)
    ok = [("--gpus", "2", "--mem", "8G"), ("--mem", "10G"), ("--gpus", "0,1")]
    d.cli("drain", "0", "--reason", "maintenance", check=True)
    ok.append(("--gpu-type", "A4000", "--mem", "16G"))
    for args in ok:
        r = d.cli("submit", "--hold", *args, "--", "true")
        assert r.returncode == 0, (args, r.stderr)


# -- 5. a deleted socket comes back ------------------------------------------------------------

def test_a_deleted_socket_is_recreated_by_housekeeping(state_dir: Path) -> None:
    d = DaemonProcess(state_dir, env={"GPUSCHED_API__SOCKET_CHECK_INTERVAL_S": "0.2"}).start()
    try:
        job = submit(d, "--hold", "--", "true")
        d.socket.unlink()  # the daemon runs on, unreachable, until housekeeping brings it back
        deadline = time.monotonic() + 30
        while (r := d.cli("show", str(job), "--json")).returncode != 0:
            assert time.monotonic() < deadline, f"the socket never came back:\n{d.log()}"
            time.sleep(0.1)
        assert json.loads(r.stdout)["status"] == "held"
        assert d.socket.stat().st_mode & 0o777 == 0o666
        assert "recreated" in d.log()
    finally:
        d.stop()
