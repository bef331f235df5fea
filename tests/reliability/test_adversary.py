"""The reliability tier's adversary (issue 11): one real user attacks the root daemon in every
way issue 11 lists at once, while another real user works. The victim's jobs all run once and
succeed, the daemon stays healthy, the database's invariants hold, and none of the adversary's
tricks gets further than its own jobs.

Needs root (``users`` creates gsuser1, the adversary, and gsuser2, the victim); skipped
otherwise. Figures go to the tier's summary (``reliability figures`` at the end of the run).
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpusched.testing.faults import check_invariants
from gpusched.testing.harness import DaemonProcess
from gpusched.testing.users import UNAVAILABLE, as_user, user_argv
from gpusched.testing.users import available as users_available

pytestmark = pytest.mark.skipif(
    not users_available(), reason=UNAVAILABLE)

ENDED = {"succeeded", "failed", "cancelled", "lost"}
VICTIM_JOBS = 12
# connections held open by the adversary, as the adversary (SO_PEERCRED names it)
HOLDER = """
import socket, sys
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    held.append(s)
print("connected", flush=True)
sys.stdin.readline()
"""


def _raw(sock_path: Path, data: bytes, timeout: float = 30) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _submit(d: DaemonProcess, user: pwd.struct_passwd, cwd: Path, *args: str) -> int:
    r = as_user(d, user, "submit", *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def _show(d: DaemonProcess, job: int, user: pwd.struct_passwd | None = None) -> dict[str, object]:
    r = as_user(d, user, "show", str(job), "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _wait(d: DaemonProcess, job: int, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        row = _show(d, job)
        if row["status"] in ENDED:
            return row
        assert time.monotonic() < deadline, f"job {job} stayed {row['status']}\n{d.log()}"
        time.sleep(0.1)


def _refused(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert needle in r.stderr, r.stderr


def test_one_user_attacks_while_another_works(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path,
        figures: dict[str, object]) -> None:
    d = root_daemon
    evil, victim = users["gsuser1"], users["gsuser2"]
    assert d.proc is not None
    home = shared_dir / "evil"
    home.mkdir()
    os.chown(home, evil.pw_uid, evil.pw_gid)
    attacks: list[str] = []

    # 300 idle connections held by the adversary for the whole scenario
    holder = subprocess.Popen([*user_argv(evil), sys.executable, "-c", HOLDER, str(d.socket),
                               "300"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "connected"
        attacks.append("300 idle connections")

        # the victim's work starts now and must not notice any of what follows
        work = [_submit(d, victim, shared_dir, "--name", f"victim-{i}", "--", "sh", "-c",
                        f"echo ok-{i}") for i in range(VICTIM_JOBS)]

        # a FIFO planted as its job's exit file, then the shim killed (point 4)
        trap = _submit(d, evil, home, "--", "sh", "-c",
                       f'f={d.state_dir}/runs/"$GPUSCHED_JOB_ID"/"$GPUSCHED_ATTEMPT"/exit; '
                       'rm -f "$f"; mkfifo "$f"; kill -9 $PPID')
        attacks.append("FIFO as exit file")
        # a job that would start in root's home (point 3)
        rootdir = _submit(d, evil, home, "--workdir", "/root", "--", "pwd")
        attacks.append("workdir /root")
        # a terminal escape in a name, shown to the victim (point 9)
        named = _submit(d, evil, home, "--hold", "--name", "\x1b[2J\x1b]0;pwned\x07", "--env",
                        "TOKEN=s3cr3t-adversary", "--", "true")
        attacks.append("escape sequences in a name")
        # impossible requests (point 13)
        for args, needle in ((("--gpu-type", "H100"), "H100"), (("--gpus", "0,7"), "7"),
                             (("--mem", "100G"), "GPU")):
            _refused(as_user(d, evil, "submit", *args, "--", "true", cwd=home), needle)
        attacks.append("impossible GPU requests")
        # a bad Content-Length and a bad query value (point 7)
        reply = _raw(d.socket, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"
                               b'{"command": ["true"]}')
        assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
        assert _raw(d.socket, b"GET /v1/jobs?limit=x HTTP/1.1\r\nHost: x\r\n\r\n"
                    ).startswith(b"HTTP/1.1 400")
        attacks.append("Content-Length -1, ?limit=x")
        # a pipeline whose gate would prune at a threshold of 0 (point 6)
        toml = home / "p.toml"
        toml.write_text('name = "evil"\n[stages.train]\ntask = "train"\nspec = "s.txt"\n'
                        '[stages.eval]\ntask = "evaluate"\nspec = "s.txt"\nneeds = ["train"]\n'
                        '[stages.prune]\ntask = "prune"\nneeds = ["train"]\n'
                        'model = "best_checkpoint:train"\nthreshold = [0.1]\n'
                        '[stages.eval_pruned]\ntask = "evaluate"\nspec = "s.txt"\n'
                        'needs = ["prune"]\n[gate]\ncandidate = "eval_pruned"\n'
                        'baseline = "eval"\nretry_thresholds = [0.0]\n')
        os.chown(toml, evil.pw_uid, evil.pw_gid)
        r = as_user(d, evil, "pipeline", "run", str(toml), cwd=home)
        assert r.returncode != 0 and "retry_thresholds" in r.stderr, r.stderr
        attacks.append("gate threshold 0")

        # the victim: every job ran once and succeeded, with its own output
        for i, job in enumerate(work):
            row = _wait(d, job)
            assert row["status"] == "succeeded" and row["attempt"] == 1, row
            out = as_user(d, victim, "logs", str(job))
            assert out.stdout == f"ok-{i}\n", out
        # ...and learns nothing of the adversary's job, and sees the name escaped
        seen = _show(d, named, victim)
        assert seen["command"] == [] and "s3cr3t" not in json.dumps(seen)
        ls = as_user(d, victim, "ls")
        assert "\x1b" not in ls.stdout and "\\x1b" in ls.stdout, ls.stdout

        # the adversary's own jobs ended with a reason, and got nowhere
        trapped = _wait(d, trap)
        assert trapped["status"] in ("failed", "lost"), trapped
        root_job = _wait(d, rootdir)
        assert root_job["status"] == "failed", root_job
        assert "/root" not in as_user(d, evil, "logs", str(rootdir)).stdout.splitlines()
        h = as_user(d, victim, "health", "--json")
        health = json.loads(h.stdout)
        assert health["checks"]["daemon"]["ok"], health
        fds = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
    finally:
        for pipe in (holder.stdin, holder.stdout):
            if pipe:
                pipe.close()
        holder.wait(30)
    d.stop()
    problems = check_invariants(d.state_dir / "gpusched.db")
    assert problems == [], problems
    figures["adversary: attacks at once"] = len(attacks)
    figures["adversary: victim jobs succeeded"] = f"{VICTIM_JOBS}/{VICTIM_JOBS}"
    figures["adversary: daemon fds at the end (300 connections were held)"] = fds
