"""Placement by the measured throughput (issue 12): the speed model and the ``throughput``
policy of ``scheduling.plan``, with examples for each rule and properties over random hosts."""

from __future__ import annotations

import heapq
import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpusched.errors import SpecError
from gpusched.models import GpuRequest
from gpusched.scheduling import GpuSlot, QueuedJob, plan
from gpusched.speedmodel import PRIOR_EFFICIENCY, SpeedModel, prior_lookup
from gpusched.units import parse_gpu_count, parse_gpus

A4000, RTX2070 = "RTX A4000", "RTX 2070"
PRIOR = {A4000: 1.40, RTX2070: 1.0}


def slot(index: int, name: str, *, mem: int = 16384, job: int | None = None,
         until: float | None = None) -> GpuSlot:
    return GpuSlot(uuid=f"GPU-{index}", index=index, name=name, memory_total_mib=mem,
                   memory_free_mib=mem, allocated_to=job, busy_until=until)


def box(**busy: Any) -> list[GpuSlot]:
    """The seed's workstation: GPU 0 an RTX A4000 (16 GB), GPU 1 an RTX 2070 (8 GB)."""
    return [slot(0, A4000, **busy.get("a", {})), slot(1, RTX2070, mem=8192, **busy.get("b", {}))]


def epochs(job_id: int, models: list[str], seconds: float, workload: str,
           n: int = 8) -> list[dict[str, Any]]:
    return [{"job_id": job_id, "attempt": 1, "epoch": e, "seconds": seconds,
             "gpu_models": models, "workload": workload, "validated": False}
            for e in range(1, n + 1)]


def seed_model() -> SpeedModel:
    """The seed's figures: the retrains ran on one card each (48 and 67 s/epoch), the train
    only on both (40 s/epoch)."""
    rows = (epochs(1, [A4000], 48.0, "retrain") + epochs(2, [RTX2070], 67.0, "retrain")
            + epochs(3, [A4000, RTX2070], 40.0, "train"))
    return SpeedModel.fit(rows, PRIOR)


def q(id: int, req: GpuRequest | None = None, **kw: Any) -> QueuedJob:
    return QueuedJob(id=id, priority=0, submitted_at=float(id), request=req or GpuRequest(), **kw)


# -- the speed model ------------------------------------------------------------------------


def test_with_no_data_the_model_is_the_prior() -> None:
    m = SpeedModel.fit([], PRIOR)
    assert m.speed(A4000) == 1.40 and m.speed("NVIDIA GeForce RTX 2070") == 1.0
    assert m.speed("Tesla T4") == 1.0 and m.speed_source("Tesla T4") == "default"
    e = m.predict("anything", [A4000])
    assert e.s_per_epoch is None and e.source == "prior" and e.confidence == "low"
    assert m.factor([A4000]) < m.factor([RTX2070])
    # two cards: the slower one sets the pace, scaled by the prior efficiency
    assert m.factor([A4000, RTX2070]) == pytest.approx(1 / (2 * PRIOR_EFFICIENCY))


def test_speed_factors_learned_on_one_workload_predict_another() -> None:
    """The A4000 : 2070 ratio the retrains measured (1.40) predicts the train on one card,
    which never ran there: within 3 % of the seed's measured 48 and 67 s/epoch."""
    m = seed_model()
    assert m.speed(A4000) / m.speed(RTX2070) == pytest.approx(67 / 48, rel=0.01)
    assert m.speed_source(A4000) == "fitted"
    on_a4000 = m.predict("train", [A4000])
    on_2070 = m.predict("train", [RTX2070])
    assert on_a4000.source == on_2070.source == "model"
    assert on_a4000.s_per_epoch == pytest.approx(48, rel=0.03)
    assert on_2070.s_per_epoch == pytest.approx(67, rel=0.03)
    both = m.predict("train", [RTX2070, A4000])
    assert both.source == "measured" and both.s_per_epoch == 40.0 and both.samples == 7


def test_data_moves_a_wrong_prior() -> None:
    """A prior that calls the 2070 three times faster gives way to the measurements."""
    rows = epochs(1, [A4000], 48.0, "w") + epochs(2, [RTX2070], 67.0, "w")
    m = SpeedModel.fit(rows, {A4000: 1.0, RTX2070: 3.0})
    assert m.speed(A4000) > m.speed(RTX2070)


