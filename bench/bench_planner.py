"""Planner benchmark: prints figures, asserts nothing (issue 12's "Done when" reads them).

    .venv/bin/python bench/bench_planner.py [--repeats 15] [--skip-sim] [--exact]

1. ``scheduling.plan`` time per call with 1,000 and 10,000 queued jobs on 2 and 8 GPUs, under
   both policies, in the two states a daemon's tick meets: every GPU free (the pass that
   places jobs) and every GPU busy with a known end (the steady state under load: every job
   waits, the reservation and the backfill rule are checked for each). The queue is the
   ``big`` generator's mix (1-, 2-, 4-GPU and elastic jobs, short evaluates, a few with 12 GiB;
   on 2 GPUs the 4-GPU ones are impossible, as they would be there), the model is fitted from
   epoch rows of every workload on every single GPU and one pair.
2. How far the seed's optimum is: the windowed bound when the first train gangs at t=0, and an
   exact lower bound on mean JCT (a relaxation: short stages off the GPUs), against fifo's;
   with ``--exact`` also the optimal makespan itself, as a MILP (SciPy HiGHS ``milp``).
3. The ``gpusched simulate`` tables of the seed, mixed and big traces under both policies.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import sys
import time
from collections import defaultdict
from typing import cast

from gpusched.scheduling import POLICIES, GpuSlot, PlacementPolicy, plan
from gpusched.simulate import _Engine, run_cli
from gpusched.speedmodel import SpeedModel
from gpusched.traces import Trace, generate_big, load_trace

BOXES = {"2 GPUs": ("RTX A4000", "RTX 2070"),
         "8 GPUs": ("RTX 3090", "RTX 3090", "RTX A4000", "RTX A4000", "RTX A4000",
                    "RTX 2070", "RTX 2070", "RTX 2070")}


def trained_model(trace: Trace) -> SpeedModel:
    """A model that has seen every workload on each GPU model and on one mixed pair."""
    rows = []
    sets = [[m] for m in trace.gpu_models] + [["RTX A4000", "RTX 2070"]]
    for w in trace.workloads:
        for gpus in sets:
            s = trace.true_s_per_epoch(w, gpus)
            rows += [{"job_id": f"{w}{gpus}", "attempt": 1, "epoch": e, "seconds": s,
                      "gpu_models": gpus, "workload": w, "validated": False} for e in range(1, 9)]
    prior = {n: g.speed for n, g in trace.gpu_models.items()}
    return SpeedModel.fit(rows, prior)


def busy(slots: list[GpuSlot], now: float) -> list[GpuSlot]:
    return [dataclasses.replace(s, allocated_to=100_000 + s.index, busy_until=now + 600 * (s.index + 1))
            for s in slots]


def bench_plan(n_jobs: int, repeats: int) -> None:
    trace = generate_big(n_jobs)
    model = trained_model(trace)
    trace = dataclasses.replace(trace, boxes={k: v for k, v in BOXES.items()})
    for box in BOXES:
        engine = _Engine(trace, box, "fifo")
        jobs = list(engine.queued.values())
        now = max(j.submitted_at for j in jobs)
        free = engine._slots(now)
        for state, slots in (("all free", free), ("all busy", busy(free, now))):
            for policy in POLICIES:
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    result = plan(jobs, slots, now, policy=cast(PlacementPolicy, policy), model=model)
                    times.append((time.perf_counter() - t0) * 1000)
                print(f"  {n_jobs:>6} queued  {box:<7} {state:<9} {policy:<10} "
                      f"median {statistics.median(times):8.2f} ms  max {max(times):8.2f} ms  "
                      f"({len(result.placements)} placed)")


# ------------------------------------------------------------------ how far the optimum is


def forced(trace: Trace, keys: set[str], count: int) -> Trace:
    """The trace with the jobs ``keys`` asking for exactly ``count`` GPUs."""
    jobs = tuple(dataclasses.replace(j, gpus_min=count, gpus_max=count) if j.key in keys else j
                 for j in trace.jobs)
    return dataclasses.replace(trace, jobs=jobs)


def jct_bound(trace: Trace, box: str) -> float:
    """A lower bound on the mean JCT of ANY schedule of ``trace`` (clairvoyant, any order):
    the exact optimum of a relaxation in which the short stages take no GPU time. Each long
    (epoch) job is placed, for every order of them and every GPU set, at the earliest time its
    set is free after the long jobs placed before it (exact for a regular objective: a schedule
    taken in order of start times is reproduced no later), released at its earliest start and
    after each long ancestor's end plus the short stages between them. A short stage completes
    no earlier than its own earliest end and each long ancestor's end plus the short chain
    to it. Long jobs alike in every respect (workload, epochs, request, release, ancestors, the
    short chains around them) are kept in one order, which loses no schedule. Small traces
    only: the orders of the long jobs are enumerated."""
    from itertools import combinations, permutations, product

    from gpusched.simulate import _chains

    names = trace.boxes[box]
    fast, es, _ = _chains(trace, box)
    by = {j.key: j for j in trace.jobs}
    long = [j.key for j in trace.jobs if j.epochs is not None]
    kids: dict[str, list[str]] = {k: [] for k in by}
    for j in trace.jobs:
        for a in j.after:
            kids[a].append(j.key)

    def gaps(src: str) -> dict[str, float]:
        """Longest chain of short stages from ``src`` (exclusive) to each job reached through
        short stages only: {job: the shorts' fast time strictly between}."""
        out: dict[str, float] = {}
        stack = [(k, 0.0) for k in kids[src]]
        while stack:
            k, g = stack.pop()
            if out.get(k, -1.0) >= g:
                continue
            out[k] = g
            if by[k].epochs is None:
                stack += [(c, g + fast[k]) for c in kids[k]]
        return out

    gap = {a: gaps(a) for a in long}
    anc = {k: [(a, gap[a][k]) for a in long if k in gap[a]] for k in by}
    sets = {k: [c for n in range(by[k].gpus_min, by[k].gpus_max + 1)
                for c in combinations(range(len(names)), n)
                if all(trace.gpu_models[names[g]].memory_mib >= (by[k].mem_mib or 0) for g in c)]
            for k in long}
    shorts = [k for k in by if by[k].epochs is None]
    sig = {k: (by[k].workload, by[k].epochs, by[k].gpus_min, by[k].gpus_max, by[k].mem_mib,
               es[k], tuple(sorted(anc[k])),
               tuple(sorted((round(g, 6), len(kids[s])) for s, g in gap[k].items()))) for k in long}
    best = math.inf
    for order in permutations(long):
        pos = {k: i for i, k in enumerate(order)}
        if any(pos[a] > pos[k] for k in long for a, _ in anc[k]):
            continue
        if any(sig[a] == sig[b] and a < b and pos[a] > pos[b] for a in long for b in long):
            continue
        for choice in product(*(sets[k] for k in order)):
            free = [0.0] * len(names)
            end: dict[str, float] = {}
            for k, c in zip(order, choice, strict=True):
                start = max([es[k], *(end[a] + g for a, g in anc[k]), *(free[i] for i in c)])
                end[k] = start + trace.true_duration_s(by[k], tuple(names[i] for i in c))
                for i in c:
                    free[i] = end[k]
            total = sum(end.values()) + sum(
                max([es[s] + fast[s], *(end[a] + g + fast[s] for a, g in anc[s])]) for s in shorts)
            best = min(best, total)
    return (best - sum(j.submit_s for j in trace.jobs)) / len(trace.jobs)


def exact_makespan(trace: Trace, box: str, time_limit_s: float = 300.0) -> tuple[float, bool]:
    """The optimal non-preemptive makespan (minutes from the first submission) by a MILP with
    SciPy's HiGHS (``milp``), and whether HiGHS proved it optimal within the time limit (else it
    is the best schedule found). Variables: a start per job, a 0/1 choice of GPU set per job, and
    an order bit per pair of jobs not ordered by their dependencies; two jobs that share a GPU
    run one after the other (big M). Branches of one fan-out whose stages are alike in every
    respect are interchangeable, so their first stages are kept in order (no schedule lost)."""
    from itertools import combinations

    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_array

    names, jobs = trace.boxes[box], trace.jobs
    t0 = min(j.submit_s for j in jobs) / 60
    idx = {j.key: i for i, j in enumerate(jobs)}
    sets = [[(c, trace.true_duration_s(j, tuple(names[g] for g in c)) / 60)
             for n in range(j.gpus_min, j.gpus_max + 1)
             for c in combinations(range(len(names)), n)
             if all(trace.gpu_models[names[g]].memory_mib >= (j.mem_mib or 0) for g in c)]
            for j in jobs]
    nv = len(jobs)  # 0..n-1: starts
    x = []
    for cs in sets:
        x.append(list(range(nv, nv + len(cs))))
        nv += len(cs)
    anc: dict[int, set[int]] = {i: set() for i in range(len(jobs))}
    changed = True  # the trace lists jobs by submit time, not by dependency: settle in rounds
    while changed:
        changed = False
        for i, j in enumerate(jobs):
            new = set().union(*({idx[a]} | anc[idx[a]] for a in j.after)) if j.after else set()
            if not new <= anc[i]:
                anc[i] |= new
                changed = True
    pairs = [(i, k) for i in range(len(jobs)) for k in range(i + 1, len(jobs))
             if i not in anc[k] and k not in anc[i]]
    y = {p: nv + n for n, p in enumerate(pairs)}
    nv += len(pairs)
    cmax = nv
    nv += 1
    big = sum(max(d for _, d in cs) for cs in sets) + max(j.submit_s for j in jobs) / 60
    rows: list[tuple[dict[int, float], float]] = []  # Σ coef·var ≥ lb (or = for choices)
    eqs: list[dict[int, float]] = []

    def dur(i: int, sign: float, row: dict[int, float]) -> dict[int, float]:
        for v, (_, d) in zip(x[i], sets[i], strict=True):
            row[v] = row.get(v, 0.0) + sign * d
        return row

    def uses(i: int, g: int) -> list[int]:
        return [v for v, (c, _) in zip(x[i], sets[i], strict=True) if g in c]

    for i, j in enumerate(jobs):
        eqs.append({v: 1.0 for v in x[i]})
        for a in j.after:
            rows.append((dur(idx[a], -1.0, {i: 1.0, idx[a]: -1.0}), 0.0))
        rows.append((dur(i, -1.0, {cmax: 1.0, i: -1.0}), 0.0))
    for i, k in pairs:
        for g in range(len(names)):
            ui, uk = uses(i, g), uses(k, g)
            if not ui or not uk:
                continue
            # y = 1: i before k, when both hold g: S_k − S_i − D_i ≥ −M(1 − y) − M(2 − u_i − u_k)
            r = dur(i, -1.0, {k: 1.0, i: -1.0, y[(i, k)]: -big})
            for v in ui + uk:
                r[v] = r.get(v, 0.0) - big
            rows.append((r, -3 * big))
            r = dur(k, -1.0, {i: 1.0, k: -1.0, y[(i, k)]: big})
            for v in ui + uk:
                r[v] = r.get(v, 0.0) - big
            rows.append((r, -2 * big))
    alike: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for i, j in enumerate(jobs):  # first stages of interchangeable branches
        if len(j.after) == 1:
            alike[(j.user, j.after, j.workload, j.epochs, j.duration_s, j.gpus_min, j.gpus_max,
                   tuple(sorted(_shape(trace, j.key))))].append(i)
    for group in alike.values():
        for first_i, next_i in itertools.pairwise(group):
            rows.append(({next_i: 1.0, first_i: -1.0}, 0.0))
    a_mat = lil_array((len(rows) + len(eqs), nv))
    lo, hi = [], []
    for r_i, (coefs, lb) in enumerate(rows):
        for v, c in coefs.items():
            a_mat[r_i, v] = c
        lo.append(lb)
        hi.append(np.inf)
    for e_i, coefs in enumerate(eqs):
        for v, c in coefs.items():
            a_mat[len(rows) + e_i, v] = c
        lo.append(1.0)
        hi.append(1.0)
    cost = np.zeros(nv)
    cost[cmax] = 1.0
    lower = np.zeros(nv)
    upper = np.full(nv, np.inf)
    integral = np.zeros(nv)
    for i, j in enumerate(jobs):
        lower[i] = j.submit_s / 60
    for v in [*(v for xs in x for v in xs), *y.values()]:
        integral[v], upper[v] = 1, 1
    res = milp(cost, constraints=LinearConstraint(a_mat.tocsr(), lo, hi), integrality=integral,
               bounds=Bounds(lower, upper), options={"time_limit": time_limit_s})
    if res.x is None:
        return math.inf, False
    return float(res.fun) - t0, res.status == 0


def _shape(trace: Trace, key: str) -> list[tuple[object, ...]]:
    """What waits (transitively) for a job, as (workload, epochs, seconds) per descendant."""
    out: list[tuple[object, ...]] = []
    todo = [key]
    while todo:
        k = todo.pop()
        for j in trace.jobs:
            if k in j.after:
                out.append((j.workload or "", j.epochs or 0, j.duration_s or 0.0))
                todo.append(j.key)
    return out


def seed_optimum(exact: bool) -> None:
    """What the seed's targets would take: the windowed bound when the first train gangs (as
    the issue's "gang when nothing else waits" makes any online planner do at t=0), and the
    relaxation's bound on mean JCT, against fifo's."""
    from gpusched.simulate import _hms, lower_bound, simulate

    seed, box = load_trace("seed"), "A4000+2070"
    first = seed.jobs[0].key
    fifo = simulate(seed, box, "fifo")
    fast = simulate(seed, box, "throughput")
    free = lower_bound(seed, box).value_s
    gang = lower_bound(forced(seed, {first}, 2), box).value_s
    jct = jct_bound(seed, box)
    print(f"\nseed: how far the optimum is\n"
          f"  lower bound {_hms(free)}; with {first} on both GPUs at t=0 {_hms(gang)}: "
          f"throughput's {_hms(fast.makespan_s)} is {fast.makespan_s / gang:.3f} of the latter, "
          f"and any schedule with that gang is at least {gang / free:.3f}× the former\n"
          f"  mean JCT: no schedule beats {_hms(jct)} (shorts off the GPUs, exact), so at best "
          f"{fifo.mean_jct_s / jct:.3f}× fifo's {_hms(fifo.mean_jct_s)}; throughput "
          f"{_hms(fast.mean_jct_s)} ({fifo.mean_jct_s / fast.mean_jct_s:.3f}×)")
    if not exact:
        return
    for label, t in (("any schedule", seed), (f"{first} on both GPUs at t=0", forced(seed, {first}, 2))):
        t1 = time.perf_counter()
        opt, proven = exact_makespan(t, box)
        print(f"  optimum, {label}: {_hms(opt * 60)} ({'proven' if proven else 'best found, not proven'}"
              f", MILP {time.perf_counter() - t1:.0f} s); throughput's makespan is "
              f"{fast.makespan_s / (opt * 60):.3f}× it")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--skip-sim", action="store_true", help="only the plan() timings")
    ap.add_argument("--exact", action="store_true",
                    help="also solve the seed's optimal makespan as a MILP (minutes)")
    args = ap.parse_args()
    print("plan() per call")
    for n in (1000, 10_000):
        bench_plan(n, args.repeats if n <= 1000 else max(3, args.repeats // 3))
    if args.skip_sim:
        return
    seed_optimum(args.exact)
    for name in ("seed", "mixed", "big"):
        t0 = time.perf_counter()
        text, code = run_cli(name, list(POLICIES), False)
        print(f"\n{text}\n(simulated in {time.perf_counter() - t0:.1f} s, exit {code})")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
