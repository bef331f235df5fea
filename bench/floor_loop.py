"""The floor of section 1: the least a durable scheduler written in Python does per no-op job.

One process, no daemon, no API, no planner: ``N`` queued rows in a WAL SQLite file with
``synchronous=FULL``, two slots, and for each job what gpusched must do too: its claim (status,
attempt row, event) committed before its process exists, a folder with its log file and its
exit file (gpusched's layout: ``logs/<job>/<n>.log`` and ``<n>.exit``), the same ``/bin/sh``
shim gpusched starts (it writes the exit status to that file), a pidfd to wake on, the exit
file read back, and its end (status, attempt, event) committed. A tick reaps
every ended job and claims the next ones in one transaction (group commit), as gpusched does.

What it leaves out, and gpusched cannot: the planner (speed model, reservations, backfill),
users (uid switch, passwd lookups, safe reads of user files), epoch parsing, notifications,
retries, the pending-launch records, reconcile. So its figure is an upper bound for a Python
scheduler on this machine, printed beside gpusched's and task-spooler's.

    python bench/floor_loop.py [N] [STATE_DIR]      prints one JSON line
"""

from __future__ import annotations

import json
import os
import resource
import select
import sqlite3
import subprocess
import sys
import tempfile
import time

SHIM_NAME = "gpusched-shim"
# the local runner's shim text (gpusched.runners.local.SHIM), copied so this file runs alone
SHIM = ('d=$1; f=$2; shift 2; trap : TERM INT HUP; cd -- "$d" || '
        '{ printf "126 cd\\n" > "$f"; exit 126; }; "$@"; s=$?; printf "%s\\n" $s > "$f"; exit $s')


def drain(n: int, root: str, slots: int = 2) -> dict[str, float]:
    db = sqlite3.connect(os.path.join(root, "floor.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript("""
        CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT NOT NULL, attempt INTEGER
                           NOT NULL DEFAULT 0, started_at REAL, ended_at REAL, exit_code INTEGER);
        CREATE TABLE attempts (job_id INTEGER NOT NULL, n INTEGER NOT NULL, state TEXT NOT NULL,
                               pid INTEGER, PRIMARY KEY (job_id, n));
        CREATE TABLE events (id INTEGER PRIMARY KEY, job_id INTEGER, to_status TEXT, at REAL);
        CREATE INDEX jobs_status ON jobs(status, id);
    """)
    db.execute("BEGIN")
    db.executemany("INSERT INTO jobs (id, status) VALUES (?, 'queued')",
                   [(i,) for i in range(1, n + 1)])
    db.execute("COMMIT")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    running: dict[int, tuple[int, subprocess.Popen[bytes], int]] = {}  # pidfd -> job, proc, slot
    free = list(range(slots))
    done = 0
    marks: list[int] = []
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    while done < n:
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        for job in marks:  # the launches of the last tick, as gpusched records them
            db.execute("UPDATE attempts SET state = 'live' WHERE job_id = ? AND n = 1", (job,))
            db.execute("UPDATE jobs SET status = 'running' WHERE id = ?", (job,))
        for pfd, (job, proc, slot) in list(running.items()):
            if proc.poll() is None:
                continue
            with open(os.path.join(root, "logs", str(job), "1.exit"), "rb") as fh:
                code = int(fh.read().split()[0])
            db.execute("UPDATE attempts SET state = 'ended' WHERE job_id = ? AND n = 1", (job,))
            db.execute("UPDATE jobs SET status = ?, ended_at = ?, exit_code = ? WHERE id = ?",
                       ("succeeded" if code == 0 else "failed", now, code, job))
            db.execute("INSERT INTO events (job_id, to_status, at) VALUES (?, 'succeeded', ?)",
                       (job, now))
            del running[pfd]
            os.close(pfd)
            free.append(slot)
            done += 1
        todo = []
        if free:
            for (job,) in db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY id"
                                     " LIMIT ?", (len(free),)).fetchall():
                db.execute("UPDATE jobs SET status = 'starting', attempt = 1, started_at = ?"
                           " WHERE id = ?", (now, job))
                db.execute("INSERT INTO attempts (job_id, n, state) VALUES (?, 1, 'starting')",
                           (job,))
                db.execute("INSERT INTO events (job_id, to_status, at) VALUES (?, 'starting', ?)",
                           (job, now))
                todo.append((job, free.pop()))
        db.execute("COMMIT")  # the claims are durable before their processes exist
        for job, slot in todo:
            logs = os.path.join(root, "logs", str(job))
            os.mkdir(logs, 0o711)
            exit_file = os.path.join(logs, "1.exit")
            os.close(os.open(exit_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            fd = os.open(os.path.join(logs, "1.log"),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                proc = subprocess.Popen(["/bin/sh", "-c", SHIM, SHIM_NAME, "/tmp", exit_file,
                                         "true"], stdin=subprocess.DEVNULL, stdout=fd,
                                        stderr=subprocess.STDOUT, cwd="/", env=env,
                                        start_new_session=True, close_fds=True)
            finally:
                os.close(fd)
            running[os.pidfd_open(proc.pid)] = (job, proc, slot)
        marks = [job for job, _ in todo]  # recorded in the next tick's transaction
        if running and done < n:
            select.select(list(running), [], [], 5.0)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    db.close()
    return {"jobs": n, "wall_s": wall, "jobs_per_s": n / wall, "cpu_ms_per_job": cpu / n * 1000}


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 900
    root = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="gsfloor", dir="/tmp")
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    print(json.dumps(drain(n, root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
