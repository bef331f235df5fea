"""The local runner: each attempt runs as a process under a tiny shim in its own session.

The shim is a few lines of POSIX sh (about 1 ms to start, where a Python shim costs 10+ ms of
CPU per job): it runs the command in the foreground, then writes the exit status to a file with
a single ``write()``. Because the shim is a session leader and not tied to the daemon, a daemon
restart neither kills the job nor loses its exit code; the daemon re-finds the shim by pid and
``/proc`` start time (so a reused pid is never adopted). SIGTERM to the shim is trapped (and
deferred until the command ends) so a cancel that signals the whole group still gets an exit
status written; SIGKILL is sent to the group's members but not to the shim.

The shim, not Popen, enters the job's working directory: Popen's ``cwd=`` happens while still
root, so a job could start in a directory its owner may not enter. The run directory (0700) and
the log (0600) belong to the job's user; everything read back from the run directory goes
through :mod:`gpusched.safefs`. An attempt's end is reported by every ``poll`` until
``cleanup``, which the daemon calls only once the end is committed.

A root daemon switches to the job's user with util-linux's ``setpriv`` in front of the shim
(``user_switch``; hooks use it too), not with Popen's ``user=``/``group=``/``extra_groups=``:
with those, CPython cannot use vfork and forks the whole daemon (page tables and all: 2 ms at
10 MiB, 6 ms at 100 MiB, holding the GIL), which made a launch cost about 5 ms of the tick on
a shared box. ``setpriv`` runs as root, so it gets only two fixed variables (PATH, LANG): a
user's LD_PRELOAD, LOCPATH or GLIBC_TUNABLES must never reach a root process. The rest of the
job's environment reaches the shim on its stdin (a memfd) as ``command export`` lines the shim
sources as the job's user before anything else, then stdin is /dev/null again. A host without
a trustworthy setpriv falls back to Popen's switch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import pwd
import re
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpusched.errors import LaunchRefused, RunnerError
from gpusched.paths import process_uid
from gpusched.runners.base import AttemptRef, Launched, LaunchRequest, Orphan, Outcome
from gpusched.safefs import UnsafeFile, open_in_daemon_dir

if TYPE_CHECKING:
    from gpusched.config import Settings

log = logging.getLogger(__name__)

SHIM_NAME = "gpusched-shim"
# $1 is the working directory, entered only after the switch to the job's user (so a job never
# starts in a directory its owner cannot enter); $2 is the exit file; the rest is the user's
# command, run as "$@" (never re-parsed by a shell). The shim exits with the command's status
# too, so a daemon holding the process learns it even when the exit file could not be written
# (a full disk). A refused directory is written as "126 cd" (see read_exit).
SHIM = ('d=$1; f=$2; shift 2; trap : TERM INT HUP; cd -- "$d" || '
        '{ printf "126 cd\\n" > "$f"; exit 126; }; "$@"; s=$?; printf "%s\\n" $s > "$f"; exit $s')
# The shim behind setpriv (see the module's doc): the job's variables first, as its user, from
# the export lines on its stdin; then stdin is /dev/null, as for every job
SHIM_SOURCING = '. /dev/stdin; exec </dev/null; ' + SHIM
# argv index of the exit file in a shim's /proc/PID/cmdline, for each shim text this runner
# recognises (the one before the working-directory argument, still running after an upgrade)
_EXIT_ARG = {SHIM.encode(): 5, SHIM_SOURCING.encode(): 5,
             b'f=$1; shift; trap : TERM INT HUP; "$@"; printf "%s\\n" $? > "$f"': 4}
EXIT_FILE = "exit"  # in an attempt's run directory (the layout before issue 15's)
EXIT_SUFFIX = ".exit"  # beside the attempt's log: <logs>/<job>/<n>.exit
EXIT_FILE_MAX = 64
#: how an attempt's log is opened: appending, never through a symlink, never blocking on a FIFO
#: (made blocking once it is known to be a regular file)
LOG_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY |
             os.O_NONBLOCK)
CD_FAILED = "cd"
JOB_UMASK = 0o022  # what a login shell gives: a job's files are readable as users expect
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: variables a local job does not get from the submitter: they change how /bin/sh (the shim)
#: starts or parses. LD_PRELOAD and the like stay: the shim runs as the job's user, so they
#: change nothing that user could not change in their own job
SHIM_UNSAFE_ENV = frozenset({"ENV", "BASH_ENV", "IFS", "CDPATH", "PS4", "SHELLOPTS",
                             "BASHOPTS", "GLOBIGNORE", "POSIXLY_CORRECT"})
#: all that setpriv (root) gets of a job's environment: fixed values, never the user's
SETPRIV_ENV = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
GROUPS_TTL_S = 10.0  # how long a user's group list is reused for their launches
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def trusted_setpriv() -> str | None:
    """util-linux's setpriv, when root may run it: a regular file of root's that nobody else
    may write, in folders of root's that nobody else may write. None elsewhere (then the
    runner switches users with Popen's arguments, a fork of the daemon)."""
    for path in ("/usr/bin/setpriv", "/bin/setpriv"):
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                continue
            folders = [os.stat(p) for p in Path(real).parents]
        except OSError:
            continue
        if all(f.st_uid == 0 and not f.st_mode & 0o022 for f in folders):
            return real
    return None


