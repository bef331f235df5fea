"""Planner benchmark: prints figures, asserts nothing (issue 12's "Done when" reads them).

    .venv/bin/python bench/bench_planner.py [--repeats 15] [--skip-sim]

1. ``scheduling.plan`` time per call with 1,000 and 10,000 queued jobs on 2 and 8 GPUs, under
   both policies, in the two states a daemon's tick meets: every GPU free (the pass that
   places jobs) and every GPU busy with a known end (the steady state under load: every job
   waits, the reservation and the backfill rule are checked for each). The queue is the
   ``big`` generator's mix (1-, 2-, 4-GPU and elastic jobs, short evaluates, a few with 12 GiB;
   on 2 GPUs the 4-GPU ones are impossible, as they would be there), the model is fitted from
   epoch rows of every workload on every single GPU and one pair.
2. The ``gpusched simulate`` tables of the seed, mixed and big traces under both policies.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import cast

from gpusched.scheduling import POLICIES, GpuSlot, PlacementPolicy, plan
from gpusched.simulate import _Engine, run_cli
from gpusched.speedmodel import SpeedModel
from gpusched.traces import Trace, generate_big

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
    for name in ("seed", "mixed", "big"):
        t0 = time.perf_counter()
        text, code = run_cli(name, list(POLICIES), False)
        print(f"\n{text}\n(simulated in {time.perf_counter() - t0:.1f} s, exit {code})")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
