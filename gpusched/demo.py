"""``gpusched demo``: a real daemon on simulated GPUs in a temporary state directory, running
work end to end with live progress. Nothing outside the temporary directory is touched."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from gpusched.client import Client
from gpusched.render import duration, table
from gpusched.testing.harness import SIM_GPUS, DaemonProcess, short_tmpdir

TERMINAL = ("succeeded", "failed", "cancelled", "lost")


def _submit(c: Client, command: list[str], **kw: Any) -> int:
    spec = {"command": command, "workdir": "/tmp", **kw}
    return int(c.post("/v1/jobs", spec)["id"])


def follow(c: Client, ids: list[int], out: Callable[[str], None]) -> list[dict[str, Any]]:
    """Print each status change until every job has ended."""
    seen: dict[int, str] = {}
    q = ",".join(map(str, ids))
    while True:
        jobs = c.get(f"/v1/jobs?all=1&ids={q}")
        for j in jobs:
            if seen.get(j["id"]) != j["status"]:
                seen[j["id"]] = j["status"]
                gpus = ",".join(map(str, j["gpu_indices"])) or "-"
                out(f"  job {j['id']:>3} {j['name'] or '':<14} {j['status']:<10} GPUs {gpus}")
        if all(j["status"] in TERMINAL for j in jobs):
            return list(jobs)
        time.sleep(0.1)


def run_jobs_demo(c: Client, out: Callable[[str], None]) -> list[dict[str, Any]]:
    stamp = "sleep {s}; echo done on $GPUSCHED_GPU_NAMES"
    ids = [
        _submit(c, ["sh", "-c", stamp.format(s=2)], name="prep-a4000", gpus={"ids": ["0"],
                                                                              "count": 1}),
        _submit(c, ["sh", "-c", stamp.format(s=1)], name="prep-2070", gpus={"ids": ["1"],
                                                                             "count": 1}),
    ]
    ids.append(_submit(c, ["sh", "-c", stamp.format(s=2)], name="train-2gpu",
                       gpus={"count": 2}))
    ids += [_submit(c, ["sh", "-c", stamp.format(s=1)], name=f"eval-{i}") for i in range(3)]
    ids.append(_submit(c, ["sh", "-c", "echo report"], name="report", gpus={"count": 0},
                       after=ids[2:]))
    out(f"queued {len(ids)} jobs: two pinned 1-GPU jobs, a 2-GPU job that must not starve, "
        "three 1-GPU jobs, and a CPU job after all of them")
    return follow(c, ids, out)


def main(keep: bool = False, out: Callable[[str], None] = print) -> int:
    state = short_tmpdir("gpusched-demo-")
    out(f"gpusched demo: daemon on simulated GPUs {SIM_GPUS!r}, state in {state}")
    d = DaemonProcess(state, simulate=SIM_GPUS)
    try:
        d.start()
        c = d.client()
        for g in c.get("/v1/gpus"):
            out(f"  GPU {g['index']}: {g['name']} ({g['memory_total_mib']} MiB) {g['uuid']}")
        jobs = run_jobs_demo(c, out)
        rows = []
        for j in sorted(jobs, key=lambda j: j["id"]):
            from gpusched.clock import parse_iso

            secs = (parse_iso(j["ended_at"]) - parse_iso(j["started_at"])
                    if j["started_at"] and j["ended_at"] else None)
            rows.append([j["id"], j["name"], j["status"],
                         ",".join(map(str, j["gpu_indices"])) or "-", duration(secs)])
        out("\n" + table(["ID", "NAME", "STATUS", "GPUS", "RAN"], rows))
        ok = all(j["status"] == "succeeded" for j in jobs)
        out("\nall jobs succeeded" if ok else "\nsome jobs did not succeed")
        return 0 if ok else 1
    finally:
        d.stop()
        if keep:
            out(f"state kept in {state} (GPUSCHED_STATE_DIR={state} gpusched daemon to inspect)")
        else:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