_groups_cache: dict[tuple[str, int], tuple[float, list[int]]] = {}


def user_groups(user: pwd.struct_passwd) -> list[int]:
    """The user's groups, as a switch of user gives them to a job or hook: read again after
    GROUPS_TTL_S (getgrouplist reads the whole group database: 0.1 ms a launch here, more
    with a directory service), as Slurm's GroupUpdateTime does (600 s there)."""
    key, now = (user.pw_name, user.pw_gid), time.monotonic()
    cached = _groups_cache.get(key)
    if cached is None or now - cached[0] > GROUPS_TTL_S:
        if len(_groups_cache) > 1024:
            _groups_cache.clear()
        cached = _groups_cache[key] = (now, os.getgrouplist(user.pw_name, user.pw_gid))
    return cached[1]


@dataclasses.dataclass(frozen=True)
class UserSwitch:
    """How a root daemon starts ``/bin/sh -c TEXT ...`` as a job's user (see the module's doc).
    ``exports`` (the environment as export lines, for the shell to source first) is set
    exactly when the switch is setpriv's; otherwise ``popen`` holds Popen's own switch."""

    prefix: list[str]  # before /bin/sh: setpriv and its arguments, or nothing
    env: dict[str, str]  # the started process's environment
    exports: bytes | None = None
    popen: dict[str, Any] = dataclasses.field(default_factory=dict)


def user_switch(setpriv: str | None, user: pwd.struct_passwd,
                env: dict[str, str]) -> UserSwitch:
    """The switch to ``user`` for a process whose environment is ``env``: setpriv where the
    host has a trustworthy one (given only SETPRIV_ENV; the rest goes to ``exports``), else
    Popen's arguments (a fork of the daemon)."""
    groups = user_groups(user)
    if setpriv is None:
        return UserSwitch([], env, popen={"user": user.pw_uid, "group": user.pw_gid,
                                          "extra_groups": groups})
    return UserSwitch(
        [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
         f"--groups={','.join(str(g) for g in groups)}", "--"], dict(SETPRIV_ENV),
        exports=export_lines({k: v for k, v in env.items() if SETPRIV_ENV.get(k) != v}))


def env_memfd(exports: bytes) -> int:
    """A memfd holding ``exports`` (export_lines), for a shim to source as the job's user."""
    fd = os.memfd_create("gpusched-env", os.MFD_CLOEXEC)
    try:
        os.write(fd, exports)  # a memfd takes it all in one write
    except BaseException:
        os.close(fd)
        raise
    return fd


