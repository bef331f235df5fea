"""Real users for the security tests: create them, and run the CLI as one of them (setpriv).

Needs root with useradd/groupadd/setpriv; ``available()`` says whether this host can. The
users are ``gsuser1``, ``gsuser2`` (plain) and ``gsadmin1`` (member of ``gsrel-admin``).
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpusched.testing.harness import DaemonProcess, short_tmpdir

USERS = ("gsuser1", "gsuser2", "gsadmin1")
ADMIN_GROUP = "gsrel-admin"
TOOLS = ("useradd", "userdel", "groupadd", "groupdel", "setpriv")


@functools.cache
def checkout_reachable() -> bool:
    """Can another user run this gpusched? Not from a checkout under a 0700 directory (as
    ``mktemp -d`` makes). Asked the way the tests will use it: as nobody, through setpriv."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-c", "import gpusched.cli"], capture_output=True,
                       timeout=60, cwd="/")
    return r.returncode == 0


def available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in TOOLS) and checkout_reachable()


#: why ``available()`` is False, for skip reasons
UNAVAILABLE = ("needs root with useradd, groupadd and setpriv, and a checkout other users can "
               "read (not under a 0700 directory such as mktemp -d's) to act as real users")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


@contextmanager
def real_users() -> Iterator[dict[str, pwd.struct_passwd]]:
    """Create the test users (removed afterwards unless they existed before)."""
    created_group = _run("groupadd", ADMIN_GROUP).returncode == 0
    created = []
    for name in USERS:
        extra = ["-G", ADMIN_GROUP] if name == "gsadmin1" else []
        r = _run("useradd", "-M", "-s", "/usr/sbin/nologin", *extra, name)
        if r.returncode == 0:
            created.append(name)
        elif "already exists" not in r.stderr:
            raise RuntimeError(f"useradd {name} failed: {r.stderr.strip()}")
        elif extra:
            _run("usermod", "-a", "-G", ADMIN_GROUP, name)
    try:
        yield {name: pwd.getpwnam(name) for name in USERS}
    finally:
        for name in created:
            _run("userdel", name)
        if created_group:
            _run("groupdel", ADMIN_GROUP)


@contextmanager
def root_daemon(env: dict[str, str] | None = None) -> Iterator[DaemonProcess]:
    """The real daemon as root (state dir 0755, like /var/lib/gpusched), with ADMIN_GROUP as
    its admin group and ``env`` on top; stopped and removed afterwards."""
    state = short_tmpdir("gsusers")
    os.chmod(state, 0o755)
    d = DaemonProcess(state, env={"GPUSCHED_API__ADMIN_GROUP": ADMIN_GROUP, **(env or {})})
    d.start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(state, ignore_errors=True)


def user_argv(user: pwd.struct_passwd | None) -> list[str]:
    """The prefix that runs a command as ``user`` (None: as root)."""
    if user is None:
        return []
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


def as_user(d: DaemonProcess, user: pwd.struct_passwd | None, *args: str,
            cwd: Path | None = None, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``gpusched ARGS`` as ``user`` against daemon ``d``; never a traceback."""
    full_env = {**d.env, "HOME": "/tmp", **(env or {})}
    r = subprocess.run([*user_argv(user), sys.executable, "-m", "gpusched.cli", *args],
                       env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def submit_as(d: DaemonProcess, user: pwd.struct_passwd, cwd: Path, *args: str) -> int:
    """``gpusched submit ARGS`` as ``user`` in ``cwd``; the job id (the submission must work)."""
    r = as_user(d, user, "submit", *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def show_as_root(d: DaemonProcess, job: int) -> dict[str, Any]:
    """``gpusched show JOB --json`` as root."""
    r = as_user(d, None, "show", str(job), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
