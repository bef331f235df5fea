"""Scenario 14: random churn, property-based (hypothesis stateful testing).

A ``RuleBasedStateMachine`` drives an in-process daemon (``Service`` with a ``SimulatedInventory``
of four GPUs, the real ``LocalRunner`` and a ``FakeClock``) through random sequences of: submit
(1 or 2 GPUs, real processes that wait for their own "go" file and exit with the code written
in it), cancel, let a job exit (0, 1, 3), an OOM-like kill (SIGKILL of the job's processes, exit
137), a daemon crash and restart (the Service is dropped without stopping jobs and a new one
opens the same state directory), a GPU falling off the bus, an admin resuming it, and foreign
processes taking GPU memory. After every step the invariants must hold: integrity ok, every job
in one known status, at most one live attempt per job, an active job has exactly its current
attempt live, allocations = GPUs of the live attempts, and no drained GPU got an allocation
that it did not already have when it was drained. At the end of every example all jobs are let
go and the daemon must drain the queue completely (every job ends, nothing stays allocated).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpusched.config import Settings
from gpusched.errors import Conflict
from gpusched.gpus import SimulatedInventory
from gpusched.models import GpuRequest, JobSpec
from gpusched.runners.local import LocalRunner, alive
from gpusched.service import Service
from gpusched.testing.clock import FakeClock
from gpusched.testing.faults import check_invariants
from gpusched.testing.harness import short_tmpdir

GPUS = "RTX A4000:16G,RTX A4000:16G,RTX 2070:8G,RTX 2070:8G"
TERMINAL = {"succeeded", "failed", "cancelled", "lost"}
STATS: Counter[str] = Counter()


def group_members(pgid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid:
            out.append(int(name))
    return out


class Churn(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = short_tmpdir("gschurn")
        self.go = self.dir / "go"
        self.go.mkdir()
        self.settings = Settings(
            state_dir=self.dir / "state", socket=self.dir / "state" / "gpusched.sock",
            gpus={"simulate": GPUS, "release_timeout_s": 5, "poll_interval_s": 1},
            docker={"enabled": False}, scheduler={"kill_grace_s": 2, "reconcile_interval_s": 5})
        self.clock = FakeClock()
        self.inventory = SimulatedInventory(GPUS)  # the hardware: it survives daemon restarts
        self.svc = self._open()
        self.jobs: list[int] = []
        self.pids: set[int] = set()
        self.lost: set[str] = set()
        self.prev_allocs: dict[str, set[tuple[int, int]]] = {}
        STATS["examples"] += 1

    # -- plumbing ---------------------------------------------------------------------------

    def _open(self) -> Service:
        return Service(self.settings, inventory=self.inventory,
                       runners={"local": LocalRunner.of(self.settings)}, clock=self.clock)

    def _close(self) -> None:
        self.svc.daemon.close()
        self.svc.store.close()

    def _tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.svc.daemon.tick(self.clock.now())
            for r in self.svc.store.live_attempts():
                if r["pid"]:
                    self.pids.add(int(r["pid"]))
            time.sleep(0.03)
            self.clock.advance(1.0)
        STATS["ticks"] += n

    def _running(self) -> list[dict[str, Any]]:
        return [r for r in self.svc.store.live_attempts()
                if r["state"] == "live" and r["job_status"] == "running"]

    # -- rules ------------------------------------------------------------------------------

    @rule(count=st.sampled_from([1, 1, 2]), priority=st.integers(0, 2))
    def submit(self, count: int, priority: int) -> None:
        self._submit(count, priority)

    @rule(counts=st.lists(st.sampled_from([1, 2]), min_size=2, max_size=3))
    def submit_several(self, counts: list[int]) -> None:
        for c in counts:
            self._submit(c, 0)
        self._tick()

    def _submit(self, count: int, priority: int) -> None:
        script = (f'f={self.go}/$GPUSCHED_JOB_ID; while [ ! -e "$f" ]; do sleep 0.02; done; '
                  f'sleep 0.01; exit "$(cat "$f")"')
        spec = JobSpec(command=["sh", "-c", script], gpus=GpuRequest(count=count),
                       priority=priority, workdir=str(self.dir))
        self.svc.validate_spec(spec, os.getuid())
        self.jobs.append(self.svc.store.submit(spec, owner_uid=os.getuid(), owner="churn",
                                               now=self.clock.now()))
        STATS["submits"] += 1

    @precondition(lambda self: bool(self.jobs))
    @rule(pick=st.integers(0, 10**6))
    def cancel(self, pick: int) -> None:
        job = self.jobs[pick % len(self.jobs)]
        with contextlib.suppress(Conflict):
            self.svc.store.request_cancel(job, actor="churn", now=self.clock.now())
            STATS["cancels"] += 1

    @rule(n=st.integers(1, 4))
    def tick(self, n: int) -> None:
        self._tick(n)

    @rule(pick=st.integers(0, 10**6), code=st.sampled_from([0, 0, 1, 3]))
    def job_exits(self, pick: int, code: int) -> None:
        running = self._running()
        if not running:
            self._tick()
            return
        row = running[pick % len(running)]
        (self.go / f"{row['job_id']}.tmp").write_text(f"{code}\n")
        (self.go / f"{row['job_id']}.tmp").rename(self.go / str(row["job_id"]))
        STATS["exits"] += 1
        self._tick(2)

    @rule(pick=st.integers(0, 10**6))
    def oom_kill(self, pick: int) -> None:
        """What the kernel's OOM killer does: SIGKILL the job's processes (not the shim)."""
        running = self._running()
        if not running:
            return
        row = running[pick % len(running)]
        if alive(row["pid"], row["pid_start"]):
            for pid in group_members(row["pid"]):
                if pid != row["pid"]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            STATS["ooms"] += 1
        self._tick(2)

    @rule()
    def crash_and_restart(self) -> None:
        self._close()
        self.svc = self._open()
        STATS["restarts"] += 1

    @precondition(lambda self: len(self.lost) < 2)  # keep two GPUs working
    @rule(gpu=st.integers(0, 3))
    def gpu_lost(self, gpu: int) -> None:
        uuid = self.inventory.uuids[gpu]
        self.inventory.set_health(uuid, "lost", "GPU is lost (fell off the bus)")
        self.lost.add(uuid)
        STATS["gpus lost"] += 1

    @rule(gpu=st.integers(0, 3))
    def admin_resumes_gpu(self, gpu: int) -> None:
        uuid = self.inventory.uuids[gpu]
        self.inventory.set_health(uuid, "ok")
        self.lost.discard(uuid)
        self.svc.daemon.refresh_inventory(self.clock.now())
        with self.svc.daemon.lock:
            if uuid in {r["uuid"] for r in self.svc.store.gpu_rows()}:
                self.svc.store.resume(uuid)

    @rule(gpu=st.integers(0, 3), mib=st.sampled_from([0, 0, 4096, 15000]))
    def foreign_process(self, gpu: int, mib: int) -> None:
        self.inventory.set_foreign(self.inventory.uuids[gpu], mib)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        problems = check_invariants(self.settings.db_path)
        assert problems == [], "\n".join(problems)
        store = self.svc.store
        drained = {r["uuid"] for r in store.gpu_rows() if r["drained"]}
        now_allocs: dict[str, set[tuple[int, int]]] = {}
        for a in store.allocations():
            now_allocs.setdefault(a["gpu_uuid"], set()).add((a["job_id"], a["attempt"]))
        for uuid in drained:
            new = now_allocs.get(uuid, set()) - self.prev_allocs.get(uuid, set())
            assert not new, f"drained GPU {uuid} got a new allocation {new}"
        self.prev_allocs = now_allocs
        STATS["invariant checks"] += 1

    # -- the end of an example --------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self._drain()
        finally:
            self._cleanup()

    def _drain(self) -> None:
        """Let every job go, heal the hardware: the daemon must end every job."""
        for uuid in self.inventory.uuids:
            self.inventory.set_health(uuid, "ok")
            self.inventory.set_foreign(uuid, 0)
        self.svc.daemon.refresh_inventory(self.clock.now())
        for r in self.svc.store.gpu_rows():
            if r["drained"]:
                self.svc.store.resume(r["uuid"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for job in self.jobs:
                f = self.go / str(job)
                if not f.exists():
                    f.write_text("0\n")
            self._tick()
            rows = self.svc.store.list_jobs()
            if all(r["status"] in TERMINAL for r in rows) and not self.svc.store.allocations():
                break
        rows = self.svc.store.list_jobs()
        left = {r["id"]: r["status"] for r in rows if r["status"] not in TERMINAL}
        assert not left, f"jobs that never ended: {left}"
        problems = check_invariants(self.settings.db_path, drained=True)
        assert problems == [], "\n".join(problems)
        STATS.update(f"ended {r['status']}" for r in rows)

    def _cleanup(self) -> None:
        with contextlib.suppress(Exception):
            for r in self.svc.store.query("SELECT pid FROM attempts WHERE pid IS NOT NULL"):
                self.pids.add(int(r["pid"]))
        with contextlib.suppress(Exception):
            self._close()
        for pid in self.pids:  # every shim this example started: kill what is left, reap it
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        deadline = time.monotonic() + 5
        for pid in self.pids:
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG) != (0, 0):
                        break
                except ChildProcessError:
                    break
                time.sleep(0.01)
        shutil.rmtree(self.dir, ignore_errors=True)


Churn.TestCase.settings = settings(max_examples=20, stateful_step_count=40, deadline=None,
                                   database=None, derandomize=True,
                                   suppress_health_check=list(HealthCheck))


@pytest.mark.timeout(600)
def test_random_churn_keeps_the_invariants(figures: dict[str, Any]) -> None:
    STATS.clear()
    Churn.TestCase("runTest").runTest()
    assert STATS["examples"] >= 20 and STATS["invariant checks"] > 100, STATS
    figures["churn (hypothesis)"] = ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()))
