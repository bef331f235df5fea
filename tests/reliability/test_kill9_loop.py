"""Scenario 7: the daemon is ``kill -9``ed at random moments, over and over, under load.

The real daemon (a subprocess on two simulated GPUs) is killed ``KILLS`` times (200 by default;
``GPUSCHED_RELIABILITY_KILLS`` changes it), each time 50-400 ms (seeded RNG) after it answered
its first health check, and restarted at once. Meanwhile four client processes submit short 1-
and 2-GPU local jobs, cancel, release and list without pause (three through the ``Client``
library, one through the ``gpusched`` CLI). Every job appends ``<job> <attempt>`` to a shared
marker file, so a job that ran twice shows.

After every kill, while no daemon writes, the database must satisfy the invariants on its own
(``gpusched.testing.faults.check_invariants``: integrity, one state per job, at most one live
attempt per job, an active job has exactly its current attempt live, allocations = GPUs of the
live attempts). At the end the daemon drains the queue and the test proves: every acknowledged
id exists (promise 1), nothing is left active or allocated (2, 5), no attempt ran twice and no
job ran in two attempts (3), every job ended (or is held because it was submitted held), no job
was LOST, and clients only ever saw success, an expected refusal or the clear, retryable
"daemon is not running" answer: never a traceback or another error.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gpusched.client import Client
from gpusched.errors import DaemonUnavailable
from gpusched.testing.faults import check_invariants
from gpusched.testing.harness import DaemonProcess

KILLS = int(os.environ.get("GPUSCHED_RELIABILITY_KILLS", "200"))
CLIENTS = 4
SEED = int(os.environ.get("GPUSCHED_RELIABILITY_SEED", "7"))
CLIENT_SCRIPT = Path(__file__).with_name("kill_loop_client.py")
RETRYABLE = {"DaemonUnavailable"}
REFUSALS = {("cancel", "Conflict"), ("release", "Conflict")}  # the job had moved on
TERMINAL = {"succeeded", "failed", "cancelled", "lost"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def wait_drained(d: DaemonProcess, timeout: float) -> None:
    client = d.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = client.get("/v1/jobs?status=queued,starting,running,unknown")
        if not rows:
            return
        time.sleep(0.5)
    raise AssertionError(f"the queue did not drain in {timeout}s: {len(rows)} jobs left, e.g. "
                         f"{rows[:3]}\n{d.log()}")


@pytest.mark.timeout(1500)
def test_200_kill9_under_load(state_dir: Path, figures: dict[str, Any],
                              capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(SEED)
    work = state_dir / "work"
    work.mkdir()
    marker = work / "markers"
    stop_file = work / "stop"
    db = state_dir / "gpusched.db"
    d = DaemonProcess(state_dir)
    d.start(timeout=60)
    clients = []
    for i in range(CLIENTS):
        argv = [sys.executable, str(CLIENT_SCRIPT), str(d.socket), str(work / f"client{i}.jsonl"),
                str(SEED * 100 + i), str(stop_file), str(marker), str(work), "1200"]
        if i == CLIENTS - 1:
            argv.append("cli")
        with open(work / f"client{i}.err", "wb") as err:
            clients.append(subprocess.Popen(argv, env=d.env, stdout=subprocess.DEVNULL,
                                            stderr=err))
    kills = 0
    start_times: list[float] = []
    violations: list[str] = []
    started = time.monotonic()
    try:
        for _ in range(KILLS):
            if d.proc is None:
                t0 = time.monotonic()
                d.start(timeout=60)
                start_times.append(time.monotonic() - t0)
            time.sleep(rng.uniform(0.05, 0.4))
            d.kill9()
            kills += 1
            found = check_invariants(db)
            violations += [f"after kill {kills}: {v}" for v in found]
            if len(violations) > 20:
                break
        loop_s = time.monotonic() - started
        assert not violations, "\n".join(violations[:20])
        d.start(timeout=60)
        time.sleep(1.0)  # the clients see the daemon up once more, then stop
        stop_file.touch()
        for p in clients:
            assert p.wait(timeout=120) == 0, (work / "client0.err").read_text()
        wait_drained(d, timeout=300)
        d.stop()
    finally:
        stop_file.touch()
        for p in clients:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        d.kill9()

    # -- what the clients saw ---------------------------------------------------------------
    records = [r for i in range(CLIENTS) for r in read_jsonl(work / f"client{i}.jsonl")]
    for i in range(CLIENTS):
        err = (work / f"client{i}.err").read_text()
        assert "Traceback" not in err, err
    acked = {r["id"]: r for r in records if r["op"] == "submit" and r["ok"]}
    errors = [r for r in records if not r["ok"]]
    retryable = [r for r in errors if r["cls"] in RETRYABLE]
    refusals = [r for r in errors if (r["op"], r["cls"]) in REFUSALS]
    # a reply cut short by a kill must surface as the retryable "daemon" error, never as a
    # success or a traceback (the client checks Content-Length)
    bad = [r for r in errors if r not in retryable and r not in refusals]
    for r in retryable:  # clear: it says what is wrong and what to do
        assert "daemon" in r["msg"], r
    cancelled_acks = {r["id"] for r in records if r["op"] == "cancel" and r["ok"]}

    # -- the database -----------------------------------------------------------------------
    final = check_invariants(db, drained=True)
    conn = sqlite3.connect(str(db))
    try:
        jobs = {r[0]: r[1] for r in conn.execute("SELECT id, status FROM jobs")}
        attempts = {(r[0], r[1]): r[2] for r in conn.execute("SELECT job_id, n, reason"
                                                             " FROM attempts")}
        specs = {r[0]: json.loads(r[1]) for r in conn.execute("SELECT id, spec FROM jobs")}
        commands = {job_id: spec["command"] for job_id, spec in specs.items()}
    finally:
        conn.close()
    missing = sorted(set(acked) - set(jobs))
    # every submission carries a unique token (its command's last argument) and retries a
    # lost reply with the same idempotency key: a token under two ids is a double submission
    by_token: dict[str, list[int]] = {}
    for job_id, cmd in commands.items():
        if cmd and cmd[-1].startswith("tok-"):
            by_token.setdefault(cmd[-1], []).append(job_id)
    double_submissions = {t: ids for t, ids in by_token.items() if len(ids) > 1}
    wrong_ack = sorted(r["id"] for r in acked.values()
                       if r.get("token") and r["id"] not in by_token.get(r["token"], []))
    # a job stays held only when it was submitted held: by the store's spec, since a held
    # submission whose every reply was lost (the client gave up retrying) is in the store
    # without an acknowledgement, which the promise allows
    not_ended = {j: s for j, s in jobs.items()
                 if s not in TERMINAL and not (s == "held" and specs[j].get("hold"))}
    wrong_hold = sorted(j for j, r in acked.items()
                        if j in specs and bool(specs[j].get("hold")) != bool(r.get("hold")))
    lost_status = sorted(j for j, s in jobs.items() if s == "lost")

    # -- who ran, how often -----------------------------------------------------------------
    lines = marker.read_text().split("\n") if marker.exists() else []
    runs = Counter(tuple(int(x) for x in line.split()) for line in lines if line.strip())
    same_attempt_twice = sorted(k for k, c in runs.items() if c > 1)
    by_job: dict[int, list[int]] = {}
    for job_id, n in runs:
        by_job.setdefault(job_id, []).append(n)
    two_attempts_ran = {j: sorted(ns) for j, ns in by_job.items() if len(ns) > 1}
    phantom = sorted(k for k in runs if k not in attempts)
    succeeded_without_run = sorted(j for j, s in jobs.items() if s == "succeeded"
                                   and j not in by_job)
    double_runs = len(same_attempt_twice) + len(two_attempts_ran)
    requeued_unstarted = sum(1 for reason in attempts.values()
                             if reason and "before the attempt started" in reason)

    daemon_log = (state_dir / "daemon.log").read_text(errors="replace")
    tracebacks = daemon_log.count("Traceback")

    summary = (f"reliability: daemon kills survived={kills}, jobs submitted={len(acked)}, "
               f"jobs lost={len(missing)}, double runs={double_runs}, "
               f"double submissions={len(double_submissions)}, "
               f"client errors={len(errors)} ({'all retryable' if not bad else f'{len(bad)} NOT retryable'}"
               f"; {len(retryable)} retryable, {len(refusals)} expected refusals)")
    with capsys.disabled():  # on the terminal with or without -s
        print("\n" + summary, flush=True)
    figures["kill -9 loop"] = summary
    figures["kill -9 loop: details"] = (
        f"{loop_s:.0f}s of kills (daemon start {sum(start_times) / max(1, len(start_times)):.2f}s"
        f" on average), {len(records)} client requests, "
        f"{len(cancelled_acks)} cancels acknowledged, {len(jobs)} jobs in the store, "
        f"final statuses {dict(Counter(jobs.values()))}, "
        f"{requeued_unstarted} attempts requeued as never started, {len(runs)} runs recorded")

    assert kills == KILLS
    assert final == [], "\n".join(final[:20])
    assert missing == [], f"acknowledged jobs missing from the store: {missing[:20]}"
    assert double_submissions == {}, (
        f"submissions queued twice (same token under two ids): "
        f"{dict(list(double_submissions.items())[:10])}")
    assert wrong_ack == [], f"acknowledged ids that are not their submission's job: {wrong_ack}"
    assert not bad, f"clients saw non-retryable errors: {bad[:5]}"
    assert not not_ended, f"jobs that did not end: {dict(list(not_ended.items())[:20])}"
    assert wrong_hold == [], f"acknowledged jobs stored with the wrong hold: {wrong_hold[:20]}"
    assert lost_status == [], f"jobs recorded LOST: {lost_status[:20]}"
    assert same_attempt_twice == [], f"attempts that ran twice: {same_attempt_twice[:20]}"
    assert two_attempts_ran == {}, (
        "jobs that ran in two attempts: "
        + "; ".join(f"job {j} attempts {ns}: reasons {[attempts.get((j, n)) for n in ns]}"
                    for j, ns in list(two_attempts_ran.items())[:10]))
    assert phantom == [], f"runs of attempts the store does not know: {phantom[:20]}"
    assert succeeded_without_run == [], f"succeeded without running: {succeeded_without_run[:20]}"
    assert tracebacks == 0, daemon_log[-5000:]
    assert len(acked) > KILLS, "the clients hardly got anything in"


# -- found by the loop: a daemon killed between its reply's headers and its body (fixed: the
# client checks Content-Length and reports the retryable "daemon" error) ----------------------

class CutShortServer:
    """A unix socket that answers every request with headers announcing a body, then hangs
    up: what a client sees when the daemon is killed between the two writes of its reply."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 27\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def cut_short(state_dir: Path) -> Any:
    server = CutShortServer(state_dir / "cut.sock")
    yield state_dir / "cut.sock"
    server.close()


def test_client_refuses_a_truncated_reply(cut_short: Path) -> None:
    with pytest.raises(DaemonUnavailable):
        result = Client(cut_short, timeout=5).post("/v1/jobs", {"command": ["true"]})
        print("the client returned", result)


def test_cli_submit_on_a_truncated_reply_is_retryable(cut_short: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCHED_")}
    env.update(GPUSCHED_SOCKET=str(cut_short), GPUSCHED_CONFIG="/dev/null")
    r = subprocess.run([sys.executable, "-m", "gpusched.cli", "submit", "--", "true"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 7, r.stderr
