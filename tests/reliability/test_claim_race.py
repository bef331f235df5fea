"""Scenario 8: the claim race.

Many claimers (threads in this process and worker processes, each with its own ``Store`` and so
its own SQLite connection) fight over thousands of queued 1/2/4-GPU jobs on 8 fake GPUs. They
pick GPU sets at random *without looking at what is free*, so most claims collide and only the
store's transaction and the ``allocations.gpu_uuid`` primary key keep them apart. Proves: each
job is claimed at most once, a multi-GPU claim gets all of its GPUs or none (never a partial set
of allocation rows, checked by a concurrent snapshot checker), a GPU is never allocated twice
(checked by every claimer at every release point), and collisions really happened.

Run as a script (``python test_claim_race.py DB SEED SECONDS OUT``), this file is a worker process.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gpusched.models import GpuRequest, JobSpec
from gpusched.states import JobStatus
from gpusched.store import Store

GPUS = [f"GPU-fake-{i:02d}" for i in range(8)]
N_JOBS = 3000
THREADS = 4
PROCESSES = 3
SECONDS = 12.0


def paths(job_id: int, n: int) -> tuple[str, str]:
    return f"/nonexistent/logs/{job_id}/{n}.log", f"/nonexistent/runs/{job_id}/{n}"


def claimer(db: Path, seed: int, seconds: float) -> dict[str, Any]:
    """Claim random queued jobs on random GPU sets; verify and release what was won."""
    rng = random.Random(seed)
    store = Store(db)
    won: list[tuple[int, int, list[str]]] = []
    held: list[tuple[int, int, list[str]]] = []
    errors: list[str] = []
    tries = collisions = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            queued = store.query("SELECT id, request FROM jobs WHERE status = 'queued'"
                                 " ORDER BY random() LIMIT 8")
            if not queued:
                break
            for row in queued:
                count = GpuRequest.model_validate_json(row["request"]).count
                gpus = rng.sample(GPUS, count)
                tries += 1
                n = store.claim(row["id"], gpus, runner="local", now=time.time(), paths=paths)
                if n is None:
                    # one statement, one snapshot: a job still queued holds no allocation rows
                    st = store.query("SELECT status, (SELECT count(*) FROM allocations WHERE"
                                     " job_id = ?) AS rows FROM jobs WHERE id = ?",
                                     [row["id"], row["id"]])[0]
                    if st["status"] == "queued":
                        collisions += 1  # a GPU was taken: the whole claim rolled back
                        if st["rows"]:
                            errors.append(f"job {row['id']} is queued yet holds {st['rows']} "
                                          "allocation rows (partial claim)")
                    continue
                won.append((row["id"], n, gpus))
                held.append((row["id"], n, gpus))
            # release point: what I hold must still be mine, all of it, and only once
            rng.shuffle(held)
            keep = rng.randint(0, 2)
            while len(held) > keep:
                job_id, n, gpus = held.pop()
                marks = ",".join("?" * len(gpus))
                rows = store.query(
                    f"SELECT gpu_uuid, job_id, attempt FROM allocations WHERE gpu_uuid IN ({marks})",
                    gpus)
                mine = sorted((r["gpu_uuid"], r["job_id"], r["attempt"]) for r in rows)
                if mine != sorted((g, job_id, n) for g in gpus):
                    errors.append(f"job {job_id} attempt {n} should hold {gpus}, allocations "
                                  f"show {mine}")
                per_gpu = store.query("SELECT gpu_uuid, count(*) AS c FROM allocations"
                                      " GROUP BY gpu_uuid HAVING c > 1")
                if per_gpu:
                    errors.append(f"GPU allocated twice: {per_gpu}")
                if not store.finish_attempt(job_id, n, to=JobStatus.SUCCEEDED, now=time.time(),
                                            ended_at=time.time(), exit_code=0, reason=None):
                    errors.append(f"job {job_id} attempt {n} had already ended")
        for job_id, n, _ in held:
            store.finish_attempt(job_id, n, to=JobStatus.SUCCEEDED, now=time.time(),
                                 ended_at=time.time(), exit_code=0, reason=None)
    finally:
        store.close()
    return {"won": won, "errors": errors, "tries": tries, "collisions": collisions}


def snapshot_checker(db: Path, stop: threading.Event, out: dict[str, Any]) -> None:
    """In one read transaction (a consistent snapshot) at a time: allocations are exactly the
    GPU sets of the attempts that are starting, whole sets only, and each GPU at most once."""
    conn = sqlite3.connect(str(db), isolation_level=None, timeout=30)
    checks = 0
    try:
        while not stop.is_set():
            conn.execute("BEGIN")
            allocs = conn.execute("SELECT gpu_uuid, job_id, attempt FROM allocations").fetchall()
            starting = conn.execute("SELECT job_id, n, gpus FROM attempts"
                                    " WHERE state = 'starting'").fetchall()
            conn.execute("COMMIT")
            expected = sorted((g, j, n) for j, n, gpus in starting for g in json.loads(gpus))
            if sorted(allocs) != expected:
                out["errors"].append(f"snapshot: allocations {sorted(allocs)} != GPUs of "
                                     f"starting attempts {expected}")
            gpu_counts = Counter(g for g, _, _ in allocs)
            if any(c > 1 for c in gpu_counts.values()):
                out["errors"].append(f"snapshot: GPU allocated twice {gpu_counts}")
            checks += 1
            time.sleep(0.005)
    finally:
        conn.close()
    out["checks"] = checks


def test_claim_race(tmp_path: Path, figures: dict[str, Any]) -> None:
    db = tmp_path / "race.db"
    store = Store(db)
    rng = random.Random(8)
    counts = [rng.choice((1, 1, 2, 2, 4)) for _ in range(N_JOBS)]
    spec_json = {c: JobSpec(command=["true"], gpus=GpuRequest(count=c)) for c in (1, 2, 4)}
    now = time.time()
    with store.write() as conn:  # thousands of queued jobs in one go (submit() fsyncs each)
        conn.executemany(
            "INSERT INTO jobs (owner_uid, owner, status, runner, spec, request, submitted_at,"
            " updated_at) VALUES (0, 'race', 'queued', 'local', ?, ?, ?, ?)",
            [(spec_json[c].model_dump_json(), spec_json[c].gpus.model_dump_json(), now, now)
             for c in counts])
    # the constraint itself: a second row for an allocated GPU is refused by SQLite
    indexes = store.query("PRAGMA index_list(allocations)")
    assert any(i["unique"] for i in indexes), indexes
    store.close()

    check: dict[str, Any] = {"errors": []}
    stop = threading.Event()
    checker = threading.Thread(target=snapshot_checker, args=(db, stop, check), daemon=True)
    checker.start()
    procs = [subprocess.Popen([sys.executable, __file__, str(db), str(100 + i), str(SECONDS),
                               str(tmp_path / f"w{i}.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(PROCESSES)]
    results: list[dict[str, Any]] = [{} for _ in range(THREADS)]

    def run(i: int) -> None:
        results[i] = claimer(db, i, SECONDS)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 60)
        assert not t.is_alive(), "a claimer thread hung"
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=SECONDS + 60)
        assert p.returncode == 0, f"worker {i} failed:\n{out}\n{err}"
        results.append(json.loads((tmp_path / f"w{i}.json").read_text()))
    stop.set()
    checker.join(30)

    errors = [e for r in results for e in r["errors"]] + check["errors"]
    assert not errors, errors[:10]
    won = [(j, n, tuple(g)) for r in results for j, n, g in r["won"]]
    claimed = Counter(j for j, _, _ in won)
    twice = {j: c for j, c in claimed.items() if c > 1}
    assert not twice, f"jobs claimed more than once: {twice}"
    assert all(len(g) == counts[j - 1] for j, _, g in won), "a claim got the wrong GPU count"
    tries = sum(r["tries"] for r in results)
    collisions = sum(r["collisions"] for r in results)
    assert len(won) > 300 and collisions > 100, (len(won), collisions)
    assert check["checks"] > 10

    store = Store(db)
    try:
        assert store.integrity_check() == "ok"
        assert store.allocations() == []
        rows = store.query("SELECT id, status, attempt FROM jobs WHERE attempt > 0")
        assert {r["id"] for r in rows} == set(claimed)
        assert all(r["attempt"] == 1 and r["status"] == "succeeded" for r in rows)
        per_job = store.query("SELECT job_id, count(*) AS c FROM attempts GROUP BY job_id"
                              " HAVING c > 1")
        assert per_job == []
    finally:
        store.close()
    figures["claim race: claims won / tries (GPU collisions rolled back)"] = (
        f"{len(won)} / {tries} ({collisions}), {THREADS} threads + {PROCESSES} processes, "
        f"{check['checks']} snapshot checks")


if __name__ == "__main__":
    _db, _seed, _seconds, _out = sys.argv[1:5]
    result = claimer(Path(_db), int(_seed), float(_seconds))
    Path(_out).write_text(json.dumps(result))
    os._exit(0)
