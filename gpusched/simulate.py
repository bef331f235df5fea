"""A discrete-event simulator that drives the real planner: ``gpusched simulate``.

Why: issue 12's claims about placement (fastest GPU, split or gang, short stages on the slow
card) are only worth what a replay of whole traces shows, and only if the replay runs the very
``scheduling.plan`` the daemon runs. So this module is a fake clock and a heap of events
(submissions, the first timed epochs of a run, completions, wake-ups) around that function;
no processes, no sockets, no store. At each event time it builds ``QueuedJob`` and ``GpuSlot``
lists as the daemon's tick does (runnable = every ``after`` job done; a busy GPU's
``busy_until`` = its holder's start + the model's estimate, never before now), calls ``plan``,
and starts what it places. How long a job really runs comes from the trace's truth, which the
planner never sees; what the planner learns is what the daemon would learn: epoch rows with
the true seconds, from which a ``SpeedModel`` is refitted.

Metrics: makespan, mean job completion time, per-GPU busy fraction, planner time per call, and
a lower bound on makespan (``lower_bound``) to say how far from optimal a policy is.

Pure layer-3 code (models, scheduling, speedmodel, throughput, traces); SciPy only inside
``lower_bound``, from the optional extra ``tao-gpusched[sim]``.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations_with_replacement
from typing import Any, cast

from gpusched.errors import GpuschedError, SpecError
from gpusched.models import GpuRequest
from gpusched.scheduling import (
    MAX_WAIT_FOR_FASTER_S,
    POLICIES,
    WAITS_FOR_FASTER,
    GpuSlot,
    PlacementPolicy,
    QueuedJob,
    plan,
)
from gpusched.speedmodel import SpeedModel
from gpusched.throughput import SetStats, gpu_set_key, summarize
from gpusched.traces import Trace, TraceJob, load_trace

#: epochs of a run the model sees early (as the daemon records them live): the warm-up, which
#: ``throughput.summarize`` drops, and two timed ones
EARLY_EPOCHS = 3
#: epoch rows fed per run at most. The truth is constant per epoch, so more rows would only
#: repeat the same median while making every refit slower (1,000 jobs must stay quick).
ROWS_PER_RUN = 8
#: runs of one (workload, GPU set) that feed rows at most: with 7 timed epochs each, three
#: runs pass the 20 samples at which ``SpeedModel.fit`` stops weighing a set more, so later
#: runs could not change the fit (the median is the truth from the first run on)
RUNS_PER_SET = 3
#: release-time cut-offs the bound's LP is solved for at most (see ``lower_bound``)
MAX_CUTOFFS = 24

# event kinds, in the order they are applied at one instant: GPUs free before new work arrives
_DONE, _EPOCHS, _SUBMIT, _WAKE = 0, 1, 2, 3


class SimulationError(GpuschedError):
    """The simulation could not finish."""


@dataclass(frozen=True)
class JobRecord:
    """What happened to one trace job."""

    key: str
    user: str
    submit_s: float
    start_s: float
    end_s: float
    gpus: tuple[int, ...]  # indices on the box
    gpu_names: tuple[str, ...]


@dataclass(frozen=True)
class Bound:
    """A lower bound on makespan, with its parts (all in seconds from the first submission).

    ``lp_s``: the LP relaxation over all jobs. ``release_lp_s``: the best of ``t + LP(jobs that
    cannot start before t)`` over cut-offs t (t = the first submission is ``lp_s``).
    ``critical_path_s``: the latest of submit + fastest durations along a dependency chain.
    ``window_lp_s``: the least T whose time-indexed LP, each job inside its window between
    release and T − its tail, is feasible. ``value_s``: the largest of them."""

    lp_s: float
    release_lp_s: float
    critical_path_s: float
    window_lp_s: float
    value_s: float


@dataclass(frozen=True)
class SimResult:
    """One policy's replay of one trace on one box."""

    trace: str
    box: str
    policy: str
    makespan_s: float  # last completion − first submission
    mean_jct_s: float  # mean of completion − submission over all jobs
    busy: tuple[float, ...]  # per GPU (box index order): busy time / makespan
    plan_ms: tuple[float, ...]  # wall time of each plan() call
    jobs: tuple[JobRecord, ...]


