"""The throughput model: the reference box (RTX A4000 48 s, RTX 2070 67 s, both 40 s), warm-up
and validation handling, ETAs, queue simulation, busy fractions, and order-invariance properties."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpusched.throughput import (
    busy_fraction,
    eta,
    gpu_set_key,
    queue_etas,
    recommend,
    summarize,
)

A4000 = "RTX A4000"
RTX2070 = "RTX 2070"
WL = "ssd/resnet18/bs16/spec:ab12cd34"


def epoch_rows(job_id: int, models: list[str], seconds: list[float], *, attempt: int = 1, first: int = 1,
               workload: str | None = WL, validated: frozenset[int] | set[int] = frozenset(),
               ) -> list[dict[str, Any]]:
    rows = []
    t = 1000.0 * job_id
    for i, s in enumerate(seconds):
        e = first + i
        rows.append({
            "job_id": job_id, "attempt": attempt, "epoch": e, "max_epoch": 80, "started_at": t,
            "ended_at": t + s, "seconds": s, "gpu_uuids": json.dumps([f"GPU-{m}" for m in models]),
            "gpu_models": json.dumps(models), "gpu_count": len(models), "workload": workload,
            "loss": 0.1, "lr": 1e-3, "map": None, "validated": int(e in validated)})
        t += s
    return rows


def reference_rows() -> list[dict[str, Any]]:
    """Epoch 1 is a slow warm-up; the rest sit symmetrically around the reference medians."""
    jitter = [0.0, -1.0, 1.0, -0.5, 0.5, -2.0, 2.0]
    return (epoch_rows(1, [A4000], [95.0] + [48 + j for j in jitter])
            + epoch_rows(2, [RTX2070], [130.0] + [67 + j for j in jitter])
            + epoch_rows(3, [A4000, RTX2070], [80.0] + [40 + j for j in jitter]))


def test_gpu_set_key_is_a_sorted_multiset() -> None:
    assert gpu_set_key([A4000, RTX2070]) == "RTX 2070 + RTX A4000"
    assert gpu_set_key([RTX2070, A4000]) == "RTX 2070 + RTX A4000"
    assert gpu_set_key(["H200", "H200"]) == "2× H200"
    assert gpu_set_key(["T4", "H200", "H200"]) == "2× H200 + T4"
    assert gpu_set_key([A4000]) == A4000


def test_reference_box_medians_ordering_and_scaling() -> None:
    stats = summarize(reference_rows())
    assert [s.gpu_set for s in stats] == [A4000, RTX2070, "RTX 2070 + RTX A4000"]
    a4000, r2070, pair = stats
    assert (a4000.median_s, r2070.median_s, pair.median_s) == (48.0, 67.0, 40.0)
    assert a4000.epochs_per_hour == pytest.approx(75.0)
    assert pair.epochs_per_hour == pytest.approx(90.0)
    assert pair.gpu_count == 2 and pair.gpu_models == (RTX2070, A4000)
    assert pair.scaling_efficiency == pytest.approx(48 / (2 * 40)) == pytest.approx(0.6)
    assert a4000.scaling_efficiency is None
    assert all(s.samples == 7 and s.confidence == "medium" for s in stats)
    assert pair.p90_s == pytest.approx(41.4)  # linear interpolation over the 7 sorted samples
    assert pair.validation_median_s is None


def test_reference_box_recommendations() -> None:
    recs = recommend(summarize(reference_rows()))
    text = "\n".join(recs)
    assert f"RTX A4000 is 1.40× faster than RTX 2070 for {WL}" in text
    assert ("one 2-GPU job on RTX 2070 + RTX A4000 gives 90 epochs/h; two separate 1-GPU jobs on "
            "RTX A4000 and RTX 2070 give 129 epochs/h together: split when more than one job waits") in text
    assert "1.20× sooner" in text  # a lone job is still better off on the pair


def test_no_recommendation_without_two_samples_per_set() -> None:
    rows = (epoch_rows(1, [A4000], [90, 48]) + epoch_rows(2, [RTX2070], [90, 67, 67])
            + epoch_rows(3, [A4000, RTX2070], [90, 40, 40]))
    stats = summarize(rows)
    assert [s.samples for s in stats] == [1, 2, 2]
    assert all("RTX A4000 is" not in r and "2-GPU" not in r for r in recommend(stats))
    assert recommend(summarize(epoch_rows(1, [A4000], [90, 48, 48]))) == []


def test_pair_that_beats_separate_jobs_is_preferred() -> None:
    rows = (epoch_rows(1, ["H200"], [90, 60, 60, 60]) + epoch_rows(2, ["H200", "H200"], [90, 25, 25, 25]))
    (rec,) = recommend(summarize(rows))
    assert "2-GPU job on 2× H200 gives 144 epochs/h" in rec and "prefer the 2-GPU set" in rec


def test_warmup_epoch_is_excluded_per_attempt() -> None:
    # attempt 2 resumed at epoch 5: its first epoch rebuilds the graph and is slow too
    rows = (epoch_rows(1, [A4000], [300, 48, 48, 48])
            + epoch_rows(1, [A4000], [200, 50, 50], attempt=2, first=5))
    (s,) = summarize(rows)
    assert s.samples == 5 and s.median_s == 48.0
    (raw,) = summarize(rows, exclude_warmup=False)
    assert raw.samples == 7 and raw.median_s == 50.0


def test_epoch_one_is_always_warmup_even_when_epoch_zero_was_seen() -> None:
    (s,) = summarize(epoch_rows(1, [A4000], [300, 300, 48, 48], first=0))
    assert s.samples == 2 and s.median_s == 48.0


def test_validation_epochs_are_reported_apart() -> None:
    rows = epoch_rows(1, [A4000], [95, 48, 48, 60, 48, 48, 62], validated={4, 7})
    (s,) = summarize(rows)
    assert s.samples == 4 and s.median_s == 48.0
    assert s.validation_median_s == 61.0


def test_groups_by_workload_and_filters() -> None:
    rows = epoch_rows(1, [A4000], [90, 48, 48]) + epoch_rows(2, [A4000], [200, 120, 120], workload="yolo")
    assert [(s.workload, s.median_s) for s in summarize(rows)] == [(WL, 48.0), ("yolo", 120.0)]
    assert [s.workload for s in summarize(rows, workload="yolo")] == ["yolo"]


def test_confidence_levels_and_bad_rows() -> None:
    def conf(n: int) -> str:
        (s,) = summarize(epoch_rows(1, [A4000], [90] + [48.0] * n))
        return s.confidence
    assert (conf(2), conf(3), conf(9), conf(10)) == ("low", "medium", "medium", "high")
    rows = epoch_rows(1, [A4000], [90, 48, 48])
    rows.append({**rows[-1], "epoch": 9, "seconds": None})
    rows.append({**rows[-1], "epoch": 10, "seconds": -3.0})
    rows.append({**rows[-1], "epoch": 11, "gpu_models": [A4000], "seconds": 48.0})  # a list, not JSON
    (s,) = summarize(rows)
    assert s.samples == 3
    assert summarize([]) == []


def test_eta() -> None:
    assert eta(10, 80, [48, 50, 46], None) == 70 * 48
    assert eta(10, 80, [], 40.0) == 70 * 40
    assert eta(10, 80, [], None) is None
    assert eta(80, 80, [], None) == 0.0
    assert eta(90, 80, [48], None) == 0.0


def test_queue_etas_list_scheduling() -> None:
    # 2 GPUs: job 1 frees one in 100 s, job 2 one in 300 s
    etas = queue_etas([(1, 100.0), (2, 300.0)], [(3, 1000.0, 1), (4, 50.0, 2), (5, 10.0, 1)], 2)
    assert etas == {3: 100.0, 4: 1100.0, 5: 1150.0}
    # a free GPU starts the head of the queue at once
    assert queue_etas([], [(7, 60.0, 1), (8, 60.0, 1), (9, 60.0, 1)], 2) == {7: 0.0, 8: 0.0, 9: 60.0}
    # unknown durations make later starts unknown; too-big jobs never start
    etas = queue_etas([(1, None)], [(3, None, 1), (4, 10.0, 1), (5, 10.0, 3)], 2)
    assert etas == {3: 0.0, 4: None, 5: None}
    # a running job may hold several GPUs
    assert queue_etas([(1, 100.0, 2)], [(2, 10.0, 1)], 2) == {2: 100.0}


def test_queue_etas_job_with_unknown_start_reserves_nothing() -> None:
    etas = queue_etas([(1, 100.0), (2, None)], [(3, 10.0, 2), (4, 10.0, 1)], 2)
    assert etas == {3: None, 4: 100.0}


def test_busy_fraction() -> None:
    gpus = [{"index": 0, "uuid": "A", "name": A4000}, {"index": 1, "uuid": "B", "name": RTX2070}]
    spans = [
        {"job_id": 1, "gpu_uuids": ["A"], "started_at": -50.0, "ended_at": 30.0},  # clipped at since
        {"job_id": 2, "gpu_uuids": ["A", "B"], "started_at": 20.0, "ended_at": 40.0},  # overlaps job 1
        {"job_id": 3, "gpu_uuids": '["B"]', "started_at": 80.0, "ended_at": None},  # still running
        {"job_id": 4, "gpu_uuids": ["C"], "started_at": 0.0, "ended_at": 100.0},  # not in inventory
        {"job_id": 5, "gpu_uuids": ["B"], "started_at": 150.0, "ended_at": 160.0},  # after the window
    ]
    assert busy_fraction(spans, gpus, 0.0, 100.0) == {"A": pytest.approx(0.4), "B": pytest.approx(0.4)}
    assert busy_fraction([], gpus, 0.0, 100.0) == {"A": 0.0, "B": 0.0}


# -- properties -------------------------------------------------------------------------------

secs = st.floats(min_value=1.0, max_value=600.0, allow_nan=False)
jobs = st.lists(st.tuples(st.sampled_from([[A4000], [RTX2070], [A4000, RTX2070], [RTX2070, A4000]]),
                          st.lists(secs, min_size=2, max_size=8),
                          st.lists(st.booleans(), min_size=8, max_size=8)),
                min_size=1, max_size=5)


def _rows(spec: list[tuple[list[str], list[float], list[bool]]]) -> list[dict[str, Any]]:
    rows = []
    for job_id, (models, seconds, val) in enumerate(spec, start=1):
        rows += epoch_rows(job_id, models, seconds,
                           validated={e for e, v in enumerate(val, start=1) if v and e > 1})
    return rows


@settings(max_examples=60, deadline=None)
@given(jobs, st.randoms(use_true_random=False))
def test_summary_is_invariant_to_row_order(spec: list[Any], rnd: random.Random) -> None:
    rows = _rows(spec)
    shuffled = rows[:]
    rnd.shuffle(shuffled)
    assert summarize(shuffled) == summarize(rows)
    assert recommend(summarize(shuffled)) == recommend(summarize(rows))


@settings(max_examples=60, deadline=None)
@given(jobs, st.lists(secs, min_size=5, max_size=5))
def test_warmup_seconds_do_not_matter(spec: list[Any], warmups: list[float]) -> None:
    rows = _rows(spec)
    changed = [{**r, "seconds": warmups[r["job_id"] - 1]} if r["epoch"] == 1 else r for r in rows]
    assert summarize(changed) == summarize(rows)
