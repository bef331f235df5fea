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

from gpusched.render import NAME_WIDTH, duration, safe, short_name

#: statuses shown under "Running jobs" and under "Queue"
RUNNING = ("starting", "running", "unknown")
QUEUED = ("queued", "held")
QUEUE_HEAD = 10

_STATE_STYLE = {"idle": "green", "busy": "cyan", "foreign": "yellow", "drained": "magenta",
                "lost": "bold red"}


def _duration(secs: float | None) -> str:
    return "-" if secs is None else duration(secs)


def _bar(done: float, total: float, label: str, width: int = 8) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=max(total, 1e-9), completed=min(done, total), width=width),
                 Text(label, no_wrap=True))
    return grid


def _table(title: str, width: int | None) -> Table:
    """One line per row (cells are cut with an ellipsis, never wrapped), no box: a frame's
    height is its row count plus two lines per table, so it can be fitted to the terminal."""
    return Table(title=title, title_justify="left", expand=True, header_style="bold", box=None,
                 padding=(0, 1), pad_edge=False, width=width)


def _name(job: dict[str, Any], width: int) -> Text:
    """A job's name cut to ``width`` keeping what tells names apart (a pipeline stage's
    ``retrain[threshold=0.2]``), shown literally (no markup)."""
    return Text(short_name(safe(job.get("name")), max(width, 8)), no_wrap=True, overflow="ellipsis")


#: the fixed columns' widths (with their padding) of each table, for the NAME column's share
_GPU_FIXED, _JOB_FIXED, _QUEUE_FIXED = 54, 50, 6


def _gpu_table(gpus: list[dict[str, Any]], width: int | None = None) -> Table:
    t = _table("GPUs", width)
    name_w = (width or 120) - _GPU_FIXED
    for col, kw in (("#", {"justify": "right"}), ("NAME", {"ratio": 1}), ("MEMORY", {}),
                    ("UTIL", {"justify": "right"}), ("TEMP", {"justify": "right"}), ("STATE", {}),
                    ("JOB", {"justify": "right"})):
        t.add_column(col, no_wrap=True, overflow="ellipsis", **kw)
    for g in sorted(gpus, key=lambda g: g.get("index", 0)):
        total = g.get("memory_total_mib") or 0
        used = g.get("memory_used_mib") or 0
        mem: RenderableType = (_bar(used, total, f"{used / 1024:.1f}/{total / 1024:.0f}G")
                               if total else Text("-"))
        util = g.get("utilization_pct")
        temp = g.get("temperature_c")
        state = str(g.get("state") or "-")
        t.add_row(str(g.get("index", "?")),
                  Text(short_name(safe(g.get("name", "")), max(name_w, 8)), no_wrap=True), mem,
                  "-" if util is None else f"{util}%", "-" if temp is None else f"{temp}°C",
                  Text(state, style=_STATE_STYLE.get(state, "")),
                  "" if g.get("job_id") is None else str(g["job_id"]))
    if not gpus:
        t.add_row("", Text("no GPUs", style="dim"), "", "", "", "", "")
    return t


def _gpus_of(job: dict[str, Any]) -> str:
    return ",".join(str(i) for i in job.get("gpu_indices") or []) or "-"


def _first(what: str, shown: int, total: int) -> str:
    return what + (f" (first {shown} of {total})" if shown < total else f" ({total})")


