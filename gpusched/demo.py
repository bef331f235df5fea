"""``gpusched demo``: the full TAO pipeline of the source workflow on simulated GPUs.

A real daemon on a temporary state directory with a simulated RTX A4000 and RTX 2070 runs the
example pipeline (train SSD-ResNet18 for 80 epochs with a checkpoint every 10, pick the best
epoch, evaluate, prune at three thresholds in parallel, retrain, evaluate, gate) on the fake TAO
at scaled time, with live progress, and ends with the pipeline's summary and the per-GPU epoch
times. Nothing outside the temporary directory is touched.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from gpusched import reports, throughput
from gpusched.client import Client
from gpusched.render import pipeline_detail
from gpusched.testing.harness import DaemonProcess, fake_tao_env, short_tmpdir

# the seed's box, with the prior speeds placement starts from (the A4000 1.4× the 2070)
DEMO_GPUS = "RTX A4000:16G:1.40,RTX 2070:8G:1.0"
SCALE = 0.004  # 48 s/epoch on the A4000 becomes 0.19 s


def examples() -> Traversable:
    """The example pipeline and specs shipped in the package (``gpusched/data/examples``, the
    same files as the checkout's ``examples/``), so the demo runs from a wheel too."""
    return resources.files("gpusched") / "data" / "examples"


def copy_examples(src: Traversable, dst: Path) -> None:
    """Copy the pipeline and its specs (``*.toml``, ``*.txt``; no Python files) into ``dst``."""
    if not src.joinpath("ssd_resnet18_kitti.toml").is_file():
        raise FileNotFoundError(f"the demo's pipeline is missing from the package: {src}")
    _copy_tree(src, dst)


def _copy_tree(src: Traversable, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            if item.name != "__pycache__":
                _copy_tree(item, dst / item.name)
        elif item.name.endswith((".toml", ".txt")):
            (dst / item.name).write_bytes(item.read_bytes())


def wait_for_gpus(c: Client, timeout_s: float = 20) -> list[dict[str, Any]]:
    """The daemon's GPUs once its first inventory is in (it serves before that: the list
    printed right after start-up was empty)."""
    deadline = time.monotonic() + timeout_s
    while True:
        gpus: list[dict[str, Any]] = c.get("/v1/gpus")
        if gpus or time.monotonic() > deadline:
            return gpus
        time.sleep(0.05)


def report_html(stats: list[throughput.SetStats], recs: list[str], spans: list[dict[str, Any]],
                gpus: list[dict[str, Any]], now: float) -> str:
    """The run's HTML report: busy fractions over the run itself (its first start to now, not
    since 1970), the GPU list, and the times labelled as scaled and the GPUs as simulated."""
    starts = [s["started_at"] for s in spans if s.get("started_at")]
    since = min(starts) if starts else now
    return reports.html_report(stats, recs,
                               throughput.busy_fraction(spans, gpus, since, now), spans, gpus,
                               since, now, title="gpusched demo report", time_scale=SCALE)


def _progress_line(p: dict[str, Any]) -> str:
    parts = []
    for j in p["jobs"]:
        stage = (j["name"] or "").split("/", 1)[-1]
        prog = j.get("progress") or {}
        if j["status"] == "running":
            gpus = ",".join(map(str, j["gpu_indices"]))
            where = (f" {prog['epoch']}/{prog['max_epoch']}" if prog.get("max_epoch") else "")
            parts.append(f"{stage}@GPU{gpus}{where}")
    done = sum(j["status"] == "succeeded" for j in p["jobs"])
    return f"  [{done}/{len(p['jobs'])} done] " + ("  ".join(parts) or "(between stages)")


def follow_pipeline(c: Client, pid: int, out: Callable[[str], None],
                    timeout_s: float = 600) -> dict[str, Any]:
    seen: dict[int, str] = {}
    last = 0.0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        p = c.get(f"/v1/pipelines/{pid}")
        for j in p["jobs"]:
            if seen.get(j["id"]) != j["status"] and j["status"] not in ("queued",):
                seen[j["id"]] = j["status"]
                stage = (j["name"] or "").split("/", 1)[-1]
                gpus = ",".join(map(str, j["gpu_indices"])) or "-"
                extra = f" ({j['reason']})" if j["status"] not in ("running", "succeeded") and \
                    j.get("reason") else ""
                out(f"  job {j['id']:>3} {stage:<36} {j['status']:<10} GPUs {gpus}{extra}")
        if p["status"] != "running":
            return dict(p)
        if time.monotonic() - last >= 3:
            out(_progress_line(p))
            last = time.monotonic()
        time.sleep(0.25)
    raise TimeoutError(f"the pipeline did not finish within {timeout_s:.0f} s")


def main(keep: bool = False, out: Callable[[str], None] = print) -> int:
    state = short_tmpdir("gpusched-demo-")
    try:
        return _run(state, keep, out)
    finally:
        if keep:
            out(f"state kept in {state}; inspect it with: GPUSCHED_STATE_DIR={state} "
                f"GPUSCHED_TAO__RUNNER=local gpusched daemon --simulate-gpus {DEMO_GPUS!r}")
        else:
            shutil.rmtree(state, ignore_errors=True)


def _run(state: Path, keep: bool, out: Callable[[str], None]) -> int:
    work = state / "work"
    copy_examples(examples(), work)
    env = fake_tao_env([str(state)])
    out(f"gpusched demo: a daemon on simulated GPUs {DEMO_GPUS!r}, state and experiments in "
        f"{state}")
    out(f"running the fake TAO at {SCALE:g}× real time (RTX A4000 48 s/epoch, RTX 2070 67 s, "
        "both 40 s)")
    d = DaemonProcess(state, simulate=DEMO_GPUS, env=env)
    t0 = time.monotonic()
    try:
        d.start()
        c = d.client()
        for g in wait_for_gpus(c):
            kind = " simulated" if g.get("simulated") else ""
            out(f"  GPU {g['index']}: {g['name']} ({g['memory_total_mib']} MiB{kind}) {g['uuid']}")
        toml_path = work / "ssd_resnet18_kitti.toml"
        import tomllib

        body = {"definition": tomllib.loads(toml_path.read_text()), "base_dir": str(work),
                "env": {"GPUSCHED_FAKE_TAO_SCALE": str(SCALE)}}
        p = c.post("/v1/pipelines", body)
        out(f"\n$ gpusched pipeline run {toml_path}\npipeline {p['id']} queued with "
            f"{len(p['jobs'])} stages: train (2 GPUs) -> evaluate -> prune at 0.1/0.2/0.3 -> "
            "retrain -> evaluate -> gate\n")
        p = follow_pipeline(c, p["id"], out)
        out(f"\n$ gpusched pipeline status {p['id']}")
        out(pipeline_detail(p))
        epochs = c.get("/v1/epochs")
        gpus = c.get("/v1/gpus")
        stats = throughput.summarize(epochs)
        model = reports.speed_model(epochs, gpus)
        recs = reports.advice(stats, model)
        out("\n$ gpusched report throughput   (per-GPU epoch times of this run, scaled time)")
        out(reports.throughput_table(
            stats, recs, model=model, gpu_names=[g["name"] for g in gpus],
            notes=[*reports.gpu_notes(gpus),
                   f"the fake TAO ran at {SCALE:g}× real time: divide the seconds by {SCALE:g} "
                   "for the real box (epochs/h: multiply by it)"]))
        if keep:
            html = state / "report.html"
            html.write_text(report_html(stats, recs, c.get("/v1/spans?since=0"), gpus,
                                        time.time()))
            out(f"\nHTML report: {html}")
        out(f"\ndemo finished in {time.monotonic() - t0:.0f} s: pipeline {p['status']}")
        return 0 if p["status"] == "succeeded" and p.get("summary") else 1
    finally:
        d.stop()


if __name__ == "__main__":
    sys.exit(main())


