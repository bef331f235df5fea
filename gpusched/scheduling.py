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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gpusched.models import GpuRequest, Placement

ForeignPolicy = Literal["memory", "exclusive"]

ORPHAN_HOLDER = -1  # allocated_to value for a container gpusched no longer has a job for


@dataclass(frozen=True)
class QueuedJob:
    """A job waiting for GPUs, with only what the policy needs to see."""

    id: int
    priority: int
    submitted_at: float
    request: GpuRequest
    est_runtime_s: float | None = None  # known/estimated run time; only such jobs backfill


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
    """The outcome of one scheduling pass; every queued job lands in exactly one bucket."""

    placements: tuple[Placement, ...]
    waiting: dict[int, str]  # job id -> why it waits now
    impossible: dict[int, str]  # job id -> why it can never run on this host as it is
    reservation: Reservation | None


def job_order_key(job: QueuedJob) -> tuple[int, float, int]:
    """Priority first, then first come first served; the id breaks exact ties so the order
    never depends on how the caller happened to list the jobs."""
    return (-job.priority, job.submitted_at, job.id)


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
) -> tuple[str, ...] | None:
    """All-or-nothing choice of GPUs for one request among the allowed ones (by UUID)."""
    if req.ids is not None:
        named, _ = resolve_ids(req.ids, slots)
        if named and all(s.uuid in allowed for s in named):
            return tuple(s.uuid for s in named)  # the user's order: it becomes device 0..n-1
        return None
    candidates = [s for s in slots if s.uuid in allowed]
    if len(candidates) < req.count:
        return None
    # Unreserved first so backfill leaves the reservation intact; then best fit, which keeps
    # the big GPUs for the jobs that need them; the index makes the choice deterministic.
    candidates.sort(key=lambda s: (s.uuid in reserved, s.memory_free_mib, s.index))
    chosen = sorted(candidates[: req.count], key=lambda s: s.index)
    return tuple(s.uuid for s in chosen)


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
    chosen = timed[: req.count]
    start_at = max(t for t, _, _ in chosen)
    uuids = tuple(s.uuid for _, _, s in sorted(chosen, key=lambda t: t[1]))
    return Reservation(job_id=job.id, gpu_uuids=uuids, start_at=start_at)


def plan(
    jobs: Sequence[QueuedJob],
    gpus: Sequence[GpuSlot],
    now: float,
    *,
    foreign_policy: ForeignPolicy = "memory",
) -> Plan:
    """Decide which jobs start now and on which GPUs.

    Jobs are visited in ``job_order_key`` order. Each is impossible (never blocks anything),
    placed on GPUs no other placement in this plan uses, or waiting. The first waiting job
    gets the single reservation; later jobs backfill around it (see ``_may_backfill``).
    The result depends only on the contents of ``jobs`` and ``gpus``, never on their order.
    """
    slots = sorted(gpus, key=lambda s: (s.index, s.uuid))
    taken: dict[str, int] = {}  # uuid -> job placed on it in this pass
    released_at: dict[str, float] = {}  # uuid -> when that job should give it back
    placements: list[Placement] = []
    waiting: dict[int, str] = {}
    impossible: dict[int, str] = {}
    reservation: Reservation | None = None

    # Many queued jobs share one request: judge each distinct request once per plan (the daemon
    # plans on every job start and end, so this loop is its hot path).
    impossible_memo: dict[tuple[object, ...], str | None] = {}
    wait_memo: dict[tuple[object, ...], str] = {}
    for job in sorted(jobs, key=job_order_key):
        req = job.request
        if req.ids is None and req.count == 0:
            placements.append(Placement(job_id=job.id, gpu_uuids=()))  # CPU-only: no GPU
            continue
        rkey = (req.count, req.ids, req.gpu_type, req.mem_mib)  # cheaper than hashing the model
        if rkey not in impossible_memo:
            impossible_memo[rkey] = impossible_reason(req, slots)
        reason = impossible_memo[rkey]
        if reason is not None:
            impossible[job.id] = reason
            continue
        reserved = frozenset(reservation.gpu_uuids) if reservation else frozenset()
        backfill = _may_backfill(job, reservation, now)

        allowed = frozenset(
            s.uuid
            for s in slots
            if s.uuid not in taken
            and _placeable(s, req, foreign_policy)
            and (backfill or s.uuid not in reserved)
        )
        chosen = _choose(req, slots, allowed, reserved)
        if chosen is not None:
            placements.append(Placement(job_id=job.id, gpu_uuids=chosen))
            until = now + job.est_runtime_s if job.est_runtime_s is not None else math.inf
            for uuid in chosen:
                taken[uuid] = job.id
                released_at[uuid] = until
            continue
        if reservation is None:
            waiting[job.id] = _wait_reason(job, slots, taken, None, backfill, foreign_policy)
            reservation = _reserve(job, slots, released_at, now, foreign_policy)
            continue
        # after the reservation exists its GPUs are fixed; only ``taken`` still grows
        key = (*rkey, backfill, len(taken))
        if key not in wait_memo:
            wait_memo[key] = _wait_reason(job, slots, taken, reservation, backfill,
                                          foreign_policy)
        waiting[job.id] = wait_memo[key]

    return Plan(
        placements=tuple(placements),
        waiting=waiting,
        impossible=impossible,
        reservation=reservation,
    )
