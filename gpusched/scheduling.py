"""Placement policy: which queued jobs start now, on which GPUs, and why the others wait.

``plan`` is a pure function of (queue, GPU slots, now) so the daemon's tick and the tests can
call it with any clock and any inventory; the daemon turns the placements into allocations in
one transaction, so this module never touches the store, NVML or a runner.

The policy is priority order with EASY backfill: the first job that could run on this host but
cannot run now gets a reservation on the GPUs that free up earliest, and later jobs may only use
those GPUs when they are known to finish before the reservation starts. Without that, a stream
of small jobs would keep a large job waiting forever.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gpusched.models import GpuRequest, Placement
from gpusched.speedmodel import SpeedModel
from gpusched.throughput import fmt_seconds

ForeignPolicy = Literal["memory", "exclusive"]
#: ``fifo``: best fit (least free memory first), elastic requests at their largest count, the
#: first release; ``throughput``: the GPU set that finishes the job soonest by the speed model
PlacementPolicy = Literal["fifo", "throughput"]
POLICIES: tuple[str, ...] = ("fifo", "throughput")
#: a long job may wait for a faster GPU at most this long (and only when it then finishes
#: sooner than it would on the free, slower one; the reservation keeps backfill honest)
MAX_WAIT_FOR_FASTER_S = 3600.0
#: waiting must gain at least this share of the run time, so noise in the estimates does not
#: keep a job off a free GPU
_WAIT_GAIN = 0.05
WAITS_FOR_FASTER = "waits for "  # how the reason of a job waiting for a faster GPU begins
_EMPTY_MODEL = SpeedModel.fit([])

ORPHAN_HOLDER = -1  # allocated_to value for a container gpusched no longer has a job for


@dataclass(frozen=True)
class QueuedJob:
    """A job waiting for GPUs, with only what the policy needs to see."""

    id: int
    priority: int
    submitted_at: float
    request: GpuRequest
    est_runtime_s: float | None = None  # known/estimated run time; only such jobs backfill
    workload: str | None = None  # what decides its speed (see speedmodel); None: unknown
    epochs: int | None = None  # epochs of work left (training); with the model: a run time
    short: bool = False  # evaluate/prune/export: leaves the fast GPUs to training
    may_wait: bool = True  # False once it waited MAX_WAIT_FOR_FASTER_S for a faster GPU in all


@dataclass(frozen=True)
class GpuSlot:
    """One GPU as the scheduler sees it: the inventory joined with allocations."""

    uuid: str
    index: int
    name: str
    memory_total_mib: int
    memory_free_mib: int  # already counts foreign (non-gpusched) processes
    usable: bool = True  # False: drained, lost or unhealthy -> never used
    has_foreign: bool = False  # a process not started by gpusched is on it
    allocated_to: int | None = None  # holder job id, ORPHAN_HOLDER, or None when free
    busy_until: float | None = None  # expected release when the holder's run time is known


@dataclass(frozen=True)
class Reservation:
    """GPUs held back for the first blocked job so that backfill cannot starve it."""

    job_id: int
    gpu_uuids: tuple[str, ...]
    start_at: float  # float("inf") when some reserved GPU has no known release time


@dataclass(frozen=True)
class Plan:
    """The outcome of one scheduling pass; every queued job lands in exactly one bucket.

    With ``plan(lazy=True)`` the jobs after the point where nothing more can start (every GPU
    busy or taken, the reservation made) are in ``rest`` instead of ``waiting``/``impossible``:
    ``reasons()`` judges them when first read."""

    placements: tuple[Placement, ...]
    waiting: dict[int, str]  # job id -> why it waits now
    impossible: dict[int, str]  # job id -> why it can never run on this host as it is
    reservation: Reservation | None
    rest: WaitingRest | None = None

    def reasons(self) -> Mapping[int, str]:
        """Why each job not placed does not start (waiting or impossible), ``rest`` included."""
        return Reasons({**self.waiting, **self.impossible}, self.rest)


class WaitingRest:
    """The jobs a plan reached once every GPU was busy or taken and the reservation made.
    From there nothing changes: no job can take a GPU (a CPU-only one is placed without),
    so each waits, or is impossible, for a reason that depends only on its request and on
    whether it may backfill. They are judged when first asked: the daemon plans on every job
    start and end, and on a long queue all but a few of the window's jobs end up here."""

    def __init__(self, jobs: Sequence[QueuedJob], slots: Sequence[GpuSlot],
                 taken: dict[str, int], reservation: Reservation, now: float,
                 policy: ForeignPolicy,
                 impossible_memo: dict[tuple[object, ...], str | None]) -> None:
        self.jobs = tuple(jobs)
        self._slots, self._taken, self._reservation = tuple(slots), dict(taken), reservation
        self._now, self._policy, self._impossible_memo = now, policy, dict(impossible_memo)
        self._judged: tuple[dict[int, str], dict[int, str]] | None = None

    def cpu_only(self) -> list[QueuedJob]:
        return [j for j in self.jobs if j.request.ids is None and j.request.count == 0]

    def judge(self) -> tuple[dict[int, str], dict[int, str]]:
        """(waiting, impossible) of these jobs, as the plan's full pass gives them."""
        if self._judged is not None:
            return self._judged
        waiting: dict[int, str] = {}
        impossible: dict[int, str] = {}
        wait_memo: dict[tuple[object, ...], str] = {}
        slots, reservation = self._slots, self._reservation
        for job in self.jobs:
            req = job.request
            if req.ids is None and req.count == 0:
                continue  # placed by the plan
            rkey = (req.count, req.count_max, req.ids, req.gpu_type, req.mem_mib)
            if rkey not in self._impossible_memo:
                self._impossible_memo[rkey] = impossible_reason(req, slots)
            reason = self._impossible_memo[rkey]
            if reason is not None:
                impossible[job.id] = reason
                continue
            backfill = _may_backfill(job, reservation, self._now)
            key = (*rkey, backfill)
            if key not in wait_memo:
                wait_memo[key] = _wait_reason(job, slots, self._taken, reservation, backfill,
                                              self._policy)
            waiting[job.id] = wait_memo[key]
        self._judged = (waiting, impossible)  # one assignment: safe to read from any thread
        return self._judged


