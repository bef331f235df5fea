"""Issue 16 with real user accounts against the root daemon: what runs at a job's end runs as
its owner, never as root, and a plain user's filter only ever reaches their own jobs.

- ``--notify`` runs as the job's user (uid and groups), with the job's outcome in its env;
- ``--output`` is written as the job's user: a symlink of theirs to a root-only file is not
  followed as root (the file stays as it was), and the copy lands where they may write;
- ``cancel --name`` by gsuser1 leaves gsuser2's job of that name alone; ``cancel --all`` by a
  plain user is refused (exit 4) before anything is cancelled; the admin group's works.

Needs root with useradd/groupadd/setpriv (the ``users`` fixture skips otherwise). Every wait is
on a state the daemon reports, never on a sleep.
"""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path
from typing import Any

from gpusched.testing.harness import DaemonProcess
from gpusched.testing.users import as_user
from gpusched.testing.users import show_as_root as show
from gpusched.testing.users import submit_as as submit


def wait_until(d: DaemonProcess, ok: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what}\n{d.log()}")
        time.sleep(0.1)


def owned_dir(path: Path, user: pwd.struct_passwd, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)
    return path


def test_notify_and_output_run_as_the_owner_never_as_root(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    d, u1 = root_daemon, users["gsuser1"]
    home = owned_dir(shared_dir / "u1", u1)
    secret = shared_dir / "root-only"
    secret.write_text("root's\n")
    os.chmod(secret, 0o600)
    link = home / "out.log"
    os.symlink(secret, link)
    os.lchown(link, u1.pw_uid, u1.pw_gid)
    note = home / "notified"
    job = submit(d, u1, home, "--output", str(link), "--notify",
                 f"(id -u; id -G; echo $GPUSCHED_JOB_ID $GPUSCHED_JOB_STATUS "
                 f"$GPUSCHED_EXIT_CODE) > {note}", "--", "sh", "-c", "echo from-the-job; exit 4")
    wait_until(d, lambda: note.exists() and len(note.read_text().splitlines()) == 3,
               "ran the --notify command")
    uid, groups, outcome = note.read_text().splitlines()
    assert uid == str(u1.pw_uid) and "0" not in groups.split()
    assert outcome == f"{job} failed 4"
    assert note.stat().st_uid == u1.pw_uid
    # the copy to a symlink of the user's pointing at a root-only file: refused as the user
    good = home / "copy-%j.log"
    job2 = submit(d, u1, home, "--output", str(good), "--", "echo", "copied")
    wait_until(d, lambda: (home / f"copy-{job2}.log").exists()
               and (home / f"copy-{job2}.log").read_text() == "copied\n", "copied the log")
    assert (home / f"copy-{job2}.log").stat().st_uid == u1.pw_uid
    assert show(d, job)["status"] == "failed"
    assert secret.read_text() == "root's\n"  # not written through the user's symlink
    assert os.stat(secret).st_uid == 0


def test_a_plain_users_filter_reaches_only_their_own_jobs(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    d = root_daemon
    u1, u2, admin = users["gsuser1"], users["gsuser2"], users["gsadmin1"]
    h1, h2 = owned_dir(shared_dir / "f1", u1), owned_dir(shared_dir / "f2", u2)
    mine = submit(d, u1, h1, "--name", "sweep", "--hold", "--", "true")
    theirs = submit(d, u2, h2, "--name", "sweep", "--hold", "--", "true")
    r = as_user(d, u1, "cancel", "--name", "sweep", cwd=h1)
    assert r.returncode == 0, r.stderr
    assert show(d, mine)["status"] == "cancelled"
    assert show(d, theirs)["status"] == "held"
    again = submit(d, u1, h1, "--name", "sweep", "--hold", "--", "true")
    r = as_user(d, u1, "cancel", "--all", "--name", "sweep", cwd=h1)
    assert r.returncode == 4 and "only root and the admin group" in r.stderr, r.stderr
    assert show(d, again)["status"] == "held"  # refused before anything was done
    assert show(d, theirs)["status"] == "held"
    r = as_user(d, admin, "cancel", "--all", "--name", "sweep", cwd=Path("/"))
    assert r.returncode == 0, r.stderr
    assert {show(d, j)["status"] for j in (again, theirs)} == {"cancelled"}