@dataclass
class _Run:
    job: TraceJob
    jid: int
    uuids: tuple[str, ...]
    names: tuple[str, ...]
    start: float
    end: float
    s_per_epoch: float | None  # truth (training jobs)


def _uuid(index: int) -> str:
    return f"GPU-sim-{index:04d}"


def _request(job: TraceJob) -> GpuRequest:
    return GpuRequest(count=job.gpus_min,
                      count_max=job.gpus_max if job.gpus_max > job.gpus_min else None,
                      mem_mib=job.mem_mib)


class _Engine:
    """One replay: the clock, the event heap, who holds which GPU, and the rows learnt."""

    def __init__(self, trace: Trace, box: str, policy: PlacementPolicy) -> None:
        self.trace, self.policy = trace, policy
        self.names = trace.boxes[box]
        self.ids = {j.key: i + 1 for i, j in enumerate(trace.jobs)}
        self.by_id = {self.ids[j.key]: j for j in trace.jobs}
        self.after = {self.ids[j.key]: [self.ids[a] for a in j.after] for j in trace.jobs}
        self.queued = {jid: QueuedJob(
            id=jid, priority=j.priority, submitted_at=j.submit_s, request=_request(j),
            est_runtime_s=j.duration_s, workload=j.workload, epochs=j.epochs, short=j.short)
            for jid, j in self.by_id.items()}
        self.prior = {n: trace.gpu_models[n].speed for n in set(self.names)}
        # epoch rows and their summary per (workload, GPU set), and the runs that fed them
        self.rows: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        self.stats: dict[tuple[str, str], SetStats] = {}
        self.fed: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.model = SpeedModel.fit([], self.prior)
        self.heap: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.waiting: set[int] = set()  # submitted, not started
        self.done: set[int] = set()
        self.running: dict[int, _Run] = {}
        self.holder: dict[str, int] = {}
        self.records: dict[int, JobRecord] = {}
        self.wakes: set[float] = set()
        self.plan_ms: list[float] = []
        self.last_waiting: dict[int, str] = {}  # the latest plan's reasons, for a deadlock
        self.waiting_since: dict[int, float] = {}  # waiting for another GPU since (as the daemon)
        for jid, j in self.by_id.items():
            self._push(j.submit_s, _SUBMIT, jid)

    def _push(self, at: float, kind: int, jid: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, kind, self.seq, jid))

    # -- learning -----------------------------------------------------------------------------

    def _feed(self, run: _Run, first: int, last: int) -> bool:
        """Epoch rows ``first..last`` of a training run, as the daemon would record them;
        True when they changed what the model is fitted from."""
        job = run.job
        if run.s_per_epoch is None or job.workload is None or first > last:
            return False
        pair = (job.workload, gpu_set_key(run.names))
        if first == 1:
            if len(self.fed[pair]) >= RUNS_PER_SET:
                return False
            self.fed[pair].add(run.jid)
        elif run.jid not in self.fed[pair]:
            return False
        rows = self.rows[pair]
        rows.extend({"job_id": run.jid, "attempt": 1, "epoch": e, "seconds": run.s_per_epoch,
                     "gpu_models": list(run.names), "workload": job.workload,
                     "validated": False} for e in range(first, last + 1))
        # the real summary, one set at a time: only this set's rows changed
        for stats in summarize(rows):
            self.stats[pair] = stats
        return True

    def _refit(self) -> None:
        self.model = SpeedModel.fit([], self.prior, stats=list(self.stats.values()))

    # -- the daemon's view ----------------------------------------------------------------------

    def _expected_end(self, run: _Run, now: float) -> float | None:
        """As the daemon: start + estimated run time, never before now (an overrunning job
        is expected to end any moment)."""
        job = run.job
        if job.epochs is not None:
            est = self.model.predict(job.workload, list(run.names)).s_per_epoch
            if est is None:
                return None
            return max(now, run.start + est * job.epochs)
        assert job.duration_s is not None
        return max(now, run.start + job.duration_s)

    def _slots(self, now: float) -> list[GpuSlot]:
        ends = {jid: self._expected_end(r, now) for jid, r in self.running.items()}
        slots = []
        for i, name in enumerate(self.names):
            uuid = _uuid(i)
            holder = self.holder.get(uuid)
            mem = self.trace.gpu_models[name].memory_mib
            slots.append(GpuSlot(uuid=uuid, index=i, name=name, memory_total_mib=mem,
                                 memory_free_mib=mem, allocated_to=holder,
                                 busy_until=ends[holder] if holder is not None else None))
        return slots

    # -- the loop -------------------------------------------------------------------------------

    def _start(self, jid: int, uuids: tuple[str, ...], now: float) -> None:
        job = self.by_id[jid]
        if not job.gpus_min <= len(uuids) <= job.gpus_max or len(set(uuids)) != len(uuids):
            raise SimulationError(f"the planner gave job {job.key} {len(uuids)} GPU(s); it asks "
                                  f"for {job.gpus_min}-{job.gpus_max}")
        if any(u in self.holder for u in uuids):
            raise SimulationError(f"the planner gave job {job.key} a GPU that is not free")
        index = {_uuid(i): i for i in range(len(self.names))}
        names = tuple(self.names[index[u]] for u in uuids)
        s = (self.trace.true_s_per_epoch(job.workload, names)
             if job.epochs is not None and job.workload is not None else None)
        run = _Run(job, jid, uuids, names, now, now + self.trace.true_duration_s(job, names), s)
        self.running[jid] = run
        self.waiting.discard(jid)
        for u in uuids:
            self.holder[u] = jid
        self.records[jid] = JobRecord(job.key, job.user, job.submit_s, now, run.end,
                                      tuple(index[u] for u in uuids), names)
        self._push(run.end, _DONE, jid)
        if s is not None and job.epochs is not None and job.epochs > EARLY_EPOCHS:
            self._push(now + EARLY_EPOCHS * s, _EPOCHS, jid)

    def _apply(self, kind: int, jid: int) -> bool:
        """Apply one event; True when the model learnt something (a refit is due)."""
        if kind == _SUBMIT:
            self.waiting.add(jid)
            return False
        if kind == _WAKE:
            return False
        run = self.running.get(jid)
        if run is None:
            return False
        epochs = run.job.epochs or 0
        if kind == _EPOCHS:
            return self._feed(run, 1, EARLY_EPOCHS)
        del self.running[jid]
        for u in run.uuids:
            del self.holder[u]
        self.done.add(jid)
        if epochs > EARLY_EPOCHS:
            return self._feed(run, EARLY_EPOCHS + 1, min(epochs, ROWS_PER_RUN))
        return self._feed(run, 1, min(epochs, ROWS_PER_RUN))

    def run(self) -> None:
        while self.heap:
            now = self.heap[0][0]
            learnt = False
            while self.heap and self.heap[0][0] == now:
                _, kind, _, jid = heapq.heappop(self.heap)
                learnt |= self._apply(kind, jid)
            if learnt:
                self._refit()
            self._plan(now)
        if self.waiting:
            head = next((j for j in self.last_waiting if j in self.waiting), min(self.waiting))
            raise SimulationError(
                f"{len(self.waiting)} job(s) never started: the planner left them waiting with "
                f"every GPU idle; the first, job {self.by_id[head].key}, "
                f"{self.last_waiting.get(head, 'was never considered')}")

    def _plan(self, now: float) -> None:
        runnable = [self.queued[j] for j in self.waiting if all(a in self.done for a in self.after[j])]
        if not runnable:
            return
        # as the daemon's tick: the wait for another GPU is bounded in all, not per pass
        for i, job in enumerate(runnable):
            since = self.waiting_since.get(job.id)
            if since is not None and now - since > MAX_WAIT_FOR_FASTER_S and job.may_wait:
                runnable[i] = self.queued[job.id] = dataclasses.replace(job, may_wait=False)
        slots = self._slots(now)
        t0 = time.perf_counter()
        result = plan(runnable, slots, now, policy=self.policy, model=self.model)
        self.plan_ms.append((time.perf_counter() - t0) * 1000)
        self.last_waiting = result.waiting
        self.waiting_since = {j: self.waiting_since.get(j, now) for j, why in result.waiting.items()
                              if why.startswith(WAITS_FOR_FASTER)}
        for p in result.placements:
            self._start(p.job_id, p.gpu_uuids, now)
        if result.impossible:
            jid = next(iter(result.impossible))
            raise SimulationError(f"job {self.by_id[jid].key} can never run on this box: "
                                  f"{result.impossible[jid]}")
        # The daemon ticks every second; its plan only changes when a GPU frees or an expected
        # end passes (a job waiting for a faster GPU), so wake up at the next expected end.
        if len(runnable) > len(result.placements) and len(self.holder) < len(self.names):
            ends = [e for r in self.running.values()
                    if (e := self._expected_end(r, now)) is not None and e > now]
            if ends and min(ends) not in self.wakes:
                self.wakes.add(min(ends))
                self._push(min(ends), _WAKE, 0)

    def result(self, box: str) -> SimResult:
        recs = [self.records[self.ids[j.key]] for j in self.trace.jobs]
        t0 = min(r.submit_s for r in recs)
        makespan = max(r.end_s for r in recs) - t0
        busy = [0.0] * len(self.names)
        for r in recs:
            for i in r.gpus:
                busy[i] += r.end_s - r.start_s
        return SimResult(
            trace=self.trace.name, box=box, policy=self.policy, makespan_s=makespan,
            mean_jct_s=statistics.fmean(r.end_s - r.submit_s for r in recs),
            busy=tuple(b / makespan if makespan > 0 else 0.0 for b in busy),
            plan_ms=tuple(self.plan_ms), jobs=tuple(recs))


