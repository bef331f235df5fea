"""The Slurm runner: an attempt is one Slurm batch job; Slurm owns the cluster's GPUs.

``sbatch --parsable`` submits a small POSIX sh shim (the local runner's idea) that runs the
command and writes its exit status to ``exit`` in the attempt's run folder, on a filesystem the
nodes share (``slurm.shared_dir``): without accounting (no ``sacct``) Slurm forgets an ended job
after ``MinJobAge``, and the file still says how it ended. The run folder is the daemon's
(0711) and the exit file and the output the job user's (0600), as for local jobs; both are read
back through :mod:`gpusched.safefs`. The job runs as its owner (``--uid``/``--gid``: the daemon
is root), never as root.

State comes from ``squeue`` (one call per tick for every attempt) and, for a job that ended,
``scontrol show job``. The comment ``gpusched:<instance>:<job>:<attempt>`` names the attempt, so
a restarted daemon adopts its Slurm jobs instead of submitting them again. A Slurm command that
cannot be run, fails to reach the controller or times out raises RunnerUnavailable: the daemon
marks the runner down and its jobs ``unknown`` until Slurm answers again.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpusched.config import SlurmSettings
from gpusched.errors import LaunchRefused, RunnerError, RunnerUnavailable
from gpusched.runners.base import AttemptRef, Launched, LaunchRequest, Orphan, Outcome
from gpusched.runners.local import (
    CD_FAILED,
    DEFAULT_PATH,
    EXIT_FILE,
    LocalRunner,
    describe_exit,
    read_exit,
)
from gpusched.tao import SLURM_GPU_INDEX

log = logging.getLogger(__name__)

LOG_FILE = "output.log"
# Slurm states in which the job will not run (again); anything else is pending or alive
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                      "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
# set by Slurm from its own allocation, or meaningless on another host: never passed on
# (GPUSCHED_SIMULATED_HOST_GPUS, set only on a simulated host, is kept for the fake TAO)
_DROPPED_ENV = ("CUDA_VISIBLE_DEVICES", "GPUSCHED_GPUS", "GPUSCHED_GPU_NAMES")
# stderr of a Slurm command that could not reach slurmctld (not a refusal of the request)
_UNREACHABLE = re.compile(r"Unable to contact slurm controller|Socket timed out|"
                          r"Zero Bytes were transmitted|Communication connection failure|"
                          r"Connection refused|Unable to establish|slurm_load_partitions|"
                          r"Invalid authentication credential|Munge", re.IGNORECASE)
_FIELD = re.compile(r"(\w[\w/:]*)=(\S*)")
_SLURM_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")
# After Slurm could not be reached, no command is tried for this long (doubling up to the max):
# a client waits ~10 s for a controller that is down, and the tick must not do so every pass
BACKOFF_S, BACKOFF_MAX_S = 2.0, 30.0


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    state: str
    reason: str
    uid: int | None
    comment: str


def shim_script(job_id: int, attempt: int, workdir: str, exit_file: Path,
                command: list[str]) -> str:
    """The batch script: the local shim's steps, with the arguments quoted into it (sbatch
    keeps the script's text; nothing is re-parsed but by this one sh). A TAO stage's
    ``--gpu_index`` placeholder becomes the host indices Slurm allocated, split on commas."""
    q, f = shlex.quote, shlex.quote(str(exit_file))
    words = [q(a) if a != SLURM_GPU_INDEX else "$g" for a in command]
    gpus = ""
    if SLURM_GPU_INDEX in command:
        gpus = ('g=$CUDA_VISIBLE_DEVICES; case $g in ""|*[!0-9,]*) echo "gpusched: Slurm '
                'allocated no GPU indices (CUDA_VISIBLE_DEVICES=$g)" >&2; '
                f"printf '125\\n' > {f}; exit 125;; esac; set -f; IFS=,\n")
    return (f"#!/bin/sh\n# gpusched job {job_id} attempt {attempt}\n"
            "trap : TERM INT HUP\n"
            f"cd -- {q(workdir)} || {{ printf '126 {CD_FAILED}\\n' > {f}; exit 126; }}\n"
            f"{gpus}{' '.join(words)}\n"
            f"s=$?; printf '%s\\n' $s > {f}; exit $s\n")


def slurm_gpu_type(gpu_type: str) -> str:
    """gpusched's type ("RTX A4000", "A4000") as a Slurm gres type ("rtxa4000", "a4000")."""
    return re.sub(r"[^a-z0-9_]", "", gpu_type.lower())