def test_measured_scaling_replaces_the_prior_efficiency() -> None:
    rows = (epochs(1, [A4000], 60.0, "w") + epochs(2, [A4000, A4000], 60.0, "w"))  # no gain
    m = SpeedModel.fit(rows, PRIOR)
    assert m.eff(2) < 0.7  # pulled from 0.85 towards the measured 0.5
    assert m.predict("w", [A4000, A4000]).s_per_epoch == 60.0


def test_prior_lookup_matches_substrings_longest_first() -> None:
    prior = {"A4000": 1.4, "RTX A4000": 1.5, "2070": 1.0}
    assert prior_lookup(prior, "NVIDIA RTX A4000") == 1.5
    assert prior_lookup(prior, "rtx a4000") == 1.5
    assert prior_lookup(prior, "GeForce RTX 2070 SUPER") == 1.0
    assert prior_lookup(prior, "H200") is None


# -- --gpus 1-2 ---------------------------------------------------------------------------------


def test_gpu_ranges_parse_and_bad_ones_are_refused() -> None:
    assert parse_gpu_count("1-2") == (1, 2) and parse_gpu_count("2") == (2, None)
    assert parse_gpu_count("2-2") == (2, None)
    assert parse_gpus("1-2")["count_max"] == 2
    for bad in ("2-1", "0-2", "1-", "a-b"):
        with pytest.raises(SpecError):
            parse_gpu_count(bad)
    with pytest.raises(ValueError, match="cannot be a range"):
        GpuRequest(ids=("0",), count_max=2)
    assert list(GpuRequest(count=1, count_max=3).counts) == [1, 2, 3]


# -- the throughput policy ----------------------------------------------------------------------


def test_a_lone_job_goes_to_the_faster_gpu_on_a_fresh_box() -> None:
    """Fresh state, prior only: the A4000, where best fit (fifo) picks the smaller 2070."""
    m = SpeedModel.fit([], PRIOR)
    got = plan([q(1)], box(), 0.0, model=m)
    assert got.placements[0].gpu_uuids == ("GPU-0",)
    assert "GPU 0 (RTX A4000)" in (got.placements[0].reason or "")
    assert plan([q(1)], box(), 0.0, policy="fifo").placements[0].gpu_uuids == ("GPU-1",)


def test_show_says_why_with_the_expected_times() -> None:
    got = plan([q(1, workload="train", epochs=80)], box(), 0.0, model=seed_model())
    reason = got.placements[0].reason or ""
    assert got.placements[0].gpu_uuids == ("GPU-0",)
    # the train only ran on both cards: its one-card times come from the retrains' ratio
    assert re.match(r"GPU 0 \(RTX A4000\): about 6[45] min; GPU 1 \(RTX 2070\): about 9[01] min"
                    r" — the soonest finish$", reason), reason


def test_an_elastic_job_gangs_alone_and_splits_when_others_wait() -> None:
    m = seed_model()
    elastic = GpuRequest(count=1, count_max=2)
    alone = plan([q(1, elastic, workload="train", epochs=80)], box(), 0.0, model=m)
    assert alone.placements[0].gpu_uuids == ("GPU-0", "GPU-1")  # 40 s/epoch beats 48
    assert "nothing else waits" in (alone.placements[0].reason or "")
    two = plan([q(1, elastic, workload="train", epochs=80),
                q(2, elastic, workload="train", epochs=80)], box(), 0.0, model=m)
    assert [p.gpu_uuids for p in two.placements] == [("GPU-0",), ("GPU-1",)]
    assert "other jobs wait" in (two.placements[0].reason or "")
    # fifo runs a range at its largest count, as `--gpus 2` is run
    fifo = plan([q(1, elastic), q(2, elastic)], box(), 0.0, policy="fifo")
    assert [p.gpu_uuids for p in fifo.placements] == [("GPU-0", "GPU-1")]


def test_short_stages_take_the_slower_gpu() -> None:
    got = plan([q(1, short=True, workload="train", epochs=1)], box(), 0.0, model=seed_model())
    assert got.placements[0].gpu_uuids == ("GPU-1",)


