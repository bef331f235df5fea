"""``gpusched top``: a live terminal view of GPUs, running jobs and the head of the queue.

``snapshot`` is a plain dict: ``{"gpus": [GET /v1/gpus rows], "jobs": [job dicts]}``; rich is
imported here only, so the common CLI commands do not pay for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from gpusched.render import duration, safe

#: statuses shown under "Running jobs" and under "Queue"
RUNNING = ("starting", "running", "unknown")
QUEUED = ("queued", "held")
QUEUE_HEAD = 10

_STATE_STYLE = {"idle": "green", "busy": "cyan", "foreign": "yellow", "drained": "magenta",
                "lost": "bold red"}


def _duration(secs: float | None) -> str:
    return "-" if secs is None else duration(secs)


def _bar(done: float, total: float, label: str, width: int = 18) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=max(total, 1e-9), completed=min(done, total), width=width), Text(label))
    return grid


def _gpu_table(gpus: list[dict[str, Any]]) -> Table:
    t = Table(title="GPUs", title_justify="left", expand=True, header_style="bold")
    for col, kw in (("#", {"justify": "right"}), ("NAME", {}), ("MEMORY", {}), ("UTIL", {"justify": "right"}),
                    ("TEMP", {"justify": "right"}), ("STATE", {}), ("JOB", {"justify": "right"})):
        t.add_column(col, **kw)  # type: ignore[arg-type]
    for g in sorted(gpus, key=lambda g: g.get("index", 0)):
        total = g.get("memory_total_mib") or 0
        used = g.get("memory_used_mib") or 0
        mem: RenderableType = (_bar(used, total, f"{used / 1024:.1f}/{total / 1024:.1f} GiB")
                               if total else Text("-"))
        util = g.get("utilization_pct")
        temp = g.get("temperature_c")
        state = str(g.get("state") or "-")
        t.add_row(str(g.get("index", "?")), safe(g.get("name", "")), mem,
                  "-" if util is None else f"{util}%", "-" if temp is None else f"{temp}°C",
                  Text(state, style=_STATE_STYLE.get(state, "")),
                  "" if g.get("job_id") is None else str(g["job_id"]))
    if not gpus:
        t.add_row("", Text("no GPUs", style="dim"), "", "", "", "", "")
    return t


def _gpus_of(job: dict[str, Any]) -> str:
    return ",".join(str(i) for i in job.get("gpu_indices") or []) or "-"


def _jobs_table(jobs: list[dict[str, Any]]) -> Table:
    t = Table(title="Running jobs", title_justify="left", expand=True, header_style="bold")
    for col, kw in (("ID", {"justify": "right"}), ("NAME", {}), ("STATUS", {}), ("GPUS", {}),
                    ("PROGRESS", {}), ("S/EPOCH", {"justify": "right"}), ("ETA", {"justify": "right"})):
        t.add_column(col, **kw)  # type: ignore[arg-type]
    for j in jobs:
        p = j.get("progress") or {}
        epoch, max_epoch = p.get("epoch"), p.get("max_epoch")
        progress: RenderableType = (_bar(epoch, max_epoch, f"epoch {epoch}/{max_epoch}")
                                    if epoch is not None and max_epoch else Text("-", style="dim"))
        spe = p.get("s_per_epoch")
        t.add_row(str(j.get("id")), Text(safe(j.get("name"))), safe(j.get("status", "")), _gpus_of(j),
                  progress, "-" if spe is None else f"{spe:.1f}", _duration(p.get("eta_s")))
    if not jobs:
        t.add_row("", Text("nothing running", style="dim"), "", "", "", "", "")
    return t


def _queue_table(queued: list[dict[str, Any]]) -> Table:
    more = len(queued) - QUEUE_HEAD
    title = "Queue" + (f" (first {QUEUE_HEAD} of {len(queued)})" if more > 0 else f" ({len(queued)})")
    t = Table(title=title, title_justify="left", expand=True, header_style="bold")
    t.add_column("ID", justify="right")
    t.add_column("NAME")
    t.add_column("STATUS")
    t.add_column("WAITING FOR", ratio=1)
    for j in queued[:QUEUE_HEAD]:
        t.add_row(str(j.get("id")), Text(safe(j.get("name"))), safe(j.get("status", "")),
                  Text(safe(j.get("waiting_reason")), style="yellow"))
    if not queued:
        t.add_row("", Text("queue empty", style="dim"), "", "")
    return t


def render_top(snapshot: dict[str, Any]) -> RenderableType:
    """One frame: GPUs, running jobs, the first queued jobs (in the order given)."""
    gpus = list(snapshot.get("gpus") or [])
    jobs = list(snapshot.get("jobs") or [])
    running = [j for j in jobs if j.get("status") in RUNNING]
    queued = [j for j in jobs if j.get("status") in QUEUED]
    parts: list[RenderableType] = [_gpu_table(gpus), _jobs_table(running), _queue_table(queued)]
    if snapshot.get("error"):
        parts.insert(0, Panel(Text(safe(snapshot["error"]), style="red"), title="daemon"))
    return Group(*parts)


def _safe_fetch(fetch: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fetch()
    except Exception as err:  # the view keeps running while the daemon restarts
        return {"gpus": [], "jobs": [], "error": f"cannot reach the daemon: {err}"}


def run_top(fetch: Callable[[], dict[str, Any]], interval_s: float = 1.0, once: bool = False,
            console: Console | None = None) -> None:
    """Refresh the view every ``interval_s`` until Ctrl-C; ``once`` prints one frame and returns."""
    console = console or Console()
    if once:
        console.print(render_top(fetch()))
        return
    try:
        with Live(render_top(_safe_fetch(fetch)), console=console, auto_refresh=False,
                  screen=False, transient=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(render_top(_safe_fetch(fetch)), refresh=True)
    except KeyboardInterrupt:
        pass
