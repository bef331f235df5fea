"""Promise 9 with real users: identity comes from SO_PEERCRED, jobs run as their owner, and only
the owner, root or the admin group may act on a job.

Needs root (it creates the users ``gsuser1``, ``gsuser2`` and ``gsadmin1`` and the group
``gsrel-admin`` with useradd/groupadd, and removes them afterwards); skipped otherwise. The
daemon runs as root with ``api.admin_group`` set to that group through
``GPUSCHED_API__ADMIN_GROUP``; the CLI runs as each user through ``setpriv``.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from gpusched.testing.harness import DaemonProcess
from gpusched.testing.users import UNAVAILABLE, as_user
from gpusched.testing.users import available as users_available
from gpusched.testing.users import show_as_root as show
from gpusched.testing.users import submit_as as submit

pytestmark = pytest.mark.skipif(
    not users_available(), reason=UNAVAILABLE)


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
