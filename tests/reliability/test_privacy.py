"""Issue 11 with real users: what one user learns of another's jobs, what reaches another
user's terminal, and whether one user's idle connections lock the others out.

Needs root (``users`` creates gsuser1, gsuser2 and gsadmin1); skipped otherwise.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpusched.testing.harness import DaemonProcess
from gpusched.testing.users import UNAVAILABLE, as_user, user_argv
from gpusched.testing.users import available as users_available

pytestmark = pytest.mark.skipif(
    not users_available(), reason=UNAVAILABLE)

SECRET = "hunter2-s3cr3t-token"
EVIL_NAME = "\x1b[2J\x1b]0;pwned\x07x"
UNSAFE = ("\x1b", "\x07", "\r", "\x9b")


def submit(d: DaemonProcess, user: pwd.struct_passwd, cwd: Path, *args: str) -> int:
    r = as_user(d, user, "submit", *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def cli_json(d: DaemonProcess, user: pwd.struct_passwd | None, *args: str) -> Any:
    r = as_user(d, user, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_other_users_see_who_and_what_state_never_the_command_env_or_paths(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    d = root_daemon
    u1, u2, admin = users["gsuser1"], users["gsuser2"], users["gsadmin1"]
    job = submit(d, u1, shared_dir, "--hold", "--name", "train-a", "--env", f"API_TOKEN={SECRET}",
                 "--", "python3", "train.py", f"--token={SECRET}")
    failed = submit(d, u1, shared_dir, "--name", "fails", "--", "sh", "-c",
                    f"echo {SECRET}; exit 3")
    d.wait_status(failed, {"failed"})

    # another user: id, name, owner, status, GPUs, times; nothing of the command or env
    for args in (("show", str(job)), ("show", str(failed)), ("ls", "--all"), ("top", "--once")):
        r = as_user(d, u2, *args)
        assert r.returncode == 0, (args, r.stderr)
        assert SECRET not in r.stdout and "train.py" not in r.stdout, (args, r.stdout)
    shown = cli_json(d, u2, "show", str(job))
    assert shown["owner"] == "gsuser1" and shown["name"] == "train-a"
    assert shown["status"] == "held" and shown["redacted"] is True
    assert shown["command"] == [] and shown["spec"] is None and shown["log_path"] is None
    assert shown["artifacts"] == [] and all("log_path" not in a for a in shown["attempts"])
    assert SECRET not in json.dumps(shown)
    other_failed = cli_json(d, u2, "show", str(failed))
    assert other_failed["reason"] == "exit code 3", other_failed  # a harmless outcome stays
    listed = {j["id"]: j for j in cli_json(d, u2, "ls", "--all")}
    assert listed[job]["command"] == [] and listed[job]["redacted"]
    assert SECRET not in json.dumps(listed)
    r = as_user(d, u2, "artifacts", str(job))
    assert r.returncode == 4 and "belongs to gsuser1" in r.stderr, r.stderr

    # the owner and the admin group see everything
    for who in (u1, admin, None):
        full = cli_json(d, who, "show", str(job))
        assert full["redacted"] is False
        assert full["command"][-1] == f"--token={SECRET}"
        assert full["spec"]["env"]["API_TOKEN"] == SECRET

    # env values never reach the daemon's log or the job's events
    assert SECRET not in d.log()
    events = json.dumps(cli_json(d, None, "show", str(job))["events"])
    assert SECRET not in events


def test_names_and_commands_are_escaped_in_other_users_terminals(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    d = root_daemon
    u1, u2, admin = users["gsuser1"], users["gsuser2"], users["gsadmin1"]
    job = submit(d, u1, shared_dir, "--hold", "--name", EVIL_NAME, "--", "echo",
                 "fake\rprompt$ \x9b2J")
    for who in (u2, admin):
        for args in (("ls",), ("show", str(job)), ("top", "--once"), ("wait", str(job),
                                                                         "--timeout", "0")):
            r = as_user(d, who, *args)
            out = r.stdout + r.stderr
            assert not any(c in out for c in UNSAFE), (who.pw_name, args, repr(out))
        r = as_user(d, who, "show", str(job))
        assert "\\x1b[2J\\x1b]0;pwned\\x07x" in r.stdout, r.stdout
    r = as_user(d, admin, "show", str(job))
    assert "fake\\rprompt$ \\x9b2J" in r.stdout, r.stdout  # the admin sees the command, escaped
    # --json output stays exact (JSON escapes it)
    assert cli_json(d, u2, "show", str(job))["name"] == EVIL_NAME


HOLDER = r"""
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
conns = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    conns.append(s)
print("connected", flush=True)
sys.stdin.readline()
idle = refused = 0
for s in conns:
    s.setblocking(False)
    try:
        data = s.recv(65536)
    except BlockingIOError:
        idle += 1
        continue
    refused += data.startswith(b"HTTP/1.1 503")
print(f"{idle} {refused}", flush=True)
sys.stdin.readline()
"""


def test_one_users_idle_connections_do_not_lock_out_another_user(
        users: dict[str, pwd.struct_passwd], state_dir: Path) -> None:
    u1, u2 = users["gsuser1"], users["gsuser2"]
    state_dir.chmod(0o755)
    d = DaemonProcess(state_dir, env={"GPUSCHED_API__IDLE_TIMEOUT_S": "120"}).start()
    try:
        with subprocess.Popen([*user_argv(u1), sys.executable, "-c", HOLDER, str(d.socket),
                               "300"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) as holder:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline().strip() == "connected"
            # gsuser2 is served at once; its connection came after gsuser1's 300, so they
            # have all been taken or refused by now
            r = as_user(d, u2, "ls")
            assert r.returncode == 0, r.stderr
            holder.stdin.write("count\n")
            holder.stdin.flush()
            idle, refused = map(int, holder.stdout.readline().split())
            assert (idle, refused) == (32, 268), (idle, refused)  # max_connections_per_user
            assert d.proc is not None and d.proc.poll() is None
            holder.stdin.write("done\n")
            holder.stdin.flush()
            assert holder.wait(30) == 0
    finally:
        d.stop()