class Reasons(Mapping[int, str]):
    """A plan's reasons, with its ``rest`` judged on first read (from any thread)."""

    def __init__(self, known: dict[int, str], rest: WaitingRest | None) -> None:
        self._known, self._rest = known, rest
        self._all: dict[int, str] | None = None if rest is not None else known

    def _get(self) -> dict[int, str]:
        if self._all is None:
            assert self._rest is not None
            waiting, impossible = self._rest.judge()
            self._all = {**waiting, **impossible, **self._known}
        return self._all

    def __getitem__(self, key: int) -> str:
        return self._get()[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __contains__(self, key: object) -> bool:
        return key in self._get()

    def __repr__(self) -> str:
        return repr(self._get())


def job_order_key(job: QueuedJob) -> tuple[int, float, int]:
    """Priority first, then first come first served; the id breaks exact ties so the order
    never depends on how the caller happened to list the jobs."""
    return (-job.priority, job.submitted_at, job.id)


#: under ``throughput`` a short stage is considered as if submitted this much earlier: the
#: evaluate that unblocks another user's pipeline does not wait behind hour-long retrains, and
#: since the head start is bounded, a stream of short stages cannot starve a long job (one
#: submitted more than this before them still goes first)
SHORT_HEAD_START_S = 3600.0


def throughput_order_key(job: QueuedJob) -> tuple[int, float, int]:
    return (-job.priority, job.submitted_at - (SHORT_HEAD_START_S if job.short else 0.0), job.id)


def _plural(n: int, word: str = "GPU") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _type_ok(slot: GpuSlot, gpu_type: str | None) -> bool:
    return gpu_type is None or gpu_type.lower() in slot.name.lower()


def _is_free(slot: GpuSlot, policy: ForeignPolicy) -> bool:
    """Free for placement: usable, unallocated, and not shared with a foreign process when
    the host is configured to keep foreign work apart."""
    if not slot.usable or slot.allocated_to is not None:
        return False
    return not (policy == "exclusive" and slot.has_foreign)


def _placeable(slot: GpuSlot, req: GpuRequest, policy: ForeignPolicy) -> bool:
    """Could this GPU go to this request right now (ignoring reservations and this round)?"""
    return (
        _is_free(slot, policy)
        and _type_ok(slot, req.gpu_type)
        and slot.memory_free_mib >= (req.mem_mib or 0)
    )


def resolve_ids(ids: Sequence[str], slots: Sequence[GpuSlot]) -> tuple[list[GpuSlot], str | None]:
    """Map a user's GPU list (indices or UUIDs, in any case) to slots, keeping its order.

    Returns the slots, or an error saying why the list can never name GPUs of this host.
    """
    by_uuid: dict[str, GpuSlot] = {}
    by_index: dict[str, GpuSlot] = {}
    for slot in slots:
        by_uuid.setdefault(slot.uuid.lower(), slot)
        by_index.setdefault(str(slot.index), slot)
    out: list[GpuSlot] = []
    for raw in ids:
        key = raw.strip()
        found = by_uuid.get(key.lower()) or by_index.get(key)
        if found is None:
            return [], f"GPU {raw} does not exist"
        if any(s.uuid == found.uuid for s in out):
            return [], f"the GPU list names GPU {found.index} twice"
        out.append(found)
    return out, None


def _describe(req: GpuRequest, n: int) -> str:
    text = _plural(n)
    if req.gpu_type is not None:
        text += f" matching --gpu-type {req.gpu_type}"
    if req.mem_mib:
        text += f" with {req.mem_mib} MiB free"
    return text


def impossible_reason(req: GpuRequest, slots: Sequence[GpuSlot]) -> str | None:
    """Why the request can never be met by the usable GPUs of this host, or None.

    Judged on totals, not on what is free now: memory used by others and busy GPUs come back,
    a GPU that does not exist or does not match does not. Such jobs must never block others.
    """
    mem = req.mem_mib or 0
    if req.ids is not None:
        chosen, error = resolve_ids(req.ids, slots)
        if error:
            return error
        for s in chosen:
            if not s.usable:
                return f"GPU {s.index} is not usable (drained, lost or unhealthy)"
            if not _type_ok(s, req.gpu_type):
                return f"GPU {s.index} is a {s.name}, not --gpu-type {req.gpu_type}"
            if s.memory_total_mib < mem:
                return f"needs {mem} MiB per GPU; GPU {s.index} has {s.memory_total_mib}"
        return None
    n = req.count
    usable = [s for s in slots if s.usable]
    if len(usable) < n:
        return f"asks for {_plural(n)}; this host has {len(usable)} usable"
    typed = [s for s in usable if _type_ok(s, req.gpu_type)]
    if not typed:
        return f"no usable GPU matches --gpu-type {req.gpu_type}"
    if len(typed) < n:
        return f"asks for {_plural(n)} of type {req.gpu_type}; this host has {len(typed)} usable"
    big = [s for s in typed if s.memory_total_mib >= mem]
    if len(big) < n:
        if not big:
            largest = max(s.memory_total_mib for s in typed)
            return f"needs {mem} MiB per GPU; the largest GPU has {largest}"
        return f"asks for {_plural(n)} with {mem} MiB each; this host has {len(big)}"
    return None


def _may_backfill(job: QueuedJob, reservation: Reservation | None, now: float) -> bool:
    """A job may use reserved GPUs only when it surely hands them back before the reserved job
    can start. An unknown start (inf) allows nothing: otherwise a stream of short jobs could
    keep re-taking a reserved GPU every time the long holder's end is unknown."""
    if reservation is None or job.est_runtime_s is None:
        return False
    if not math.isfinite(reservation.start_at):
        return False
    return now + job.est_runtime_s <= reservation.start_at


def _choose(
    req: GpuRequest,
    slots: Sequence[GpuSlot],
    allowed: frozenset[str],
    reserved: frozenset[str],
    count: int | None = None,
) -> tuple[str, ...] | None:
    """All-or-nothing best-fit choice of ``count`` GPUs (default: the request's) among the
    allowed ones (by UUID): the ``fifo`` policy, and the tie-break of ``throughput``."""
    if req.ids is not None:
        named, _ = resolve_ids(req.ids, slots)
        if named and all(s.uuid in allowed for s in named):
            return tuple(s.uuid for s in named)  # the user's order: it becomes device 0..n-1
        return None
    n = req.count if count is None else count
    candidates = [s for s in slots if s.uuid in allowed]
    if len(candidates) < n:
        return None
    # Unreserved first so backfill leaves the reservation intact; then best fit, which keeps
    # the big GPUs for the jobs that need them; the index makes the choice deterministic.
    candidates.sort(key=lambda s: _fit_key(s, reserved))
    chosen = sorted(candidates[:n], key=lambda s: s.index)
    return tuple(s.uuid for s in chosen)


def _fit_key(s: GpuSlot, reserved: frozenset[str]) -> tuple[bool, int, int]:
    return (s.uuid in reserved, s.memory_free_mib, s.index)


def fmt_duration(seconds: float) -> str:
    """'about 40 s', 'about 64 min', 'about 2.1 h'."""
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 120 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def set_label(gpus: Sequence[GpuSlot]) -> str:
    """'GPU 0 (RTX A4000)', 'GPUs 0,1 (RTX A4000 + RTX 2070)'."""
    ordered = sorted(gpus, key=lambda s: s.index)
    names = " + ".join(s.name for s in ordered)
    if len(ordered) == 1:
        return f"GPU {ordered[0].index} ({names})"
    return f"GPUs {','.join(str(s.index) for s in ordered)} ({names})"


@dataclass(frozen=True)
class _Option:
    """One GPU set a job could take, with what the speed model expects of it there."""

    gpus: tuple[GpuSlot, ...]
    factor: float  # relative time (lower is faster)
    duration_s: float | None  # expected run time, when the workload was timed anywhere
    start_at: float = 0.0  # when all its GPUs are free (now, or a busy GPU's expected end)
    s_per_epoch: float | None = None

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(s.uuid for s in sorted(self.gpus, key=lambda s: s.index))

    def describe(self) -> str:
        if self.duration_s is not None:
            return f"{set_label(self.gpus)}: {fmt_duration(self.duration_s)}"
        if self.s_per_epoch is not None:
            return f"{set_label(self.gpus)}: {fmt_seconds(self.s_per_epoch)} s/epoch"
        return f"{set_label(self.gpus)}: speed {1 / self.factor:.2f}"


_MAX_OPTIONS = 256


def _options(job: QueuedJob, pool: Sequence[GpuSlot], counts: Sequence[int], model: SpeedModel,
             reserved: frozenset[str], start_of: dict[str, float] | None = None) -> list[_Option]:
    """The distinct GPU sets of the allowed counts that ``pool`` can make. GPUs of one model
    and (to the minute) one start time are interchangeable, so one set per multiset of such
    groups is enough: within a group the best-fit GPUs are taken (as ``fifo`` would). The
    walk only visits multisets that add up, and stops at _MAX_OPTIONS sets, so a host of many
    busy GPUs with different end times costs no more than one of few."""
    starts = start_of or {}
    groups: dict[tuple[str, float], list[GpuSlot]] = defaultdict(list)
    for s in pool:
        groups[(s.name, round(starts.get(s.uuid, 0.0) / 60.0))].append(s)
    keys = sorted(groups)
    for k in keys:
        groups[k].sort(key=lambda s: _fit_key(s, reserved))
    out: list[_Option] = []

    def add(take: list[int]) -> None:
        gpus = tuple(s for k, t in zip(keys, take, strict=False) for s in groups[k][:t])
        est = model.predict(job.workload, [s.name for s in gpus])
        dur = job.epochs * est.s_per_epoch if job.epochs and est.s_per_epoch else None
        start = max(starts.get(s.uuid, 0.0) for s in gpus)
        out.append(_Option(gpus, est.factor, dur, start, est.s_per_epoch))

    def walk(i: int, left: int, take: list[int]) -> None:
        if len(out) >= _MAX_OPTIONS:
            return
        if left == 0:
            add(take)
            return
        if i == len(keys):
            return
        for t in range(min(len(groups[keys[i]]), left), -1, -1):
            walk(i + 1, left - t, [*take, t])

    for n in counts:
        walk(0, n, [])
    return out


def _pick(job: QueuedJob, options: list[_Option], reserved: frozenset[str],
          others_wait: bool) -> tuple[_Option, str]:
    """The throughput policy's choice among sets free now, and why, for ``show``.

    * short stages (evaluate, prune, export) take the slowest set of the fewest GPUs, which
      leaves the fast GPUs to training;
    * an elastic job while other jobs wait takes the set with the most epochs per GPU-hour
      (split), since that finishes the queue sooner; alone it takes the soonest finish (gang
      when scaling pays);
    * otherwise the set that finishes soonest.
    Ties go to fewer GPUs, then best fit, so equal GPUs are used as ``fifo`` would."""
    def fit(o: _Option) -> tuple[int, int, tuple[int, ...]]:
        return (sum(s.uuid in reserved for s in o.gpus), sum(s.memory_free_mib for s in o.gpus),
                tuple(s.index for s in o.gpus))

    elastic = job.request.count_max is not None
    if job.short:
        chosen = min(options, key=lambda o: (len(o.gpus), -o.factor, fit(o)))
        why = "a short stage takes the slower GPU and leaves the faster one to training"
    elif elastic and others_wait:
        chosen = min(options, key=lambda o: (o.factor * len(o.gpus), o.factor, fit(o)))
        why = "other jobs wait: the most epochs per GPU-hour"
    else:
        chosen = min(options, key=lambda o: (o.factor, len(o.gpus), fit(o)))
        why = "the soonest finish" + (": nothing else waits" if elastic else "")
    if len(options) == 1:
        return chosen, f"{chosen.describe()} (the only choice)"
    ranked = sorted(options, key=lambda o: (o.factor, len(o.gpus), fit(o)))[:3]
    listed = "; ".join(o.describe() for o in ([chosen] + [o for o in ranked if o is not chosen])[:3])
    return chosen, f"{listed} — {why}"


def _wait_for_faster(job: QueuedJob, now_best: _Option, slots: Sequence[GpuSlot],
                     taken: dict[str, int], req: GpuRequest, counts: Sequence[int],
                     model: SpeedModel, policy: ForeignPolicy,
                     now: float) -> tuple[_Option, str] | None:
    """A busy set that, once its holder's expected end is reached, finishes this long job
    sooner (by more than the noise margin) than the free set would, within the bounded wait.
    Only holders whose end lies ahead count: an overrunning holder's end is unknown, so a job
    never waits on it."""
    if now_best.duration_s is None or job.short or not job.may_wait:
        return None
    start_of: dict[str, float] = {}
    pool = []
    for s in slots:
        if s.uuid in taken or not s.usable or not _type_ok(s, req.gpu_type):
            continue
        if s.memory_total_mib < (req.mem_mib or 0):
            continue
        if _placeable(s, req, policy):
            start_of[s.uuid] = now
        elif (s.allocated_to not in (None, ORPHAN_HOLDER) and s.busy_until is not None
              and now < s.busy_until <= now + MAX_WAIT_FOR_FASTER_S):
            start_of[s.uuid] = s.busy_until
        else:
            continue
        pool.append(s)
    best_end = now + now_best.duration_s
    found: tuple[float, _Option] | None = None
    for o in _options(job, pool, counts, model, frozenset(), start_of):
        if o.duration_s is None or o.start_at <= now:
            continue
        end = o.start_at + o.duration_s
        if end < best_end - _WAIT_GAIN * now_best.duration_s and (found is None or end < found[0]):
            found = (end, o)
    if found is None:
        return None
    o = found[1]
    why = (f"{WAITS_FOR_FASTER}{set_label(o.gpus)}, free in {fmt_duration(o.start_at - now)}: done in "
           f"{fmt_duration(found[0] - now)} from now, against {fmt_duration(now_best.duration_s)} "
           f"on {set_label(now_best.gpus)} now")
    return o, why


def _wait_for_slower(job: QueuedJob, now_best: _Option, slots: Sequence[GpuSlot],
                     taken: dict[str, int], model: SpeedModel, now: float,
                     long_waits: bool) -> tuple[_Option, str] | None:
    """A short stage whose only free choice is faster than a busy GPU that frees within the
    stage's own run time waits for that slower GPU when a long job waits that could use the
    fast one now: the fast card goes to training, and the short stage loses at most its own
    run time. It then holds the reservation, so the usual backfill rule applies; an
    overrunning holder's end is unknown, and nobody waits on it."""
    req = job.request
    if (not job.short or not long_waits or not job.may_wait or job.est_runtime_s is None
            or req.ids is not None or req.count_max is not None or req.count != 1):
        return None
    found: tuple[float, float, GpuSlot] | None = None
    for s in slots:
        if (s.uuid in taken or not s.usable or not _type_ok(s, req.gpu_type)
                or s.memory_total_mib < (req.mem_mib or 0) or s.has_foreign
                or s.allocated_to in (None, ORPHAN_HOLDER) or s.busy_until is None
                or not now < s.busy_until <= now + job.est_runtime_s):
            continue
        factor = model.predict(job.workload, [s.name]).factor
        if factor <= now_best.factor:
            continue
        if found is None or (s.busy_until, -factor) < found[:2]:
            found = (s.busy_until, -factor, s)
    if found is None:
        return None
    target = _Option((found[2],), -found[1], None, found[0])
    why = (f"{WAITS_FOR_FASTER}{set_label(target.gpus)} (slower), free in "
           f"{fmt_duration(found[0] - now)}: a short stage leaves {set_label(now_best.gpus)} to a "
           "waiting training job")
    return target, why


def _wait_reason(
    job: QueuedJob,
    slots: Sequence[GpuSlot],
    taken: dict[str, int],
    reservation: Reservation | None,
    may_backfill: bool,
    policy: ForeignPolicy,
) -> str:
    """A human reason that points at the GPU or the count that holds the job back."""
    req = job.request
    reserved = frozenset(reservation.gpu_uuids) if reservation else frozenset()
    if req.ids is not None:
        named, _ = resolve_ids(req.ids, slots)
        for s in named:
            if s.uuid in taken:
                return f"GPU {s.index} is busy (job {taken[s.uuid]})"
            if s.allocated_to == ORPHAN_HOLDER:
                return f"GPU {s.index} is held by an orphan container"
            if s.allocated_to is not None:
                return f"GPU {s.index} is busy (job {s.allocated_to})"
            if policy == "exclusive" and s.has_foreign:
                return f"GPU {s.index} runs a process not started by gpusched"
            if s.memory_free_mib < (req.mem_mib or 0):
                return f"GPU {s.index} has {s.memory_free_mib} MiB free, needs {req.mem_mib}"
            if reservation is not None and s.uuid in reserved and not may_backfill:
                return f"GPU {s.index} is reserved for job {reservation.job_id}"
        return "waiting for its GPUs"  # not reached: some named GPU always blocks
    free = [s for s in slots if s.uuid not in taken and _placeable(s, req, policy)]
    text = f"needs {_describe(req, req.count)}, {len(free)} free"
    if req.count_max is not None:
        text = f"needs {req.label()} GPUs" + text[len(f"needs {_plural(req.count)}"):]
    held = [s for s in free if s.uuid in reserved]
    if reservation is not None and held and not may_backfill:
        text += f" ({len(held)} reserved for job {reservation.job_id})"
    return text


def _reserve(
    job: QueuedJob,
    slots: Sequence[GpuSlot],
    released_at: dict[str, float],
    now: float,
    policy: ForeignPolicy,
    count: int | None = None,
) -> Reservation:
    """Reserve the GPUs the blocked job could start on earliest.

    ``released_at`` covers GPUs handed out earlier in this same pass. A free GPU that cannot
    take the job now (foreign process, not enough free memory) has no known release time.
    """
    req = job.request
    mem = req.mem_mib or 0
    if req.ids is not None:
        candidates, _ = resolve_ids(req.ids, slots)
    else:
        candidates = [
            s for s in slots if s.usable and _type_ok(s, req.gpu_type) and s.memory_total_mib >= mem
        ]

    def available_at(s: GpuSlot) -> float:
        if s.uuid in released_at:
            return released_at[s.uuid]
        if _placeable(s, req, policy):
            return now
        if s.allocated_to is not None and s.busy_until is not None:
            return max(now, s.busy_until)
        return math.inf

    timed = sorted(((available_at(s), s.index, s) for s in candidates), key=lambda t: t[:2])
    chosen = timed[: req.count if count is None else count]
    start_at = max(t for t, _, _ in chosen)
    uuids = tuple(s.uuid for _, _, s in sorted(chosen, key=lambda t: t[1]))
    return Reservation(job_id=job.id, gpu_uuids=uuids, start_at=start_at)


def plan(
    jobs: Sequence[QueuedJob],
    gpus: Sequence[GpuSlot],
    now: float,
    *,
    foreign_policy: ForeignPolicy = "memory",
    policy: PlacementPolicy = "throughput",
    model: SpeedModel | None = None,
    lazy: bool = False,
) -> Plan:
    """Decide which jobs start now and on which GPUs.

    Jobs are visited in ``job_order_key`` order (``throughput``: short stages with a bounded
    head start, ``throughput_order_key``). Each is impossible (never blocks anything),
    placed on GPUs no other placement in this plan uses, or waiting. The first waiting job
    gets the single reservation; later jobs backfill around it (see ``_may_backfill``).
    Under ``throughput`` a job takes the free set the speed model expects to finish it soonest
    (see ``_pick``), and a long job may instead wait for a busier, faster set: it then holds the
    reservation, so the same backfill rule keeps everyone else moving and nobody starves. A
    short stage whose only free GPU is faster than one that frees within its own run time waits
    for that slower one when a training job could use the fast GPU now (``_wait_for_slower``).
    The result depends only on the contents of ``jobs`` and ``gpus``, never on their order.
    With ``lazy`` the reasons of the jobs after the point where nothing more can start are
    judged only when read (``Plan.rest``, ``Plan.reasons()``): the same reasons, later.
    """
    slots = sorted(gpus, key=lambda s: (s.index, s.uuid))
    speed = model if model is not None else _EMPTY_MODEL
    taken: dict[str, int] = {}  # uuid -> job placed on it in this pass
    released_at: dict[str, float] = {}  # uuid -> when that job should give it back
    placements: list[Placement] = []
    waiting: dict[int, str] = {}
    impossible: dict[int, str] = {}
    reservation: Reservation | None = None
    fits_memo: dict[tuple[str | None, int], int] = {}

    def fitting(req: GpuRequest) -> int:
        """How many usable GPUs could ever take one share of this request."""
        k = (req.gpu_type, req.mem_mib or 0)
        if k not in fits_memo:
            fits_memo[k] = sum(1 for s in slots if s.usable and _type_ok(s, req.gpu_type)
                               and s.memory_total_mib >= k[1])
        return fits_memo[k]
    flexible: list[QueuedJob] = []  # jobs that could share the host with an elastic one
    decided: set[int] = set()  # placed or found impossible in this pass

    def others_could_use(job: QueuedJob, free: Sequence[GpuSlot]) -> bool:
        """Does another job wait that could run on what ``job`` leaves free at its smallest
        count? Only then is splitting worth anything (a job pinned elsewhere, of another type
        or too big for a GPU here is no reason to leave one idle)."""
        spare = len(free) - job.request.count
        if not flexible:  # made when first needed: most queues have no elastic job
            flexible.extend(j for j in jobs if j.request.ids is not None or j.request.count > 0)
        for o in flexible:
            if o.id == job.id or o.id in decided or o.request.count > spare:
                continue
            if o.request.ids is not None:
                named, _ = resolve_ids(o.request.ids, free)
                if named:  # its GPUs are all among the free ones: split to leave them
                    return True
            elif sum(_placeable(s, o.request, foreign_policy) for s in free) >= o.request.count:
                return True
        return False

    def long_waits(job: QueuedJob, best: _Option) -> bool:
        """Does a long (not short) job wait that could start on ``best``'s GPUs now?"""
        free = list(best.gpus)
        for o in jobs:
            if o.short or o.id == job.id or o.id in decided or o.request.ids is not None:
                continue
            if o.request.count <= len(free) and sum(
                    _placeable(g, o.request, foreign_policy) for g in free) >= o.request.count:
                return True
        return False

    # Many queued jobs share one request: judge each distinct request once per plan (the daemon
    # plans on every job start and end, so this loop is its hot path).
    impossible_memo: dict[tuple[object, ...], str | None] = {}
    wait_memo: dict[tuple[object, ...], str] = {}
    none_free_at = -1  # every GPU was found busy or taken as of len(taken) == this: no
    rest: WaitingRest | None = None
    order = sorted(jobs, key=throughput_order_key if policy == "throughput" else job_order_key)
    for i, job in enumerate(order):
        if reservation is not None and none_free_at != len(taken):
            none_free_at = len(taken)  # what is free changes only when a job takes GPUs
            if not any(s.uuid not in taken and _is_free(s, foreign_policy) for s in slots):
                # every GPU is busy or taken in this pass and the reservation is made: from
                # here no job can take a GPU, each waits for the reason its request gives
                # (the hot path of a long queue: no options, no choice to make)
                rest = WaitingRest(order[i:], slots, taken, reservation, now, foreign_policy,
                                   impossible_memo)
                break
        req = job.request
        if req.ids is None and req.count == 0:
            placements.append(Placement(job_id=job.id, gpu_uuids=()))  # CPU-only: no GPU
            continue
        rkey = (req.count, req.count_max, req.ids, req.gpu_type, req.mem_mib)
        if rkey not in impossible_memo:
            impossible_memo[rkey] = impossible_reason(req, slots)
        reason = impossible_memo[rkey]
        if reason is not None:
            impossible[job.id] = reason
            decided.add(job.id)
            continue
        backfill = _may_backfill(job, reservation, now)
        reserved = frozenset(reservation.gpu_uuids) if reservation else frozenset()

        allowed = frozenset(
            s.uuid
            for s in slots
            if s.uuid not in taken
            and _placeable(s, req, foreign_policy)
            and (backfill or s.uuid not in reserved)
        )
        chosen: tuple[str, ...] | None = None
        why: str | None = None
        gang = None  # fifo: the count an elastic request is placed at
        if policy == "fifo" and req.ids is None:
            # elastic: the largest count the host can ever give it (usable, of its type, with
            # its memory), as `--gpus N` is placed today; counting every GPU would make a
            # 10 GiB 1-2 request on an A4000 + 2070 wait for two forever
            gang = max(c for c in req.counts if c <= max(req.count, fitting(req)))
        if req.ids is not None or len(allowed) < req.count or policy == "fifo":
            chosen = _choose(req, slots, allowed, reserved, gang)
        else:
            counts = [c for c in req.counts if c <= len(allowed)]
            options = _options(job, [s for s in slots if s.uuid in allowed], counts, speed,
                               reserved)
            others = req.count_max is not None and others_could_use(
                job, [s for s in slots if s.uuid in allowed])
            best, why = _pick(job, options, reserved, others_wait=others)
            later = None
            if reservation is None:
                later = _wait_for_faster(job, best, slots, taken, req, list(req.counts), speed,
                                         foreign_policy, now)
            if reservation is None and later is None and job.short:
                later = _wait_for_slower(job, best, slots, taken, speed, now,
                                         long_waits(job, best))
            if later is not None:
                target, text = later
                waiting[job.id] = text
                reservation = Reservation(job_id=job.id, gpu_uuids=target.uuids,
                                          start_at=target.start_at)
                continue
            chosen = best.uuids
        if chosen is not None:
            decided.add(job.id)
            placements.append(Placement(job_id=job.id, gpu_uuids=chosen, reason=why))
            until = now + job.est_runtime_s if job.est_runtime_s is not None else math.inf
            for uuid in chosen:
                taken[uuid] = job.id
                released_at[uuid] = until
            continue
        if reservation is None:
            waiting[job.id] = _wait_reason(job, slots, taken, None, backfill, foreign_policy)
            reservation = _reserve(job, slots, released_at, now, foreign_policy, gang)
            continue
        # after the reservation exists its GPUs are fixed; only ``taken`` still grows
        key = (*rkey, backfill, len(taken))
        if key not in wait_memo:
            wait_memo[key] = _wait_reason(job, slots, taken, reservation, backfill,
                                          foreign_policy)
        waiting[job.id] = wait_memo[key]

    if rest is not None:
        placements.extend(Placement(job_id=j.id, gpu_uuids=()) for j in rest.cpu_only())
        if not lazy:
            rest_waiting, rest_impossible = rest.judge()
            waiting.update(rest_waiting)
            impossible.update(rest_impossible)
            rest = None
    return Plan(
        placements=tuple(placements),
        waiting=waiting,
        impossible=impossible,
        reservation=reservation,
        rest=rest,
    )