def simulate(trace: Trace, box: str, policy: str) -> SimResult:
    """Replay ``trace`` on one of its boxes under ``policy`` (``fifo`` or ``throughput``)."""
    if policy not in POLICIES:
        raise SpecError(f"no policy {policy!r}: use {' or '.join(POLICIES)}")
    if box not in trace.boxes:
        raise SpecError(f"trace {trace.name} has no box {box!r} (boxes: {', '.join(trace.boxes)})")
    engine = _Engine(trace, box, cast(PlacementPolicy, policy))
    engine.run()
    return engine.result(box)


# ------------------------------------------------------------------------------ the bound


def _configs(trace: Trace, box: str, job: TraceJob) -> list[tuple[str, ...]]:
    """GPU sets the job may run on, as model multisets (identical cards are interchangeable):
    every count its request allows, from the cards with enough memory."""
    have: dict[str, int] = defaultdict(int)
    for n in trace.boxes[box]:
        if trace.gpu_models[n].memory_mib >= (job.mem_mib or 0):
            have[n] += 1
    out = []
    for k in range(job.gpus_min, job.gpus_max + 1):
        for combo in combinations_with_replacement(sorted(have), k):
            if all(combo.count(m) <= have[m] for m in set(combo)):
                out.append(combo)
    return out


