"""The local runner: each attempt runs as a process under a tiny shim in its own session.

The shim is a few lines of POSIX sh (about 1 ms to start, where a Python shim costs 10+ ms of
CPU per job): it runs the command in the foreground, then writes the exit status to a file with
a single ``write()``. Because the shim is a session leader and not tied to the daemon, a daemon
restart neither kills the job nor loses its exit code; the daemon re-finds the shim by pid and
``/proc`` start time (so a reused pid is never adopted). SIGTERM to the shim is trapped (and
deferred until the command ends) so a cancel that signals the whole group still gets an exit
status written; SIGKILL is sent to the group's members but not to the shim.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
import subprocess
from pathlib import Path

from gpusched.errors import LaunchRefused, RunnerError
from gpusched.runners.base import AttemptRef, Launched, LaunchRequest, Orphan, Outcome

log = logging.getLogger(__name__)

SHIM_NAME = "gpusched-shim"
# $1 is the exit file; the rest is the user's command, run as "$@" (never re-parsed by a shell).
SHIM = 'f=$1; shift; trap : TERM INT HUP; "$@"; printf "%s\\n" $? > "$f"'
EXIT_FILE = "exit"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _stat(pid: int) -> list[bytes] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _proc_state_pgid(pid: int) -> tuple[str, int] | None:
    fields = _stat(pid)
    return (fields[0].decode(), int(fields[2])) if fields else None


def alive(pid: int | None, start: int | None) -> bool:
    """True if ``pid`` runs and is the very process that started at ``start`` (not a zombie)."""
    if not pid:
        return False
    st = _proc_state_pgid(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return start is None or proc_start_time(pid) == start


def read_exit_file(path: Path) -> int | None:
    """The shim's exit status, or None while it is not (completely) written."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if not text.endswith("\n"):
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def describe_exit(code: int | None) -> str | None:
    if code is None or code == 0:
        return None
    if code == 127:
        return "exit code 127 (command not found)"
    if code == 126:
        return "exit code 126 (command not executable)"
    if code > 128:
        try:
            return f"exit code {code} (killed by {signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"exit code {code}"


