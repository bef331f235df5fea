"""Issue 11 with two real user accounts against the root daemon: the local runner and the files
the daemon reads on its users' behalf.

- a job never starts in a directory its owner cannot enter (the shim changes directory after
  the switch of user, not Popen while still root);
- a FIFO, or a symlink to one, as a job's exit file does not block the daemon's tick;
- a queued TAO stage whose spec file becomes a FIFO does not hang ``gpusched show``;
- a status.json that is a symlink to a root-only file is not read;
- a job's log is 0600 and the job user's; its run directory is the daemon's (0711) and
  holds only the exit file, which is the user's (0600) but cannot be replaced;
- the switch to the job's user (setpriv in front of the shim, or Popen's where there is no
  setpriv) gives the job its whole environment, exactly, its user's groups and umask 022, and
  gives none of it to a process that runs as root; so does the switch of a `--notify` or
  `--output` hook.

Needs root with useradd/groupadd/setpriv (the ``users`` fixture skips otherwise). Every wait is
on a state the daemon reports (a status, progress, a process gone), never on a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import select
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusched.models import JobSpec
from gpusched.runners import local
from gpusched.runners.base import AttemptRef, LaunchRequest, Outcome
from gpusched.runners.hooks import Hooks
from gpusched.runners.local import SHIM, SHIM_SOURCING, LocalRunner, exit_path, trusted_setpriv
from gpusched.testing import users as real
from gpusched.testing.harness import DaemonProcess, fake_tao_env
from gpusched.testing.users import UNAVAILABLE, as_user
from gpusched.testing.users import available as users_available

pytestmark = pytest.mark.skipif(
    not users_available(), reason=UNAVAILABLE)

EXAMPLE_SPEC = Path(__file__).resolve().parents[2] / "examples/specs/ssd_train_resnet18_kitti.txt"
ENDED = {"succeeded", "failed", "cancelled", "lost"}


def submit(d: DaemonProcess, user: pwd.struct_passwd, cwd: Path, *args: str) -> int:
    r = as_user(d, user, "submit", *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def show(d: DaemonProcess, job: int, user: pwd.struct_passwd | None = None,
         timeout: float = 30) -> dict[str, Any]:
    r = as_user(d, user, "show", str(job), "--json", timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def wait_for(d: DaemonProcess, job: int, ok: Any, what: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = show(d, job)
        if ok(row):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} never {what}: {row}\n{d.log()}")
        time.sleep(0.1)


def wait_status(d: DaemonProcess, job: int, want: set[str], timeout: float = 30) -> dict[str, Any]:
    return wait_for(d, job, lambda r: r["status"] in want, f"reached {sorted(want)}", timeout)


def owned_dir(path: Path, user: pwd.struct_passwd, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)
    return path


def release_fifo(path: Path) -> None:
    """Let a reader blocked on the FIFO go (only the old, blocking code has one)."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def train_spec(dst: Path, user: pwd.struct_passwd, num_epochs: int = 3) -> Path:
    text = re.sub(r"\bnum_epochs: \d+", f"num_epochs: {num_epochs}", EXAMPLE_SPEC.read_text())
    dst.write_text(text)
    os.chown(dst, user.pw_uid, user.pw_gid)
    return dst


@contextlib.contextmanager
def tao_root_daemon(shared_dir: Path, command: list[str] | None = None) -> Iterator[DaemonProcess]:
    """The root daemon running TAO stages as local processes: the fake TAO, or ``command``."""
    env = fake_tao_env(mount_roots=[str(shared_dir)])
    if command is not None:
        env["GPUSCHED_TAO__LOCAL_COMMAND"] = json.dumps(command)
    with real.root_daemon(env) as d:
        yield d


# -- A: the working directory is entered as the job's user -----------------------------------