def _jobs_table(jobs: list[dict[str, Any]], width: int | None = None,
                rows: int | None = None) -> Table:
    shown = jobs if rows is None else jobs[:max(rows, 1)]
    t = _table(_first("Running jobs", len(shown), len(jobs)) if rows is not None and jobs
               else "Running jobs", width)
    name_w = (width or 120) - _JOB_FIXED
    for col, kw in (("ID", {"justify": "right"}), ("NAME", {"ratio": 1}), ("STATUS", {}),
                    ("GPUS", {}), ("PROGRESS", {}), ("S/EP", {"justify": "right"}),
                    ("ETA", {"justify": "right"})):
        t.add_column(col, no_wrap=True, overflow="ellipsis", **kw)
    for j in shown:
        p = j.get("progress") or {}
        epoch, max_epoch = p.get("epoch"), p.get("max_epoch")
        progress: RenderableType = (_bar(epoch, max_epoch, f"{epoch}/{max_epoch}")
                                    if epoch is not None and max_epoch else Text("-", style="dim"))
        spe = p.get("s_per_epoch")
        t.add_row(str(j.get("id")), _name(j, name_w), safe(j.get("status", "")), _gpus_of(j),
                  progress, "-" if spe is None else f"{spe:.1f}", _duration(p.get("eta_s")))
    if not jobs:
        t.add_row("", Text("nothing running", style="dim"), "", "", "", "", "")
    return t


def _queue_table(queued: list[dict[str, Any]], width: int | None = None,
                 rows: int | None = None) -> Table:
    limit = QUEUE_HEAD if rows is None else max(min(rows, QUEUE_HEAD), 1)
    shown = queued[:limit]
    t = _table(_first("Queue", len(shown), len(queued)), width)
    # the name gets at most half of the line, the reason the rest (held jobs say so there)
    name_w = min(NAME_WIDTH, ((width or 120) - _QUEUE_FIXED) // 2)
    t.add_column("ID", justify="right", no_wrap=True)
    t.add_column("NAME", no_wrap=True, overflow="ellipsis", max_width=name_w)
    t.add_column("WAITING FOR", ratio=1, no_wrap=True, overflow="ellipsis")
    for j in shown:
        why = safe(j.get("waiting_reason") or j.get("reason"))
        if j.get("status") == "held":
            why = "held" + (f": {why}" if why else " (gpusched release ID)")
        t.add_row(str(j.get("id")), _name(j, name_w),
                  Text(why, style="yellow", no_wrap=True, overflow="ellipsis"))
    if not queued:
        t.add_row("", Text("queue empty", style="dim"), "")
    return t


def render_top(snapshot: dict[str, Any], width: int | None = None,
               height: int | None = None) -> RenderableType:
    """One frame: GPUs, running jobs, the first queued jobs (in the order given). With a
    terminal's ``height`` the frame fits it: every GPU (up to a third of it), then running jobs
    and the queue share the rest, their titles saying how many are left out."""
    gpus = list(snapshot.get("gpus") or [])
    jobs = list(snapshot.get("jobs") or [])
    running = [j for j in jobs if j.get("status") in RUNNING]
    queued = [j for j in jobs if j.get("status") in QUEUED]
    run_rows = queue_rows = None
    if height is not None:
        error_lines = 3 if snapshot.get("error") else 0
        # two lines (title, header) per table, one left for the cursor
        budget = height - 1 - 6 - error_lines
        gpus = gpus[:max(1, min(len(gpus), height // 3))]
        budget -= max(len(gpus), 1)
        run_rows = max(1, min(len(running), budget - min(len(queued), QUEUE_HEAD, budget // 2)))
        queue_rows = max(1, budget - max(run_rows, 1))
    parts: list[RenderableType] = [_gpu_table(gpus, width), _jobs_table(running, width, run_rows),
                                   _queue_table(queued, width, queue_rows)]
    if snapshot.get("error"):
        parts.insert(0, Panel(Text(safe(snapshot["error"]), style="red", no_wrap=True,
                                   overflow="ellipsis"), title="daemon"))
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

    def frame(snapshot: dict[str, Any]) -> RenderableType:
        # on a terminal the frame fits its size; piped (--once > file) every row is printed
        size = console.size
        return render_top(snapshot, width=size.width,
                          height=size.height if console.is_terminal else None)

    if once:
        console.print(frame(fetch()))
        return
    try:
        with Live(frame(_safe_fetch(fetch)), console=console, auto_refresh=False,
                  screen=False, transient=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(frame(_safe_fetch(fetch)), refresh=True)
    except KeyboardInterrupt:
        pass
