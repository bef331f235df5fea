"""Habits from Slurm and pueue, on the real tick (real SQLite, real processes, a FakeClock):
--time enforced, --after-any, requeue, --output, and the shim's environment."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gpusched.errors import Conflict
from gpusched.models import GpuRequest
from gpusched.service import Service
from gpusched.testing.ticks import ended, run_until, status, submit


def job(svc: Service, job_id: int) -> dict:
    return svc.store.get_job(job_id)


def test_a_job_past_its_time_limit_gets_sigterm_and_fails_with_time_limit(
        service: Service) -> None:
    start = service.clock.now()
    j = submit(service, "sleep", "1000", time_limit_s=30)
    run_until(service, ended(service, j), step=2)
    row = job(service, j)
    assert (row["status"], row["reason"]) == ("failed", "time limit (30 s)")
    assert row["exit_code"] == 128 + 15  # SIGTERM was enough for sleep
    assert 30 <= row["ended_at"] - start <= 30 + 2 + 2  # the limit, a tick step, the grace
    assert row["attempt"] == 1  # never retried
    assert [e["to_status"] for e in service.store.events(j)][-2:] == ["stop", "failed"]


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(service: Service) -> None:
    j = submit(service, "sh", "-c", "trap '' TERM; sleep 1000", time_limit_s=10)
    run_until(service, ended(service, j), step=0.5)
    row = job(service, j)
    assert (row["status"], row["reason"]) == ("failed", "time limit (10 s)")
    att = service.store.attempt(j, 1)
    assert att is not None and att["kill_sent_at"] is not None
    assert row["ended_at"] - att["kill_sent_at"] >= 2  # scheduler.kill_grace_s = 2


def test_a_backfilled_job_that_overruns_cannot_delay_the_reserved_job_past_its_limit(
        service: Service) -> None:
    """GPU 0 runs a long job (limit 100 s); a 2-GPU job waits and reserves both GPUs; a
    1-GPU job whose --time (40 s) ends before the reservation backfills GPU 1, then
    overruns. It is stopped at 40 s, so the 2-GPU job starts once the first job's limit is
    reached instead of never."""
    t0 = service.clock.now()
    first = submit(service, "sleep", "1000", gpus=GpuRequest(count=1), time_limit_s=100)
    run_until(service, lambda: status(service, first) == "running")
    pair = submit(service, "true", gpus=GpuRequest(count=2))
    small = submit(service, "sleep", "1000", gpus=GpuRequest(count=1), time_limit_s=40)
    run_until(service, lambda: status(service, small) == "running")
    assert status(service, pair) == "queued"
    run_until(service, ended(service, pair), step=2, timeout=60)
    assert status(service, pair) == "succeeded"
    assert job(service, small)["reason"] == "time limit (40 s)"
    assert job(service, first)["reason"] == "time limit (100 s)"
    assert job(service, small)["ended_at"] - t0 <= 40 + 2 + 2 + 2
    assert job(service, pair)["started_at"] - t0 <= 100 + 2 + 2 + 2


def test_the_planner_estimate_is_the_limit() -> None:
    from gpusched.models import JobSpec

    assert JobSpec(command=["x"], time_limit_s=60).est_runtime_s == 60
    # an API client's estimate alone is enforced as the limit: no backfill without one
    assert JobSpec(command=["x"], est_runtime_s=50).time_limit_s == 50
    assert JobSpec(command=["x"], est_runtime_s=500, time_limit_s=60).est_runtime_s == 60


def test_after_any_starts_after_its_jobs_ended_in_any_state(service: Service) -> None:
    bad = submit(service, "sh", "-c", "sleep 0.3; exit 3")
    cancelled = submit(service, "sleep", "1000")
    cleanup = submit(service, "true", after_any=[bad, cancelled])
    strict = submit(service, "true", after=[bad])
    run_until(service, lambda: status(service, bad) == "failed")
    service.daemon.tick(service.clock.now())
    assert status(service, cleanup) == "queued"  # `cancelled` still runs
    service.store.request_cancel(cancelled, actor="tester", now=service.clock.now())
    run_until(service, ended(service, cleanup, strict))
    assert status(service, cleanup) == "succeeded"
    assert status(service, strict) == "failed"
    assert job(service, cleanup)["started_at"] >= job(service, cancelled)["ended_at"]


def test_requeue_runs_an_ended_job_again_as_a_new_attempt(service: Service) -> None:
    j = submit(service, "sh", "-c", "echo attempt $GPUSCHED_ATTEMPT; exit $((2 - "
               "$GPUSCHED_ATTEMPT))", retries=0)
    run_until(service, ended(service, j))
    assert (status(service, j), job(service, j)["exit_code"]) == ("failed", 1)
    service.store.requeue(j, actor="tester", now=service.clock.now())
    row = job(service, j)
    assert (row["status"], row["exit_code"], row["ended_at"]) == ("queued", None, None)
    run_until(service, ended(service, j))
    assert (status(service, j), job(service, j)["attempt"]) == ("succeeded", 2)
    assert [a["exit_code"] for a in service.store.attempts(j)] == [1, 0]
    live = submit(service, "sleep", "1000")
    run_until(service, lambda: status(service, live) == "running")
    with pytest.raises(Conflict, match="only ended jobs"):
        service.store.requeue(live, actor="tester", now=service.clock.now())
    service.store.request_cancel(live, actor="tester", now=service.clock.now())
    run_until(service, ended(service, live))


def test_output_copies_the_log_with_the_job_id(service: Service, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    j = submit(service, "sh", "-c", "echo hello; echo to-stderr >&2",
               output=str(target / "job-%j.log"))
    path = target / f"job-{j}.log"
    run_until(service, lambda: bool(service.store.notifications(j, "done")))
    assert sorted(path.read_text().split()) == ["hello", "to-stderr"]
    assert path.stat().st_uid == os.getuid()


def test_the_shim_ignores_exported_variables_that_change_sh(service: Service,
                                                            tmp_path: Path) -> None:
    """IFS, ENV, CDPATH... from --export ALL would change how the shim's sh parses and
    starts; they are not passed. LD_PRELOAD-like ones are the user's own business."""
    (tmp_path / "rc").write_text("echo sourced-ENV\n")
    j = submit(service, "sh", "-c", 'echo "IFS=[$IFS] ENV=[$ENV] KEEP=$KEEP"', env={
        "IFS": "x", "ENV": str(tmp_path / "rc"), "BASH_ENV": str(tmp_path / "rc"),
        "CDPATH": "/", "KEEP": "kept"})
    run_until(service, ended(service, j))
    assert status(service, j) == "succeeded"
    out = Path(service.store.attempt(j, 1)["log_path"]).read_text()  # type: ignore[index]
    assert "sourced" not in out and "ENV=[]" in out and "KEEP=kept" in out
    assert "IFS=[x]" not in out