def test_a_long_job_waits_for_a_faster_gpu_that_frees_soon_enough() -> None:
    """A4000 busy for 10 more minutes: 10 + 64 min there beats 89 min on the idle 2070. The
    job holds the reservation, so a short job may still backfill the 2070."""
    m = seed_model()
    busy = box(a={"job": 9, "until": 600.0})
    got = plan([q(1, workload="train", epochs=80),
                q(2, est_runtime_s=60.0)], busy, 0.0, model=m)
    assert 1 in got.waiting and "waits for GPU 0 (RTX A4000), free in about 10 min" in got.waiting[1]
    assert got.reservation is not None and got.reservation.job_id == 1
    assert got.reservation.gpu_uuids == ("GPU-0",) and got.reservation.start_at == 600.0
    assert [p.job_id for p in got.placements] == [2]


@pytest.mark.parametrize(("until", "long_job", "waits"), [
    (60.0, True, True),  # the 2070 frees within the evaluate's 180 s: the A4000 trains
    (300.0, True, False),  # later than the stage's own run time: it takes the A4000
    (100.0, False, False),  # no training waits for the A4000: nothing to leave it to
    (None, True, False),  # the holder's end is unknown
])
def test_a_short_stage_waits_briefly_for_the_slower_gpu_to_leave_the_fast_one_to_training(
        until: float | None, long_job: bool, waits: bool) -> None:
    busy = box(b={"job": 9, "until": until})
    jobs = [q(1, short=True, est_runtime_s=180.0)]
    if long_job:
        jobs.append(q(2, workload="train", epochs=80))
    got = plan(jobs, busy, 0.0, model=seed_model())
    placed = {p.job_id: p.gpu_uuids for p in got.placements}
    if waits:
        assert 1 in got.waiting and "GPU 1 (RTX 2070) (slower), free in about 60 s" in got.waiting[1]
        assert got.reservation is not None and got.reservation.gpu_uuids == ("GPU-1",)
        assert placed == {2: ("GPU-0",)}
    else:
        assert placed[1] == ("GPU-0",)


@pytest.mark.parametrize("until", [3000.0, 0.0, None])
def test_no_wait_when_it_does_not_pay_or_the_end_is_unknown(until: float | None) -> None:
    """50 min more on the A4000 loses to 89 min now on the 2070; an end already passed (the
    holder overruns) or unknown never makes a job wait."""
    busy = box(a={"job": 9, "until": until})
    got = plan([q(1, workload="train", epochs=80)], busy, 100.0, model=seed_model())
    assert [p.gpu_uuids for p in got.placements] == [("GPU-1",)]


def test_waiting_never_jumps_a_blocked_job_ahead_of_it() -> None:
    """The reservation belongs to the first blocked job; a later job does not wait for the
    faster GPU (it would take that reservation away) but runs on the free one."""
    busy = box(a={"job": 9, "until": 600.0})
    got = plan([q(1, GpuRequest(count=2)), q(2, workload="train", epochs=80)], busy, 0.0,
               model=seed_model())
    assert got.reservation is not None and got.reservation.job_id == 1
    assert 2 not in got.waiting or "reserved" in got.waiting[2]


# -- properties ---------------------------------------------------------------------------------

NAMES = [(A4000, 1.4), (RTX2070, 1.0), ("Tesla T4", 0.6)]


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[GpuSlot], list[QueuedJob], SpeedModel]:
    n = draw(st.integers(1, 4))
    gpus = []
    for i in range(n):
        name, _ = draw(st.sampled_from(NAMES))
        gpus.append(slot(i, name, mem=draw(st.sampled_from([8192, 16384]))))
    jobs = []
    for i in range(draw(st.integers(1, 6))):
        lo = draw(st.integers(1, n))
        hi = draw(st.sampled_from([None, min(n, lo + 1)]))
        jobs.append(QueuedJob(
            id=i + 1, priority=draw(st.integers(0, 1)), submitted_at=float(i),
            request=GpuRequest(count=lo, count_max=hi),
            workload=draw(st.sampled_from(["a", "b"])), epochs=draw(st.integers(1, 40)),
            short=draw(st.booleans()),
            est_runtime_s=draw(st.sampled_from([None, 30.0, 600.0]))))
    rows: list[dict[str, Any]] = []
    for k, (name, speed) in enumerate(NAMES):
        rows += epochs(k, [name], 60.0 / speed, "a")
    return gpus, jobs, SpeedModel.fit(rows, dict(NAMES))


