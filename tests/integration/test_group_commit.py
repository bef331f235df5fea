"""Group commit (issue 15): a tick's ends, epochs and claims share one transaction, each job's
part a savepoint of it; reads run on their own connections and never wait for the tick.

Real SQLite file, real local processes, FakeClock. Commits are counted with SQLite's own trace
of the statements the daemon's connection runs.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.config import Settings
from gpusched.errors import StoreError
from gpusched.gpus import SimulatedInventory
from gpusched.models import JobSpec
from gpusched.runners.base import AttemptRef, Launched, LaunchRequest, Orphan, Outcome
from gpusched.runners.local import LocalRunner
from gpusched.service import Service
from gpusched.store import Store
from gpusched.testing.clock import FakeClock
from gpusched.testing.ticks import TERMINAL, run_until, status, submit

FOUR = "RTX A4000:16G,RTX A4000:16G,RTX 2070:8G,RTX 2070:8G"


@pytest.fixture
def four(state_dir: Path) -> Iterator[Service]:
    settings = Settings(state_dir=state_dir, socket=state_dir / "gpusched.sock",
                        gpus={"simulate": FOUR}, docker={"enabled": False})
    svc = Service(settings, inventory=SimulatedInventory(FOUR),
                  runners={"local": LocalRunner.of(settings)}, clock=FakeClock())
    yield svc
    svc.close()


def spec(*cmd: str) -> JobSpec:
    return JobSpec(command=list(cmd), workdir="/tmp")


def commits(store: Store) -> list[str]:
    """Every COMMIT the store's writing connection runs from now on."""
    seen: list[str] = []
    store.conn.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


def wait_all_exited(svc: Service) -> None:
    """Block until every running shim has exited (their pidfds turn readable): no sleeps."""
    fds = svc.daemon.wait_fds()[1:]  # the first is the wake pipe
    assert fds, "no pidfd to wait on"
    for fd in fds:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(30_000), "a job did not exit within 30 s"


