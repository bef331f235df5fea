"""The simulator: exact figures on traces small enough to schedule by hand, the invariants a
replay must keep (dependencies, all-or-nothing gangs, one job per GPU), the LP bound on cases
with a known optimum, and clear errors for bad traces."""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpusched.errors import SpecError
from gpusched.simulate import SimResult, lower_bound, run_cli, simulate
from gpusched.traces import Trace, generate_big, load_trace, parse_trace_text

pytest.importorskip("scipy")

# GPU A is twice as fast as B and has more memory, so best fit (fifo) prefers B
BOX = """
name = "tiny"
jobs = [
{jobs}
]

[gpu_models.A]
memory = "16G"
speed = 2.0

[gpu_models.B]
memory = "8G"
speed = 1.0

[boxes]
ab = {box}

[workloads.w]
base_s = 100.0
"""


def tiny(jobs: str, box: str = '["A", "B"]') -> Trace:
    return parse_trace_text(BOX.format(jobs=jobs, box=box), "tiny.toml")


def by_key(r: SimResult) -> dict[str, tuple[float, float, tuple[int, ...]]]:
    return {j.key: (j.start_s, j.end_s, j.gpus) for j in r.jobs}


def test_a_lone_job_goes_to_best_fit_under_fifo_and_to_the_fast_gpu_under_throughput() -> None:
    t = tiny('{ id = "j", submit = 0, workload = "w", epochs = 4, gpus = "1" }')
    fifo = simulate(t, "ab", "fifo")
    assert by_key(fifo) == {"j": (0.0, 400.0, (1,))}  # B: 4 × 100 s
    assert (fifo.makespan_s, fifo.mean_jct_s, fifo.busy) == (400.0, 400.0, (0.0, 1.0))
    fast = simulate(t, "ab", "throughput")
    assert by_key(fast) == {"j": (0.0, 200.0, (0,))}  # A: 4 × 50 s, from the prior alone
    assert (fast.makespan_s, fast.mean_jct_s) == (200.0, 200.0)


def test_an_elastic_request_gangs_under_fifo() -> None:
    # the pair runs at the slowest card: 100 / (2 × 0.85) s per epoch
    t = tiny('{ id = "j", submit = 0, workload = "w", epochs = 17, gpus = "1-2" }')
    r = simulate(t, "ab", "fifo")
    assert by_key(r) == {"j": (0.0, pytest.approx(1000.0), (0, 1))}


def test_dependencies_are_respected_and_the_order_is_first_come_first_served() -> None:
    t = tiny('{ id = "a", submit = 0, duration_s = 100 },\n'
             '{ id = "b", submit = 0, duration_s = 50, after = ["a"] },\n'
             '{ id = "c", submit = 0, duration_s = 30 },', box='["A"]')
    for policy in ("fifo", "throughput"):
        r = simulate(t, "ab", policy)
        # a first (file order breaks the tie), then b (listed before c) once a is done, then c
        assert by_key(r) == {"a": (0.0, 100.0, (0,)), "b": (100.0, 150.0, (0,)),
                             "c": (150.0, 180.0, (0,))}, policy
        assert r.makespan_s == 180.0
        assert r.mean_jct_s == pytest.approx((100 + 150 + 180) / 3)


def test_a_gang_waits_for_both_gpus_and_is_not_starved_by_a_long_single() -> None:
    t = tiny('{ id = "one", submit = 0, duration_s = 100 },\n'
             '{ id = "gang", submit = 0, duration_s = 50, gpus = "2" },\n'
             '{ id = "long", submit = 0, duration_s = 300 },')
    for policy in ("fifo", "throughput"):
        r = by_key(simulate(t, "ab", policy))
        assert r["one"][:2] == (0.0, 100.0)
        assert r["gang"] == (100.0, 150.0, (0, 1)), policy  # reserved: long may not backfill
        assert r["long"][:2] == (150.0, 450.0)


