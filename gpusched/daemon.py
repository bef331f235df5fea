"""The daemon's tick: a fixed list of named steps, each a function of ``now``.

``tick(now)`` never sleeps and never reads the clock, so tests drive it with a FakeClock. The
wiring that loops, listens on the socket and handles signals is in ``service.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from gpusched.config import Settings
from gpusched.errors import (
    GpuschedError,
    LaunchRefused,
    RunnerError,
    RunnerUnavailable,
    StoreError,
)
from gpusched.gpus import Inventory, job_of_pid
from gpusched.models import Gpu, GpuRequest, GpuState, JobSpec
from gpusched.notifier import Notifier
from gpusched.pipeline_runner import PipelineRunner
from gpusched.progress import ProgressTracker, workload_of
from gpusched.runners.base import AttemptRef, Launched, LaunchRequest, Outcome, Runner
from gpusched.scheduling import (
    MAX_WAIT_FOR_FASTER_S,
    WAITS_FOR_FASTER,
    GpuSlot,
    QueuedJob,
    plan,
)
from gpusched.speedmodel import SpeedModel, prior_lookup
from gpusched.states import JobStatus
from gpusched.store import Row, Store
from gpusched.throughput import eta

log = logging.getLogger(__name__)

S = JobStatus
# Queued jobs the planner looks at per tick, in priority/submission order (the idea of Slurm's
# bf_max_job_test): jobs beyond it wait for the head of the queue to move.
PLAN_WINDOW = 128
#: what _queued_job reads of a queued job (the jobs table as ``j``)
QUEUED_COLUMNS = ("j.id, j.priority, j.submitted_at, j.request, j.runner, j.owner_uid, j.owner,"
                  " json_extract(j.spec, '$.est_runtime_s') AS est_runtime_s, j.spec")
TICK_STATS = 256  # the last ticks whose durations health reports
MODEL_MIN_REFIT_S = 5.0  # a job that timed epochs ended: refit, but at most this often
EPOCH_SLACK_S = 60.0  # clock steps and polling delay when checking an epoch against wall time
MODEL_MAX_EPOCHS = 20_000  # the newest epochs the speed model is fitted from (a tick's cost)
FAILED_DEP = {S.FAILED.value, S.CANCELLED.value, S.LOST.value}
TIME_LIMIT = "time limit"  # jobs.cancel_by of an attempt stopped for its --time
# After a launch failed for lack of host resources, no launch is tried for this long (each try
# costs an attempt row and a fork; the resources rarely come back within a tick).
RESOURCE_BACKOFF_S = 2.0
# errno values of a host short of resources (file descriptors, processes, memory): a launch that
# meets one is queued again without using a retry, like a runner that is down
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM,
                              errno.ENOSPC})


def transient(err: BaseException) -> bool:
    """True for a failure of the host, not of the job (EMFILE, ENFILE, EAGAIN, ENOMEM,
    ENOSPC), looking through the ``raise ... from`` chain."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in TRANSIENT_ERRNOS:
            return True
        seen = seen.__cause__
    return False


class _Paused(Exception):
    """A start not made: launches were paused (the host ran short of resources)."""