def _unit(trace: Trace, job: TraceJob, config: tuple[str, ...]) -> float:
    """Seconds per unit of the job's work on a set: s/epoch for training, 1 for a fixed stage."""
    if job.epochs is not None and job.workload is not None:
        return trace.true_s_per_epoch(job.workload, config)
    return 1.0


def _fastest(trace: Trace, box: str, job: TraceJob) -> float:
    return min(trace.true_duration_s(job, c) for c in _configs(trace, box, job))


def _lp(trace: Trace, box: str, jobs: Sequence[TraceJob]) -> float:
    """The LP relaxation's optimum T for ``jobs`` on the box, from time zero (see ``lower_bound``)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_array

    # Work is linear in epochs, so jobs of one (workload, request, memory) merge into one class
    # whose demand is their epochs (or seconds): the LP stays tiny even for 1,000 jobs.
    demand: dict[tuple[Any, ...], float] = defaultdict(float)
    sample: dict[tuple[Any, ...], TraceJob] = {}
    for j in jobs:
        key = (j.workload if j.epochs is not None else None, j.gpus_min, j.gpus_max, j.mem_mib)
        demand[key] += j.epochs if j.epochs is not None else (j.duration_s or 0.0)
        sample[key] = j
    models = sorted(set(trace.boxes[box]))
    cards = {m: trace.boxes[box].count(m) for m in models}
    rows, cols, vals = [], [], []  # capacity rows (one per GPU model), then demand rows
    cost: list[float] = [1.0]  # variable 0 is T
    eq_rows, eq_cols, eq_vals = [], [], []
    for ci, key in enumerate(demand):
        job = sample[key]
        for config in _configs(trace, box, job):
            var = len(cost)
            cost.append(0.0)
            unit = _unit(trace, job, config)
            eq_rows.append(ci)
            eq_cols.append(var)
            eq_vals.append(1.0)
            for m in set(config):  # card-seconds on model m per unit of work in this set
                rows.append(models.index(m))
                cols.append(var)
                vals.append(unit * config.count(m) / cards[m])
    for mi, _ in enumerate(models):  # Σ load / cards − T ≤ 0
        rows.append(mi)
        cols.append(0)
        vals.append(-1.0)
    n = len(cost)
    a_ub = coo_array((vals, (rows, cols)), shape=(len(models), n))
    a_eq = coo_array((eq_vals, (eq_rows, eq_cols)), shape=(len(demand), n))
    res = linprog(cost, A_ub=a_ub, b_ub=[0.0] * len(models), A_eq=a_eq,
                  b_eq=list(demand.values()), bounds=(0, None), method="highs")
    if not res.success:
        raise SimulationError(f"the lower bound's LP failed: {res.message}")
    return float(res.x[0])


def _chains(trace: Trace, box: str) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per job: its fastest duration, its earliest start es (submit, and every ``after`` job
    ended at the earliest, at its fastest) and its tail q (the longest chain of fastest
    durations that must still run after it ends)."""
    fast = {j.key: _fastest(trace, box, j) for j in trace.jobs}
    es: dict[str, float] = {}
    pending = list(trace.jobs)  # sorted by submit time, not by dependency: settle in rounds
    while pending:
        rest = []
        for j in pending:
            if all(a in es for a in j.after):
                es[j.key] = max([j.submit_s, *(es[a] + fast[a] for a in j.after)])
            else:
                rest.append(j)
        if len(rest) == len(pending):
            raise SimulationError("the trace's `after` jobs form a cycle")
        pending = rest
    tail = {j.key: 0.0 for j in trace.jobs}
    for j in sorted(trace.jobs, key=lambda j: -es[j.key]):  # children start later: done first
        for a in j.after:
            tail[a] = max(tail[a], fast[j.key] + tail[j.key])
    return fast, es, tail