@pytest.mark.parametrize("policy", ["fifo", "throughput"])
def test_replays_keep_the_invariants(policy: str) -> None:
    t = load_trace("seed")
    r = simulate(t, "A4000+2070", policy)
    jobs = {j.key: j for j in t.jobs}
    done = {rec.key: rec for rec in r.jobs}
    assert set(done) == set(jobs)
    per_gpu: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for rec in r.jobs:
        job = jobs[rec.key]
        assert job.gpus_min <= len(rec.gpus) <= job.gpus_max  # all or nothing, in its range
        assert rec.start_s >= job.submit_s
        assert all(rec.start_s >= done[a].end_s for a in job.after)
        assert rec.end_s - rec.start_s == pytest.approx(t.true_duration_s(job, rec.gpu_names))
        for g in rec.gpus:
            per_gpu[g].append((rec.start_s, rec.end_s))
    for spans in per_gpu.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in pairwise(spans))
    assert r.makespan_s >= lower_bound(t, "A4000+2070").value_s
    assert all(0 <= b <= 1 for b in r.busy)
    assert r.plan_ms


def test_the_throughput_policy_splits_the_seed_trains_and_beats_fifo() -> None:
    t = load_trace("seed")
    fifo = simulate(t, "A4000+2070", "fifo")
    fast = simulate(t, "A4000+2070", "throughput")
    assert by_key(fifo)["b.train"][2] == (0, 1)  # fifo: the example's gang
    assert len(by_key(fast)["b.train"][2]) == 1  # the second train runs beside the first user's
    assert fast.makespan_s < fifo.makespan_s


def test_lower_bound_of_one_job_is_its_fastest_run() -> None:
    t = tiny('{ id = "j", submit = 0, workload = "w", epochs = 10 }')
    b = lower_bound(t, "ab")
    # LP: y_A·500 ≤ T, y_B·1000 ≤ T, y_A + y_B = 1 -> T = 1000/3; but the job runs 500 s on A
    assert b.lp_s == pytest.approx(1000 / 3)
    assert b.critical_path_s == pytest.approx(500)
    assert b.value_s == pytest.approx(500)


def test_lower_bound_spreads_the_work_and_never_prefers_an_inefficient_gang() -> None:
    t = tiny('{ id = "j1", submit = 0, workload = "w", epochs = 10, gpus = "1-2" },\n'
             '{ id = "j2", submit = 0, workload = "w", epochs = 10, gpus = "1-2" },')
    b = lower_bound(t, "ab")
    # both cards together do 1/500 + 1/1000 jobs per second split, 1/588 as a gang
    assert b.lp_s == pytest.approx(2000 / 3)
    assert b.value_s == pytest.approx(2000 / 3)


def test_lower_bound_uses_release_times() -> None:
    t = tiny('{ id = "early", submit = 0, workload = "w", epochs = 10 },\n'
             '{ id = "l1", submit = 1000, workload = "w", epochs = 10 },\n'
             '{ id = "l2", submit = 1000, workload = "w", epochs = 10 },')
    b = lower_bound(t, "ab")
    assert b.lp_s == pytest.approx(1000)  # three jobs' work from time zero
    assert b.critical_path_s == pytest.approx(1500)  # l1 submitted at 1000, 500 s on A
    assert b.release_lp_s == pytest.approx(1000 + 2000 / 3)  # the two late jobs after 1000
    assert b.value_s == pytest.approx(1000 + 2000 / 3)


def test_gang_truth_follows_the_rule_unless_the_trace_lists_the_set() -> None:
    seed = load_trace("seed")
    assert seed.true_s_per_epoch("ssd/resnet18 384x1248 bs16", ["RTX 2070", "RTX A4000"]) == 40.0
    t = tiny('{ id = "j", submit = 0, workload = "w", epochs = 1 }')
    assert t.true_s_per_epoch("w", ["A", "B"]) == pytest.approx(100 / (2 * 0.85))
    assert t.true_s_per_epoch("w", ["A"]) == 50.0


