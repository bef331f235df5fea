"""The plan window kept between ticks (issue 15): the tick reads the queue's head again only
when the store says the queue changed other than by its own claims (Store.queue_version).
Every other change must show in the very next plan. Real SQLite file, real local processes,
FakeClock."""

from __future__ import annotations

import os
import threading

import pytest

from gpusched.models import JobSpec
from gpusched.service import Service
from gpusched.states import JobStatus
from gpusched.store import Store
from gpusched.testing.ticks import ended, run_until, status, submit


@pytest.fixture
def reads(service: Service, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the tick has read the queue's head (one entry per read)."""
    seen: list[int] = []
    real = service.daemon._runnable_rows

    def counted(lean: bool) -> list[dict[str, object]]:
        seen.append(1)
        return real(lean)
    monkeypatch.setattr(service.daemon, "_runnable_rows", counted)
    return seen


def test_every_change_but_the_daemons_own_claims_shows_in_the_next_plan(
        service: Service, reads: list[int]) -> None:
    svc = service
    now = svc.clock.now
    holders = [submit(svc, "sleep", "60") for _ in range(2)]  # both simulated GPUs
    svc.daemon.tick(now())
    assert [status(svc, h) for h in holders] == ["running", "running"]
    low = submit(svc, "true")
    svc.daemon.tick(now())
    assert low in svc.daemon.waiting
    reads.clear()
    svc.daemon.tick(now())
    assert reads == [], "nothing changed, yet the queue's head was read again"
    high = submit(svc, "true", priority=10)
    svc.daemon.tick(now())  # a submission
    assert high in svc.daemon.waiting and low in svc.daemon.waiting
    svc.store.hold(low, actor="tester", now=now())
    svc.daemon.tick(now())  # a hold
    assert low not in svc.daemon.waiting
    svc.store.release(low, actor="tester", now=now())
    svc.daemon.tick(now())  # a release
    assert low in svc.daemon.waiting
    gone = submit(svc, "true")
    svc.daemon.tick(now())
    assert svc.store.request_cancel(gone, actor="tester", now=now()) == "cancelled"
    svc.daemon.tick(now())  # a cancel
    assert gone not in svc.daemon.waiting
    follower = submit(svc, "true", after_any=[holders[0]])
    svc.daemon.tick(now())
    assert follower not in svc.daemon.waiting  # its dependency still runs
    svc.store.request_cancel(holders[0], actor="tester", now=now())
    # the end, in this tick's own uncommitted writes, makes the follower runnable: the plan
    # of the same tick sees it (and the freed GPU goes to the highest priority)
    run_until(svc, ended(svc, holders[0]), step=0.0)
    assert follower in svc.daemon.waiting or status(svc, follower) != "queued"
    assert status(svc, high) in ("starting", "running", "succeeded")
    svc.store.request_cancel(holders[1], actor="tester", now=now())
    run_until(svc, lambda: all(status(svc, j) == "succeeded" for j in (high, low, follower)))


def test_a_window_read_while_another_thread_writes_is_not_kept(service: Service) -> None:
    """Another thread's submission is inside its transaction while the tick reads the
    queue's head, which cannot see it: the tick does not wait for that write (reads never
    queue behind writers), and the window it read then is read again on the next tick."""
    svc = service
    holders = [submit(svc, "sleep", "60") for _ in range(2)]
    svc.daemon.tick(svc.clock.now())
    made, go = threading.Event(), threading.Event()
    late: list[int] = []

    def submit_slowly() -> None:
        with svc.store.write():  # one transaction, committed at the end of this block
            late.append(submit(svc, "true"))
            made.set()
            assert go.wait(30), "the test never let the submission commit"
    t = threading.Thread(target=submit_slowly)
    t.start()
    try:
        assert made.wait(30)
        svc.daemon.tick(svc.clock.now())  # reads the queue: the submission is not committed
        assert late[0] not in svc.daemon.waiting
    finally:
        go.set()
        t.join(30)
    svc.daemon.tick(svc.clock.now())
    assert late[0] in svc.daemon.waiting
    for h in holders:
        svc.store.request_cancel(h, actor="tester", now=svc.clock.now())
    run_until(svc, lambda: status(svc, late[0]) == "succeeded")


def test_a_job_written_by_another_connection_is_planned_next(service: Service) -> None:
    """A write that does not go through the daemon's store (another process: a restore, a
    tool writing the file; here a second Store on it) moves SQLite's data_version."""
    svc = service
    holders = [submit(svc, "sleep", "60") for _ in range(2)]
    svc.daemon.tick(svc.clock.now())
    svc.daemon.tick(svc.clock.now())
    other = Store(svc.settings.db_path)
    try:
        job = other.submit(JobSpec(command=["true"], workdir="/tmp"), owner_uid=os.getuid(),
                           owner="tester", now=svc.clock.now())
    finally:
        other.close()
    svc.daemon.tick(svc.clock.now())
    assert job in svc.daemon.waiting
    for h in holders:
        svc.store.request_cancel(h, actor="tester", now=svc.clock.now())
    run_until(svc, lambda: status(svc, job) == "succeeded")


def test_a_placement_that_fails_after_its_claim_leaves_the_window(
        service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job claimed and then failed in the same step (as a TAO stage whose command cannot be
    built for its GPUs is) leaves the queue with no bump of the store's version: the window
    must not keep it, or it would be placed on the free GPU on every tick and claimed in vain,
    and the job behind it would never start."""
    svc = service
    holder = submit(svc, "sleep", "60")
    svc.daemon.tick(svc.clock.now())  # one GPU busy, one free
    bad, good = submit(svc, "true"), submit(svc, "true")
    real = svc.daemon._claim

    def claim_then_fail(row: dict[str, object], *args: object) -> object:
        req = real(row, *args)  # type: ignore[arg-type]
        if row["id"] == bad and req is not None:
            svc.store.finish_attempt(bad, req.attempt, to=JobStatus.FAILED, now=svc.clock.now(),
                                     ended_at=svc.clock.now(), exit_code=None,
                                     reason="could not start: (injected)")
            return None
        return req
    monkeypatch.setattr(svc.daemon, "_claim", claim_then_fail)
    run_until(svc, lambda: status(svc, good) == "succeeded")
    assert status(svc, bad) == "failed"
    svc.store.request_cancel(holder, actor="tester", now=svc.clock.now())
    run_until(svc, ended(svc, holder))