def _group_members(pgid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_state_pgid(int(name))
            if st and st[1] == pgid:
                out.append(int(name))
    return out


class _ShimProcess(subprocess.Popen[bytes]):
    """A Popen the daemon may leave behind on purpose: a job outlives a daemon shutdown, so a
    shim still running then is detached, not waited for (and not warned about)."""

    detached = False

    def __del__(self) -> None:
        if not self.detached:
            super().__del__()


class LocalRunner:
    name = "local"

    def __init__(self, runs_dir: Path | None = None) -> None:
        # Only shims under our own runs directory are ours: another daemon (another state
        # directory, a test) may run shims on the same host, and reconcile must never touch them.
        self.runs_dir = runs_dir.resolve() if runs_dir else None
        self._procs: dict[tuple[int, int], _ShimProcess] = {}
        self._pidfds: dict[tuple[int, int], int] = {}

    # -- launch ---------------------------------------------------------------------------

    def _environment(self, req: LaunchRequest, user: pwd.struct_passwd | None) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
        if user is not None:
            env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name,
                       SHELL=user.pw_shell or "/bin/sh")
        env.update(req.spec.env)
        env.update(req.env)  # the daemon's variables (CUDA_*, GPUSCHED_*) win
        return env

    def launch(self, req: LaunchRequest) -> Launched:
        key = (req.job_id, req.attempt)
        try:
            user: pwd.struct_passwd | None = pwd.getpwuid(req.owner_uid)
        except KeyError:
            user = None
        as_other = os.geteuid() == 0 and req.owner_uid != 0
        if as_other and user is None:
            raise LaunchRefused(f"uid {req.owner_uid} has no passwd entry; cannot run as it")
        workdir = req.spec.workdir or (user.pw_dir if user else "/")
        if not os.path.isdir(workdir):
            raise LaunchRefused(f"working directory {workdir} does not exist")
        req.run_dir.mkdir(parents=True, exist_ok=True)
        req.log_path.parent.mkdir(parents=True, exist_ok=True)
        exit_file = req.run_dir / EXIT_FILE
        exit_file.unlink(missing_ok=True)
        kwargs: dict[str, object] = {}
        if as_other and user is not None:
            os.chown(req.run_dir, req.owner_uid, user.pw_gid)
            kwargs.update(user=req.owner_uid, group=user.pw_gid,
                          extra_groups=os.getgrouplist(user.pw_name, user.pw_gid))
        try:
            with open(req.log_path, "ab") as logf:
                if as_other and user is not None:
                    os.fchown(logf.fileno(), req.owner_uid, user.pw_gid)
                proc = _ShimProcess(
                    ["/bin/sh", "-c", SHIM, SHIM_NAME, str(exit_file), *req.spec.command],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    cwd=workdir, env=self._environment(req, user), start_new_session=True,
                    close_fds=True, **kwargs,  # type: ignore[call-overload]
                )
        except OSError as err:
            raise RunnerError(f"could not start the shim for job {req.job_id}: {err}") from err
        self._procs[key] = proc
        self._watch(key, proc.pid)
        return Launched(pid=proc.pid, pid_start=proc_start_time(proc.pid))

    def _watch(self, key: tuple[int, int], pid: int) -> None:
        if key in self._pidfds:
            return
        with contextlib.suppress(OSError, AttributeError):
            self._pidfds[key] = os.pidfd_open(pid)

    def _forget(self, key: tuple[int, int]) -> None:
        self._procs.pop(key, None)
        fd = self._pidfds.pop(key, None)
        if fd is not None:
            os.close(fd)

    # -- poll -----------------------------------------------------------------------------

    def poll(self, ref: AttemptRef, now: float) -> Outcome | None:
        key = ref.key
        exit_file = ref.run_dir / EXIT_FILE
        proc = self._procs.get(key)
        if proc is not None:
            if proc.poll() is None:
                return None
            code = read_exit_file(exit_file)
            if code is None:  # the shim itself was killed before it could write
                rc = proc.returncode
                code = 128 - rc if rc < 0 else rc
                return self._ended(key, code, now, reason=f"the shim ended without an exit "
                                   f"status ({describe_exit(code) or 'exit 0'})")
            return self._ended(key, code, self._mtime(exit_file, now))
        code = read_exit_file(exit_file)
        if code is not None:
            return self._ended(key, code, self._mtime(exit_file, now))
        if ref.pid and alive(ref.pid, ref.pid_start):
            self._watch(key, ref.pid)  # adopted after a restart: wake on its exit too
            return None
        code = read_exit_file(exit_file)  # it may have finished between the two looks
        if code is not None:
            return self._ended(key, code, self._mtime(exit_file, now))
        self._forget(key)
        return Outcome(exit_code=None, ended_at=now, lost=True,
                       reason="the job's process is gone and left no exit status")

    @staticmethod
    def _mtime(path: Path, default: float) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return default

    def _ended(self, key: tuple[int, int], code: int, ended_at: float,
               reason: str | None = None) -> Outcome:
        self._forget(key)
        return Outcome(exit_code=code, ended_at=ended_at, reason=reason or describe_exit(code))

    # -- cancel and cleanup ---------------------------------------------------------------

    def signal_cancel(self, ref: AttemptRef, *, kill: bool) -> None:
        if not alive(ref.pid, ref.pid_start):
            return
        assert ref.pid is not None
        if not kill:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(ref.pid, signal.SIGTERM)
            return
        # SIGKILL every member of the job's group but the shim, so the shim records the status
        members = [p for p in _group_members(ref.pid) if p != ref.pid]
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def cleanup(self, ref: AttemptRef) -> None:
        self._forget(ref.key)

    # -- reconcile ------------------------------------------------------------------------

    def orphans(self, live: set[tuple[int, int]]) -> list[Orphan]:
        """Shims running on this host whose attempt the store does not count as live."""
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
            except OSError:
                continue
            if len(argv) < 5 or argv[3] != SHIM_NAME.encode() or argv[2] != SHIM.encode():
                continue
            run_dir = Path(argv[4].decode(errors="replace")).parent
            if self.runs_dir is None or run_dir.parent.parent != self.runs_dir:
                continue
            try:
                job_id, n = int(run_dir.parent.name), int(run_dir.name)
            except ValueError:
                continue
            if (job_id, n) not in live:
                pid = int(name)
                found.append(Orphan(f"local shim pid {pid} of job {job_id} attempt {n}",
                                    job_id=job_id, attempt=n, handle=(pid, proc_start_time(pid))))
        return found

    def remove_orphan(self, orphan: Orphan) -> bool:
        pid, start = orphan.handle
        if alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            return False
        return True

    def wait_fds(self) -> list[int]:
        return list(self._pidfds.values())

    def health(self) -> tuple[bool, str]:
        return True, "local runner ok"

    def close(self) -> None:
        for key in list(self._pidfds):
            os.close(self._pidfds.pop(key))
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.detached = True
        self._procs.clear()