def _truth(model: SpeedModel, j: QueuedJob, models: list[str]) -> float:
    e = model.predict(j.workload, models)
    return (j.epochs or 1) * (e.s_per_epoch or 60.0 * e.factor)


@settings(max_examples=150, deadline=None)
@given(instances())
def test_all_or_nothing_and_never_worse_than_best_fit(inst: Any) -> None:
    """Every placement is within the request's counts on distinct free GPUs, and a long,
    fixed-size job's expected finish is never later than best fit's choice for it."""
    gpus, jobs, model = inst
    got = plan(jobs, gpus, 0.0, model=model)
    by_id = {j.id: j for j in jobs}
    used: set[str] = set()
    for p in got.placements:
        j = by_id[p.job_id]
        assert len(p.gpu_uuids) in j.request.counts
        assert not used & set(p.gpu_uuids)
        used |= set(p.gpu_uuids)
    names = {g.uuid: g.name for g in gpus}
    taken: set[str] = set()
    for p in got.placements:  # in the order plan() made them
        j = by_id[p.job_id]
        free = [g for g in gpus if g.uuid not in taken]
        taken |= set(p.gpu_uuids)
        if j.short or j.request.count_max is not None:
            continue
        alone = plan([j], free, 0.0, policy="fifo").placements
        if alone:
            assert (model.factor([names[u] for u in p.gpu_uuids])
                    <= model.factor([names[u] for u in alone[0].gpu_uuids]) + 1e-9)
    # every job lands in exactly one bucket
    buckets = [{p.job_id for p in got.placements}, set(got.waiting), set(got.impossible)]
    assert sum(map(len, buckets)) == len(jobs) == len(set().union(*buckets))


@settings(max_examples=100, deadline=None)
@given(instances())
def test_every_job_runs_in_a_replay_nobody_starves(inst: Any) -> None:
    """Replay the queue through plan() with a fake clock until it is empty: every job that
    fits the host starts, and no job waits longer than the whole queue's serial run time."""
    gpus, jobs, model = inst
    now = 0.0
    holder: dict[str, tuple[int, float]] = {}
    ends: list[tuple[float, int]] = []
    queue = {j.id: j for j in jobs}
    started: dict[int, float] = {}
    bound = sum(_truth(model, j, [g.name for g in gpus[:1]]) * 4 for j in jobs) + 1
    for _ in range(10 * len(jobs) + 10):
        slots = [slot(g.index, g.name, mem=g.memory_total_mib,
                      job=holder[g.uuid][0] if g.uuid in holder else None,
                      until=holder[g.uuid][1] if g.uuid in holder else None) for g in gpus]
        got = plan(list(queue.values()), slots, now, model=model)
        for jid in got.impossible:
            queue.pop(jid)
        for p in got.placements:
            j = queue.pop(p.job_id)
            started[j.id] = now
            end = now + _truth(model, j, [g.name for g in gpus if g.uuid in p.gpu_uuids])
            for u in p.gpu_uuids:
                holder[u] = (j.id, end)
            heapq.heappush(ends, (end, j.id))
        if not queue:
            break
        assert ends, f"queue stuck with nothing running: {got.waiting}"
        now, done = heapq.heappop(ends)
        holder = {u: h for u, h in holder.items() if h[0] != done}
    assert not queue
    assert all(t <= bound for t in started.values()), (started, bound)
    assert math.isfinite(now)


def test_tao_and_pipelines_take_a_gpu_range() -> None:
    from gpusched.pipelines import StageDef
    from gpusched.tao import parse_tao_command

    cmd = parse_tao_command(["ssd", "train", "-e", "/s.txt", "-r", "/r", "--gpus", "1-2"])
    assert (cmd.stage.gpus, cmd.stage.gpus_max) == (1, 2)
    with pytest.raises(SpecError, match="a range lets gpusched choose"):
        parse_tao_command(["ssd", "train", "-e", "/s", "-r", "/r", "--gpus", "1-2",
                           "--gpu_index", "0", "1"])
    with pytest.raises(SpecError, match="only train on more than one GPU"):
        parse_tao_command(["ssd", "evaluate", "-e", "/s", "-m", "/m", "--gpus", "1-2"])
    assert StageDef(task="train", gpus="1-2").gpus == "1-2"
    with pytest.raises(ValueError, match="bad GPU count"):
        StageDef(task="train", gpus="two")


