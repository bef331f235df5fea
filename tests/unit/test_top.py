"""``gpusched top``: one frame rendered to a recording console."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from gpusched.top import render_top, run_top

SNAPSHOT: dict[str, Any] = {
    "gpus": [
        {"index": 0, "uuid": "GPU-a", "name": "NVIDIA RTX A4000", "memory_total_mib": 16376,
         "memory_used_mib": 9830, "utilization_pct": 97, "temperature_c": 71, "state": "busy", "job_id": 42},
        {"index": 1, "uuid": "GPU-b", "name": "NVIDIA GeForce RTX 2070", "memory_total_mib": 8192,
         "memory_used_mib": 2, "utilization_pct": None, "temperature_c": None, "state": "drained",
         "job_id": None},
    ],
    "jobs": [
        {"id": 42, "name": "ssd-kitti", "status": "running", "gpu_indices": [0],
         "progress": {"epoch": 12, "max_epoch": 80, "s_per_epoch": 48.2, "eta_s": 3278},
         "waiting_reason": None},
        {"id": 43, "name": "[bold]no markup[/bold]", "status": "starting", "gpu_indices": [],
         "progress": None},
        *[{"id": 100 + i, "name": f"queued-{i}", "status": "queued", "gpu_indices": [], "progress": None,
           "waiting_reason": "needs 2 GPUs with 12 GiB free"} for i in range(12)],
        {"id": 99, "name": "done", "status": "succeeded", "gpu_indices": [0], "progress": None},
    ],
}


def frame(snapshot: dict[str, Any]) -> str:
    console = Console(record=True, width=120, color_system=None)
    console.print(render_top(snapshot))
    return console.export_text()


def test_frame_shows_gpus_jobs_and_queue_head() -> None:
    text = frame(SNAPSHOT)
    assert "NVIDIA RTX A4000" in text and "9.6/16G" in text and "97%" in text and "71°C" in text
    assert "drained" in text and "busy" in text
    assert "ssd-kitti" in text and "12/80" in text and "48.2" in text and "54m38s" in text
    assert "[bold]no markup[/bold]" in text  # job names are shown literally, never as markup
    assert "Queue (first 10 of 12)" in text
    assert "queued-9" in text and "queued-10" not in text
    assert "needs 2 GPUs with 12 GiB free" in text
    assert "done" not in text.split("Queue")[1]


def test_empty_snapshot() -> None:
    text = frame({"gpus": [], "jobs": []})
    assert "no GPUs" in text and "nothing running" in text and "queue empty" in text


def test_run_top_once_prints_one_frame() -> None:
    console = Console(record=True, width=120, color_system=None)
    calls = []

    def fetch() -> dict[str, Any]:
        calls.append(1)
        return SNAPSHOT

    run_top(fetch, once=True, console=console)
    assert calls == [1]
    assert "ssd-kitti" in console.export_text()


def _busy_snapshot() -> dict[str, Any]:
    """Four GPUs, long pipeline stage names, long waiting reasons and a queue of 30."""
    gpus = [{**SNAPSHOT["gpus"][i % 2], "index": i, "uuid": f"GPU-{i}"} for i in range(4)]
    stage = "ssd_resnet18_kitti/retrain[threshold=0.{}]"
    running = [{"id": i, "name": stage.format(i), "status": "running", "gpu_indices": [i],
                "progress": {"epoch": 12, "max_epoch": 80, "s_per_epoch": 48.2, "eta_s": 3278}}
               for i in range(1, 4)]
    queued = [{"id": 10 + i, "name": f"ssd_resnet18_kitti/evaluate_retrained[threshold=0.{i}]",
               "status": "queued", "gpu_indices": [], "progress": None,
               "waiting_reason": f"after job {i} retrain[threshold=0.{i}] (running)"}
              for i in range(30)]
    queued[5]["waiting_reason"] = ("the docker runner is unavailable: Error while fetching "
                                   "server API version: connection refused")
    queued[6].update(status="held", waiting_reason=None, reason=None)
    return {"gpus": gpus, "jobs": [*running, *queued]}


def test_top_fits_80x24() -> None:
    """At 80x24 nothing is cut off the bottom or wrapped, names keep their stage, and the queue
    says how many rows it left out."""
    console = Console(record=True, width=80, height=24, color_system=None, force_terminal=True)
    run_top(_busy_snapshot, once=True, console=console)
    lines = console.export_text().rstrip("\n").split("\n")
    assert len(lines) <= 23, f"{len(lines)} lines:\n" + "\n".join(lines)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert lines[0].startswith("GPUs")
    assert sum(1 for line in lines if "NVIDIA" in line) == 4  # every GPU, one line each
    assert "…/retrain[threshold=0.1]" in text  # the stage and branch survive the cut
    assert "evaluate_retrained[threshold=0.0]" in text
    assert "Running jobs (3)" in text
    queue = text.split("Queue (first ")[1]
    assert queue.startswith(tuple(f"{n} of 30)" for n in range(1, 11)))
    assert "after job 0 retrain[threshold=0.0]" in queue  # the upstream stage, named
    assert "the docker runner is unavailable" in queue
    assert "held (gpusched release ID)" in queue


def test_top_piped_prints_every_row() -> None:
    """Not a terminal (``top --once > file``): the whole queue head, not fitted to a height."""
    console = Console(record=True, width=80, height=24, color_system=None)
    run_top(_busy_snapshot, once=True, console=console)
    text = console.export_text()
    assert "Queue (first 10 of 30)" in text
