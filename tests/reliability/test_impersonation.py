"""What a review found after issue 11's first fixes, each with real users and real processes:
a user passing their process off as another user's job or shim, a running job declaring itself
finished after a restart, the daemon reading another user's status.json for a user, and
another user's terminal escapes in an admin's `gpusched logs`.

Needs root (``users`` creates gsuser1, gsuser2 and gsadmin1); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.gpus import job_of_pid
from gpusched.models import JobSpec
from gpusched.runners.base import AttemptRef
from gpusched.runners.local import EXIT_FILE, SHIM, SHIM_NAME, alive, exit_path
from gpusched.service import Service
from gpusched.testing.harness import DaemonProcess
from gpusched.testing.ticks import TERMINAL, restarted, run_until, status, submit
from gpusched.testing.users import UNAVAILABLE, as_user, user_argv
from gpusched.testing.users import available as users_available

pytestmark = pytest.mark.skipif(
    not users_available(), reason=UNAVAILABLE)


@pytest.fixture
def sleeper(users: dict[str, pwd.struct_passwd]) -> Iterator[subprocess.Popen[bytes]]:
    """A process of gsuser1 that claims, in its environment, to be gpusched job 7."""
    u1 = users["gsuser1"]
    proc = subprocess.Popen([*user_argv(u1), "sleep", "60"], env={"GPUSCHED_JOB_ID": "7",
                                                                  "PATH": os.environ["PATH"]})
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{proc.pid}").st_uid != u1.pw_uid:  # setpriv has switched and exec'd
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


def test_a_process_counts_as_a_job_only_when_it_runs_as_the_jobs_owner(
        users: dict[str, pwd.struct_passwd], sleeper: subprocess.Popen[bytes]) -> None:
    """GPUSCHED_JOB_ID is anyone's to set: gsuser1's process must not pass for gsuser2's job
    7 (the GPU of job 7 would be drained when it ends, and the process would hide from the
    foreign-process check)."""
    u1, u2 = users["gsuser1"], users["gsuser2"]
    while job_of_pid(sleeper.pid) is None:  # environ is readable once exec is done
        time.sleep(0.01)
    assert job_of_pid(sleeper.pid) == 7  # what the environment says
    assert job_of_pid(sleeper.pid, {7: u2.pw_uid}) is None  # job 7 is gsuser2's: foreign
    assert job_of_pid(sleeper.pid, {7: u1.pw_uid}) == 7
    assert job_of_pid(sleeper.pid, {}) is None  # no job 7 holds a GPU


def test_a_fake_shim_of_another_user_is_not_adopted(
        service: Service, users: dict[str, pwd.struct_passwd]) -> None:
    """A crash leaves gsuser2's attempt 'starting'; gsuser1 starts a process that looks like
    its shim (same command line, own session). The restarted daemon must not adopt it: the job
    is queued again and the impostor is stopped."""
    u1, u2 = users["gsuser1"], users["gsuser2"]
    service.daemon.refresh_inventory(service.clock.now())
    job = service.store.submit(JobSpec(command=["true"], workdir="/tmp"), owner_uid=u2.pw_uid,
                               owner="gsuser2", now=service.clock.now())
    n = service.store.claim(job, [service.daemon.gpus[0].uuid], runner="local",
                            now=service.clock.now(), paths=service.daemon.paths)
    assert n == 1
    _, run_dir = service.daemon.paths(job, n)
    os.makedirs(run_dir, exist_ok=True)
    fake = subprocess.Popen([*user_argv(u1), "setsid", "/bin/sh", "-c", SHIM, SHIM_NAME, "/",
                             str(Path(run_dir) / EXIT_FILE), "sleep", "60"],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not _shim_pids(run_dir):
            assert time.monotonic() < deadline, "the fake shim never started"
            time.sleep(0.01)
        (pid,) = _shim_pids(run_dir)
        with restarted(service) as svc2:
            svc2.daemon.tick(svc2.clock.now())
            attempts = svc2.store.attempts(job)
            assert attempts[0]["state"] == "ended", attempts
            assert "before the attempt started" in attempts[0]["reason"], attempts
            deadline = time.monotonic() + 10
            while alive(pid, None):  # removed as an orphan
                assert time.monotonic() < deadline, "the impostor still runs"
                time.sleep(0.02)
            # the job itself runs, as gsuser2, once
            run_until(svc2, lambda: status(svc2, job) in TERMINAL)
            assert status(svc2, job) == "succeeded"
    finally:
        fake.kill()
        fake.wait()


def _shim_pids(run_dir: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 5 and argv[3] == SHIM_NAME.encode() and argv[5].startswith(
                    run_dir.encode()) and int(name) == os.getsid(int(name)):
                out.append(int(name))
    return out


def test_a_running_job_cannot_declare_itself_finished_after_a_restart(service: Service) -> None:
    """The exit file is the job user's to write: after a restart (the runner holds no child),
    it counts only once the shim we started is gone."""
    job = submit(service, "sleep", "60")
    service.daemon.tick(service.clock.now())
    assert status(service, job) == "running"
    att = service.store.attempt(job, 1)
    assert att is not None
    # what the job's user could do
    exit_path(Path(att["run_dir"]), Path(att["log_path"]), att["n"]).write_text("0\n")
    with restarted(service) as svc2:
        svc2.daemon.tick(svc2.clock.now())
        assert status(svc2, job) == "running"
        ref = AttemptRef.from_row({**att, "state": "live"})
        assert svc2.daemon.runners["local"].poll(ref, svc2.clock.now()) is None
        os.kill(att["pid"], signal.SIGKILL)  # now the shim is gone: the file is believed
        run_until(svc2, lambda: status(svc2, job) in TERMINAL)
        row = svc2.store.get_job(job)
        assert row["ended_at"] >= att["started_at"]


def test_progress_reads_a_results_dir_only_as_its_owner_could(
        users: dict[str, pwd.struct_passwd], shared_dir: Path, tmp_path: Path) -> None:
    """A stage of gsuser1 pointing at gsuser2's private results: the daemon follows
    status.json as gsuser1 could read it, which is not at all."""
    from gpusched.progress import ProgressTracker

    u1, u2 = users["gsuser1"], users["gsuser2"]
    private = shared_dir / "u2"
    (private / "results").mkdir(parents=True)
    line = {"epoch": 3, "max_epoch": 80, "time_per_epoch": "0:01:40", "status": "RUNNING",
            "graphical": {"loss": "1.2345", "learning_rate": "0.000777",
                          "mean average precision": "0.4242"}}
    (private / "results" / "status.json").write_text(json.dumps(line) + "\n")
    for p in (private, private / "results", private / "results" / "status.json"):
        os.chown(p, u2.pw_uid, u2.pw_gid)
    private.chmod(0o700)
    (private / "results" / "status.json").chmod(0o600)
    log = tmp_path / "1.log"
    log.write_text("")
    spec = {"command": ["ssd", "train"], "kind": "tao:train", "stage": {"stage": {
        "task": "train", "results_dir": str(private / "results")}}}
    ref = AttemptRef(job_id=1, n=1, runner="local", gpus=(), log_path=log, run_dir=tmp_path,
                     started_at=0.0)
    assert ProgressTracker().poll(ref, spec, 100.0, owner_uid=u1.pw_uid) == []
    rows = ProgressTracker().poll(ref, spec, 100.0, owner_uid=u2.pw_uid)
    assert [(r["epoch"], r["loss"]) for r in rows] == [(3, 1.2345)]


def test_an_admin_reading_another_users_log_gets_no_terminal_escapes(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    d = root_daemon
    u1, admin = users["gsuser1"], users["gsadmin1"]
    r = as_user(d, u1, "submit", "--", "printf", "a\\033]0;pwned\\007b\\tc\\n", cwd=shared_dir)
    assert r.returncode == 0, r.stderr
    job = int(r.stdout)
    d.wait_status(job, {"succeeded"})
    own = as_user(d, u1, "logs", str(job)).stdout
    assert own == "a\x1b]0;pwned\x07b\tc\n"  # one's own output, as it is
    seen = as_user(d, admin, "logs", str(job)).stdout
    assert seen == "a\\x1b]0;pwned\\x07b\tc\n", seen


def test_the_cli_talks_only_to_a_daemon_of_root_or_its_own_user(
        users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    """A socket configured in a directory others can write: another user could listen there
    first and collect the jobs (with their environment) sent to it. The CLI refuses."""
    u1, u2 = users["gsuser1"], users["gsuser2"]
    path = shared_dir / "fake.sock"
    fake = subprocess.Popen([*user_argv(u2), sys.executable, "-c",
                             "import os,socket,sys,time; s=socket.socket(socket.AF_UNIX);"
                             f"s.bind({str(path)!r}); os.chmod({str(path)!r}, 0o666);"
                             "s.listen(8); print('up', flush=True);"
                             "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "up"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("GPUSCHED_")},
               "GPUSCHED_SOCKET": str(path), "GPUSCHED_CONFIG": "/dev/null", "HOME": "/tmp"}
        r = subprocess.run([*user_argv(u1), sys.executable, "-m", "gpusched.cli", "submit",
                            "--env", "TOKEN=s3cr3t", "--", "true"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, r
        assert f"served by uid {u2.pw_uid}, neither root nor you" in r.stderr, r.stderr
    finally:
        fake.kill()
        fake.wait()
        if fake.stdout:
            fake.stdout.close()
