"""Promise 9 with real users: identity comes from SO_PEERCRED, jobs run as their owner, and only
the owner, root or the admin group may act on a job.

Needs root (it creates the users ``gsuser1``, ``gsuser2`` and ``gsadmin1`` and the group
``gsrel-admin`` with useradd/groupadd, and removes them afterwards); skipped otherwise. The
daemon runs as root with ``api.admin_group`` set to that group through
``GPUSCHED_API__ADMIN_GROUP``; the CLI runs as each user through ``setpriv``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusched.testing.harness import DaemonProcess, short_tmpdir

USERS = ("gsuser1", "gsuser2", "gsadmin1")
ADMIN_GROUP = "gsrel-admin"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("useradd", "userdel", "groupadd",
                                                            "groupdel", "setpriv")),
    reason="needs root with useradd, groupadd and setpriv to act as real users")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, pwd.struct_passwd]]:
    created_group = _run("groupadd", ADMIN_GROUP).returncode == 0
    created = []
    for name in USERS:
        extra = ["-G", ADMIN_GROUP] if name == "gsadmin1" else []
        r = _run("useradd", "-M", "-s", "/usr/sbin/nologin", *extra, name)
        if r.returncode == 0:
            created.append(name)
        elif "already exists" not in r.stderr:
            pytest.skip(f"useradd {name} failed: {r.stderr.strip()}")
        elif extra:
            _run("usermod", "-a", "-G", ADMIN_GROUP, name)
    try:
        yield {name: pwd.getpwnam(name) for name in USERS}
    finally:
        for name in created:
            _run("userdel", name)
        if created_group:
            _run("groupdel", ADMIN_GROUP)


@pytest.fixture
def root_daemon(users: dict[str, pwd.struct_passwd]) -> Iterator[DaemonProcess]:
    state = short_tmpdir("gsusers")
    os.chmod(state, 0o755)  # like /var/lib/gpusched: users' shims write their exit file below
    d = DaemonProcess(state, env={"GPUSCHED_API__ADMIN_GROUP": ADMIN_GROUP})
    d.start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    d = short_tmpdir("gsshared")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_user(d: DaemonProcess, user: pwd.struct_passwd | None, *args: str,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    prefix = [] if user is None else ["setpriv", f"--reuid={user.pw_uid}",
                                      f"--regid={user.pw_gid}", "--clear-groups"]
    env = {**d.env, "HOME": "/tmp"}
    r = subprocess.run([*prefix, sys.executable, "-m", "gpusched.cli", *args], env=env,
                       capture_output=True, text=True, timeout=60, cwd=cwd)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def submit(d: DaemonProcess, user: pwd.struct_passwd, cwd: Path, *args: str) -> int:
    r = as_user(d, user, "submit", *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def show(d: DaemonProcess, job: int) -> dict[str, Any]:
    r = as_user(d, None, "show", str(job), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def wait_status(d: DaemonProcess, job: int, want: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = show(d, job)
        if row["status"] in want:
            return row
        time.sleep(0.2)
    raise AssertionError(f"job {job} not {want}: {row}\n{d.log()}")


def refused(r: subprocess.CompletedProcess[str], owner: str) -> None:
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    assert f"belongs to {owner}" in r.stderr, r.stderr


def test_jobs_run_as_their_owner_and_only_owner_root_or_admins_act_on_them(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    d = root_daemon
    u1, u2, admin = users["gsuser1"], users["gsuser2"], users["gsadmin1"]

    # a local job runs as the user who submitted it
    job = submit(d, u1, shared_dir, "--", "sh", "-c", "id -u; id -g; touch mine")
    assert wait_status(d, job, {"succeeded", "failed", "lost"})["status"] == "succeeded"
    r = as_user(d, u1, "logs", str(job))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == [str(u1.pw_uid), str(u1.pw_gid)]
    assert (shared_dir / "mine").stat().st_uid == u1.pw_uid
    assert show(d, job)["owner"] == "gsuser1"

    # another user sees user1's jobs but cannot touch them or read their logs
    held = submit(d, u1, shared_dir, "--hold", "--", "true")
    running = submit(d, u1, shared_dir, "--", "sleep", "60")
    wait_status(d, running, {"running"})
    r = as_user(d, u2, "ls", "--json")
    assert r.returncode == 0, r.stderr
    assert {held, running} <= {j["id"] for j in json.loads(r.stdout)}
    for action, target in (("cancel", held), ("hold", held), ("release", held),
                           ("cancel", running), ("hold", running)):
        refused(as_user(d, u2, action, str(target)), "gsuser1")
    refused(as_user(d, u2, "logs", str(job)), "gsuser1")
    assert as_user(d, u2, "drain", "0", "--reason", "mine now").returncode == 4
    assert show(d, held)["status"] == "held"
    assert show(d, running)["status"] == "running"

    # the owner may, root may: root cancels user1's running job
    r = as_user(d, u1, "release", str(held))
    assert r.returncode == 0, r.stderr
    r = as_user(d, None, "cancel", str(running))
    assert r.returncode == 0, r.stderr
    assert wait_status(d, running, {"cancelled", "failed", "succeeded", "lost"})["status"] == \
        "cancelled"

    # a member of the admin group may act on anyone's job
    other = submit(d, u2, shared_dir, "--hold", "--", "true")
    refused(as_user(d, u1, "cancel", str(other)), "gsuser2")
    r = as_user(d, admin, "cancel", str(other))
    assert r.returncode == 0, r.stderr
    assert show(d, other)["status"] == "cancelled"
    events = show(d, other)["events"]
    assert events[-1]["actor"] == "gsadmin1", events
