"""The placement policy: examples for each rule, then properties over random hosts and queues."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from gpusched.models import GpuRequest
from gpusched.scheduling import (
    ForeignPolicy,
    GpuSlot,
    PlacementPolicy,
    Plan,
    QueuedJob,
    Reservation,
    impossible_reason,
    job_order_key,
    plan,
    resolve_ids,
)

NOW = 1000.0
A100 = "NVIDIA A100-SXM4-80GB"
V100 = "Tesla V100-PCIE-16GB"
T4 = "Tesla T4"


def gpu(
    index: int,
    *,
    name: str = A100,
    total: int = 81920,
    free: int | None = None,
    usable: bool = True,
    foreign: bool = False,
    job: int | None = None,
    until: float | None = None,
) -> GpuSlot:
    return GpuSlot(
        uuid=f"GPU-{index:08x}-aaaa-bbbb-cccc-{index:012x}",
        index=index,
        name=name,
        memory_total_mib=total,
        memory_free_mib=total if free is None else free,
        usable=usable,
        has_foreign=foreign,
        allocated_to=job,
        busy_until=until,
    )


def job(
    id: int,
    count: int = 1,
    *,
    ids: tuple[str, ...] | None = None,
    gpu_type: str | None = None,
    mem: int | None = None,
    priority: int = 0,
    at: float | None = None,
    est: float | None = None,
) -> QueuedJob:
    request = (
        GpuRequest(ids=ids, gpu_type=gpu_type, mem_mib=mem)
        if ids is not None
        else GpuRequest(count=count, gpu_type=gpu_type, mem_mib=mem)
    )
    return QueuedJob(
        id=id,
        priority=priority,
        submitted_at=float(id) if at is None else at,
        request=request,
        est_runtime_s=est,
    )


def placed(p: Plan) -> dict[int, tuple[str, ...]]:
    return {pl.job_id: pl.gpu_uuids for pl in p.placements}


def u(index: int) -> str:
    return gpu(index).uuid


# --- count -------------------------------------------------------------------------------


def test_count_places_on_free_gpus_all_or_nothing() -> None:
    gpus = [gpu(0, job=9), gpu(1), gpu(2)]
    p = plan([job(1, 2), job(2, 3)], gpus, NOW)
    assert placed(p) == {1: (u(1), u(2))}
    assert p.waiting == {2: "needs 3 GPUs, 0 free"}
    assert 2 not in p.impossible


def test_count_prefers_best_fit_then_lowest_index() -> None:
    gpus = [gpu(0, free=80000), gpu(1, free=30000), gpu(2, free=20000), gpu(3, free=20000)]
    p = plan([job(1, 1, mem=25000), job(2, 2)], gpus, NOW)
    # job 1 takes the smallest GPU that fits (1), job 2 the two smallest left (2, 3), so the
    # 80 GB GPU stays free for whoever needs it.
    assert placed(p) == {1: (u(1),), 2: (u(2), u(3))}


def test_cpu_only_job_is_placed_at_once_with_no_gpus() -> None:
    p = plan([job(1, 1), job(2, 0)], [gpu(0, job=9)], NOW)
    assert placed(p) == {2: ()}
    assert 1 in p.waiting


def test_placement_gpus_are_listed_by_index() -> None:
    p = plan([job(1, 3)], [gpu(2), gpu(0), gpu(1)], NOW)
    assert placed(p) == {1: (u(0), u(1), u(2))}


# --- explicit ids ------------------------------------------------------------------------


def test_ids_by_index_and_by_uuid_any_case() -> None:
    gpus = [gpu(0), gpu(1), gpu(2)]
    p = plan([job(1, ids=("2",)), job(2, ids=(u(0).lower().upper(),))], gpus, NOW)
    assert placed(p) == {1: (u(2),), 2: (u(0),)}
    p2 = plan([job(1, ids=(u(1).lower(), "0"))], gpus, NOW)
    assert placed(p2) == {1: (u(1), u(0))}  # the user's order: it becomes device 0, 1


def test_ids_all_or_nothing_and_reason_names_the_busy_gpu() -> None:
    gpus = [gpu(0), gpu(1, job=7), gpu(2, job=-1)]
    p = plan([job(1, ids=("0", "1")), job(2, ids=("2",))], gpus, NOW)
    assert placed(p) == {}
    assert p.waiting[1] == "GPU 1 is busy (job 7)"
    assert p.waiting[2] == "GPU 2 is held by an orphan container"


def test_ids_blocked_by_a_placement_earlier_in_the_same_plan() -> None:
    p = plan([job(1, ids=("0",), priority=5), job(2, ids=("0",))], [gpu(0)], NOW)
    assert placed(p) == {1: (u(0),)}
    assert p.waiting[2] == "GPU 0 is busy (job 1)"


def test_ids_impossible_reasons() -> None:
    gpus = [gpu(0, name=T4, total=16384), gpu(1, usable=False)]
    cases = {
        ("5",): "GPU 5 does not exist",
        ("GPU-nope",): "GPU GPU-nope does not exist",
        ("1",): "GPU 1 is not usable (drained, lost or unhealthy)",
        ("0", u(0)): "the GPU list names GPU 0 twice",
    }
    for ids, reason in cases.items():
        assert impossible_reason(GpuRequest(ids=ids), gpus) == reason
    assert impossible_reason(GpuRequest(ids=("0",), gpu_type="V100"), gpus) == (
        "GPU 0 is a Tesla T4, not --gpu-type V100"
    )
    assert impossible_reason(GpuRequest(ids=("0",), mem_mib=20000), gpus) == (
        "needs 20000 MiB per GPU; GPU 0 has 16384"
    )


def test_resolve_ids_keeps_order() -> None:
    slots, error = resolve_ids(["1", u(0)], [gpu(0), gpu(1)])
    assert error is None
    assert [s.index for s in slots] == [1, 0]


# --- type, memory, foreign, unusable -----------------------------------------------------


def test_gpu_type_is_a_case_insensitive_substring() -> None:
    gpus = [gpu(0, name=A100), gpu(1, name=V100), gpu(2, name=T4)]
    p = plan([job(1, gpu_type="v100"), job(2, gpu_type="tesla")], gpus, NOW)
    assert placed(p) == {1: (u(1),), 2: (u(2),)}


def test_gpu_type_busy_waits_and_missing_is_impossible() -> None:
    gpus = [gpu(0, name=V100, job=3), gpu(1, name=A100)]
    p = plan([job(1, gpu_type="V100"), job(2, gpu_type="H100")], gpus, NOW)
    assert p.waiting[1] == "needs 1 GPU matching --gpu-type V100, 0 free"
    assert p.impossible[2] == "no usable GPU matches --gpu-type H100"


def test_memory_counts_foreign_use_under_memory_policy() -> None:
    gpus = [gpu(0, total=16384, free=4000, foreign=True), gpu(1, total=16384, free=10000)]
    p = plan([job(1, mem=8000), job(2, mem=3000)], gpus, NOW)
    assert placed(p) == {1: (u(1),), 2: (u(0),)}  # sharing with a foreign process is fine
    p2 = plan([job(1, mem=12000)], gpus, NOW)
    assert p2.waiting[1] == "needs 1 GPU with 12000 MiB free, 0 free"  # may free up later


def test_exclusive_policy_never_uses_a_gpu_with_a_foreign_process() -> None:
    gpus = [gpu(0, foreign=True), gpu(1)]
    p = plan([job(1), job(2), job(3, ids=("0",))], gpus, NOW, foreign_policy="exclusive")
    assert placed(p) == {1: (u(1),)}
    assert p.waiting[3] == "GPU 0 runs a process not started by gpusched"
    assert placed(plan([job(1), job(2)], gpus, NOW)) == {1: (u(0),), 2: (u(1),)}


def test_unusable_gpus_are_never_used_and_do_not_count() -> None:
    gpus = [gpu(0, usable=False), gpu(1)]
    p = plan([job(1), job(2)], gpus, NOW)
    assert placed(p) == {1: (u(1),)}
    assert p.impossible == {}
    p2 = plan([job(1, 2)], gpus, NOW)
    assert p2.impossible[1] == "asks for 2 GPUs; this host has 1 usable"


def test_count_impossible_reasons() -> None:
    gpus = [gpu(0, name=T4, total=16384), gpu(1, name=V100, total=16384)]
    assert impossible_reason(GpuRequest(count=3), gpus) == "asks for 3 GPUs; this host has 2 usable"
    assert impossible_reason(GpuRequest(count=2, gpu_type="T4"), gpus) == (
        "asks for 2 GPUs of type T4; this host has 1 usable"
    )
    assert impossible_reason(GpuRequest(count=1, mem_mib=20000), gpus) == (
        "needs 20000 MiB per GPU; the largest GPU has 16384"
    )
    big = [*gpus, gpu(2, total=40960)]
    assert impossible_reason(GpuRequest(count=2, mem_mib=20000), big) == (
        "asks for 2 GPUs with 20000 MiB each; this host has 1"
    )
    assert impossible_reason(GpuRequest(count=2, mem_mib=16384), gpus) is None


def test_impossible_jobs_never_block_or_reserve() -> None:
    gpus = [gpu(0), gpu(1)]
    p = plan([job(1, 5, priority=9), job(2, 2)], gpus, NOW)
    assert placed(p) == {2: (u(0), u(1))}
    assert 1 in p.impossible
    assert p.reservation is None


# --- order -------------------------------------------------------------------------------


def test_priority_then_submission_then_id() -> None:
    jobs = [job(1, at=5.0), job(2, at=1.0), job(3, priority=1, at=9.0), job(4, at=1.0)]
    assert [j.id for j in sorted(jobs, key=job_order_key)] == [3, 2, 4, 1]
    p = plan(jobs, [gpu(0), gpu(1)], NOW)
    assert set(placed(p)) == {3, 2}


def test_higher_priority_job_goes_first_regardless_of_input_order() -> None:
    jobs = [job(1), job(2, priority=10)]
    for order in (jobs, jobs[::-1]):
        assert placed(plan(order, [gpu(0)], NOW)) == {2: (u(0),)}


# --- reservation and backfill ------------------------------------------------------------


def test_reservation_keeps_small_jobs_off_the_big_jobs_gpus() -> None:
    gpus = [gpu(0, job=7), gpu(1)]
    stream = [job(i, 1) for i in range(2, 6)]
    p = plan([job(1, 2), *stream], gpus, NOW)
    assert placed(p) == {}
    assert p.reservation == Reservation(job_id=1, gpu_uuids=(u(0), u(1)), start_at=math.inf)
    assert p.waiting[2] == "needs 1 GPU, 1 free (1 reserved for job 1)"
    # GPU 0 frees: the big job gets both, ahead of the stream.
    p2 = plan([job(1, 2), *stream], [gpu(0), gpu(1)], NOW + 60)
    assert placed(p2) == {1: (u(0), u(1))}


def test_unknown_start_allows_no_backfill_even_with_an_estimate() -> None:
    p = plan([job(1, 2), job(2, 1, est=1.0)], [gpu(0, job=7), gpu(1)], NOW)
    assert placed(p) == {}


def test_backfill_only_when_it_ends_before_the_reservation_starts() -> None:
    gpus = [gpu(0, job=7, until=NOW + 100), gpu(1)]
    for est, fits in ((50.0, True), (100.0, True), (150.0, False), (None, False)):
        p = plan([job(1, 2), job(2, 1, est=est)], gpus, NOW)
        assert p.reservation == Reservation(1, (u(0), u(1)), NOW + 100)
        assert placed(p) == ({2: (u(1),)} if fits else {}), est


def test_jobs_always_use_gpus_outside_the_reservation() -> None:
    gpus = [gpu(0, name=V100, job=7), gpu(1, name=V100), gpu(2, name=A100)]
    p = plan([job(1, 2, gpu_type="V100"), job(2), job(3)], gpus, NOW)
    assert p.reservation == Reservation(1, (u(0), u(1)), math.inf)
    assert placed(p) == {2: (u(2),)}  # no estimate needed off the reserved GPUs
    assert p.waiting[3] == "needs 1 GPU, 1 free (1 reserved for job 1)"


def test_backfill_prefers_unreserved_gpus_over_a_better_fit() -> None:
    gpus = [
        gpu(0, name=V100, job=7, until=NOW + 500),
        gpu(1, name=A100, free=80000),
        gpu(2, name=V100, free=1000),
        gpu(3, name=V100, free=1000),
    ]
    p = plan([job(1, 3, gpu_type="V100"), job(2, 1, est=10.0)], gpus, NOW)
    assert p.reservation == Reservation(1, (u(0), u(2), u(3)), NOW + 500)
    assert placed(p) == {2: (u(1),)}
    # When only reserved GPUs are left, a job that ends in time backfills the best fit.
    p2 = plan([job(1, 3, gpu_type="V100"), job(2, 1, est=10.0), job(3, 1, est=10.0)], gpus, NOW)
    assert placed(p2) == {2: (u(1),), 3: (u(2),)}


def test_reservation_picks_the_earliest_gpus_and_counts_this_plans_placements() -> None:
    gpus = [gpu(0, job=7, until=NOW + 300), gpu(1, job=8, until=NOW + 50), gpu(2)]
    p = plan([job(1, 1, priority=5, est=20.0), job(2, 2)], gpus, NOW)
    assert placed(p) == {1: (u(2),)}
    # GPU 2 is back at NOW+20 (job 1's estimate), GPU 1 at NOW+50, GPU 0 only at NOW+300.
    assert p.reservation == Reservation(2, (u(1), u(2)), NOW + 50)


def test_only_the_first_blocked_job_reserves() -> None:
    gpus = [gpu(0, job=7, until=NOW + 100), gpu(1), gpu(2, job=8)]
    p = plan([job(1, 2), job(2, 3), job(3, 1, est=10.0)], gpus, NOW)
    assert p.reservation is not None and p.reservation.job_id == 1
    assert placed(p) == {3: (u(1),)}
    assert set(p.waiting) == {1, 2}


def test_ids_job_reserves_exactly_its_gpus() -> None:
    gpus = [gpu(0, job=7, until=NOW + 100), gpu(1), gpu(2)]
    p = plan([job(1, ids=("0", "1")), job(2, 2), job(3, 1, est=200.0)], gpus, NOW)
    assert p.reservation == Reservation(1, (u(0), u(1)), NOW + 100)
    assert placed(p) == {3: (u(2),)}
    assert p.waiting[2] == "needs 2 GPUs, 2 free (1 reserved for job 1)"
    assert p.waiting[1] == "GPU 0 is busy (job 7)"


# --- properties --------------------------------------------------------------------------

NAMES = [A100, V100, T4, "NVIDIA GeForce RTX 3090"]
TYPES = [None, None, None, None, None, "a100", "V100", "tesla", "rtx", "H100", ""]


# Strategies are built once: building them inside each draw dominated the run time.
GPU_RECORD = st.tuples(
    st.sampled_from([16384, 24576, 40960, 81920]),  # total
    st.integers(0, 81920) | st.just(81920),  # free, clipped to total
    st.sampled_from(NAMES),
    st.sampled_from([True, True, False]),  # usable
    st.booleans(),  # foreign
    st.sampled_from([None, None, None, 900, 901, -1]),  # holder
    # busy_until when held: unknown, overdue, or in the future
    st.sampled_from([None, NOW - 5, NOW + 100, NOW + 1000]) | st.floats(NOW, NOW + 1000),
)
GPU_NAME = st.tuples(st.integers(0, 9), st.integers(0, 2))  # index, written as index/UUID/uuid
JOB_RECORD = st.tuples(
    st.sampled_from([False, False, True]),  # explicit ids?
    st.integers(0, 3) | st.integers(0, 9),  # count: mostly small, so most jobs can run
    st.lists(GPU_NAME, min_size=1, max_size=4, unique_by=lambda x: x[0]),
    st.sampled_from(TYPES),
    st.none() | st.none() | st.sampled_from([0, 4000, 12000, 30000, 90000]),  # mem
    st.integers(-2, 2),  # priority
    st.integers(0, 20),  # submitted_at: small range, so ties are common
    st.sampled_from([None, 10.0, 100.0, 500.0]) | st.floats(1, 1500),  # est
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[QueuedJob], list[GpuSlot], ForeignPolicy]:
    indices = draw(st.lists(st.integers(0, 9), min_size=1, max_size=8, unique=True))
    records = draw(st.lists(GPU_RECORD, min_size=len(indices), max_size=len(indices)))
    gpus = [
        GpuSlot(
            uuid=f"GPU-{index:04d}-{len(indices):04x}-Ab",
            index=index,
            name=name,
            memory_total_mib=total,
            memory_free_mib=min(free, total),
            usable=usable,
            has_foreign=foreign,
            allocated_to=holder,
            busy_until=until if holder is not None else None,
        )
        for index, (total, free, name, usable, foreign, holder, until) in zip(
            indices, records, strict=True
        )
    ]
    uuid_of = {g.index: g.uuid for g in gpus}

    def spell(index: int, form: int) -> str:
        if form == 0 or index not in uuid_of:  # absent GPUs can only be named by index
            return str(index)
        return uuid_of[index] if form == 1 else uuid_of[index].lower()

    jobs = []
    for i, (explicit, count, names, gpu_type, mem, prio, at, est) in enumerate(
        draw(st.lists(JOB_RECORD, min_size=1, max_size=30))
    ):
        request = (
            GpuRequest(ids=tuple(spell(*n) for n in names), gpu_type=gpu_type, mem_mib=mem)
            if explicit
            else GpuRequest(count=count, gpu_type=gpu_type, mem_mib=mem)
        )
        jobs.append(QueuedJob(i + 1, prio, float(at), request, est))
    policy: ForeignPolicy = draw(st.sampled_from(["memory", "exclusive"]))
    return jobs, gpus, policy


def _fits_on(
    j: QueuedJob, gpus: Sequence[GpuSlot], policy: ForeignPolicy, excluded: frozenset[str]
) -> bool:
    """Whether the job could start on the free GPUs, minus ``excluded``, ignoring all others."""
    req = j.request

    def ok(g: GpuSlot) -> bool:
        return (
            g.usable
            and g.allocated_to is None
            and not (policy == "exclusive" and g.has_foreign)
            and (req.gpu_type is None or req.gpu_type.lower() in g.name.lower())
            and g.memory_free_mib >= (req.mem_mib or 0)
            and g.uuid not in excluded
        )

    if req.ids is not None:
        named, error = resolve_ids(req.ids, gpus)
        return error is None and all(ok(g) for g in named)
    return sum(ok(g) for g in gpus) >= req.count


@st.composite
def contended(draw: st.DrawFn) -> tuple[list[QueuedJob], list[GpuSlot], ForeignPolicy]:
    """A head job that needs every GPU while GPU holders have known end times: the reservation
    then covers the whole host with a finite start, so later placements are mostly backfills,
    which random queues alone reach too rarely."""
    jobs, gpus, policy = draw(scenarios())
    until = draw(st.sampled_from([NOW + 50, NOW + 300, NOW + 1000]))
    gpus = [
        replace(
            g,
            usable=True,
            busy_until=(g.busy_until or until) if g.allocated_to is not None else None,
        )
        for g in gpus
    ]
    gpus[0] = replace(gpus[0], allocated_to=900, busy_until=until)
    head = QueuedJob(0, 3, 0.0, GpuRequest(count=len(gpus)), None)
    return [head, *jobs], gpus, policy


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_plan_invariants(case: tuple[list[QueuedJob], list[GpuSlot], ForeignPolicy]) -> None:
    check_invariants(*case)


@settings(max_examples=100, deadline=None)
@given(contended())
def test_plan_invariants_under_a_reservation(
    case: tuple[list[QueuedJob], list[GpuSlot], ForeignPolicy],
) -> None:
    check_invariants(*case)


def check_invariants(jobs: list[QueuedJob], gpus: list[GpuSlot], policy: ForeignPolicy) -> None:
    """Properties (1)-(7) of one plan; see the comments for which is which."""
    p = plan(jobs, gpus, NOW, foreign_policy=policy)
    by_uuid = {g.uuid: g for g in gpus}
    by_id = {j.id: j for j in jobs}
    res = p.reservation
    reserved = set(res.gpu_uuids) if res else set()
    order = {j.id: k for k, j in enumerate(sorted(jobs, key=job_order_key))}

    # (1) no GPU in two placements; (4) each job placed once, never an impossible one.
    all_uuids = [x for pl in p.placements for x in pl.gpu_uuids]
    assert len(all_uuids) == len(set(all_uuids))
    placed_ids = [pl.job_id for pl in p.placements]
    assert len(placed_ids) == len(set(placed_ids))
    assert not set(placed_ids) & set(p.impossible)
    # Every job lands in exactly one bucket.
    assert sorted([*placed_ids, *p.waiting, *p.impossible]) == sorted(by_id)

    for pl in p.placements:
        req = by_id[pl.job_id].request
        # (3) exactly the requested number, each GPU matching type, memory and ids.
        assert len(pl.gpu_uuids) == req.count
        if req.ids is not None:
            named, error = resolve_ids(req.ids, gpus)
            assert error is None
            assert [g.uuid for g in named] == list(pl.gpu_uuids)
        for x in pl.gpu_uuids:
            g = by_uuid[x]
            # (2) never an allocated, unusable, or (exclusive) foreign GPU.
            assert g.usable and g.allocated_to is None
            assert not (policy == "exclusive" and g.has_foreign)
            assert req.gpu_type is None or req.gpu_type.lower() in g.name.lower()
            assert g.memory_free_mib >= (req.mem_mib or 0)
            # (6) a job after the reserved one takes a reserved GPU only when it is known to be
            # done before the reservation starts (jobs before it were placed first).
            if x in reserved and res is not None and order[pl.job_id] > order[res.job_id]:
                assert res is not None
                est = by_id[pl.job_id].est_runtime_s
                assert est is not None and NOW + est <= res.start_at

    if res is not None:
        assert res.job_id in p.waiting
        assert len(res.gpu_uuids) == len(set(res.gpu_uuids)) == by_id[res.job_id].request.count
        assert all(by_uuid[x].usable for x in res.gpu_uuids)

    # (7) the first job (in order) that fits on the free GPUs is placed when nothing before it
    # holds a reservation, or when it fits even without the reserved GPUs.
    ordered = sorted(jobs, key=job_order_key)
    first = next((j for j in ordered if _fits_on(j, gpus, policy, frozenset())), None)
    if first is not None:
        earlier_blocked = any(
            j.id in p.waiting for j in ordered[: ordered.index(first)] if j.id != first.id
        )
        if not earlier_blocked or _fits_on(first, gpus, policy, frozenset(reserved)):
            assert first.id in placed_ids


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_plan_is_deterministic(
    case: tuple[list[QueuedJob], list[GpuSlot], ForeignPolicy], rnd: random.Random
) -> None:
    jobs, gpus, policy = case
    expected = plan(jobs, gpus, NOW, foreign_policy=policy)
    jobs2, gpus2 = list(jobs), list(gpus)
    rnd.shuffle(jobs2)
    rnd.shuffle(gpus2)
    assert plan(jobs2, gpus2, NOW, foreign_policy=policy) == expected


@settings(max_examples=200, deadline=None)
@given(scenarios() | contended(), st.sampled_from(["throughput", "fifo"]))
def test_lazy_plan_gives_the_full_plans_reasons(
    case: tuple[list[QueuedJob], list[GpuSlot], ForeignPolicy], placement: PlacementPolicy,
) -> None:
    """plan(lazy=True), as the daemon calls it, places the same jobs and, once its rest is
    judged, gives every other job the same reason as the full pass."""
    jobs, gpus, policy = case
    full = plan(jobs, gpus, NOW, foreign_policy=policy, policy=placement)
    lazy = plan(jobs, gpus, NOW, foreign_policy=policy, policy=placement, lazy=True)
    assert full.rest is None
    assert lazy.placements == full.placements and lazy.reservation == full.reservation
    reasons = lazy.reasons()
    assert dict(reasons) == {**full.waiting, **full.impossible} == dict(full.reasons())
    assert len(reasons) == len(jobs) - len(full.placements)
    assert all((j.id in reasons) == (j.id not in {p.job_id for p in full.placements})
               for j in jobs)
    if lazy.rest is not None:  # the point where nothing more could start was reached
        assert lazy.reservation is not None
        assert not set(lazy.waiting) & {j.id for j in lazy.rest.jobs}


def test_lazy_plan_leaves_the_jobs_behind_full_gpus_unjudged() -> None:
    """On a long queue of one request and two free GPUs the lazy plan judges the two it
    places and the one that holds the reservation; the others' reasons come when read."""
    gpus = [GpuSlot(f"GPU-{i}", i, "RTX A4000", 16384, 16384) for i in range(2)]
    jobs = [QueuedJob(i, 0, float(i), GpuRequest(count=1), None) for i in range(1, 129)]
    lazy = plan(jobs, gpus, NOW, lazy=True)
    assert [p.job_id for p in lazy.placements] == [1, 2]
    assert set(lazy.waiting) == {3} and lazy.rest is not None and len(lazy.rest.jobs) == 125
    assert lazy.reasons()[128] == "needs 1 GPU, 0 free"
    assert repr(lazy.reasons()).startswith("{")