def parse_fields(line: str) -> dict[str, str]:
    """``Key=Value Key=Value`` of ``scontrol show ... -o`` (values without spaces)."""
    return {m.group(1): m.group(2) for m in _FIELD.finditer(line)}


class SlurmRunner:
    name = "slurm"

    def __init__(self, settings: SlurmSettings, runs_dir: Path) -> None:
        self.settings = settings
        self.runs_dir = runs_dir
        self.prefix = f"gpusched:{settings.instance}:"
        self._queue: tuple[float, dict[str, SlurmJob]] | None = None
        self._outcomes: dict[tuple[int, int], Outcome] = {}  # ended, until cleanup()
        self._lock = threading.Lock()
        self._down: tuple[float, float, str] | None = None  # (until, backoff, why), monotonic

    # -- running Slurm's commands ---------------------------------------------------------

    def _env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(base if base is not None else {"PATH": os.environ.get("PATH", DEFAULT_PATH)})
        conf = self.settings.conf or os.environ.get("SLURM_CONF")
        if conf:
            env["SLURM_CONF"] = conf
        return env

    def _run(self, tool: str, args: list[str], *, stdin: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run one Slurm command. RunnerUnavailable when it cannot run, times out or cannot
        reach the controller; the caller reads other failures from the returned rc."""
        with self._lock:
            down = self._down
        if down is not None and time.monotonic() < down[0]:
            raise RunnerUnavailable(down[2])
        try:
            r = self._command(tool, args, stdin, env)
        except RunnerUnavailable as err:
            backoff = min(down[1] * 2, BACKOFF_MAX_S) if down else BACKOFF_S
            with self._lock:
                self._down = (time.monotonic() + backoff, backoff, err.message)
            raise
        with self._lock:
            self._down = None
        return r

    def _command(self, tool: str, args: list[str], stdin: str | None,
                 env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
        argv = [getattr(self.settings, tool), *args]
        try:
            r = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                               timeout=self.settings.timeout_s, env=self._env(env), cwd="/",
                               stdin=None if stdin is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise RunnerUnavailable(f"{tool} did not answer within "
                                    f"{self.settings.timeout_s:g} s") from err
        except OSError as err:
            raise RunnerUnavailable(f"cannot run {argv[0]}: {err}") from err
        if r.returncode != 0 and _UNREACHABLE.search(r.stderr):
            raise RunnerUnavailable(f"Slurm unreachable ({tool}): {_first_line(r.stderr)}")
        return r

    def queue(self, now: float | None = None) -> dict[str, SlurmJob]:
        """Slurm job id -> SlurmJob for every job slurmctld still knows (ended ones too, for
        MinJobAge), read once per tick (``now``)."""
        if now is not None and self._queue is not None and self._queue[0] == now:
            return self._queue[1]
        r = self._run("squeue", ["-h", "-a", "-t", "all", "-o", "%i|%T|%r|%U|%k"])
        if r.returncode != 0:
            raise RunnerUnavailable(f"squeue failed: {_first_line(r.stderr)}")
        jobs = {}
        for line in r.stdout.splitlines():
            parts = line.split("|", 4)
            if len(parts) == 5:
                jid, state, reason, uid, comment = parts
                jobs[jid] = SlurmJob(jid, state.split()[0] if state else "", reason,
                                     int(uid) if uid.isdigit() else None, comment)
        if now is not None:
            self._queue = (now, jobs)
        return jobs

    def show_job(self, slurm_id: str) -> dict[str, str] | None:
        r = self._run("scontrol", ["show", "job", "-o", slurm_id])
        if r.returncode != 0 or not r.stdout.strip():
            return None
        return parse_fields(r.stdout.splitlines()[0])

    # -- launch ---------------------------------------------------------------------------

    def comment(self, job_id: int, attempt: int) -> str:
        return f"{self.prefix}{job_id}:{attempt}"

    def _job_env(self, req: LaunchRequest, user: pwd.struct_passwd) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "HOME": user.pw_dir,
               "USER": user.pw_name, "LOGNAME": user.pw_name, "SHELL": user.pw_shell or "/bin/sh"}
        # a user's SBATCH_*/SLURM_* would change how sbatch submits (partition, account...)
        env.update({k: v for k, v in req.spec.env.items()
                    if not k.startswith(("SBATCH_", "SLURM_"))})
        env.update({k: v for k, v in req.env.items() if k not in _DROPPED_ENV})
        for k in _DROPPED_ENV:
            env.pop(k, None)
        return env

    def sbatch_args(self, req: LaunchRequest, user: pwd.struct_passwd, workdir: str) -> list[str]:
        s, g = self.settings, req.spec.gpus
        args = ["--parsable", f"--job-name={req.spec.name or f'gpusched-{req.job_id}'}",
                f"--comment={self.comment(req.job_id, req.attempt)}", f"--chdir={workdir}",
                f"--output={req.log_path}", "--open-mode=append",
                f"--uid={req.owner_uid}", f"--gid={user.pw_gid}", "--export=ALL"]
        if g.count:
            kind = f"{slurm_gpu_type(g.gpu_type)}:" if g.gpu_type else ""
            args.append(f"--gpus={kind}{g.count}")
        if s.partition:
            args.append(f"--partition={s.partition}")
        if s.account:
            args.append(f"--account={s.account}")
        return args + list(s.extra_sbatch_args)

    def launch(self, req: LaunchRequest) -> Launched:
        if req.owner_uid == 0:
            raise LaunchRefused("the slurm runner does not run jobs as root; submit as a user")
        if req.spec.gpus.ids is not None:
            raise LaunchRefused("Slurm picks the GPUs: give a count (--gpus N), not GPU ids")
        try:
            user = pwd.getpwuid(req.owner_uid)
        except KeyError as err:
            raise LaunchRefused(f"uid {req.owner_uid} has no passwd entry") from err
        workdir = req.spec.workdir or user.pw_dir
        owner = (req.owner_uid, user.pw_gid)
        try:
            os.close(LocalRunner.attempt_files(req.run_dir / EXIT_FILE, req.log_path, owner))
        except OSError as err:
            raise RunnerError(f"could not prepare job {req.job_id}'s run folder in "
                              f"{self.runs_dir}: {err}") from err
        script = shim_script(req.job_id, req.attempt, workdir, req.run_dir / EXIT_FILE,
                             list(req.spec.command))
        r = self._run("sbatch", self.sbatch_args(req, user, workdir), stdin=script,
                      env=self._job_env(req, user))
        if r.returncode != 0:
            raise LaunchRefused(f"Slurm refused job {req.job_id}: "
                                f"{_first_line(r.stderr) or f'sbatch exit {r.returncode}'}")
        slurm_id = r.stdout.strip().split(";")[0]
        if not _SLURM_ID.match(slurm_id):
            raise RunnerError(f"sbatch printed no job id: {r.stdout.strip()[:200]!r}")
        self._queue = None
        log.info("job %s attempt %s is Slurm job %s", req.job_id, req.attempt, slurm_id)
        return Launched(slurm_job_id=slurm_id)

    # -- poll -----------------------------------------------------------------------------

    def poll(self, ref: AttemptRef, now: float) -> Outcome | None:
        done = self._outcomes.get(ref.key)
        if done is not None:
            return done
        job = self.queue(now).get(ref.slurm_job_id or "")
        if job is not None and job.state not in TERMINAL:
            return None
        code, why = read_exit(ref.run_dir / EXIT_FILE)
        ended = self._end_time(ref, now)
        if job is None:
            if code is not None:
                return self._end(ref, Outcome(exit_code=code, ended_at=ended,
                                              reason=why or describe_exit(code)))
            return self._end(ref, Outcome(
                exit_code=None, ended_at=now, lost=True,
                reason=f"Slurm no longer knows job {ref.slurm_job_id} and it left no exit "
                       f"status{f' ({why})' if why else ''}"))
        info = self.show_job(job.job_id) or {}
        reason = info.get("Reason") or job.reason
        slurm_code = _exit_code(info.get("ExitCode"))
        said = f"Slurm job {job.job_id} {job.state}" + (
            f" ({reason})" if reason and reason != "None" else "")
        if job.state == "CANCELLED":
            return self._end(ref, Outcome(exit_code=code, ended_at=ended, cancelled=True,
                                          reason=f"cancelled in Slurm: {said}"))
        if job.state in ("COMPLETED", "FAILED") and (code is not None or slurm_code is not None):
            final = code if code is not None else slurm_code
            note = None if code is not None else "the exit file is missing; Slurm's exit code"
            text = why or describe_exit(final)
            if note:
                text = f"{text}; {note}" if text else note
            return self._end(ref, Outcome(exit_code=final, ended_at=ended, reason=text))
        # TIMEOUT, NODE_FAIL, PREEMPTED, OUT_OF_MEMORY, BOOT_FAIL, DEADLINE
        return self._end(ref, Outcome(
            exit_code=code if code is not None else slurm_code, ended_at=ended,
            oom=job.state == "OUT_OF_MEMORY", reason=said))

    def _end_time(self, ref: AttemptRef, now: float) -> float:
        try:
            mtime = os.stat(ref.run_dir / EXIT_FILE, follow_symlinks=False).st_mtime
        except OSError:
            return now
        return min(max(mtime, ref.started_at), now)

    def _end(self, ref: AttemptRef, outcome: Outcome) -> Outcome:
        self._outcomes[ref.key] = outcome
        return outcome

    # -- cancel, hold, cleanup ------------------------------------------------------------

    def _control(self, tool: str, args: list[str]) -> subprocess.CompletedProcess[str]:
        r = self._run(tool, args)
        self._queue = None
        return r

    def signal_cancel(self, ref: AttemptRef, *, kill: bool) -> None:
        if not ref.slurm_job_id:
            return
        # scancel: SIGTERM, then SIGKILL after Slurm's KillWait; a pending job just goes
        args = ["--signal=KILL", "--full", ref.slurm_job_id] if kill else [ref.slurm_job_id]
        r = self._control("scancel", args)
        if r.returncode != 0 and "already completing or completed" not in r.stderr:
            raise RunnerError(f"scancel {ref.slurm_job_id}: {_first_line(r.stderr)}")

    def hold(self, ref: AttemptRef, *, release: bool) -> str:
        """``scontrol hold``/``release`` the attempt's Slurm job (only a pending job can be
        held). Returns Slurm's complaint, or '' when done."""
        if not ref.slurm_job_id:
            return "the attempt has no Slurm job"
        r = self._control("scontrol", ["release" if release else "hold", ref.slurm_job_id])
        return "" if r.returncode == 0 else (_first_line(r.stderr) or f"exit {r.returncode}")

    def state_of(self, ref: AttemptRef, now: float | None = None) -> SlurmJob | None:
        return self.queue(now).get(ref.slurm_job_id or "")

    def cleanup(self, ref: AttemptRef) -> None:
        self._outcomes.pop(ref.key, None)

    # -- reconcile ------------------------------------------------------------------------

    def orphans(self, live: set[tuple[int, int]]) -> list[Orphan]:
        """Slurm jobs with this instance's comment, not ended, whose attempt is not live in the
        store (an ended one holds nothing; a "starting" attempt whose Slurm job already ended
        is judged from its exit file by reconcile)."""
        found = []
        for job in self.queue().values():
            if not job.comment.startswith(self.prefix) or job.state in TERMINAL:
                continue
            ids = job.comment[len(self.prefix):].split(":")
            if len(ids) != 2 or not all(i.isdigit() for i in ids):
                continue
            key = (int(ids[0]), int(ids[1]))
            if key in live:
                continue
            found.append(Orphan(f"Slurm job {job.job_id} ({job.state}) of job {key[0]} "
                                f"attempt {key[1]}", job_id=key[0], attempt=key[1],
                                handle=job.job_id, uid=job.uid))
        return found

    def remove_orphan(self, orphan: Orphan) -> bool:
        job = self.queue().get(str(orphan.handle))
        if job is None or job.state in TERMINAL:
            return True
        self._control("scancel", [str(orphan.handle)])
        return False

    def wait_fds(self) -> list[int]:
        return []

    # -- views ----------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, str]]:
        """Per node: name, state, Gres and GresUsed (``scontrol -d show node -o``)."""
        r = self._run("scontrol", ["-d", "show", "node", "-o"])
        if r.returncode != 0:
            raise RunnerUnavailable(f"scontrol show node: {_first_line(r.stderr)}")
        out = []
        for line in r.stdout.splitlines():
            f = parse_fields(line)
            if "NodeName" in f:
                out.append({"node": f["NodeName"], "state": f.get("State", "?"),
                            "gres": f.get("Gres", ""), "gres_used": f.get("GresUsed", ""),
                            "partitions": f.get("Partitions", "")})
        return out

    def health(self) -> tuple[bool, str]:
        try:
            r = self._run("scontrol", ["ping"])
        except RunnerUnavailable as err:
            return False, err.message
        text = _first_line(r.stdout) or _first_line(r.stderr)
        if r.returncode != 0 or " UP" not in r.stdout:
            return False, f"Slurm unreachable: {text}"
        return True, f"slurm: {text}"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:500] if lines else ""


def _exit_code(text: str | None) -> int | None:
    """``ExitCode=3:0`` (status:signal) as a shell would report it."""
    if not text or ":" not in text:
        return None
    status, _, sig = text.partition(":")
    if not status.isdigit() or not sig.isdigit():
        return None
    return 128 + int(sig) if int(sig) else int(status)