def test_a_failed_write_in_a_batch_is_rolled_back_alone(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.db")
    try:
        with store.batch():
            kept = store.submit(spec("true"), owner_uid=1, owner="a", now=1.0)
            with pytest.raises(RuntimeError), store.write():
                store.submit(spec("false"), owner_uid=1, owner="a", now=2.0)
                raise RuntimeError("this job's part fails")
            after = store.submit(spec("true"), owner_uid=1, owner="a", now=3.0)
        assert [r["id"] for r in store.list_jobs()] == [kept, after]
        assert [r["command"] for r in store.query("SELECT json_extract(spec, '$.command')"
                                                  " AS command FROM jobs")] == \
            ['["true"]', '["true"]']
        assert store.integrity_check() == "ok"
    finally:
        store.close()


def test_an_exception_out_of_a_batch_saves_none_of_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.db")
    try:
        with pytest.raises(RuntimeError), store.batch():
            store.submit(spec("true"), owner_uid=1, owner="a", now=1.0)
            raise RuntimeError("the tick itself broke")
        assert store.list_jobs() == []
        store.submit(spec("true"), owner_uid=1, owner="a", now=2.0)  # the store still writes
        assert len(store.list_jobs()) == 1
    finally:
        store.close()


def test_reads_on_other_threads_neither_wait_for_an_open_batch_nor_see_it(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "g.db")
    first = store.submit(spec("true"), owner_uid=1, owner="a", now=1.0)
    opened, read_done = threading.Event(), threading.Event()
    seen: list[list[int]] = []

    def tick() -> None:
        with store.batch():
            store.submit(spec("true"), owner_uid=1, owner="a", now=2.0)  # uncommitted
            opened.set()
            # the batch stays open (its write lock held) until the reader is done: a read
            # that waited for it would never finish
            assert read_done.wait(30)

    t = threading.Thread(target=tick)
    t.start()
    try:
        assert opened.wait(30)
        seen.append([r["id"] for r in store.list_jobs()])
        read_done.set()
    finally:
        read_done.set()
        t.join(30)
    assert seen == [[first]]  # the committed state only
    assert len(store.list_jobs()) == 2  # and the batch's job once it committed
    store.close()


def test_a_tick_records_all_its_ends_and_claims_in_one_commit(four: Service) -> None:
    """Four jobs end and four more start in one tick: one COMMIT, made before the launches
    (the claims are durable before any process exists), where the first wave of gpusched
    made three per job (claim, launched, end)."""
    svc = four
    svc.daemon.defer_marks = True  # as the service's loop runs it
    svc.daemon.tick(svc.clock.now())  # the first tick's inventory and reconcile
    ids = [submit(svc, "true") for _ in range(8)]
    seen = commits(svc.store)
    svc.daemon.tick(svc.clock.now())
    assert seen == ["COMMIT"]  # the four claims, before their launches
    assert [status(svc, i) for i in ids[:4]] == ["starting"] * 4
    wait_all_exited(svc)
    seen.clear()
    svc.clock.advance(1)
    svc.daemon.tick(svc.clock.now())
    # the four starts kept from the last tick, the four ends and the four new claims
    assert seen == ["COMMIT"], seen
    assert [status(svc, i) for i in ids[:4]] == ["succeeded"] * 4
    assert [status(svc, i) for i in ids[4:]] == ["starting"] * 4
    events = svc.store.events(ids[0])
    assert [e["to_status"] for e in events] == ["queued", "starting", "running", "succeeded"]
    svc.daemon.flush_marks()  # what the loop does before it sleeps
    assert [status(svc, i) for i in ids[4:]] == ["running"] * 4
    run_until(svc, lambda: all(status(svc, i) in TERMINAL for i in ids))
    assert all(status(svc, i) == "succeeded" for i in ids)


def test_starts_kept_for_the_next_commit_survive_a_crash_before_it(four: Service) -> None:
    """The daemon dies after launching, before the starts were committed: the restarted
    daemon adopts the running attempts (never runs them twice) and records their ends."""
    svc = four
    svc.daemon.defer_marks = True
    gate = Path(svc.settings.state_dir) / "go"
    ids = [submit(svc, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
           for _ in range(2)]
    svc.daemon.tick(svc.clock.now())
    assert [status(svc, i) for i in ids] == ["starting"] * 2
    svc.close()  # kept starts are lost with the process, as in a kill -9
    svc2 = Service(svc.settings, inventory=SimulatedInventory(FOUR),
                   runners={"local": LocalRunner.of(svc.settings)}, clock=svc.clock)
    try:
        svc2.daemon.tick(svc2.clock.now())  # reconcile: adopt
        assert [status(svc2, i) for i in ids] == ["running"] * 2
        assert [len(svc2.store.attempts(i)) for i in ids] == [1, 1]
        gate.touch()
        run_until(svc2, lambda: all(status(svc2, i) in TERMINAL for i in ids))
        assert [status(svc2, i) for i in ids] == ["succeeded"] * 2
        assert [len(svc2.store.attempts(i)) for i in ids] == [1, 1]
    finally:
        gate.touch()
        svc2.close()


def test_a_dependent_of_a_job_that_failed_before_it_was_submitted_fails(
        service: Service) -> None:
    """Dependencies are checked from the events since the last check: a job queued after
    its --after job already failed is among them."""
    bad = submit(service, "false")
    run_until(service, lambda: status(service, bad) == "failed")
    for _ in range(2):
        service.daemon.tick(service.clock.now())  # checked up to here
    late = submit(service, "true", after=[bad])
    chained = submit(service, "true", after=[late])
    service.daemon.tick(service.clock.now())
    assert status(service, late) == "failed"
    assert status(service, chained) == "failed"  # in the same tick
    assert "dependency job" in service.store.get_job(chained)["reason"]
    assert os.path.exists(service.settings.db_path)


class HandleRunner:
    """A runner that knows an attempt only by the handle its launch returned (a container
    id, as Docker and Slurm do): polled without it, it answers that the attempt is gone."""

    name = "docker"

    def __init__(self) -> None:
        self.done: set[int] = set()
        self.polled: list[str | None] = []

    def launch(self, req: LaunchRequest) -> Launched:
        return Launched(container_id=f"c{req.job_id}")

    def poll(self, ref: AttemptRef, now: float) -> Outcome | None:
        self.polled.append(ref.container_id)
        if ref.container_id != f"c{ref.job_id}":
            return Outcome(exit_code=None, ended_at=now, lost=True, reason="no such container")
        return Outcome(exit_code=0, ended_at=now) if ref.job_id in self.done else None

    def signal_cancel(self, ref: AttemptRef, *, kill: bool) -> None:
        self.done.add(ref.job_id)

    def cleanup(self, ref: AttemptRef) -> None:
        pass

    def orphans(self, live: set[tuple[int, int]]) -> list[Orphan]:
        return []

    def remove_orphan(self, orphan: Orphan) -> bool:
        return True

    def wait_fds(self) -> list[int]:
        return []

    def health(self) -> tuple[bool, str]:
        return True, "ok"


def test_an_attempt_whose_start_is_not_recorded_yet_is_polled_by_its_handle(
        state_dir: Path) -> None:
    """The review's case: a Slurm or container attempt launched in the last tick, its record
    kept for this tick's commit, was polled from its stored row (no handle yet) and recorded
    lost while it ran."""
    runner = HandleRunner()
    settings = Settings(state_dir=state_dir, socket=state_dir / "gpusched.sock",
                        gpus={"simulate": FOUR}, docker={"enabled": False})
    svc = Service(settings, inventory=SimulatedInventory(FOUR),
                  runners={"local": LocalRunner.of(settings), "docker": runner},
                  clock=FakeClock())
    try:
        svc.daemon.defer_marks = True
        svc.daemon.tick(svc.clock.now())
        job = svc.store.submit(JobSpec(command=["true"], workdir="/tmp", runner="docker",
                                       image="busybox:latest"),
                               owner_uid=os.getuid(), owner="tester", now=svc.clock.now())
        svc.daemon.tick(svc.clock.now())
        assert status(svc, job) == "starting"  # its record waits for the next commit
        svc.clock.advance(1)
        svc.daemon.tick(svc.clock.now())
        assert runner.polled == [f"c{job}"]
        assert status(svc, job) == "running"
        assert svc.store.attempts(job)[0]["container_id"] == f"c{job}"
        runner.done.add(job)
        svc.clock.advance(1)
        svc.daemon.tick(svc.clock.now())
        assert status(svc, job) == "succeeded"
    finally:
        svc.close()


def test_a_dependency_failure_not_recorded_is_checked_again(service: Service,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's case: the cursor of the incremental dependency check moved past an event
    before its dependents' transitions were made; one that raised was never checked again."""
    bad = submit(service, "false")
    dependent = submit(service, "true", after=[bad])
    real = service.store.transition
    failures = [1]

    def flaky(job_id: int, *args: object, **kw: object) -> bool:
        if job_id == dependent and failures:
            failures.pop()
            raise StoreError("disk I/O error (injected once)")
        return real(job_id, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(service.store, "transition", flaky)
    run_until(service, lambda: status(service, bad) == "failed")
    run_until(service, lambda: status(service, dependent) == "failed")
    assert not failures  # the injected failure happened, and the next check caught up
    assert "dependency job" in service.store.get_job(dependent)["reason"]


def test_a_job_that_ends_while_the_tick_runs_frees_its_gpu_in_that_tick(
        four: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """late_reap: a shim that exits after the tick's reap (here: the reap's poll is told it
    still runs) is recorded before the plan, and the job queued behind it starts in the same
    tick, in the same commit as its end and the other ends."""
    svc = four
    svc.daemon.defer_marks = True
    svc.daemon.tick(svc.clock.now())
    first = [submit(svc, "true") for _ in range(4)]
    svc.daemon.tick(svc.clock.now())
    svc.daemon.flush_marks()
    wait_all_exited(svc)
    behind = [submit(svc, "true") for _ in range(4)]
    runner = svc.daemon.runners["local"]
    real_poll, polls = runner.poll, []

    def poll(ref: AttemptRef, now: float) -> Outcome | None:
        polls.append(ref.job_id)
        if ref.job_id == first[0] and polls.count(first[0]) == 1:
            return None  # the reap's poll: it "still runs"; its exit comes during the tick
        return real_poll(ref, now)

    monkeypatch.setattr(runner, "poll", poll)
    seen = commits(svc.store)
    svc.clock.advance(1)
    svc.daemon.tick(svc.clock.now())
    assert polls.count(first[0]) == 2  # the reap, then the late reap
    assert [status(svc, i) for i in first] == ["succeeded"] * 4
    assert [status(svc, i) for i in behind] == ["starting"] * 4  # all four GPUs, this tick
    assert seen == ["COMMIT"], seen  # the ends and the claims: one commit
    run_until(svc, lambda: all(status(svc, i) in TERMINAL for i in behind))
    assert all(status(svc, i) == "succeeded" for i in behind)


def test_the_late_reap_polls_nothing_while_no_job_has_ended(four: Service,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    svc = four
    svc.daemon.tick(svc.clock.now())
    job = submit(svc, "sleep", "1000")
    run_until(svc, lambda: status(svc, job) == "running")
    calls: list[float] = []
    monkeypatch.setattr(svc.daemon, "step_reap", lambda now: calls.append(now))
    svc.daemon.step_late_reap(svc.clock.now())
    assert calls == []  # its pidfd is not readable: no poll, no query
    svc.store.request_cancel(job, actor="tester", now=svc.clock.now())
    monkeypatch.undo()
    run_until(svc, lambda: status(svc, job) in TERMINAL)
