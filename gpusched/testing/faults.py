"""Fault injection and invariant checks for the reliability tests (tests/reliability).

``check_invariants`` reads the state database directly and returns every violation of the
promises in the reliability document ("invariants" = integrity ok, every job in exactly one
known state, no job with two live attempts, allocations = GPUs of live attempts). It is meant
to run while no daemon writes (after a ``kill -9``, between ticks), when the database must be
consistent on its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from gpusched.states import ACTIVE, JobStatus

KNOWN_STATUSES = frozenset(s.value for s in JobStatus)
ACTIVE_STATUSES = frozenset(s.value for s in ACTIVE)


def check_invariants(db: Path | str | sqlite3.Connection, *, integrity: bool = True,
                     drained: bool = False) -> list[str]:
    """Every violated invariant, as a sentence; ``[]`` when all hold.

    With ``drained`` (no work left) there must also be no active job, no starting or live
    attempt and no allocation at all."""
    if isinstance(db, sqlite3.Connection):
        conn, own = db, False
    else:
        conn, own = sqlite3.connect(str(db), timeout=30), True
    out: list[str] = []
    try:
        if integrity:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
            if [r[0] for r in rows] != ["ok"]:
                out.append(f"integrity_check: {'; '.join(str(r[0]) for r in rows[:5])}")
        conn.execute("BEGIN")  # one snapshot for everything below
        try:
            jobs = {r[0]: (r[1], r[2]) for r in
                    conn.execute("SELECT id, status, attempt FROM jobs")}
            attempts = conn.execute("SELECT job_id, n, state, gpus FROM attempts").fetchall()
            allocs = conn.execute("SELECT gpu_uuid, job_id, attempt, releasing_since"
                                  " FROM allocations").fetchall()
        finally:
            conn.execute("COMMIT")
    finally:
        if own:
            conn.close()
    for job_id, (status, _) in jobs.items():
        if status not in KNOWN_STATUSES:
            out.append(f"job {job_id} has unknown status {status!r}")
    live: dict[int, list[tuple[int, str]]] = {}
    ended: set[tuple[int, int]] = set()
    for job_id, n, state, _gpus in attempts:
        if job_id not in jobs:
            out.append(f"attempt {n} of job {job_id} has no job row")
        if state in ("starting", "live"):
            live.setdefault(job_id, []).append((n, state))
        elif state == "ended":
            ended.add((job_id, n))
        else:
            out.append(f"job {job_id} attempt {n} has unknown state {state!r}")
    for job_id, lst in live.items():
        if len(lst) > 1:
            out.append(f"job {job_id} has {len(lst)} live attempts at once: {lst}")
    for job_id, (status, attempt) in jobs.items():
        lst = live.get(job_id, [])
        if status in ACTIVE_STATUSES:
            if [n for n, _ in lst] != [attempt]:
                out.append(f"job {job_id} is {status} (attempt {attempt}) but its live attempts "
                           f"are {lst}")
        elif lst:
            out.append(f"job {job_id} is {status} yet has live attempts {lst}")
    counts = Counter(a[0] for a in allocs)
    out += [f"GPU {g} allocated {c} times" for g, c in counts.items() if c > 1]
    held = sorted((g, j, n) for g, j, n, since in allocs if since is None)
    expected = sorted((g, j, n) for j, n, state, gpus in attempts if state in ("starting", "live")
                      for g in json.loads(gpus))
    if held != expected:
        out.append(f"allocations {held} != GPUs of live attempts {expected}")
    for g, j, n, since in allocs:
        if since is not None and (j, n) not in ended:
            out.append(f"GPU {g} is releasing for job {j} attempt {n}, which has not ended")
    if drained:
        if live:
            out.append(f"drained, yet live attempts remain: {live}")
        if allocs:
            out.append(f"drained, yet allocations remain: {allocs}")
        active = {j: s for j, (s, _) in jobs.items() if s in ACTIVE_STATUSES or s == "queued"}
        if active:
            out.append(f"drained, yet jobs are still queued or active: {active}")
    return out


def fill_filesystem(directory: Path, name: str = "filler", chunk: int = 1 << 20) -> Path:
    """Write zeros into ``directory/name`` until the filesystem is full (ENOSPC); returns the
    file. Smaller and smaller writes take the last free bytes too."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = chunk
        while size >= 1:
            try:
                os.write(fd, b"\0" * size)
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                size //= 2
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
    return path


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``directory`` (root only); unmounted on exit, lazily if
    something still holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                    str(directory)], check=True, capture_output=True, timeout=30)
    try:
        yield directory
    finally:
        r = subprocess.run(["umount", str(directory)], capture_output=True, timeout=30)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30)
