"""Issue 11, point 8 with real users: the state directory is private. Another user can neither
list the daemon's directories nor read a job's log, the database or its backups from the
filesystem; the job's owner still reads their own log, and their job still runs and writes it.

Needs root (real users through ``setpriv``); skipped otherwise."""

from __future__ import annotations

import json
import pwd
import subprocess
from pathlib import Path

import pytest

from gpusched.testing.harness import DaemonProcess
from gpusched.testing.users import UNAVAILABLE, as_user, user_argv
from gpusched.testing.users import available as users_available

pytestmark = pytest.mark.skipif(
    not users_available(), reason=UNAVAILABLE)


def run_as(user: pwd.struct_passwd, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*user_argv(user), *argv], capture_output=True, text=True, timeout=30,
                          cwd="/")


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_other_users_cannot_read_or_list_the_state_directory(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    d = root_daemon
    u1, u2 = users["gsuser1"], users["gsuser2"]
    r = as_user(d, u1, "submit", "--", "sh", "-c", "echo secret-of-user1", cwd=shared_dir)
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    assert d.wait_status(job, {"succeeded", "failed", "lost"})["status"] == "succeeded"
    backup = Path(d.cli("admin", "backup", check=True).stdout.strip())
    state = d.state_dir
    log = Path(json.loads(d.cli("show", str(job), "--json", check=True).stdout)["log_path"])
    assert log == state / "logs" / str(job) / "1.log"

    # the owner: their job wrote its log, they read it through the daemon and from the file
    r = as_user(d, u1, "logs", str(job))
    assert r.returncode == 0 and "secret-of-user1" in r.stdout, r.stderr
    r = run_as(u1, "cat", str(log))
    assert r.returncode == 0 and r.stdout == "secret-of-user1\n", r.stderr

    # another user: nothing to read, nothing to list
    for path in (log, log.with_suffix(".exit"), state / "gpusched.db",
                 state / "gpusched.db-wal", backup, state / "daemon.lock"):
        if path.exists():
            r = run_as(u2, "cat", str(path))
            assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r)
    assert not (state / "runs" / str(job)).exists()  # a local job's files are in logs/<job>/
    for directory in (state, state / "logs", state / "runs", state / "backups",
                      state / "logs" / str(job)):
        r = run_as(u2, "ls", str(directory))
        assert r.returncode != 0 and "Permission denied" in r.stderr, (directory, r)
    r = run_as(u2, "python3", "-c", "import sqlite3,sys; c = sqlite3.connect("
               f"'file:{state / 'gpusched.db'}?mode=ro', uri=True); "
               "print(c.execute('select count(*) from jobs').fetchone())")
    assert r.returncode != 0, r.stdout
    # ...but still reaches the socket beside them: the API answers, with SO_PEERCRED identity
    r = as_user(d, u2, "ls", "--json")
    assert r.returncode == 0, r.stderr
    r = as_user(d, u2, "logs", str(job))
    assert r.returncode == 4, r.stderr

    # the modes themselves (the fixture made the state directory 0755, like an old install)
    assert mode(state) == 0o711
    for p in (state / "logs", state / "runs", state / "logs" / str(job)):
        assert mode(p) == 0o711, p
    assert mode(state / "backups") == 0o700
    for p in (state / "gpusched.db", state / "daemon.lock", backup, log, log.with_suffix(".exit")):
        assert mode(p) == 0o600, p
    for suffix in ("-wal", "-shm"):
        p = Path(f"{state / 'gpusched.db'}{suffix}")
        if p.exists():
            assert mode(p) == 0o600, p
    assert log.stat().st_uid == u1.pw_uid
    assert mode(d.socket) == 0o666
