"""Planner benchmark: prints figures, asserts nothing (issue 12's "Done when" reads them).

    .venv/bin/python bench/bench_planner.py [--repeats 15] [--skip-sim]

1. ``scheduling.plan`` time per call with 1,000 and 10,000 queued jobs on 2 and 8 GPUs, under
   both policies, in the two states a daemon's tick meets: every GPU free (the pass that
   places jobs) and every GPU busy with a known end (the steady state under load: every job
   waits, the reservation and the backfill rule are checked for each). The queue is the
   ``big`` generator's mix (1-, 2-, 4-GPU and elastic jobs, short evaluates, a few with 12 GiB;
   on 2 GPUs the 4-GPU ones are impossible, as they would be there), the model is fitted from
   epoch rows of every workload on every single GPU and one pair.
2. How far the seed's optimum is: the windowed bound when the first train gangs at t=0, and an
   exact lower bound on mean JCT (a relaxation: short stages off the GPUs), against fifo's.
3. The ``gpusched simulate`` tables of the seed, mixed and big traces under both policies.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
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


def seed_optimum() -> None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--skip-sim", action="store_true", help="only the plan() timings")
    args = ap.parse_args()
    print("plan() per call")
    for n in (1000, 10_000):
        bench_plan(n, args.repeats if n <= 1000 else max(3, args.repeats // 3))
    if args.skip_sim:
        return
    seed_optimum()
    for name in ("seed", "mixed", "big"):
        t0 = time.perf_counter()
        text, code = run_cli(name, list(POLICIES), False)
        print(f"\n{text}\n(simulated in {time.perf_counter() - t0:.1f} s, exit {code})")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