def export_lines(env: dict[str, str]) -> bytes:
    """``env`` as POSIX sh that exports it (each value single-quoted; ``command`` so a name
    the shell holds read-only, such as bash's UID, is skipped, its complaint dropped, instead
    of ending the shim). Every name must be a shell name: a job's are checked at submission
    (JobSpec), the daemon's are its own."""
    lines = ["{ :\n"]
    for name, value in env.items():
        if not _SHELL_NAME.fullmatch(name):
            raise ValueError(f"environment variable name {name!r} cannot be exported by sh")
        quoted = value.replace("'", "'\\''")
        lines.append(f"command export {name}='{quoted}'\n")
    lines.append("} 2>/dev/null\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _stat(pid: int) -> list[bytes] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:  # os.open/os.read: three system calls, where open() makes nine
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # a few hundred bytes: the name is at most 64
    except OSError:
        return None
    finally:
        os.close(fd)
    return data[data.rindex(b")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _proc_state_pgid(pid: int) -> tuple[str, int] | None:
    fields = _stat(pid)
    return (fields[0].decode(), int(fields[2])) if fields else None


def _session_leader(pid: int) -> bool:
    """A shim runs in its own session (start_new_session): pid == pgid == sid."""
    fields = _stat(pid)
    return fields is not None and int(fields[2]) == pid and int(fields[3]) == pid


def alive(pid: int | None, start: int | None) -> bool:
    """True if ``pid`` runs and is the very process that started at ``start`` (not a zombie)."""
    if not pid:
        return False
    st = _proc_state_pgid(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return start is None or proc_start_time(pid) == start


def exit_path(run_dir: Path, log_path: Path, n: int) -> Path:
    """Where an attempt's shim writes its exit status. A local attempt keeps it beside its log,
    in the job's log folder (the daemon's, 0711): ``<logs>/<job>/<n>.exit``, and names that
    folder as its run directory; the attempt needs no folders of its own (one new folder per
    job, not three: the files a sweep of short jobs creates are most of what it costs). An
    attempt started by an older gpusched has ``<runs>/<job>/<n>/exit``."""
    if run_dir == log_path.parent:
        return log_path.with_name(f"{n}{EXIT_SUFFIX}")
    return run_dir / EXIT_FILE


def read_exit(path: Path) -> tuple[int | None, str | None]:
    """(the shim's exit status or None while it is not (completely) written, why it cannot be
    read). The file is the job user's: it is read through safefs all the same (never
    blocking, never following a link, a size cap), as every file a user controls."""
    try:
        fd = open_in_daemon_dir(path)
    except UnsafeFile as err:
        return None, f"the exit file is refused ({err})"
    except OSError:
        return None, None
    try:
        data = os.pread(fd, EXIT_FILE_MAX, 0)
    except OSError:
        return None, None
    finally:
        os.close(fd)
    text = data.decode(errors="replace")
    if not text.endswith("\n"):
        return None, None
    word, _, note = text.strip().partition(" ")
    try:
        code = int(word)
    except ValueError:
        return None, None
    if note == CD_FAILED:
        return code, "the job's user cannot enter its working directory (see its log)"
    return code, None


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
    via_setpriv = False  # started behind setpriv (see the module's doc)

    def __del__(self) -> None:
        if not self.detached:
            super().__del__()


class LocalRunner:
    name = "local"

    def __init__(self, runs_dir: Path | None = None, logs_dir: Path | None = None, *,
                 setpriv: str | bool | None = True) -> None:
        # Only shims under our own state directory are ours: another daemon (another state
        # directory, a test) may run shims on the same host, and reconcile must never touch them.
        self.runs_dir = runs_dir.resolve() if runs_dir else None
        self.logs_dir = logs_dir.resolve() if logs_dir else None
        self._procs: dict[tuple[int, int], _ShimProcess] = {}
        self._pidfds: dict[tuple[int, int], int] = {}
        self._outcomes: dict[tuple[int, int], Outcome] = {}  # ended, until cleanup()
        # how a root daemon switches to a job's user (see the module's doc): True finds it
        self.setpriv = trusted_setpriv() if setpriv is True else setpriv or None

    @classmethod
    def of(cls, settings: Settings) -> LocalRunner:
        """The runner of a daemon's state directory (its runs/ and logs/)."""
        return cls(settings.runs_dir, settings.logs_dir)

    # -- launch ---------------------------------------------------------------------------

    def _environment(self, req: LaunchRequest, user: pwd.struct_passwd | None) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
        if user is not None:
            env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name,
                       SHELL=user.pw_shell or "/bin/sh")
        # the submitter's environment (--export), less what would change how the shim's own
        # shell behaves (its startup files, word splitting, cd): the shim must record the
        # exit status the same way whatever a user exports
        env.update({k: v for k, v in req.spec.env.items() if k not in SHIM_UNSAFE_ENV})
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
        exit_file = exit_path(req.run_dir, req.log_path, req.attempt)
        owner = (req.owner_uid, user.pw_gid) if as_other and user is not None else None
        env = self._environment(req, user)
        # the shim enters the working directory itself, as the job's user: Popen's cwd=
        # happens before the switch of user, while still root
        switch = (user_switch(self.setpriv, user, env) if owner is not None and user is not None
                  else UserSwitch([], env))
        text = SHIM_SOURCING if switch.exports is not None else SHIM
        argv = [*switch.prefix, "/bin/sh", "-c", text, SHIM_NAME, workdir, str(exit_file),
                *req.spec.command]
        try:
            logfd = self.attempt_files(exit_file, req.log_path, owner)
        except OSError as err:
            raise RunnerError(f"could not prepare job {req.job_id}'s run directory or log: "
                              f"{err}") from err
        stdin: int = subprocess.DEVNULL
        try:
            if switch.exports is not None:
                stdin = env_memfd(switch.exports)
            proc = _ShimProcess(
                argv, stdin=stdin, stdout=logfd, stderr=subprocess.STDOUT,
                cwd="/", env=switch.env, start_new_session=True,
                close_fds=True, umask=JOB_UMASK,  # not the daemon's own (066)
                **switch.popen,
            )
        except OSError as err:
            raise RunnerError(f"could not start the shim for job {req.job_id}: {err}") from err
        finally:
            os.close(logfd)
            if stdin != subprocess.DEVNULL:
                os.close(stdin)
        proc.via_setpriv = switch.exports is not None
        self._procs[key] = proc
        self._watch(key, proc.pid)
        # the start time is read later (confirm): /proc/PID/stat of a process in the middle
        # of its exec waits for the exec to finish, half a launch's cost
        return Launched(pid=proc.pid)

    def confirm(self, launched: Launched) -> Launched:
        """The launch with what is cheap to learn once the process runs: its /proc start time
        (read before the launch is recorded; the shim, not yet waited for, is there)."""
        if launched.pid is None or launched.pid_start is not None:
            return launched
        return dataclasses.replace(launched, pid_start=proc_start_time(launched.pid))

    @staticmethod
    def _daemon_folder(folder: Path) -> tuple[int, bool]:
        """An fd of one of the daemon's folders (a job's log folder, an older attempt's run
        directory), 0711 and ours, made when missing (and whether it was made now); never
        reached through a symlink, and a leftover of an older gpusched is taken back."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        made = False
        try:  # made first: most attempts are a job's first, whose folder is not there yet
            os.mkdir(folder, 0o711)
            made = True
        except FileExistsError:
            pass
        except FileNotFoundError:  # the daemon's logs/ (runs/) itself is missing
            folder.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o711)
                made = True
        fd = os.open(folder, flags)
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, os.geteuid(), os.getegid())
            if stat.S_IMODE(st.st_mode) != 0o711:
                os.fchmod(fd, 0o711)
        except BaseException:
            os.close(fd)
            raise
        return fd, made

    @staticmethod
    def attempt_files(exit_file: Path, log_path: Path, owner: tuple[int, int] | None) -> int:
        """The attempt's exit file (see _exit_file_in) and its log, opened for appending (an
        fd, see _private_log). When both are in one folder (a local attempt's log folder)
        the folder is opened once and the log made in it."""
        fd, made = LocalRunner._daemon_folder(exit_file.parent)
        try:
            LocalRunner._exit_file_in(fd, exit_file.name, owner, fresh=made)
            if log_path.parent == exit_file.parent:
                return LocalRunner._checked_log(
                    os.open(log_path.name, LOG_FLAGS, 0o600, dir_fd=fd), log_path, owner)
        finally:
            os.close(fd)
        return LocalRunner._private_log(log_path, owner)

    @staticmethod
    def _exit_file_in(folder_fd: int, name: str, owner: tuple[int, int] | None, *,
                      fresh: bool) -> None:
        """The attempt's empty exit file, the job user's (0600), in a folder that is the
        daemon's (0711): the job's log folder, or an older attempt's run directory. The shim,
        as that user, writes the file in place; the user can neither replace it (with a FIFO,
        a symlink) nor add anything beside it, since the folder is not theirs. A leftover of
        the same attempt is replaced."""
        if not fresh:  # a folder made just now holds no leftover
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=folder_fd)
        efd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=folder_fd)
        try:
            if owner is not None:
                os.fchown(efd, *owner)
        finally:
            os.close(efd)

    @staticmethod
    def _private_log(log_path: Path, owner: tuple[int, int] | None) -> int:
        """The attempt's log, 0600 and the job user's, opened for appending (an fd), in a
        folder of the daemon's (made here when the exit file did not make it)."""
        try:
            fd = os.open(log_path, LOG_FLAGS, 0o600)
        except FileNotFoundError:
            os.close(LocalRunner._daemon_folder(log_path.parent)[0])
            fd = os.open(log_path, LOG_FLAGS, 0o600)
        return LocalRunner._checked_log(fd, log_path, owner)

    @staticmethod
    def _checked_log(fd: int, log_path: Path, owner: tuple[int, int] | None) -> int:
        """``fd`` of a log just opened (LOG_FLAGS), made blocking, the job user's and 0600;
        closed and refused unless it is a regular file."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{log_path} is not a regular file")
            os.set_blocking(fd, True)
            if owner is not None:
                os.fchown(fd, *owner)
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _watch(self, key: tuple[int, int], pid: int) -> None:
        if key in self._pidfds:
            return
        with contextlib.suppress(OSError, AttributeError):
            self._pidfds[key] = os.pidfd_open(pid)

    def _forget(self, key: tuple[int, int]) -> None:
        self._procs.pop(key, None)
        self._outcomes.pop(key, None)
        fd = self._pidfds.pop(key, None)
        if fd is not None:
            os.close(fd)

    # -- poll -----------------------------------------------------------------------------

    def poll(self, ref: AttemptRef, now: float) -> Outcome | None:
        """None while the attempt runs; once it ended, the same Outcome on every call until
        ``cleanup`` (the daemon may fail to commit the end, on a full disk, and ask again)."""
        key = ref.key
        done = self._outcomes.get(key)
        if done is not None:
            return done
        exit_file = exit_path(ref.run_dir, ref.log_path, ref.n)
        proc = self._procs.get(key)
        if proc is not None:
            if proc.poll() is None:
                return None
            code, why = read_exit(exit_file)
            if code is None:
                rc = proc.returncode
                if rc >= 0:  # the shim exits with the command's status: only the file is missing
                    missing = ("the switch to the job's user failed (setpriv's message is in "
                               "the log) or the exit file could not be written"
                               if proc.via_setpriv else
                               "the exit file could not be written")
                    return self._ended(key, rc, now, reason=describe_exit(rc),
                                       note=why or missing)
                code = 128 - rc  # the shim itself was killed before it could write
                return self._ended(key, code, now, reason=f"the shim ended without an exit "
                                   f"status ({describe_exit(code)})", note=why)
            return self._ended(key, code, self._end_time(exit_file, ref, now), reason=why)
        # Adopted after a restart (not our child). The exit file is the job user's to write:
        # trust it only once the shim, the very process we started, is gone, or a running job
        # could declare itself finished and free its GPU for someone else.
        if ref.pid and alive(ref.pid, ref.pid_start):
            self._watch(key, ref.pid)  # wake on its exit too
            return None
        code, why = read_exit(exit_file)
        if code is not None:
            return self._ended(key, code, self._end_time(exit_file, ref, now), reason=why)
        return self._end(key, Outcome(
            exit_code=None, ended_at=now, lost=True,
            reason=f"the job's process is gone and left no exit status{f' ({why})' if why else ''}"))

    @staticmethod
    def _end_time(path: Path, ref: AttemptRef, now: float) -> float:
        """When the shim wrote the exit file (the job may have ended while the daemon was
        down), kept between the attempt's start and now: the file is the user's to touch."""
        try:
            mtime = os.stat(path, follow_symlinks=False).st_mtime
        except OSError:
            return now
        return min(max(mtime, ref.started_at), now)

    def _ended(self, key: tuple[int, int], code: int, ended_at: float,
               reason: str | None = None, note: str | None = None) -> Outcome:
        reason = reason or describe_exit(code)
        if note:
            reason = f"{reason}; {note}" if reason else note
        return self._end(key, Outcome(exit_code=code, ended_at=ended_at, reason=reason))

    def _end(self, key: tuple[int, int], outcome: Outcome) -> Outcome:
        """Remember the end until cleanup; stop waking on the (reaped) process."""
        self._outcomes[key] = outcome
        fd = self._pidfds.pop(key, None)
        if fd is not None:
            os.close(fd)
        return outcome

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
            at = _EXIT_ARG.get(argv[2]) if len(argv) > 3 and argv[3] == SHIM_NAME.encode() \
                else None
            if at is None or len(argv) <= at:
                continue
            pid = int(name)
            if not _session_leader(pid):
                continue  # the shim's child between fork and exec has the same cmdline
            found_at = self._attempt_of(Path(argv[at].decode(errors="replace")))
            if found_at is None:
                continue
            job_id, n = found_at
            if (job_id, n) not in live:
                found.append(Orphan(f"local shim pid {pid} of job {job_id} attempt {n}",
                                    job_id=job_id, attempt=n, handle=(pid, proc_start_time(pid)),
                                    uid=process_uid(pid)))
        return found

    def _attempt_of(self, exit_file: Path) -> tuple[int, int] | None:
        """(job, attempt) of a shim's exit file under our own state directory, else None:
        ``<logs>/<job>/<n>.exit``, or an older gpusched's ``<runs>/<job>/<n>/exit``."""
        try:
            if exit_file.name == EXIT_FILE:
                run_dir = exit_file.parent
                if self.runs_dir is None or run_dir.parent.parent != self.runs_dir:
                    return None
                return int(run_dir.parent.name), int(run_dir.name)
            if exit_file.suffix == EXIT_SUFFIX:
                if self.logs_dir is None or exit_file.parent.parent != self.logs_dir:
                    return None
                return int(exit_file.parent.name), int(exit_file.stem)
        except ValueError:
            pass
        return None

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