def test_built_in_traces_load_and_big_is_the_same_every_time() -> None:
    assert len(load_trace("seed").jobs) == 22
    assert set(load_trace("mixed").boxes) == {"2gpu", "4gpu"}
    big = load_trace("big")
    assert len(big.jobs) == 1000
    assert big.jobs == generate_big().jobs


@pytest.mark.parametrize(("jobs", "message"), [
    ('{ id = "j", workload = "w", epochs = 1, colour = "red" }', "unknown field(s) colour"),
    ('{ id = "j", duration_s = 1, after = ["x"] }', "after names 'x'"),
    ('{ id = "j", duration_s = 1, gpus = "2-1" }', "gpus must be a count"),
    ('{ id = "j", duration_s = 1, gpus = "3" }', "can never run on box 'ab'"),
    ('{ id = "j", epochs = 3 }', "epochs needs a workload"),
    ('{ id = "j", workload = "w", epochs = 3, duration_s = 5 }', "exactly one of epochs"),
    ('{ id = "j", workload = "v", epochs = 3 }', "workload 'v' is not in [workloads]"),
    ('{ id = "j", duration_s = 1, submit = "25:99" }', "submit must be"),
    ('{ id = "j", duration_s = 1 },\n{ id = "j", duration_s = 2 }', "the id is used twice"),
])
def test_bad_traces_say_what_is_wrong(jobs: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        tiny(jobs)
    assert message in err.value.message
    assert "tiny.toml" in err.value.message


def test_a_trace_of_fixed_length_jobs_needs_no_workloads_but_gpu_models() -> None:
    text = 'jobs = [{ id = "a", duration_s = 5 }]\n[gpu_models.A]\nmemory = "8G"\nspeed = 1.0\n'
    t = parse_trace_text(text + '[boxes]\nx = ["A"]\n', "fixed.toml")
    assert simulate(t, "x", "fifo").makespan_s == 5.0
    with pytest.raises(SpecError, match=r"gpu_models.'A': needs memory"):
        parse_trace_text(text.replace('memory = "8G"\n', "") + '[boxes]\nx = ["A"]\n', "f.toml")
    with pytest.raises(SpecError, match="box 'x' must list GPU models"):
        parse_trace_text(text + '[boxes]\nx = ["Z"]\n', "f.toml")


def test_a_trace_path_that_is_not_toml_or_not_there(tmp_path: object) -> None:
    from pathlib import Path

    bad = Path(str(tmp_path)) / "bad.toml"
    bad.write_text("jobs = [", encoding="utf-8")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_trace(str(bad))
    with pytest.raises(SpecError, match="no trace 'nope'"):
        load_trace("nope")


def test_run_cli_prints_a_table_per_box_and_json() -> None:
    text, code = run_cli("seed", ["fifo", "throughput"], False)
    assert code == 0
    assert "makespan/LB" in text and "throughput vs fifo" in text
    out, code = run_cli("seed", ["throughput"], True)
    assert code == 0
    data = json.loads(out)
    (box,) = data["boxes"]
    (res,) = box["results"]
    assert res["policy"] == "throughput"
    assert res["makespan_over_lb"] >= 1.0
    assert [g["name"] for g in res["busy"]] == ["RTX A4000", "RTX 2070"]
    assert box["lower_bound"]["value_s"] > 0


def test_run_cli_errors_exit_2() -> None:
    text, code = run_cli("seed", ["greedy"], False)
    assert code == 2 and "no policy greedy" in text
    text, code = run_cli("/nonexistent.toml", ["fifo"], False)
    assert code == 2 and "no trace" in text


def test_a_planner_that_never_places_is_reported_not_hung(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpusched.simulate as sim
    from gpusched.scheduling import Plan

    def idle(jobs: list, gpus: list, now: float, **_: object) -> Plan:
        return Plan(placements=(), waiting={j.id: "waits for nothing" for j in jobs},
                    impossible={}, reservation=None)

    monkeypatch.setattr(sim, "plan", idle)
    with pytest.raises(sim.SimulationError, match="job a, waits for nothing"):
        simulate(tiny('{ id = "a", duration_s = 5 }'), "ab", "fifo")
    text, code = run_cli("seed", ["fifo"], False)
    assert code == 1 and "fifo: did not finish: 22 job(s) never started" in text


# -- the bound is a lower bound: random small traces against every policy and the optimum -----


def brute_force_makespan(t: Trace, box: str) -> float:
    """The optimal non-preemptive makespan, by enumeration: for every order of the jobs that
    keeps their dependencies and every GPU set of each, place each job in turn at the earliest
    time its set is free after the jobs placed before it. Exact, since any schedule taken in
    order of start times is reproduced no later this way."""
    from itertools import combinations, permutations, product

    names = t.boxes[box]
    sets = {j.key: [c for n in range(j.gpus_min, j.gpus_max + 1)
                    for c in combinations(range(len(names)), n)
                    if all(t.gpu_models[names[g]].memory_mib >= (j.mem_mib or 0) for g in c)]
            for j in t.jobs}
    best = float("inf")
    for order in permutations(t.jobs):
        seen: set[str] = set()
        ok = True
        for j in order:
            ok = ok and all(a in seen for a in j.after)
            seen.add(j.key)
        if not ok:
            continue
        for choice in product(*(sets[j.key] for j in order)):
            free = [0.0] * len(names)
            end: dict[str, float] = {}
            for j, c in zip(order, choice, strict=True):
                start = max([j.submit_s, *(end[a] for a in j.after), *(free[g] for g in c)])
                end[j.key] = start + t.true_duration_s(j, tuple(names[g] for g in c))
                for g in c:
                    free[g] = end[j.key]
            best = min(best, max(end.values()))
    return best - min(j.submit_s for j in t.jobs)


@st.composite
def small_traces(draw: st.DrawFn, max_jobs: int = 5) -> Trace:
    lines = []
    for i in range(draw(st.integers(1, max_jobs))):
        submit = draw(st.sampled_from([0, 0, 100, 400]))
        after = draw(st.sampled_from([[], [], *([[f"j{k}"] for k in range(i)])]))
        gpus = draw(st.sampled_from(["1", "1", "1-2", "2"]))
        mem = draw(st.sampled_from(["", "", ', mem = "10G"'])) if gpus == "1" else ""
        if draw(st.booleans()):
            what = f'workload = "w", epochs = {draw(st.integers(1, 12))}'
        else:
            what = f"duration_s = {draw(st.sampled_from([60, 180, 500]))}, short = true"
        deps = ", ".join(f'"{a}"' for a in after)
        lines.append(f'{{ id = "j{i}", submit = {submit}, {what}, gpus = "{gpus}"{mem}, '
                     f"after = [{deps}] }},")
    return tiny("\n".join(lines))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(small_traces())
def test_the_bound_never_exceeds_any_policy_or_the_optimum(t: Trace) -> None:
    b = lower_bound(t, "ab")
    opt = brute_force_makespan(t, "ab")
    assert b.value_s <= opt + 1e-6, (b, opt)
    for policy in ("fifo", "throughput"):
        assert b.value_s <= simulate(t, "ab", policy).makespan_s + 1e-6


def test_the_windowed_bound_sees_a_gpu_idle_before_the_second_job_arrives() -> None:
    # j0 alone for 400 s, then j1: the plain LP spreads both over A and B from time zero, but
    # while j0 is the only job B can only idle (or gang, at the gang's poor efficiency)
    t = tiny('{ id = "j0", submit = 0, workload = "w", epochs = 10, gpus = "1-2" },\n'
             '{ id = "j1", submit = 400, workload = "w", epochs = 10, gpus = "1-2" },')
    b = lower_bound(t, "ab")
    assert b.lp_s == pytest.approx(2000 / 3)
    assert b.window_lp_s > b.lp_s + 30
    assert b.value_s <= brute_force_makespan(t, "ab") + 1e-6
