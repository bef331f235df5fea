"""``gpusched ls`` without typer (the fast path and the typer command both run it).

By default ``ls`` pages: every starting, running and unknown job, then the head of the queue
(queued, then held jobs, in the planner's order) up to ``LS_HEAD`` rows, and one line saying how
many more are queued or held and how to see them. ``--limit N`` shows N queue rows instead;
``--all`` lists every job, ended ones too (``--all --limit N``: the newest N).
"""

from __future__ import annotations

import os
import sys

from gpusched import render
from gpusched.cli_submit import client, echo, fail
from gpusched.errors import GpuschedError, SpecError

#: queued and held rows ``gpusched ls`` shows by default
LS_HEAD = 30


def more_line(more: dict[str, int], shown: int) -> str | None:
    """What a page left out, and how to see it ('... 99,970 more queued, 5 held not shown
    ...'), or None."""
    pending = [k for k in ("queued", "held") if more.get(k)]
    parts = [f"{more[k]:,} {'more ' if i == 0 else ''}{k}" for i, k in enumerate(pending)]
    ended = sum(v for k, v in more.items() if k not in ("queued", "held"))
    if ended:
        parts.append(f"{ended:,} {'' if parts else 'more '}ended")
    if not parts:
        return None
    above = (f"the first {shown:,} of the queue, in planning order" if pending else
             f"the newest {shown:,}")
    return (f"... {', '.join(parts)} not shown (above: {above}): `gpusched ls --limit N` "
            "shows N, `gpusched ls --all` every job")


def run_list(*, all_: bool, status: str | None, mine: bool, name: str | None,
             limit: int | None, as_json: bool) -> None:
    from urllib.parse import quote

    if limit is not None and limit < 0:
        fail(SpecError(f"--limit {limit}: give a number of jobs (1 or more)"))
    q = []
    if all_:
        q.append("all=1")
    if status:
        q.append(f"status={quote(status)}")
    if mine:
        q.append(f"owner={os.getuid()}")
    if name:
        q.append(f"name={quote(name)}")
    head = None
    if all_:
        if limit:
            q.append(f"limit={limit}")
    else:
        head = limit if limit else LS_HEAD
        q.append(f"head={head}")
    try:
        data = client().get("/v1/jobs?" + "&".join(q))
    except GpuschedError as err:
        fail(err)
    jobs, more = (data["jobs"], data["more"]) if isinstance(data, dict) else (data, {})
    note = more_line(more, head or 0) if head else None
    if as_json:
        render.emit_json(jobs)
        if note:
            echo(f"gpusched: {note}", err=True)
    elif not jobs and not note:
        echo("no jobs" if all_ else "no queued or running jobs (ls --all shows ended ones)")
    else:
        if jobs:
            sys.stdout.write(render.jobs_table(jobs) + "\n")
        if note:
            sys.stdout.write(note + "\n")
        sys.stdout.flush()