def test_the_tick_does_not_wait_for_a_slow_output_copy(service: Service,
                                                       tmp_path: Path) -> None:
    """A FIFO as --output blocks its copy (as the user) until someone reads: the tick goes
    on, other jobs run, and the copy is killed past notify.command_timeout_s."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    j = submit(service, "echo", "x", output=str(fifo))
    run_until(service, lambda: bool(service.store.notifications(j, "sending")))
    other = submit(service, "true")
    t = time.monotonic()
    run_until(service, ended(service, other))
    assert time.monotonic() - t < 10
    service.clock.advance(service.settings.notify.command_timeout_s)  # type: ignore[attr-defined]
    run_until(service, lambda: bool(service.store.notifications(j, "failed")))
    assert service.store.notifications(j)[0]["last_error"] == "timed out; killed"


def test_a_time_limit_holds_across_a_daemon_restart(service: Service) -> None:
    """The limit counts from the attempt's start, which the store keeps: a daemon restarted
    while the job runs adopts it and still stops it at its limit."""
    from gpusched.testing.ticks import restarted

    start = service.clock.now()
    j = submit(service, "sleep", "1000", time_limit_s=20)
    run_until(service, lambda: status(service, j) == "running")
    with restarted(service) as svc2:
        run_until(svc2, ended(svc2, j), step=2)
        row = svc2.store.get_job(j)
    assert (row["status"], row["reason"], row["attempt"]) == ("failed", "time limit (20 s)", 1)
    assert 20 <= row["ended_at"] - start <= 20 + 2 + 2 + 2