def _window_feasible(trace: Trace, box: str, es: dict[str, float], tail: dict[str, float],
                     grid: list[float], t_end: float) -> bool:
    """Could all jobs fit before ``t_end``, fractionally, each inside its window?

    The time line is cut at ``grid`` (and ``t_end``) into intervals. Variable y(j, c, k): the
    share of job j's work done on set c during interval k, only for intervals inside j's
    window [es(j), t_end − tail(j)] widened outward to the grid. Rows: Σ y = 1 per job; per
    interval and GPU model, card-seconds ≤ cards × length; per job (class) and interval, the
    seconds it runs ≤ length × its jobs (one job runs on one set at a time)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_array

    cuts = sorted({g for g in grid if g < t_end} | {t_end})
    spans = list(itertools.pairwise(cuts))

    def first(t: float) -> int:  # the interval that holds t, rounding the window outward
        return max(0, bisect.bisect_right(cuts, t) - 1)

    def last(t: float) -> int:
        return min(len(spans) - 1, bisect.bisect_left(cuts, t) - 1)

    classes: dict[tuple[Any, ...], list[TraceJob]] = defaultdict(list)
    for j in trace.jobs:
        lo, hi = first(es[j.key]), last(t_end - tail[j.key])
        if hi < lo:
            return False
        classes[(j.workload if j.epochs is not None else None, j.gpus_min, j.gpus_max,
                  j.mem_mib, lo, hi)].append(j)
    models = sorted(set(trace.boxes[box]))
    cards = {m: trace.boxes[box].count(m) for m in models}
    cap_rows, cap_cols, cap_vals = [], [], []
    eq_rows, eq_cols, eq_vals = [], [], []
    n = 0
    own_rows: list[int] = []
    own_cols: list[int] = []
    own_vals: list[float] = []
    own_cap: list[float] = []
    # y is the share of the class's work (Σ = 1) and time is in hours: HiGHS then sees
    # coefficients of one scale whatever the trace's units
    for ci, ((*_, lo, hi), group) in enumerate(classes.items()):
        job = group[0]
        work = sum(j.epochs if j.epochs is not None else (j.duration_s or 0.0) for j in group)
        for k in range(lo, hi + 1):
            length = (spans[k][1] - spans[k][0]) / 3600.0
            row = len(own_cap)
            own_cap.append(length * len(group))
            for config in _configs(trace, box, job):
                unit = _unit(trace, job, config) * work / 3600.0
                eq_rows.append(ci)
                eq_cols.append(n)
                eq_vals.append(1.0)
                own_rows.append(row)
                own_cols.append(n)
                own_vals.append(unit)
                for m in set(config):
                    cap_rows.append(k * len(models) + models.index(m))
                    cap_cols.append(n)
                    cap_vals.append(unit * config.count(m))
                n += 1
    if n == 0:
        return True
    cap = [(b - a) / 3600.0 * cards[m] for a, b in spans for m in models]
    a_ub = coo_array((cap_vals + own_vals,
                      (cap_rows + [len(cap) + r for r in own_rows], cap_cols + own_cols)),
                     shape=(len(cap) + len(own_cap), n))
    a_eq = coo_array((eq_vals, (eq_rows, eq_cols)), shape=(len(classes), n))
    res = linprog([0.0] * n, A_ub=a_ub, b_ub=cap + own_cap, A_eq=a_eq, b_eq=[1.0] * len(classes),
                  bounds=(0, None), method="highs")
    # only an infeasibility HiGHS proves raises the bound; anything else (numerical trouble)
    # counts as feasible, which can only make the bound weaker, never wrong
    return bool(res.status != 2)


def lower_bound(trace: Trace, box: str) -> Bound:
    """A lower bound on the makespan of any non-preemptive schedule of ``trace`` on ``box``.

    Makespan counts from the first submission t0. Let a configuration of a job be a multiset of
    GPU models with as many cards as its request allows (1..max for elastic ones, only cards
    with the memory it asks for), and d(j, c) the job's TRUE duration there; fast(j) = min_c
    d(j, c). Every schedule respects three things the bound builds on: no job starts before its
    submission, none before its ``after`` jobs have ended, and each job runs once, on one set.

    * Earliest start and tail: es(j) = max(submit(j), max over after-jobs a of es(a) +
      fast(a)) is the earliest j can start; tail(j), the longest chain of fast() over the jobs
      that wait (transitively) for j, must still run after j ends.
    * LP relaxation (``lp_s``): variables y(j, c) ≥ 0, the share of job j's work done on c;
      Σ_c y(j, c) = 1 for each job; for each GPU model m with n_m cards,
      Σ_{j,c} y(j, c) · d(j, c) · c_m ≤ n_m · T, where c_m counts m's cards in c; minimise T.
      Any real schedule gives a feasible point (its shares are 0/1 and every card is busy at
      most makespan), so T ≤ makespan. This is the issue's "total work spread over the GPUs'
      throughput", with each job's best mix of sets. Per-model capacity equals per-card
      capacity here: identical cards are interchangeable in a fractional solution.
    * Release refinement (``release_lp_s``): for any t, makespan ≥ t − t0 + T_LP(jobs with
      es(j) ≥ t). Solved for up to ``MAX_CUTOFFS`` evenly spread es values.
    * Critical path (``critical_path_s``): max_j es(j) + fast(j) − t0.
    * Windowed LP (``window_lp_s``): for a candidate end T, cut time at the es values and the
      T − tail values (at most ``MAX_CUTOFFS`` of each, windows widened outward to the cuts);
      y(j, c, k) is the share of j's work on c in interval k, allowed only inside j's window
      [es(j), T − tail(j)]; each interval's card-seconds per GPU model ≤ cards × its length,
      and each job runs at most the interval's length in it (it is on one set at a time).
      A schedule of makespan M ≤ T − t0 keeps every job inside its window (it starts after
      es(j) and leaves time for its tail), so its overlaps with the intervals are a feasible
      point: an infeasible LP at T proves makespan > T − t0, and feasibility only grows with
      T. The largest T proven infeasible, by bisection to 1 s, is the bound. It sees what the
      plain LP cannot: a GPU that must idle while the only released job runs on the other,
      stages that cannot start before their pipeline's train ends, and the tail after the
      last long job.

    ``value_s`` is the largest of them. It still lets a job run split over sets and lets a
    stage overlap its own upstream within one interval, so the true optimum may lie above it;
    a ratio near 1 proves a schedule near-optimal, a larger one does not prove it poor.
    Solved with SciPy's HiGHS (``linprog``).
    """
    try:
        import scipy  # noqa: F401
    except ImportError as err:
        raise GpuschedError("the lower bound needs SciPy: pip install 'tao-gpusched[sim]'") from err
    jobs = trace.jobs
    t0 = min(j.submit_s for j in jobs)
    fast, starts, tail = _chains(trace, box)
    critical = max(starts[k] + fast[k] for k in starts) - t0
    lp_all = _lp(trace, box, jobs)
    cutoffs = _spread(sorted(set(starts.values())))
    release = lp_all
    for t in cutoffs:
        later = [j for j in jobs if starts[j.key] >= t]
        if later and t > t0:
            release = max(release, t - t0 + _lp(trace, box, later))
    best = max(lp_all, release, critical)
    tails = _spread(sorted(set(tail.values())))

    def feasible(span: float) -> bool:
        end = t0 + span
        grid = {t0, *cutoffs, *(end - q for q in tails if end - q > t0)}
        return _window_feasible(trace, box, starts, tail, sorted(grid), end)

    lo, hi = best, best
    if not feasible(lo):
        hi = lo * 1.25 + 1.0
        while not feasible(hi):
            lo, hi = hi, hi * 1.25 + 1.0
        while hi - lo > 1.0:
            mid = (lo + hi) / 2
            if feasible(mid):
                hi = mid
            else:
                lo = mid
    return Bound(lp_s=lp_all, release_lp_s=release, critical_path_s=critical, window_lp_s=lo,
                 value_s=max(best, lo))


def _spread(values: list[float]) -> list[float]:
    """At most ``MAX_CUTOFFS`` of the sorted ``values``, evenly spread, first and last kept."""
    if len(values) <= MAX_CUTOFFS:
        return values
    step = (len(values) - 1) / (MAX_CUTOFFS - 1)
    return sorted({values[round(i * step)] for i in range(MAX_CUTOFFS)})


# ------------------------------------------------------------------------------ the command


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _box_json(trace: Trace, box: str, bound: Bound,
              results: list[SimResult | SimulationError], policies: list[str]) -> dict[str, Any]:
    def one(r: SimResult | SimulationError, policy: str) -> dict[str, Any]:
        if isinstance(r, SimulationError):
            return {"policy": policy, "error": r.message}
        return {"policy": r.policy, "makespan_s": round(r.makespan_s, 1),
                "mean_jct_s": round(r.mean_jct_s, 1),
                "busy": [{"index": i, "name": n, "fraction": round(b, 4)}
                         for i, (n, b) in enumerate(zip(trace.boxes[box], r.busy, strict=True))],
                "makespan_over_lb": round(r.makespan_s / bound.value_s, 4),
                "plan_ms": {"calls": len(r.plan_ms),
                            "median": round(statistics.median(r.plan_ms), 3) if r.plan_ms else 0.0,
                            "max": round(max(r.plan_ms), 3) if r.plan_ms else 0.0}}
    return {"box": box, "gpus": list(trace.boxes[box]), "jobs": len(trace.jobs),
            "lower_bound": {k: round(v, 1) for k, v in asdict(bound).items()},
            "results": [one(r, p) for r, p in zip(results, policies, strict=True)]}


def _box_text(trace: Trace, box: str, bound: Bound,
              results: list[SimResult | SimulationError], policies: list[str]) -> str:
    names = trace.boxes[box]
    gpu_cols = [f"GPU{i}" for i in range(len(names))]
    head = ["policy", "makespan", "mean JCT", *gpu_cols, "LB", "makespan/LB", "plan ms med/max"]
    body, failed = [], []
    for r, policy in zip(results, policies, strict=True):
        if isinstance(r, SimulationError):
            failed.append(f"{policy}: did not finish: {r.message}")
            continue
        ms = (f"{statistics.median(r.plan_ms):.2f}/{max(r.plan_ms):.2f}" if r.plan_ms else "-")
        body.append([r.policy, _hms(r.makespan_s), _hms(r.mean_jct_s),
                     *(f"{b:.0%}" for b in r.busy), _hms(bound.value_s),
                     f"{r.makespan_s / bound.value_s:.3f}", ms])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = [f"trace {trace.name}, box {box}: "
             + ", ".join(f"GPU{i} {n}" for i, n in enumerate(names)) + f"; {len(trace.jobs)} jobs",
             f"lower bound {_hms(bound.value_s)} (LP {_hms(bound.lp_s)}, with release times "
             f"{_hms(bound.release_lp_s)}, critical path {_hms(bound.critical_path_s)}, windowed LP "
             f"{_hms(bound.window_lp_s)})"]
    for row in [head, *body]:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    lines += failed
    by = {r.policy: r for r in results if isinstance(r, SimResult)}
    if "fifo" in by and "throughput" in by:
        f, t = by["fifo"], by["throughput"]
        lines.append(f"throughput vs fifo: makespan {f.makespan_s / t.makespan_s:.2f}× shorter, "
                     f"mean JCT {f.mean_jct_s / t.mean_jct_s:.2f}× shorter")
    return "\n".join(lines)


def run_cli(trace: str, policies: list[str], as_json: bool) -> tuple[str, int]:
    """``gpusched simulate``: every box of the trace under each policy; (text, exit code)."""
    try:
        bad = [p for p in policies if p not in POLICIES]
        if bad or not policies:
            raise SpecError(f"no policy {', '.join(bad) or '(none)'}: use {', '.join(POLICIES)}")
        t = load_trace(trace)
        out_json, out_text = [], []
        code = 0
        for box in t.boxes:
            results: list[SimResult | SimulationError] = []
            for p in policies:
                try:
                    results.append(simulate(t, box, p))
                except SimulationError as err:  # a planner that deadlocks is a finding: say so
                    results.append(err)
                    code = 1
            bound = lower_bound(t, box)
            out_json.append(_box_json(t, box, bound, results, policies))
            out_text.append(_box_text(t, box, bound, results, policies))
    except GpuschedError as err:
        return f"gpusched simulate: {err.message}", err.exit_code
    if as_json:
        return json.dumps({"trace": t.name, "description": t.description, "boxes": out_json},
                          indent=2), code
    return "\n\n".join(out_text), code