def test_a_job_never_starts_in_a_directory_its_owner_cannot_enter(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    d = root_daemon
    u1, u2 = users["gsuser1"], users["gsuser2"]
    private = owned_dir(shared_dir / "u2-private", u2, 0o700)
    assert os.stat("/root").st_mode & 0o077 == 0, "this host's /root is not private"
    for workdir in ("/root", str(private)):
        r = as_user(d, u1, "submit", "--workdir", workdir, "--", "pwd", cwd=shared_dir)
        if r.returncode != 0:  # refused at submission: fine too, as long as it says why
            assert workdir in r.stderr, r.stderr
            continue
        job = int(r.stdout)
        row = wait_status(d, job, ENDED)
        out = as_user(d, None, "logs", str(job)).stdout
        assert workdir not in out.splitlines(), f"the job ran in {workdir}: {out!r}"
        assert row["status"] == "failed", row
        assert row["exit_code"] == 126, row
        assert "working directory" in (row["reason"] or ""), row
        assert "can't cd" in out or "cd:" in out, out  # the shell's own words, in the job's log

    # an ordinary job still runs where it asked to
    job = submit(d, u1, shared_dir, "--workdir", str(shared_dir), "--", "pwd")
    assert wait_status(d, job, ENDED)["status"] == "succeeded"
    assert as_user(d, None, "logs", str(job)).stdout.split() == [str(shared_dir)]


# -- B: files users control never block or mislead the daemon ----------------------------------


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-fifo"])
def test_a_fifo_as_exit_file_does_not_block_the_daemon(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path,
        kind: str) -> None:
    d = root_daemon
    u1, u2 = users["gsuser1"], users["gsuser2"]
    home = owned_dir(shared_dir / "u1", u1)
    fifo = home / "fifo"
    exit_file = f'{d.state_dir}/logs/"$GPUSCHED_JOB_ID"/"$GPUSCHED_ATTEMPT".exit'
    plant = (f'rm -f {exit_file}; mkfifo {exit_file}' if kind == "fifo" else
             f'mkfifo {fifo}; rm -f {exit_file}; ln -sf {fifo} {exit_file}')
    # the job tries to plant the trap beside its log, then kills its shim (same uid)
    # so the daemon goes to read the exit file
    hostile = submit(d, u1, home, "--", "sh", "-c", f"{plant}; kill -9 $PPID")
    try:
        row = wait_status(d, hostile, ENDED)
        assert row["status"] in ("failed", "lost"), row
        # the log folder is not the user's: the exit file is still the regular file made for it
        st = os.lstat(d.state_dir / "logs" / str(hostile) / "1.exit")
        assert stat.S_ISREG(st.st_mode) and st.st_uid == u1.pw_uid, st
        assert "Permission denied" in as_user(d, u1, "logs", str(hostile)).stdout
        # the tick still runs: another user's job starts and finishes, health answers
        other = submit(d, u2, shared_dir, "--", "true")
        assert wait_status(d, other, ENDED)["status"] == "succeeded"
        r = as_user(d, u2, "health", timeout=20)
        assert r.returncode == 0, r.stderr
    finally:
        release_fifo(fifo)
        release_fifo(d.state_dir / "logs" / str(hostile) / "1.exit")


def test_a_queued_stage_whose_spec_becomes_a_fifo_does_not_hang_show(
        users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    with tao_root_daemon(shared_dir) as d:
        _spec_fifo_scenario(d, users, shared_dir)


def _spec_fifo_scenario(d: DaemonProcess, users: dict[str, pwd.struct_passwd],
                        shared_dir: Path) -> None:
    u1, u2 = users["gsuser1"], users["gsuser2"]
    home = owned_dir(shared_dir / "u1", u1)
    spec = train_spec(home / "spec.txt", u1)
    go = shared_dir / "go"
    # both GPUs busy, so the stage stays queued (and show computes its expected start)
    busy = [submit(d, u2, shared_dir, "--", "sh", "-c", f"while [ ! -e {go} ]; do sleep 0.1; done")
            for _ in range(2)]
    stage = None
    try:
        for job in busy:
            wait_status(d, job, {"running"})
        r = as_user(d, u1, "tao", "ssd", "train", "-e", str(spec), "-r", str(home / "results"),
                    cwd=home)
        assert r.returncode == 0, r.stderr
        stage = int(r.stdout)
        assert show(d, stage)["status"] == "queued"
        spec.unlink()
        os.mkfifo(spec)
        os.chown(spec, u1.pw_uid, u1.pw_gid)
        for user in (u2, u1, None):
            try:
                row = show(d, stage, user, timeout=20)
            except subprocess.TimeoutExpired:
                raise AssertionError("`gpusched show` hung on the stage's spec FIFO") from None
            assert row["status"] == "queued", row
        r = as_user(d, u2, "ls", timeout=20)
        assert r.returncode == 0, r.stderr
    finally:
        if stage is not None:
            as_user(d, None, "cancel", str(stage), timeout=20)
        release_fifo(spec)
        go.touch()
        for job in busy:
            wait_status(d, job, ENDED)


SECRET = [{"epoch": 7, "max_epoch": 42, "time_per_epoch": "0:00:05", "graphical": {"loss": 1.5}},
          {"status": "SUCCESS", "message": "secret"}]


def test_a_status_json_symlink_to_a_root_only_file_is_not_read(
        users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    u1 = users["gsuser1"]
    secret_dir = shared_dir / "root-only"
    secret_dir.mkdir(mode=0o700)
    secret = secret_dir / "status.json"
    secret.write_text("".join(json.dumps(r) + "\n" for r in SECRET))
    os.chmod(secret, 0o600)
    home = owned_dir(shared_dir / "u1", u1)
    results = owned_dir(home / "results", u1)
    spec = train_spec(home / "spec.txt", u1)
    go, planted = shared_dir / "go", shared_dir / "planted"
    # the "TAO" of this daemon: once the trap is set, one epoch line of gpusched's own on
    # stdout, then wait
    script = shared_dir / "fake-train.sh"
    script.write_text(f"while [ ! -e {planted} ]; do sleep 0.1; done\n"
                      "echo 'GPUSCHED_EPOCH {\"epoch\": 1, \"max_epoch\": 3, \"seconds\": 2.0}'\n"
                      f"while [ ! -e {go} ]; do sleep 0.1; done\n")
    os.chmod(script, 0o755)
    with tao_root_daemon(shared_dir, ["/bin/sh", str(script)]) as d:
        _status_symlink_scenario(d, u1, home, results, spec, go, planted, secret)


def _status_symlink_scenario(d: DaemonProcess, u1: pwd.struct_passwd, home: Path, results: Path,
                             spec: Path, go: Path, planted: Path, secret: Path) -> None:
    try:
        r = as_user(d, u1, "tao", "ssd", "train", "-e", str(spec), "-r", str(results), cwd=home)
        assert r.returncode == 0, r.stderr
        job = int(r.stdout)
        # after submission (which refuses a results dir that already holds a status.json)
        link = results / "status.json"
        link.symlink_to(secret)
        os.lchown(link, u1.pw_uid, u1.pw_gid)
        planted.touch()
        # the log and status.json are read in the same progress pass: once the log's epoch
        # shows, status.json was tried too
        row = wait_for(d, job, lambda r: (r.get("progress") or {}).get("epoch") is not None,
                       "showed progress")
        assert row["progress"]["epoch"] == 1, row["progress"]
        assert row["progress"]["max_epoch"] == 3, row["progress"]
        go.touch()
        row = wait_status(d, job, ENDED)
        assert "secret" not in (row["reason"] or ""), row
        assert row["status"] == "failed", row  # no status.json SUCCESS, no Execution status
    finally:
        go.touch()


# -- E: privacy of the local runner's files ---------------------------------------------------


def test_a_jobs_log_and_run_directory_are_private_to_its_user(
        root_daemon: DaemonProcess, users: dict[str, pwd.struct_passwd], shared_dir: Path) -> None:
    d = root_daemon
    u1 = users["gsuser1"]
    job = submit(d, u1, shared_dir, "--", "echo", "hello")
    row = wait_status(d, job, ENDED)
    assert row["status"] == "succeeded", row
    att = row["attempts"][0]
    log, run = os.stat(att["log_path"]), os.stat(att["run_dir"])
    assert (log.st_uid, log.st_gid, stat.S_IMODE(log.st_mode)) == (u1.pw_uid, u1.pw_gid, 0o600)
    assert (run.st_uid, stat.S_IMODE(run.st_mode)) == (0, 0o711)  # the user cannot replace
    exit_file = os.stat(exit_path(Path(att["run_dir"]), Path(att["log_path"]), att["n"]))
    # (what is in it: they may only write it)
    assert (exit_file.st_uid, stat.S_IMODE(exit_file.st_mode)) == (u1.pw_uid, 0o600)
    assert as_user(d, u1, "logs", str(job)).stdout == "hello\n"


# -- F: the switch of user, and what the job's environment reaches ----------------------------


def daemon_state(shared_dir: Path) -> Path:
    """A state directory laid out as the daemon's (root's, 0711: a job's user may reach its
    exit file, in logs/<job>/), where a user can reach it."""
    state = shared_dir / "state"
    state.mkdir(mode=0o711)
    return state


def launch_as(runner: LocalRunner, user: pwd.struct_passwd, spec: JobSpec, job: int = 1,
              n: int = 1, env: dict[str, str] | None = None) -> AttemptRef:
    """Launch ``spec`` as ``user``'s attempt ``job``/``n`` in the runner's state, as the
    daemon does; the attempt's ref, for polls."""
    assert runner.logs_dir is not None
    log = runner.logs_dir / str(job) / f"{n}.log"
    req = LaunchRequest(job_id=job, attempt=n, spec=spec, gpus=(), simulated=True,
                        env=env or {}, log_path=log, run_dir=log.parent,
                        owner_uid=user.pw_uid, owner=user.pw_name)
    return AttemptRef(job_id=job, n=n, runner="local", gpus=(), log_path=log,
                      run_dir=log.parent, started_at=time.time(), pid=runner.launch(req).pid)


def wait_end(runner: LocalRunner, ref: AttemptRef) -> Outcome:
    try:
        while (outcome := runner.poll(ref, time.time())) is None:
            select.select(runner.wait_fds(), [], [], 30)  # the shim's pidfd: its end
    finally:
        runner.close()
    return outcome


@pytest.mark.parametrize("switch", ["setpriv", "popen"])
def test_the_switch_to_a_jobs_user_keeps_its_environment_from_every_root_process(
        users: dict[str, pwd.struct_passwd], shared_dir: Path, switch: str) -> None:
    """Both ways the runner switches users: setpriv (what a root daemon uses: a vfork, not a
    fork of the daemon) and Popen's own (where a host has no trustworthy setpriv). The job
    sees its environment exactly (quotes, $, backquotes, a newline, an empty value), runs with
    its user's uid, gid and groups (gsadmin1 has a supplementary one), umask 022 and stdin
    /dev/null. And no root process saw the user's variables: the dynamic loader writes
    LD_DEBUG's output to LD_DEBUG_OUTPUT.<pid> for every process that has both, so a setpriv
    (root) given them would leave a root-owned file there."""
    setpriv = trusted_setpriv()
    if switch == "setpriv" and setpriv is None:
        pytest.skip("no trustworthy setpriv on this host (util-linux)")
    admin = users["gsadmin1"]
    work = owned_dir(shared_dir / f"env-{switch}", admin)
    state = daemon_state(shared_dir)
    runner = LocalRunner(state / "runs", state / "logs",
                         setpriv=setpriv if switch == "setpriv" else None)
    tricky = "it's \"quoted\" $HOME `id` \\ and\na second line"
    spec = JobSpec(command=["sh", "-c", 'printf "[%s]\\n" "$TRICKY" "${EMPTY-unset}" '
                            '"$GPUSCHED_JOB_ID" "$HOME"; id -u; id -g; id -G; umask; '
                            'readlink /proc/self/fd/0; tr "\\0" " " </proc/$PPID/cmdline'],
                   workdir=str(work),
                   env={"TRICKY": tricky, "EMPTY": "", "LD_DEBUG": "libs",
                        "LD_DEBUG_OUTPUT": str(work / "ld")})
    ref = launch_as(runner, admin, spec, env={"GPUSCHED_JOB_ID": "1"})
    outcome = wait_end(runner, ref)
    out = ref.log_path.read_text()
    assert (outcome.exit_code, outcome.reason) == (0, None), (outcome, out)  # its exit file
    lines = [ln for ln in out.splitlines() if not re.match(r"\s*\d+:", ln)]  # LD_DEBUG's own
    text = "\n".join(lines)
    assert f"[{tricky}]\n[]\n[1]\n[{admin.pw_dir}]\n" in text + "\n", out
    i = lines.index(f"[{admin.pw_dir}]") + 1
    uid, gid, groups, umask, stdin, parent = lines[i:i + 6]
    assert (int(uid), int(gid)) == (admin.pw_uid, admin.pw_gid)
    assert {int(g) for g in groups.split()} == set(os.getgrouplist(admin.pw_name, admin.pw_gid))
    assert len(groups.split()) >= 2  # gsadmin1's supplementary group is there
    assert (umask, stdin) == ("0022", "/dev/null")
    assert (SHIM_SOURCING if switch == "setpriv" else SHIM) in parent, parent
    debug = sorted(work.glob("ld.*"))
    assert debug, f"LD_DEBUG reached no process of the job: {out}"  # the check below is live
    owners = {p.name: p.stat().st_uid for p in debug}
    assert set(owners.values()) == {admin.pw_uid}, owners
    for p in debug:
        assert "initialize program: setpriv" not in p.read_text(), p


@pytest.fixture
def setpriv_runner(users: dict[str, pwd.struct_passwd], shared_dir: Path) -> LocalRunner:
    """A local runner that switches users with setpriv, in a state folder of the daemon's
    layout (skipped where the host has no trustworthy setpriv)."""
    setpriv = trusted_setpriv()
    if setpriv is None:
        pytest.skip("no trustworthy setpriv on this host (util-linux)")
    state = daemon_state(shared_dir)
    return LocalRunner(state / "runs", state / "logs", setpriv=setpriv)


def test_a_shim_started_through_setpriv_is_found_again_after_a_restart(
        users: dict[str, pwd.struct_passwd], setpriv_runner: LocalRunner) -> None:
    """Reconcile finds a shim by its command line: the one setpriv runs (SHIM_SOURCING) is
    recognised, with its job, attempt and user, by a runner that did not start it (the
    daemon after a restart)."""
    runner, u1 = setpriv_runner, users["gsuser1"]
    pid = launch_as(runner, u1, JobSpec(command=["sleep", "60"], workdir="/tmp"), 5, 2).pid
    assert pid is not None
    try:
        deadline = time.monotonic() + 30
        shim = b"\0".join([b"/bin/sh", b"-c", SHIM_SOURCING.encode()])  # not setpriv's, whose
        while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(shim):  # argv holds it
            assert time.monotonic() < deadline, "setpriv never ran the shim"
            time.sleep(0.01)  # setpriv's exec of the shim: a state of the process, polled
        after_restart = LocalRunner(runner.runs_dir, runner.logs_dir)
        found = [o for o in after_restart.orphans(set()) if o.handle[0] == pid]
        assert [(o.job_id, o.attempt, o.uid) for o in found] == [(5, 2, u1.pw_uid)], found
        assert after_restart.orphans({(5, 2)}) == []  # a live attempt's shim is not an orphan
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, 9)
        runner.close()


def test_a_failed_switch_of_user_says_so(users: dict[str, pwd.struct_passwd],
                                         setpriv_runner: LocalRunner,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """When setpriv cannot switch (here: a group that is not a gid), the job fails with a
    reason that names the switch, and setpriv's own message is in the job's log."""
    runner = setpriv_runner
    monkeypatch.setattr(local, "user_groups", lambda user: ["none"])
    ref = launch_as(runner, users["gsuser1"], JobSpec(command=["true"], workdir="/tmp"))
    outcome = wait_end(runner, ref)
    assert outcome.exit_code not in (None, 0), outcome
    assert "the switch to the job's user failed" in (outcome.reason or ""), outcome
    assert "setpriv" in ref.log_path.read_text(), ref.log_path.read_text()


@pytest.mark.parametrize("switch", ["setpriv", "popen"])
def test_a_hook_switches_to_its_owner_as_a_job_does(
        users: dict[str, pwd.struct_passwd], shared_dir: Path, switch: str) -> None:
    """--notify and --output run as the job's owner through the same switch: the hook sees
    its environment exactly, its owner's uid and groups, its own stdin (the log, for a
    copy), and no root process sees the owner's variables (LD_DEBUG_OUTPUT, as above)."""
    setpriv = trusted_setpriv()
    if switch == "setpriv" and setpriv is None:
        pytest.skip("no trustworthy setpriv on this host (util-linux)")
    admin = users["gsadmin1"]
    work = owned_dir(shared_dir / f"hook-{switch}", admin)
    given = shared_dir / f"stdin-{switch}"  # a file of the daemon's, as the log is
    given.write_text("the log\n")
    hooks = Hooks(setpriv=setpriv if switch == "setpriv" else None)
    tricky = "it's \"quoted\" $HOME `id` \\ and\na second line"
    hooks.start(1, 'printf "[%s]\\n" "$TRICKY" > out; id -u >> out; id -G >> out; '
                   'cat >> out; tr "\\0" " " </proc/$PPID/cmdline >> out',
                uid=admin.pw_uid, workdir=str(work), now=time.time(), timeout_s=30,
                env={"TRICKY": tricky, "LD_DEBUG": "libs", "LD_DEBUG_OUTPUT": str(work / "ld")},
                stdin_path=str(given))
    hooks._running[1].proc.wait(timeout=30)  # the hook's end
    assert hooks.poll(1, time.time()) == (True, None)
    out = (work / "out").read_text()
    assert out.startswith(f"[{tricky}]\n{admin.pw_uid}\n"), out
    groups = out.splitlines()[3]
    assert {int(g) for g in groups.split()} == set(os.getgrouplist(admin.pw_name, admin.pw_gid))
    assert "the log\n" in out
    debug = sorted(work.glob("ld.*"))
    assert debug, out
    assert {p.stat().st_uid for p in debug} == {admin.pw_uid}
    assert all("initialize program: setpriv" not in p.read_text() for p in debug)