class Daemon:
    STEPS = ("reap", "progress", "time_limits", "cancels", "inventory", "reconcile",
             "pipelines", "dependencies", "late_reap", "plan_and_launch", "notify")

    def __init__(self, settings: Settings, store: Store, inventory: Inventory,
                 runners: dict[str, Runner]) -> None:
        self.settings = settings
        self.store = store
        self.inventory = inventory
        self.runners = runners
        self.gpus: list[Gpu] = []
        self.waiting: Mapping[int, str] = {}  # job id -> why it waits (from the last plan)
        self.degraded: dict[str, str] = {}  # runner name -> why it is unusable
        self.orphan_gpus: set[str] = set()
        self._known_gpus: tuple[tuple[str, int, str, int], ...] = ()
        self._next_inventory = 0.0
        self._next_reconcile = 0.0
        self._reconcile_now = True  # first tick reconciles: adopt, record, clean up
        self._reconcile_due: bool | None = None  # this tick's decision (see _waits_outside)
        self.last_tick: float | None = None
        self.placed_last_tick = 0
        self.tick_error: str | None = None
        self.step_errors: dict[str, str] = {}  # step -> why it failed in the last tick
        self._unfollowable: set[tuple[int, int]] = set()  # attempts whose output cannot be read
        self._gpu_names: dict[str, str] = {}  # uuid -> model, also for GPUs not yet inventoried
        self._launch_pause: tuple[float, str] | None = None  # (until, why): host out of fds...
        self.progress = ProgressTracker()
        self.pipelines = PipelineRunner(settings, store)
        self.pipelines.before_advance = self.commit
        self._specs: dict[tuple[int, int], tuple[dict[str, Any], str]] = {}  # spec, workload
        self._queued_cache: dict[int, QueuedJob] = {}  # a queued job's request never changes
        # the plan window (runnable()'s rows), kept between ticks while the store says the
        # queue did not change (Store.queue_state) but for this daemon's own claims
        self._window: list[Row] | None = None
        self._window_version: tuple[int, int] | None = None
        self._window_full = False  # the query filled it: more runnable jobs may be behind
        self._queued_specs: dict[int, str] = {}  # and its spec, as planned (see _launch_spec)
        self._refs: dict[tuple[int, int], tuple[tuple[Any, ...], AttemptRef]] = {}  # _ref_of
        self.speed_model: SpeedModel | None = None  # refit every scheduler.model_refresh_s
        self._model_at = -math.inf
        self._model_stale = False  # a job that timed epochs ended since the last fit
        self._waiting_since: dict[int, float] = {}  # job -> when it began waiting for a faster GPU
        self._live: list[Row] = []  # live attempts, read once per tick
        # starts not yet recorded (see _launch_all): (job, attempt) -> (launched, when)
        self._pending_marks: dict[tuple[int, int], tuple[Launched, float, str]] = {}
        self.defer_marks = False  # the service's loop sets it; tests tick with it off
        self._after_commit: list[Callable[[], None]] = []  # what waits for the tick's commit
        self.tick_seconds: collections.deque[float] = collections.deque(maxlen=TICK_STATS)
        self.ticks = 0
        # seconds spent in each step since the daemon started, in the end-of-tick commit
        # ("commit") and in three parts of plan_and_launch (".plan": the queue read and the
        # plan, ".commit": the claims' commit, ".start": the runners' launches): where a busy
        # daemon's time goes, without a profiler (health; bench/bench_perf.py). Every key is
        # there from the start: the API thread reads the dict while the tick adds to it, so
        # it must never change size
        self.step_seconds: dict[str, float] = dict.fromkeys(
            (*self.STEPS, "commit", "plan_and_launch.plan", "plan_and_launch.commit",
             "plan_and_launch.start"), 0.0)
        self._dep_events = 0  # job_events id up to which dependencies were checked (0: none)
        self.notifier = Notifier(settings, store, lambda job, n: self.paths(job, n)[0])
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.lock = threading.RLock()  # the API reads daemon state while the loop ticks

    # -- wiring helpers -------------------------------------------------------------------

    def wake(self) -> None:
        """Make the loop tick now (a submission, a cancel, a signal)."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending) or closed (shutting down)

    def drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def wait_fds(self) -> list[int]:
        fds = [self._wake_r]
        for r in self.runners.values():
            fds += r.wait_fds()
        return fds

    def request_reconcile(self) -> None:
        self._reconcile_now = True
        self.wake()

    def close(self) -> None:
        """Let go of runners and the wake pipe (jobs keep running). Safe to call twice."""
        if self._wake_r < 0:
            return
        self.notifier.close()
        for r in self.runners.values():
            close = getattr(r, "close", None)
            if close:
                close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1

    # -- the tick -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Run every step. A step that fails is logged and reported by health; the steps
        after it still run (one bad job or pipeline must never stop scheduling for everyone:
        the steps contain failures to the job or pipeline that caused them)."""
        started = time.perf_counter()
        with self.lock:
            self.step_errors = {}
            self._after_commit = []
            # one transaction for the whole tick where it can be (group commit: the ends,
            # epochs and claims of a tick cost one fsync), committed before anything that
            # waits on the outside world (a launch, Docker, NVML, a notification), so no
            # other writer (a submission) ever waits on that
            with self.store.batch():
                for step in self.STEPS:
                    outside = self._waits_outside(step, now)
                    if outside and not self.commit():
                        continue  # what it would do rests on what could not be saved
                    step_started = time.perf_counter()
                    try:
                        if outside:
                            with self.store.unbatched():
                                getattr(self, f"step_{step}")(now)
                        else:
                            getattr(self, f"step_{step}")(now)
                    except Exception as err:
                        log.exception("tick step %s failed", step)
                        self.step_errors[step] = f"{type(err).__name__}: {err}"
                    self.step_seconds[step] += time.perf_counter() - step_started
                step_started = time.perf_counter()
                self.commit()
                self.step_seconds["commit"] += time.perf_counter() - step_started
            self.last_tick = now
            self.tick_seconds.append(time.perf_counter() - started)
            self.ticks += 1

    def _waits_outside(self, step: str, now: float) -> bool:
        """Whether a step may wait on something outside the process this tick."""
        if step == "cancels":
            return any(r["cancel_requested_at"] is not None for r in self._live)
        if step == "inventory":
            return now >= self._next_inventory
        if step == "reconcile":
            # decided once: the step runs on this decision, not on a flag the housekeeping
            # thread may set in between (it would run inside the open transaction)
            self._reconcile_due = self._reconcile_now or now >= self._next_reconcile
            return self._reconcile_due
        return step == "notify"

    def commit(self) -> bool:
        """Commit what the tick wrote so far, then do what waited for it (a runner may forget
        an end only once it is saved). False when it could not be saved: nothing of it was,
        and the next tick does it again (the runners still report the ends)."""
        try:
            self.store.commit_batch()
        except StoreError as err:
            log.warning("could not save this tick's changes (%s); trying again on the next "
                        "tick", err)
            self.step_errors["commit"] = err.message
            self._after_commit = []
            self._window = None  # what it undid is read again, whatever the bumps said
            self._dep_events = 0  # the events it read past may be undone: check them all
            return False
        done, self._after_commit = self._after_commit, []
        for call in done:
            try:
                call()
            except Exception:  # one attempt's clean-up must not skip the others'
                log.exception("after the tick's commit: %r failed", call)
        return True

    def _contain(self, job_id: int, what: str, call: Callable[[], None], now: float) -> None:
        """Run one job's part of a step. A store error is transient (the step tries again on
        the next tick); anything else fails that job, with the reason, and only that job."""
        try:
            call()
        except StoreError as err:
            log.warning("job %s: could not %s (%s); trying again on the next tick", job_id,
                        what, err)
        except Exception as err:
            log.exception("job %s: %s failed", job_id, what)
            self._fail_job(job_id, f"internal error while trying to {what}: "
                                   f"{type(err).__name__}: {err}", now)

    def _fail_job(self, job_id: int, reason: str, now: float) -> None:
        try:
            for row in self.store.live_attempts():
                if row["job_id"] == job_id:
                    self.store.finish_attempt(job_id, row["n"], to=S.FAILED, now=now,
                                              ended_at=now, exit_code=None, reason=reason)
            self.store.transition(job_id, S.FAILED, now, reason=reason,
                                  allowed={S.QUEUED, S.HELD}, fields={"ended_at": now})
        except GpuschedError as err:
            log.error("job %s: could not record its failure (%s): %s", job_id, reason, err)
        self._queued_cache.pop(job_id, None)
        self._queued_specs.pop(job_id, None)

    def next_due(self) -> float:
        return min(self._next_inventory, self._next_reconcile)

    # -- reap -----------------------------------------------------------------------------

    def _runner(self, name: str) -> Runner | None:
        return self.runners.get(name)

    def step_reap(self, now: float) -> None:
        """Poll every live attempt, then record all the ends found (and the launches of the
        last tick not yet recorded) in one transaction: one fsync however many jobs ended.
        Each job's records are a savepoint of it, so one that fails is rolled back alone."""
        self._confirm_marks()  # before the polls: an ended shim is waited for by its poll
        self._live = self.store.live_attempts()
        if len(self._refs) > 2 * len(self._live) + 64:  # attempts ended by other paths
            live = {(r["job_id"], r["n"]) for r in self._live}
            self._refs = {k: v for k, v in self._refs.items() if k in live}
        ended: list[tuple[Row, AttemptRef, Runner, Outcome]] = []
        # nothing is written while the runners are asked (Docker, Slurm may be slow): what
        # their answers change is written after the polls, in the tick's transaction
        reachable: dict[str, str | None] = {}  # runner -> why it is down (None: it answered)
        for row in self._live:
            key = (row["job_id"], row["n"])
            if row["state"] != "live" and key not in self._pending_marks:
                continue  # never confirmed launched: reconcile decides
            runner = self._runner(row["runner"])
            if runner is None or reachable.get(row["runner"]):
                continue
            ref = self._ref_of(row)
            if key in self._pending_marks:  # launched last tick, not yet recorded: its handles
                launched = self._pending_marks[key][0]
                ref = dataclasses.replace(
                    ref, pid=launched.pid, pid_start=launched.pid_start,
                    container_id=launched.container_id, container_name=launched.container_name,
                    slurm_job_id=launched.slurm_job_id)
            try:
                outcome = runner.poll(ref, now)
            except RunnerUnavailable as err:
                reachable[runner.name] = str(err)
                continue
            except Exception as err:  # one attempt's runner trouble stops nobody else
                log.exception("job %s: polling attempt %s failed", ref.job_id, ref.n)
                self.step_errors["reap"] = f"job {ref.job_id}: {type(err).__name__}: {err}"
                continue
            reachable.setdefault(runner.name, None)
            if outcome is not None:
                ended.append((row, ref, runner, outcome))
        for name, why in reachable.items():
            if why is None:
                self._runner_up(name, now)
            else:
                self._runner_down(name, why, now)
        if not ended and not self._pending_marks:
            if reachable and any(r is not None for r in reachable.values()):
                self._live = self.store.live_attempts()
            return
        self._write_marks()
        for row, ref, runner, outcome in ended:
            def end(row: Row = row, ref: AttemptRef = ref, runner: Runner = runner,
                    outcome: Outcome = outcome) -> None:
                with self.store.write():
                    what = self._record_end(row, ref, outcome, now)
                # only once committed may the runner forget the end (until then every poll
                # reports it again, so an end whose commit failed is recorded next tick)
                self._after_commit.append(lambda: self._forget_attempt(ref, runner, what))
            self._contain(ref.job_id, "record the end of its attempt", end, now)
        self._live = self.store.live_attempts()

    _REF_COLUMNS = ("job_id", "n", "runner", "gpus", "log_path", "run_dir", "started_at", "pid",
                    "pid_start", "container_id", "container_name", "slurm_job_id")

    def _ref_of(self, row: Row) -> AttemptRef:
        """A live attempt's AttemptRef, built once per version of its row (every tick polls
        and follows every live attempt)."""
        values = tuple(row.get(c) for c in self._REF_COLUMNS)
        key = (row["job_id"], row["n"])
        cached = self._refs.get(key)
        if cached is None or cached[0] != values:
            cached = self._refs[key] = (values, AttemptRef.from_row(row))
        return cached[1]

    def step_late_reap(self, now: float) -> None:
        """Ends that came while this tick ran: recorded before the plan, so the GPUs they free
        are planned in this tick with the others. Jobs that end together then start together
        (one plan and one fsync for both), and short jobs stay in step instead of each GPU
        costing a tick of its own. Only when a runner's wait fd (a shim's pidfd) says so."""
        fds = [fd for r in self.runners.values() for fd in r.wait_fds()]
        if not fds:
            return
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        try:
            ready = poller.poll(0)
        except (InterruptedError, OSError):
            return
        if ready:
            self.step_reap(now)

    def _runner_down(self, name: str, why: str, now: float) -> None:
        if name not in self.degraded:
            log.warning("runner %s unavailable: %s", name, why)
        self.degraded[name] = why
        for row in self.store.live_attempts(runner=name):
            if row["job_status"] == S.RUNNING.value:
                self.store.transition(row["job_id"], S.UNKNOWN, now,
                                      reason=f"{name} unreachable: {why}")

    def _runner_up(self, name: str, now: float) -> None:
        if self.degraded.pop(name, None) is None:
            return
        log.info("runner %s reachable again", name)
        for row in self.store.live_attempts(runner=name):
            if row["job_status"] == S.UNKNOWN.value:
                self.store.transition(row["job_id"], S.RUNNING, now, reason="runner reachable again",
                                      allowed={S.UNKNOWN})

    # -- progress -------------------------------------------------------------------------

    def step_progress(self, now: float) -> None:
        for row in self._live:
            if row["state"] == "live":
                self._follow(row, self._ref_of(row), now)

    def _follow(self, row: Row, ref: AttemptRef, now: float) -> None:
        """Read new epochs of one attempt into the store. Epoch timing is information: when
        an attempt's output cannot be read or recorded the job goes on, its epochs are
        retried (store errors) or given up for that attempt (anything else, logged once)."""
        if ref.key in self._unfollowable:
            return
        try:
            self._follow_once(row, ref, now)
        except StoreError as err:
            log.warning("job %s: epochs not recorded this time (%s)", ref.job_id, err)
        except Exception:
            log.exception("job %s attempt %s: cannot follow its progress; epochs of this "
                          "attempt are not recorded", ref.job_id, ref.n)
            self._unfollowable.add(ref.key)

    def gpu_name(self, uuid: str) -> str:
        """A GPU's model: from the inventory, else as the store last saw it (right after a
        restart the first tick reads epochs before the inventory step has run)."""
        if uuid not in self._gpu_names:
            self._gpu_names.update({g.uuid: g.name for g in self.gpus})
        if uuid not in self._gpu_names:
            self._gpu_names.update({r["uuid"]: r["name"] for r in self.store.gpu_rows()})
        return self._gpu_names.get(uuid, "?")

    def _spec_of(self, row: Row, ref: AttemptRef) -> tuple[dict[str, Any], str]:
        """A live attempt's job spec and workload, parsed once per attempt (not every tick)."""
        cached = self._specs.get(ref.key)
        if cached is None:
            spec = json.loads(row["job_spec"])
            cached = self._specs[ref.key] = (spec, workload_of(spec, owner=row.get("owner")))
        return cached

    def _follow_once(self, row: Row, ref: AttemptRef, now: float) -> None:
        spec, workload = self._spec_of(row, ref)
        rows = self.progress.poll(ref, spec, now, owner_uid=row.get("owner_uid"))
        # The job reports its own epoch times and the speed model trusts them for everyone's
        # placement: an epoch cannot have lasted longer than the attempt has run (1e308 s
        # would overflow the fit), so such a figure is kept as unknown.
        ran = max(0.0, now - ref.started_at) + EPOCH_SLACK_S
        for r in rows:
            secs = r.get("seconds")
            if secs is not None and not (isinstance(secs, int | float) and math.isfinite(secs)
                                         and 0 < secs <= ran):
                r["seconds"] = None
        if rows:
            self.store.record_epochs(ref.job_id, ref.n, rows, gpu_uuids=ref.gpus,
                                     gpu_models=[self.gpu_name(u) for u in ref.gpus],
                                     workload=workload)

    def progress_of(self, job_id: int, n: int) -> dict[str, Any] | None:
        s = self.progress.summary((job_id, n))
        if s is None:
            return None
        recent = s.pop("recent_seconds")
        s["s_per_epoch"] = sorted(recent)[len(recent) // 2] if recent else None
        s["eta_s"] = (eta(s["epoch"], s["max_epoch"], recent, None)
                      if s["max_epoch"] else None)
        return s

    def _record_end(self, row: Row, ref: AttemptRef, outcome: Outcome, now: float) -> str:
        """Record an attempt's end (in the caller's transaction); says what became of it."""
        job_id, n = ref.job_id, ref.n
        self._follow(row, ref, now)  # the last epochs, before the attempt is closed
        if self.progress.summary(ref.key) is not None:
            self._model_stale = True  # it timed epochs: the speed model can learn from them
        requeue, consume = False, True
        reason: str | None
        if row.get("requeue_reason") and row["cancel_requested_at"] is None:
            # infrastructure failure (GPU lost): queue again, the job's retries stay untouched
            to, reason, requeue, consume = S.QUEUED, row["requeue_reason"], True, False
        elif row["cancel_requested_at"] is not None and row.get("cancel_by") == TIME_LIMIT:
            to, reason = S.FAILED, self._limit_reason(row)  # never retried, as in Slurm
        elif row["cancel_requested_at"] is not None or outcome.cancelled:
            why = outcome.reason or "cancelled"
            to, reason = S.CANCELLED, why if why.startswith("cancel") else f"cancelled ({why})"
        elif outcome.lost:
            to, reason = S.LOST, outcome.reason or "lost"
        elif (judged := self._judge(row, ref, outcome, now)) is not None:
            to, reason = judged
            if to == S.FAILED and (row["retries_left"] or 0) > 0:
                requeue = True
                reason = f"{reason}; retrying ({row['retries_left'] - 1} retries left)"
        elif outcome.exit_code == 0:
            to, reason = S.SUCCEEDED, None
        else:
            to = S.FAILED
            reason = "killed: out of memory" if outcome.oom else outcome.reason
            retry_on = self._spec_of(row, ref)[0].get("retry_on")
            if (row["retries_left"] or 0) > 0 and (not retry_on or
                                                   outcome.exit_code in retry_on):
                requeue = True
                reason = f"{reason}; retrying ({row['retries_left'] - 1} retries left)"
        release_now = self.inventory.simulated or not ref.gpus
        # If this commit fails (state disk full) the caller does not forget the attempt: the
        # runner keeps it and reports the same outcome on the next tick, until it is recorded.
        self.store.finish_attempt(job_id, n, to=to, now=now, ended_at=outcome.ended_at,
                                  exit_code=outcome.exit_code, reason=reason, oom=outcome.oom,
                                  release_now=release_now, requeue=requeue,
                                  consume_retry=consume)
        return f"{'requeued' if requeue else to.value} ({reason or f'exit {outcome.exit_code}'})"

    def _forget_attempt(self, ref: AttemptRef, runner: Runner, what: str) -> None:
        """After the end of an attempt is committed: let go of what followed it."""
        self.progress.forget(ref.key)
        self._specs.pop(ref.key, None)
        self._refs.pop(ref.key, None)
        self._unfollowable.discard(ref.key)
        try:
            runner.cleanup(ref)
        except GpuschedError as err:
            log.warning("cleanup of job %s attempt %s failed: %s", ref.job_id, ref.n, err)
        log.info("job %s attempt %s ended: %s", ref.job_id, ref.n, what)

    def _judge(self, row: Row, ref: AttemptRef, outcome: Outcome,
               now: float) -> tuple[JobStatus, str | None] | None:
        """TAO stages: success from exit code, Execution status, status.json and artifacts;
        the artifacts are recorded either way. None for plain jobs (told by the spec parsed
        once per attempt: validating it again cost every end of a plain job ~0.1 ms)."""
        if not str(self._spec_of(row, ref)[0].get("kind") or "").startswith("tao:"):
            return None
        spec = JobSpec.model_validate_json(row["job_spec"])
        from gpusched.stages import judge

        try:
            ok, reason, artifacts = judge(spec, outcome.exit_code, ref.log_path,
                                          owner_uid=row.get("owner_uid"))
        except GpuschedError:
            raise
        except Exception as err:  # hostile or broken output fails this stage, nothing else
            log.exception("job %s: judging the stage's output failed", ref.job_id)
            return S.FAILED, f"could not judge the stage's output: {type(err).__name__}: {err}"
        self.store.record_artifacts(ref.job_id, ref.n, artifacts, now)
        if outcome.oom:
            reason = "killed: out of memory"
        return (S.SUCCEEDED, None) if ok else (S.FAILED, reason)

    # -- time limits ----------------------------------------------------------------------

    def _limit_of(self, row: Row) -> float | None:
        spec = self._spec_of(row, AttemptRef.from_row(row))[0]
        limit = spec.get("time_limit_s") or spec.get("est_runtime_s")
        return float(limit) if limit else None

    def _limit_reason(self, row: Row) -> str:
        limit = self._limit_of(row)
        return f"time limit ({limit:g} s)" if limit else "time limit"

    def step_time_limits(self, now: float) -> None:
        """An attempt past its job's --time is stopped like a cancel (SIGTERM, SIGKILL after
        the grace) and its job fails with the reason `time limit`: the limit bounds what a
        backfilled job may hold a reserved GPU for."""
        marked = False
        for row in self._live:
            if row["state"] != "live" or row["cancel_requested_at"] is not None:
                continue
            limit = self._limit_of(row)
            if limit is not None and now - float(row["started_at"]) >= limit:
                log.info("job %s attempt %s: past its time limit (%g s); stopping it",
                         row["job_id"], row["n"], limit)
                self.store.request_stop(row["job_id"], by=TIME_LIMIT, now=now,
                                        reason=self._limit_reason(row))
                marked = True
        if marked:
            self._live = self.store.live_attempts()

    # -- cancels --------------------------------------------------------------------------

    def step_cancels(self, now: float) -> None:
        for row in self._live:
            if row["cancel_requested_at"] is None or row["state"] != "live":
                continue
            runner = self._runner(row["runner"])
            if runner is None:
                continue
            ref = AttemptRef.from_row(row)
            grace = (self.settings.docker.stop_grace_s if row["runner"] == "docker"
                     else self.settings.scheduler.kill_grace_s)
            try:
                if row["kill_sent_at"] is None:
                    runner.signal_cancel(ref, kill=False)
                    self.store.update_attempt(ref.job_id, ref.n, kill_sent_at=now)
                elif now - row["kill_sent_at"] >= grace:
                    runner.signal_cancel(ref, kill=True)
            except RunnerUnavailable as err:
                self._runner_down(runner.name, str(err), now)
            except Exception as err:  # tried again on the next tick; others go on
                log.exception("job %s: cancelling failed", ref.job_id)
                self.step_errors["cancels"] = f"job {ref.job_id}: {type(err).__name__}: {err}"

    # -- inventory ------------------------------------------------------------------------

    def step_inventory(self, now: float) -> None:
        if now < self._next_inventory:
            return
        self._next_inventory = now + self.settings.gpus.poll_interval_s
        self.refresh_inventory(now)

    def refresh_inventory(self, now: float) -> None:
        owners = self.store.allocation_owners()
        try:
            gpus = self.inventory.snapshot(lambda pid: job_of_pid(pid, owners))
        except GpuschedError as err:
            log.error("GPU inventory failed: %s", err)
            return
        self.gpus = gpus
        known = tuple((g.uuid, g.index, g.name, g.memory_total_mib) for g in gpus)
        if known != self._known_gpus:
            self.store.upsert_gpus(known, now)
            self._known_gpus = known
        for g in gpus:
            if g.health != "ok":
                if self.store.drain(g.uuid, reason=g.health_reason or f"GPU {g.health}",
                                    by="daemon", now=now):
                    log.error("GPU %s (%s) drained: %s", g.index, g.uuid, g.health_reason)
                    self._evacuate(g, now)
        self._release_clean_gpus(now)

    def _evacuate(self, gpu: Gpu, now: float) -> None:
        """Jobs on a GPU that failed: stop them and queue them again without using a retry
        (an infrastructure failure is not the job's fault)."""
        jobs = sorted({a["job_id"] for a in self.store.allocations()
                       if a["gpu_uuid"] == gpu.uuid and a["releasing_since"] is None})
        if not jobs:
            return
        why = f"GPU {gpu.index} failed ({gpu.health_reason or gpu.health}); queued again"
        self.store.mark_infra_requeue(jobs, why, now)
        for row in self.store.live_attempts():
            if row["job_id"] in jobs and row["state"] == "live":
                runner = self._runner(row["runner"])
                if runner is not None:
                    try:
                        runner.signal_cancel(AttemptRef.from_row(row), kill=True)
                    except GpuschedError as err:
                        log.warning("could not stop job %s on failed GPU: %s", row["job_id"],
                                    err)
        # the GPU's allocation goes with its attempt; nothing will be placed on it (drained)

    def _release_clean_gpus(self, now: float) -> None:
        """Allocations of ended attempts go once NVML shows none of the job's processes."""
        by_uuid = {g.uuid: g for g in self.gpus}
        for alloc in self.store.allocations():
            since = alloc["releasing_since"]
            if since is None:
                continue
            gpu = by_uuid.get(alloc["gpu_uuid"])
            still = [p.pid for p in (gpu.processes if gpu else []) if p.job_id == alloc["job_id"]]
            if not still:
                self.store.release_gpu(alloc["gpu_uuid"])
            elif now - since >= self.settings.gpus.release_timeout_s:
                self.store.drain(alloc["gpu_uuid"], by="daemon", now=now,
                                 reason=f"processes {still} of finished job {alloc['job_id']} "
                                        "still hold the GPU")
                self.store.release_gpu(alloc["gpu_uuid"])

    # -- reconcile ------------------------------------------------------------------------

    def step_reconcile(self, now: float) -> None:
        due, self._reconcile_due = self._reconcile_due, None
        if due is None:  # called on its own, not from tick
            due = self._reconcile_now or now >= self._next_reconcile
        if not due:
            return
        self._reconcile_now = False
        self._next_reconcile = now + self.settings.scheduler.reconcile_interval_s
        self.reconcile(now)

    def reconcile(self, now: float) -> None:
        """Compare the store with what the runners see: adopt attempts that a crash left
        unconfirmed, requeue those that never started, remove orphans."""
        rows = self.store.live_attempts()
        live = {(r["job_id"], r["n"]) for r in rows if r["state"] == "live"}
        starting = {(r["job_id"], r["n"]): r for r in rows if r["state"] == "starting"}
        orphan_gpus: set[str] = set()
        for runner in self.runners.values():
            try:
                found = runner.orphans(live)
            except RunnerUnavailable as err:
                self._runner_down(runner.name, str(err), now)
                for key, row in list(starting.items()):
                    if row["runner"] == runner.name:
                        starting.pop(key)  # cannot decide without the backend
                continue
            # it answered: a runner marked down (an outage, another daemon's lease) is back,
            # even when it has no live attempt whose poll would have said so
            self._runner_up(runner.name, now)
            for orphan in found:
                key = (orphan.job_id or -1, orphan.attempt or -1)
                if (key in starting and starting[key]["runner"] == runner.name
                        and orphan.adoptable and self._runs_as_owner(orphan, starting[key])):
                    self._adopt(starting.pop(key), runner.name, orphan.handle, now)
                    continue
                # not adoptable (a container created but never started): removed below, and
                # its attempt, still "starting", is queued again as never started
                log.warning("removing orphan: %s", orphan.description)
                if not runner.remove_orphan(orphan):
                    orphan_gpus.update(orphan.gpus)
        for (job_id, n), row in starting.items():
            maybe = self._runner(row["runner"])
            ref = AttemptRef.from_row(row)
            # a local (or Slurm) attempt may have run and finished while we were down, or
            # Slurm forgot it since: its exit file says
            outcome = (maybe.poll(ref, now) if maybe and row["runner"] in ("local", "slurm")
                       else None)
            if outcome is not None and not outcome.lost and maybe is not None:
                with self.store.write():
                    self.store.mark_launched(job_id, n, now=now)
                    what = self._record_end(row, ref, outcome, now)
                self._forget_attempt(ref, maybe, what)  # reconcile runs unbatched: saved
                continue
            log.warning("job %s attempt %s never started; queueing it again", job_id, n)
            self.store.finish_attempt(job_id, n, to=S.QUEUED, now=now, ended_at=now,
                                      exit_code=None, reason="the daemon stopped before the "
                                      "attempt started; queued again", requeue=True,
                                      consume_retry=False)
            if maybe is not None:
                maybe.cleanup(ref)  # the runner may remember an outcome of it
        self.orphan_gpus = orphan_gpus

    @staticmethod
    def _runs_as_owner(orphan: Any, row: Row) -> bool:
        """A found attempt runs as its job's user (as the daemon itself when not root)."""
        if orphan.uid is None:
            return True  # the runner cannot tell (containers: Docker runs them as asked)
        expected = row.get("owner_uid") if os.geteuid() == 0 else os.geteuid()
        if orphan.uid != expected:
            log.warning("not adopting %s: it runs as uid %s, the job's user is uid %s",
                        orphan.description, orphan.uid, expected)
            return False
        return True

    def _adopt(self, row: Row, runner: str, handle: Any, now: float) -> None:
        job_id, n = row["job_id"], row["n"]
        log.info("adopting job %s attempt %s found running after a restart", job_id, n)
        if runner == "local":
            pid, start = handle
            self.store.mark_launched(job_id, n, now=now, pid=pid, pid_start=start)
        elif runner == "slurm":
            self.store.mark_launched(job_id, n, now=now, slurm_job_id=str(handle))
        else:
            self.store.mark_launched(job_id, n, now=now, container_id=str(handle))

    # -- pipelines ------------------------------------------------------------------------

    def step_pipelines(self, now: float) -> None:
        """Gate rounds that ended: prune again at lower thresholds, or record the result."""
        self.pipelines.step(now)

    # -- dependencies ---------------------------------------------------------------------

    def step_dependencies(self, now: float) -> None:
        """Fail queued jobs whose ``--after`` job failed; repeat so chains fail in one tick."""
        while True:
            last = self.store.last_event_id()
            broken = self.store.broken_dependencies(after_event=self._dep_events)
            for job_id, (after_id, after_status) in broken.items():
                self.store.transition(job_id, S.FAILED, now, fields={"ended_at": now},
                                      reason=f"dependency job {after_id} {after_status}; not run")
            # only once they are all made (a transition that raises leaves the cursor, and the
            # next tick checks the same events again); those transitions are newer than
            # ``last``: the next pass sees them
            self._dep_events = last
            if not broken:
                return

    # -- plan and launch ------------------------------------------------------------------

    def _slots(self, now: float) -> list[GpuSlot]:
        drained = {r["uuid"]: r["drain_reason"] for r in self.store.gpu_rows() if r["drained"]}
        allocs = {a["gpu_uuid"]: a for a in self.store.allocations()}
        ends = self._expected_ends(allocs, now)
        slots = []
        for g in self.gpus:
            a = allocs.get(g.uuid)
            holder = a["job_id"] if a else (-1 if g.uuid in self.orphan_gpus else None)
            slots.append(GpuSlot(
                uuid=g.uuid, index=g.index, name=g.name, memory_total_mib=g.memory_total_mib,
                memory_free_mib=g.memory_free_mib, usable=g.health == "ok" and g.uuid not in drained,
                has_foreign=bool(g.foreign_processes), allocated_to=holder,
                busy_until=ends.get(holder) if holder else None))
        return slots

    def _expected_ends(self, allocs: dict[str, Row], now: float) -> dict[int, float]:
        """When each holder should give its GPUs back: its epoch ETA while it trains (the
        placement may wait for a faster GPU only on such an estimate), else --time from its
        start. An estimate already passed is kept as passed (the holder overruns): the
        planner then never waits on it."""
        live = {(a["job_id"], a["attempt"]) for a in allocs.values()
                if a["releasing_since"] is None}
        ids = sorted({j for j, _ in live})
        if not ids:
            return {}
        rows = self.store.query(
            "SELECT id, started_at, json_extract(spec, '$.est_runtime_s') AS est FROM jobs"
            f" WHERE id IN ({','.join('?' * len(ids))}) AND started_at IS NOT NULL", ids)
        out = {r["id"]: max(now, r["started_at"] + r["est"]) for r in rows if r["est"]}
        for job_id, n in live:
            p = self.progress_of(job_id, n)
            if p and p.get("eta_s") is not None and p.get("last_at") is not None:
                # from the last epoch seen, not from now: a holder that stopped reporting
                # epochs (hung) has an end in the past, and nobody waits on it
                end = float(p["last_at"]) + float(p["eta_s"])
                if end > now:
                    out[job_id] = end
        return out

    def _model(self, now: float) -> SpeedModel:
        """The speed model, refit from the last 30 days of epochs every model_refresh_s, and
        soon after a job that timed epochs ends (so the next stage of a pipeline already
        benefits); the prior is the config's speed per GPU model, else the inventory's."""
        age = now - self._model_at
        if (self.speed_model is None or age >= self.settings.scheduler.model_refresh_s
                or (self._model_stale and age >= MODEL_MIN_REFIT_S)):
            self._model_stale = False
            self._model_at = now
            try:
                self.speed_model = SpeedModel.fit(
                    self.store.epochs(since=now - 30 * 86400, limit=MODEL_MAX_EPOCHS),
                    self.prior_speeds(), self.settings.scheduler.efficiency_prior)
            except Exception:  # placement goes on with the last model, or the prior alone
                log.exception("the speed model could not be refit; keeping the last one")
                if self.speed_model is None:
                    self.speed_model = SpeedModel.fit([], self.prior_speeds(),
                                                      self.settings.scheduler.efficiency_prior)
        return self.speed_model

    def prior_speeds(self) -> dict[str, float]:
        """The prior speed per GPU model: the config's [gpus.speed], else the inventory's.
        Inventory speeds (NVML's cores × clock, a simulated spec's) are scaled so that the
        slowest is 1, the config's convention, so the two sources can be mixed."""
        configured = self.settings.gpus.speed
        prior: dict[str, float] = dict(configured)
        found = [g.speed for g in self.gpus if g.speed]
        slowest = min(found) if found else 1.0
        for g in self.gpus:
            value = prior_lookup(configured, g.name) or (g.speed / slowest if g.speed else None)
            if value:
                prior[g.name] = value
        return prior

    def _queued_job(self, r: Row) -> QueuedJob | None:
        """What the planner needs of a runnable job (built once: a queued job's request and
        spec do not change): for TAO training its workload and epochs, so the speed model can
        tell how long it runs on each GPU set; evaluate/prune/export are short stages."""
        try:
            request = GpuRequest.model_validate_json(r["request"])
        except ValueError as err:
            raise ValueError(f"its GPU request cannot be read: {err}") from err
        spec = json.loads(r["spec"])
        self._queued_specs[r["id"]] = r["spec"]  # what it launches with (_launch_spec)
        kind = str(spec.get("kind") or "")
        workload, epochs = workload_of(spec, owner=r.get("owner")), None
        if kind in ("tao:train", "tao:retrain"):
            from gpusched.parsers_tao import workload_key
            from gpusched.progress import recorded_spec_facts
            from gpusched.stages import parse_ref, pruning_ratio

            facts = recorded_spec_facts(spec, owner_uid=r.get("owner_uid"))
            epochs = facts.get("num_epochs") if isinstance(facts.get("num_epochs"), int) else None
            refs = (spec.get("stage") or {}).get("refs") or {}
            for v in refs.values():
                parsed = parse_ref(str(v))
                if parsed and parsed[0] == "pruned_model":  # a retrain: its own workload
                    ratio = pruning_ratio(next((a for a in self.store.artifacts(parsed[1])
                                                if a["kind"] == "pruned_model"), None))
                    workload = workload_key(facts, ratio)
        return QueuedJob(id=r["id"], priority=r["priority"], submitted_at=r["submitted_at"],
                         request=request, est_runtime_s=r["est_runtime_s"], workload=workload,
                         epochs=epochs, short=kind in ("tao:evaluate", "tao:prune", "tao:export"))

    def runnable(self, lean: bool = False) -> list[Row]:
        """Queued jobs whose dependencies all succeeded, in planning order (the index
        jobs_queue_order gives it without sorting). ``lean``: only what the tick needs of a
        job it has already built (_queued_cache); _queued_job reads the rest."""
        return [r for r in self._runnable_rows(lean) if r["runner"] not in self.degraded]

    def _runnable_window(self) -> list[Row]:
        """runnable(lean=True), read again only when the queue changed other than by this
        daemon's claims (Store.queue_state: read before the query, so a change committed
        while it runs makes the next tick read again), or when claims have used up a quarter
        of a full window. A plan sees the same jobs as with a fresh read, less at most a
        quarter of the window's tail: on a long drain the query ran on every tick for two
        jobs, and it costs in proportion to the window."""
        version = self.store.queue_state()
        window = self._window
        if (window is None or version != self._window_version
                or (self._window_full and len(window) < PLAN_WINDOW * 3 // 4)):
            window = self._window = self._runnable_rows(lean=True)
            self._window_version, self._window_full = version, len(window) >= PLAN_WINDOW
        return [r for r in window if r["runner"] not in self.degraded] if self.degraded else window

    def _runnable_rows(self, lean: bool) -> list[Row]:
        columns = "j.id, j.priority, j.runner, j.owner_uid, j.owner" if lean else QUEUED_COLUMNS
        return self.store.query(
            f"SELECT {columns} FROM jobs j"
            " WHERE j.status = 'queued' AND NOT EXISTS (SELECT 1 FROM job_deps d"
            " JOIN jobs a ON a.id = d.after_id WHERE d.job_id = j.id AND a.status != 'succeeded')"
            " AND NOT EXISTS (SELECT 1 FROM job_after_any e JOIN jobs a ON a.id = e.after_id"
            " WHERE e.job_id = j.id AND a.status NOT IN ('succeeded', 'failed', 'cancelled',"
            " 'lost'))"
            " ORDER BY j.priority DESC, j.submitted_at, j.id LIMIT ?", [PLAN_WINDOW])

    def step_plan_and_launch(self, now: float) -> None:
        started = time.perf_counter()
        rows = self._runnable_window()
        self.placed_last_tick = 0
        if not rows:
            self.waiting = {}
            return
        by_id = {r["id"]: r for r in rows}
        cache = self._queued_cache
        missing = [r["id"] for r in rows if r["id"] not in cache
                   or cache[r["id"]].priority != r["priority"]]
        full = {r["id"]: r for r in self.store.query(
            f"SELECT {QUEUED_COLUMNS} FROM jobs j"
            f" WHERE j.id IN ({','.join('?' * len(missing))})", missing)} if missing else {}
        jobs: list[QueuedJob] = []
        # Slurm owns its cluster's GPUs: a runnable slurm job is handed to Slurm, which
        # queues it; it takes no local GPU and never enters the local plan
        handed: list[QueuedJob] = []
        for r in rows:
            job = cache.get(r["id"])
            if job is None or job.priority != r["priority"]:
                try:
                    if r["id"] not in full:
                        continue  # it changed since (claimed, cancelled): the next tick
                    built = self._queued_job(full[r["id"]])
                except Exception as err:  # one job that cannot be planned stops nobody else
                    self._fail_job(r["id"], f"it cannot be planned: {err}", now)
                    continue
                if built is None:
                    continue
                job = cache[r["id"]] = built
            since = self._waiting_since.get(job.id)
            if since is not None and now - since > MAX_WAIT_FOR_FASTER_S and job.may_wait:
                job = cache[r["id"]] = dataclasses.replace(job, may_wait=False)
            (handed if r["runner"] == "slurm" else jobs).append(job)
        if len(cache) > 4 * PLAN_WINDOW:
            self._queued_cache = {j.id: j for j in jobs + handed}
            self._queued_specs = {j.id: self._queued_specs[j.id] for j in jobs + handed
                                  if j.id in self._queued_specs}
        for job in handed:
            if "slurm" in self.degraded:
                break  # Slurm stopped answering during this tick: the rest wait, unclaimed
            def hand(row: Row = by_id[job.id]) -> None:
                self._launch(row, (), now)
            self._contain(job.id, "hand it to Slurm", hand, now)
        result = plan(jobs, self._slots(now), now,
                      foreign_policy=self.settings.gpus.foreign_policy,
                      policy=self.settings.scheduler.policy, model=self._model(now), lazy=True)
        # the reasons of the jobs that wait behind full GPUs are judged when read (ls, show)
        self.waiting = result.reasons()
        # the wait for a faster GPU is bounded in all, not per pass: a holder whose ETA keeps
        # sliding (it reports max_epoch = epoch + 1) would otherwise be waited on forever
        self._waiting_since = {
            j: self._waiting_since.get(j, now) for j, why in result.waiting.items()
            if why.startswith(WAITS_FOR_FASTER)}
        if self._launch_pause is not None:
            until, why = self._launch_pause
            if now < until:
                self.waiting = {**self.waiting, **{p.job_id: f"launches paused: {why}"
                                                   for p in result.placements}}
                return
            self._launch_pause = None
        gpus = {g.uuid: g for g in self.gpus}
        self.step_seconds["plan_and_launch.plan"] += time.perf_counter() - started
        self._launch_all([(by_id[p.job_id], tuple(gpus[u] for u in p.gpu_uuids), p.reason)
                          for p in result.placements], now)

    def _resolve_stage(self, job_id: int, spec: JobSpec, now: float) -> JobSpec | None:
        """Hand upstream results (best checkpoint, pruned model) to a stage that needs them."""
        from gpusched import policy
        from gpusched.errors import SpecError
        from gpusched.stages import resolve

        def lookup(upstream: int, kind: str) -> dict[str, Any] | None:
            return next((a for a in self.store.artifacts(upstream) if a["kind"] == kind), None)

        try:
            resolved = resolve(spec, self.settings, lookup)
            if resolved.runner == "docker":  # rebuilt from the request: check its mounts again
                resolved = policy.resolve_mounts(resolved, self.settings.docker)
                # and keep the container user as checked and spelled (uid:gid) at submission
                resolved = resolved.model_copy(update={"user": spec.user})
        except (SpecError, ValueError) as err:  # ValueError: pydantic's ValidationError
            reason = err.message if isinstance(err, SpecError) else f"bad stage: {err}"
            self.store.transition(job_id, S.FAILED, now, reason=reason,
                                  allowed={S.QUEUED}, fields={"ended_at": now})
            return None
        self.store.update_spec(job_id, resolved.model_dump_json())
        return resolved

    def paths(self, job_id: int, n: int) -> tuple[str, str]:
        return (os.path.join(self.settings.logs_dir, str(job_id), f"{n}.log"),
                os.path.join(self.settings.runs_dir, str(job_id), str(n)))

    def local_paths(self, job_id: int, n: int) -> tuple[str, str]:
        """A local attempt's log, and its run directory: the job's log folder, which also
        holds the shim's exit file (LocalRunner: exit_path)."""
        folder = os.path.join(self.settings.logs_dir, str(job_id))
        return os.path.join(folder, f"{n}.log"), folder

    def slurm_paths(self, job_id: int, n: int) -> tuple[str, str]:
        """A Slurm attempt's output and run folder, on the filesystem its nodes share."""
        run_dir = self.settings.slurm_runs_dir / str(job_id) / str(n)
        return str(run_dir / "output.log"), str(run_dir)

    def job_env(self, job_id: int, n: int, gpus: tuple[Gpu, ...]) -> dict[str, str]:
        uuids = ",".join(g.uuid for g in gpus)
        env = {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": uuids,
            "GPUSCHED_JOB_ID": str(job_id),
            "GPUSCHED_ATTEMPT": str(n),
            "GPUSCHED_GPUS": uuids,
            "GPUSCHED_GPU_NAMES": ",".join(g.name for g in gpus),
        }
        if self.inventory.simulated:
            # what `nvidia-smi -L` would list on this simulated host, in index order, for
            # programs that look at the host's GPUs themselves (TAO's entrypoint does; the
            # fake TAO reads this). Containers get only their own GPUs (the runner's env).
            env["GPUSCHED_SIMULATED_HOST_GPUS"] = ",".join(
                f"{g.uuid}={g.name}" for g in sorted(self.gpus, key=lambda g: g.index))
        return env

    def _launch(self, row: Row, gpus: tuple[Gpu, ...], now: float,
                why: str | None = None) -> None:
        self._launch_all([(row, gpus, why)], now)

    def _launch_all(self, todo: list[tuple[Row, tuple[Gpu, ...], str | None]],
                    now: float) -> None:
        """Start these placements in three steps: claim them all in one transaction (durable
        before any process exists, so a crash can never run a job twice), start them, and
        record what each start did. A start's record is kept for the next tick's first
        transaction when ``defer_marks`` is set (the service's loop under load: one fsync
        for the ends and starts of a tick); a crash before that commit leaves the attempt
        "starting", which reconcile adopts (it runs) or queues again (it never started)."""
        specs: dict[int, JobSpec] = {}
        for row, _, _ in todo:
            def prepare(row: Row = row) -> None:
                spec = self._launch_spec(row, now)
                if spec is not None:
                    specs[row["id"]] = spec
            self._contain(row["id"], "launch it", prepare, now)
        ready: list[LaunchRequest] = []
        for row, gpus, why in todo:
            if row["id"] not in specs:
                continue

            def claim(row: Row = row, gpus: tuple[Gpu, ...] = gpus,
                      why: str | None = why) -> None:
                with self.store.write():
                    req = self._claim(row, specs[row["id"]], gpus, now, why)
                if req is not None:
                    ready.append(req)
            self._contain(row["id"], "launch it", claim, now)
        if len(ready) != len(todo):
            # a placement that did not become a launch (failed at its claim, claimed and then
            # failed, rolled back) may have left the queue without a bump of the store's
            # version, or still be in it: the window is read again rather than guessed
            self._window = None
        started = time.perf_counter()
        saved = bool(ready) and self.commit()
        self.step_seconds["plan_and_launch.commit"] += time.perf_counter() - started
        if not saved:
            return  # a claim not saved starts nothing: the next tick plans it again
        if self._window is not None:  # claimed: no longer runnable (the store did not say)
            claimed = {req.job_id for req in ready}
            self._window = [r for r in self._window if r["id"] not in claimed]
        results: list[tuple[LaunchRequest, Launched | BaseException]] = []
        started = time.perf_counter()
        for i, req in enumerate(ready):
            if self._launch_pause is not None:  # the host ran short of resources
                for rest in ready[i:]:
                    results.append((rest, _Paused(self._launch_pause[1])))
                break
            try:
                results.append((req, self._runner_of(req).launch(req)))
            except Exception as err:
                results.append((req, err))
                if isinstance(err, (RunnerError, OSError)) and transient(err):
                    self._launch_pause = (now + RESOURCE_BACKOFF_S, f"the host is short of "
                                          f"resources ({err}); trying again shortly")
        self.step_seconds["plan_and_launch.start"] += time.perf_counter() - started
        for req, result in results:
            if isinstance(result, Launched):
                self._record_start(req, result, now)  # kept in memory until written
                continue

            def record(req: LaunchRequest = req,
                       result: Launched | BaseException = result) -> None:
                with self.store.write():
                    self._record_start(req, result, now)
            self._contain(req.job_id, "record its start", record, now)
        if not self.defer_marks:
            self._write_marks()
        # a start that failed and whose record is not saved stays "starting" with no
        # process: the reconcile asked for here queues it again
        if not self.commit():
            self.request_reconcile()

    def _runner_of(self, req: LaunchRequest) -> Runner:
        runner = self._runner(req.spec.runner)
        assert runner is not None  # checked by _claim
        return runner

    def _launch_spec(self, row: Row, now: float) -> JobSpec | None:
        """The spec a job starts with: a stage gets its upstream results here. That checks
        the user's paths (mounts), which may be slow: it runs outside the tick's open
        transaction, so no submission waits on it."""
        job_id = row["id"]
        self._queued_cache.pop(job_id, None)
        # the spec read when the job was planned: a queued job's spec changes only here
        # (_resolve_stage), and a job queued again is planned again from its row
        text = self._queued_specs.pop(job_id, None) or self.store.get_job(job_id)["spec"]
        spec = JobSpec.model_validate_json(text)
        if spec.kind.startswith("tao:") and (spec.stage or {}).get("refs"):
            if not self.commit():
                return None  # planned again on the next tick
            with self.store.unbatched():
                return self._resolve_stage(job_id, spec, now)
        return spec

    def _claim(self, row: Row, spec: JobSpec, gpus: tuple[Gpu, ...], now: float,
               why: str | None) -> LaunchRequest | None:
        """Claim the job's GPUs and make its launch request (None: it does not start)."""
        job_id = row["id"]
        runner = self._runner(spec.runner)
        if runner is None:
            self.store.transition(job_id, S.HELD, now, allowed={S.QUEUED},
                                  reason=f"the {spec.runner} runner is not enabled on this daemon")
            return None
        paths = {"slurm": self.slurm_paths, "local": self.local_paths}.get(runner.name,
                                                                          self.paths)
        n = self.store.claim(job_id, [g.uuid for g in gpus], runner=runner.name, now=now,
                             paths=paths, reason=f"placed: {why}" if why else None)
        if n is None:
            return None
        log_path, run_dir = paths(job_id, n)
        if spec.kind.startswith("tao:"):
            # the GPUs are known now: TAO's --gpu_index (host indices for a host TAO, which
            # sets CUDA_VISIBLE_DEVICES itself), and a retried train resumes from its latest
            # checkpoint
            from gpusched.errors import SpecError
            from gpusched.stages import for_launch

            try:
                launched_as = for_launch(spec, attempt=n, gpu_indices=[g.index for g in gpus],
                                         owner_uid=row["owner_uid"])
                if launched_as.command != spec.command:  # `show` lists what really ran
                    self.store.update_attempt(job_id, n,
                                              command=json.dumps(launched_as.command))
                spec = launched_as
            except (SpecError, ValueError) as err:
                reason = err.message if isinstance(err, SpecError) else f"bad stage: {err}"
                self.store.finish_attempt(job_id, n, to=S.FAILED, now=now, ended_at=now,
                                          exit_code=None, reason=f"could not start: {reason}")
                return None
        return LaunchRequest(job_id=job_id, attempt=n, spec=spec, gpus=gpus,
                             simulated=self.inventory.simulated,
                             env=self.job_env(job_id, n, gpus), log_path=Path(log_path),
                             run_dir=Path(run_dir), owner_uid=row["owner_uid"],
                             owner=row["owner"])

    def _record_start(self, req: LaunchRequest, result: Launched | BaseException,
                      now: float) -> None:
        """Record what one start did: launched (now, or at the next tick's first commit), or
        why not (held, queued again, failed)."""
        job_id, n, runner = req.job_id, req.attempt, self._runner_of(req)
        if isinstance(result, Launched):
            self._pending_marks[(job_id, n)] = (result, now, runner.name)
            self.placed_last_tick += 1
            log.info("job %s attempt %s started on %s", job_id, n,
                     ",".join(str(g.index) for g in req.gpus) or "no GPU")
        elif isinstance(result, _Paused):
            self.store.finish_attempt(job_id, n, to=S.QUEUED, now=now, ended_at=now,
                                      exit_code=None, reason=f"launches paused: {result}; "
                                      "queued again", requeue=True, consume_retry=False)
        elif isinstance(result, LaunchRefused):
            self.store.finish_attempt(job_id, n, to=S.HELD, now=now, ended_at=now, exit_code=None,
                                      reason=result.message, requeue=False)
            self.store.transition(job_id, S.HELD, now, reason=result.message,
                                  allowed={S.STARTING})
            log.warning("job %s held: %s", job_id, result.message)
        elif isinstance(result, RunnerUnavailable):
            self.store.finish_attempt(job_id, n, to=S.QUEUED, now=now, ended_at=now,
                                      exit_code=None, reason=f"{runner.name} unavailable: "
                                      f"{result}", requeue=True, consume_retry=False)
            self._runner_down(runner.name, str(result), now)
        elif isinstance(result, (RunnerError, OSError)) and transient(result):
            # the host is short of fds/processes/memory: not the job's fault
            log.warning("job %s: launch failed for lack of resources (%s); queued again",
                        job_id, result)
            self.store.finish_attempt(job_id, n, to=S.QUEUED, now=now, ended_at=now,
                                      exit_code=None, reason=f"could not start (host short "
                                      f"of resources: {result}); queued again", requeue=True,
                                      consume_retry=False)
        elif isinstance(result, (RunnerError, OSError)):
            self.store.finish_attempt(job_id, n, to=S.FAILED, now=now, ended_at=now,
                                      exit_code=None, reason=f"could not start: {result}")
        else:
            raise result  # a bug: _contain fails this job, with the reason

    def _write_marks(self) -> None:
        """Record the starts kept (see _launch_all) in the open transaction; they are kept
        until it commits (a commit that fails leaves them for the next one)."""
        marks = dict(self._pending_marks)  # a second reap in the tick writes them again: no-ops
        for (job_id, n), (launched, at, name) in marks.items():
            confirm = getattr(self.runners.get(name), "confirm", None)
            if confirm is not None:  # what a runner learns once the process runs (pid start)
                launched = confirm(launched)
            self.store.mark_launched(job_id, n, now=at, pid=launched.pid,
                                     pid_start=launched.pid_start,
                                     container_id=launched.container_id,
                                     container_name=launched.container_name,
                                     slurm_job_id=launched.slurm_job_id)

        def written() -> None:
            for key in marks:
                self._pending_marks.pop(key, None)
        self._after_commit.append(written)

    def _confirm_marks(self) -> None:
        for key, (launched, at, name) in list(self._pending_marks.items()):
            confirm = getattr(self.runners.get(name), "confirm", None)
            if confirm is not None:
                self._pending_marks[key] = (confirm(launched), at, name)

    def has_pending_marks(self) -> bool:
        return bool(self._pending_marks)

    def flush_marks(self) -> None:
        """Commit the starts kept for the next tick (the loop is about to sleep, or stop)."""
        with self.lock:
            if not self._pending_marks:
                return
            self._after_commit = []
            with self.store.batch():
                self._write_marks()
                if not self.commit():
                    raise StoreError(self.step_errors.get("commit", "not saved"))

    # -- notify ---------------------------------------------------------------------------

    def step_notify(self, now: float) -> None:
        """--output, --notify and --notify-url of jobs that ended (see notifier.py)."""
        self.notifier.step(now, self._contain)

    # -- Slurm ----------------------------------------------------------------------------

    def slurm_hold(self, job_id: int, *, release: bool, actor: str, now: float) -> str | None:
        """Hold or release a job already handed to Slurm (``scontrol hold/release``, for a job
        Slurm has not started yet). None when the job has no live Slurm attempt (the store's
        own hold/release applies)."""
        from gpusched.errors import Conflict
        from gpusched.runners.slurm import SlurmRunner

        runner = self.runners.get("slurm")
        with self.lock:
            row = next((r for r in self.store.live_attempts(runner="slurm")
                        if r["job_id"] == job_id and r["state"] == "live"), None)
        if row is None or not isinstance(runner, SlurmRunner):
            return None
        ref = AttemptRef.from_row(row)
        verb = "release" if release else "hold"
        why = runner.hold(ref, release=release)
        if why:
            raise Conflict(f"Slurm would not {verb} job {job_id} (Slurm job "
                           f"{ref.slurm_job_id}): {why}")
        done = "released" if release else "held"
        self.store.note(job_id, f"{done} in Slurm by {actor} (Slurm job {ref.slurm_job_id})",
                        actor=actor, now=now)
        return f"{done} in Slurm"

    def slurm_nodes(self) -> list[dict[str, str]] | None:
        """The Slurm cluster's nodes and their GPUs (Gres, GresUsed); None without Slurm."""
        from gpusched.runners.slurm import SlurmRunner

        runner = self.runners.get("slurm")
        return runner.nodes() if isinstance(runner, SlurmRunner) else None

    # -- views for the API ----------------------------------------------------------------

    def gpu_states(self) -> list[GpuState]:
        """The GPUs as `gpusched gpus` shows them (API threads, without the daemon's lock:
        the inventory list is replaced whole by the tick, never changed in place)."""
        rows = {r["uuid"]: r for r in self.store.gpu_rows()}
        allocs = {a["gpu_uuid"]: a["job_id"] for a in self.store.allocations()}
        speeds = self.prior_speeds()
        out = []
        for g in list(self.gpus):
            r = rows.get(g.uuid, {})
            state: Literal["idle", "busy", "foreign", "drained", "lost"]
            if g.health == "lost":
                state = "lost"
            elif r.get("drained"):
                state = "drained"
            elif g.uuid in allocs or g.uuid in self.orphan_gpus:
                state = "busy"
            elif g.foreign_processes:
                state = "foreign"
            else:
                state = "idle"
            out.append(GpuState(
                index=g.index, uuid=g.uuid, name=g.name, memory_total_mib=g.memory_total_mib,
                memory_used_mib=g.memory_used_mib, memory_free_mib=g.memory_free_mib,
                utilization_pct=g.utilization_pct, temperature_c=g.temperature_c,
                power_w=g.power_w, pci_bus_id=g.pci_bus_id,
                compute_capability=g.compute_capability, mig_mode=g.mig_mode, state=state,
                job_id=allocs.get(g.uuid), drain_reason=r.get("drain_reason"),
                processes=g.processes, health=g.health, simulated=g.simulated,
                speed=speeds.get(g.name)))
        return out

    def health(self) -> dict[str, Any]:
        """The daemon's checks. Called from API threads without the daemon's lock: it reads
        only fields the tick replaces whole (or copies them in one step), and the store's
        check runs on a read connection, so health neither waits for a tick nor holds one
        up (quick_check of a big database takes a while)."""
        checks: dict[str, dict[str, Any]] = {}
        tick_error, step_errors = self.tick_error, dict(self.step_errors)
        degraded, gpus = dict(self.degraded), list(self.gpus)
        problems = [tick_error] if tick_error else []
        problems += [f"step {k} failed: {v}" for k, v in step_errors.items()]
        checks["daemon"] = {"ok": not problems,
                            "detail": "; ".join(problems) or "tick loop running"}
        try:
            qc = self.store.quick_check()
            checks["store"] = {"ok": qc == "ok", "detail": f"quick_check {qc}"}
        except GpuschedError as err:
            checks["store"] = {"ok": False, "detail": err.message}
        lost = [g for g in gpus if g.health != "ok"]
        checks["gpus"] = {
            "ok": bool(gpus) and not lost,
            "detail": (f"{len(gpus)} GPU(s), simulated" if self.inventory.simulated else
                       f"{len(gpus)} GPU(s) through NVML")
            + (f"; unhealthy: {', '.join(f'{g.index} {g.health_reason}' for g in lost)}"
               if lost else ""),
        }
        for name, runner in self.runners.items():
            ok, detail = runner.health() if name not in degraded else (False, degraded[name])
            checks[name] = {"ok": ok, "detail": detail}
        return {"ok": all(c["ok"] for c in checks.values()),
                "status": "ok" if all(c["ok"] for c in checks.values()) else "degraded",
                "checks": checks, "tick": self.tick_stats()}

    def tick_stats(self) -> dict[str, Any]:
        """How long the last ticks took (ms): what a big queue or a slow step costs."""
        recent = list(self.tick_seconds)
        secs = sorted(recent)
        if not secs:
            return {"ticks": self.ticks}
        return {"ticks": self.ticks, "last_ms": round(recent[-1] * 1000, 3),
                "median_ms": round(secs[len(secs) // 2] * 1000, 3),
                "p95_ms": round(secs[min(len(secs) - 1, int(len(secs) * 0.95))] * 1000, 3),
                "max_ms": round(secs[-1] * 1000, 3), "over_last": len(secs),
                "seconds_by_step": {k: round(v, 6) for k, v in sorted(
                    self.step_seconds.items(), key=lambda kv: -kv[1])}}