def test_fifo_runs_a_range_at_the_largest_count_that_can_ever_fit() -> None:
    """1-2 with 10 GiB on A4000 (16 GB) + 2070 (8 GB): only one GPU can ever take it, so fifo
    runs it on one instead of waiting forever for two (found by the simulator's mixed trace)."""
    req = GpuRequest(count=1, count_max=2, mem_mib=10240)
    got = plan([q(1, req), q(2)], box(), 0.0, policy="fifo")
    assert [p.gpu_uuids for p in got.placements] == [("GPU-0",), ("GPU-1",)]


def test_absurd_epoch_times_do_not_break_or_turn_the_model() -> None:
    """Jobs report their own epoch times. 1.5e308 s or NaN is no measurement (it overflowed
    the fit and stopped all planning), and fake figures move a prior at most 4× either way."""
    rows = (epochs(1, [A4000], 1.5e308, "x") + epochs(2, [RTX2070], float("nan"), "y")
            + epochs(3, [A4000], 48.0, "w") + epochs(4, [RTX2070], 67.0, "w"))
    m = SpeedModel.fit(rows, PRIOR)
    assert m.speed(A4000) / m.speed(RTX2070) == pytest.approx(67 / 48, rel=0.02)
    fake = (epochs(5, [A4000], 1000.0, "evil", n=40) + epochs(6, [RTX2070], 1.0, "evil", n=40))
    turned = SpeedModel.fit(fake, PRIOR)
    assert turned.speed(RTX2070) <= 4.0 * 1.0 + 1e-9 and turned.speed(A4000) >= 1.40 / 4 - 1e-9


def test_an_elastic_stage_is_told_its_count_in_its_own_flags() -> None:
    """A split elastic train gets --gpus 1 and one index; a wrapper's own --gpus (say a
    `docker run --gpus all` in tao.local_command) is left alone."""
    from gpusched.config import Settings, TaoSettings
    from gpusched.stages import StageRequest, build_job, for_launch

    settings = Settings(tao=TaoSettings(runner="local", local_command=["docker", "run", "--gpus",
                                                                      "all", "img", "tao"]))
    req = StageRequest(stage={"task": "train", "spec": "/tmp/s.txt", "results_dir": "/tmp/r",
                              "gpus": 1, "gpus_max": 2})
    job = build_job(req, settings, spec_facts={"num_epochs": 80}, check_results=False)
    split = for_launch(job, attempt=1, gpu_indices=[1], owner_uid=None).command
    gang = for_launch(job, attempt=1, gpu_indices=[0, 1], owner_uid=None).command
    assert split[:5] == gang[:5] == ["docker", "run", "--gpus", "all", "img"]
    assert split[-4:] == ["--gpus", "1", "--gpu_index", "1"]
    assert gang[-5:] == ["--gpus", "2", "--gpu_index", "0", "1"]


def test_an_elastic_job_gangs_when_the_others_could_not_use_the_spare_gpu() -> None:
    m = seed_model()
    elastic = GpuRequest(count=1, count_max=2)
    gang = plan([q(1, elastic, workload="train", epochs=80), q(2, GpuRequest(count=2))],
                box(a={"job": None}), 0.0, model=m)
    assert gang.placements[0].gpu_uuids == ("GPU-0", "GPU-1")  # job 2 needs both anyway
    pinned = plan([q(1, elastic, workload="train", epochs=80), q(2, GpuRequest(ids=("1",)))],
                  box(), 0.0, model=m)
    assert [p.gpu_uuids for p in pinned.placements] == [("GPU-0",), ("GPU-1",)]
    typed = plan([q(1, elastic, workload="train", epochs=80), q(2, GpuRequest(gpu_type="H100"))],
                 box(), 0.0, model=m)
    assert typed.placements[0].gpu_uuids == ("GPU-0", "GPU-1")  # job 2 can never run here


def test_a_job_that_waited_long_enough_takes_the_free_gpu() -> None:
    """The daemon clears may_wait once a job waited MAX_WAIT_FOR_FASTER_S in all: an ETA that
    keeps sliding cannot hold it forever."""
    busy = box(a={"job": 9, "until": 600.0})
    got = plan([q(1, workload="train", epochs=80, may_wait=False)], busy, 0.0, model=seed_model())
    assert [p.gpu_uuids for p in got.placements] == [("GPU-1",)]
