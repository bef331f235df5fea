"""Helpers for tests that drive ``Daemon.tick`` by hand on a FakeClock (tests/integration):
submit a job as the current user, tick until a condition holds, restart the Service."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from gpusched.gpus import SimulatedInventory
from gpusched.models import JobSpec
from gpusched.runners.local import LocalRunner
from gpusched.service import Service
from gpusched.testing.harness import SIM_GPUS

TERMINAL = ("succeeded", "failed", "cancelled", "lost")


def submit(svc: Service, *cmd: str, **kw: object) -> int:
    """A local job in the state directory, owned by the current user."""
    spec = JobSpec(command=list(cmd), workdir=str(svc.settings.state_dir), **kw)  # type: ignore[arg-type]
    return svc.store.submit(spec, owner_uid=os.getuid(), owner="tester", now=svc.clock.now())


def run_until(svc: Service, cond: Callable[[], bool], timeout: float = 15.0,
              step: float = 0.5) -> None:
    """Tick (moving the fake clock) until ``cond`` holds; real time only for real processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        svc.daemon.tick(svc.clock.now())
        if cond():
            return
        time.sleep(0.02)
        svc.clock.advance(step)  # type: ignore[attr-defined]
    raise AssertionError(f"condition not reached; jobs: {svc.store.list_jobs()}")


def status(svc: Service, job_id: int) -> str:
    return str(svc.store.get_job(job_id)["status"])


def ended(svc: Service, *ids: int) -> Callable[[], bool]:
    return lambda: all(status(svc, i) in TERMINAL for i in ids)


@contextmanager
def restarted(svc: Service) -> Iterator[Service]:
    """What a daemon crash or restart leaves: a new Service on the same state directory."""
    svc.close()
    svc2 = Service(svc.settings, inventory=SimulatedInventory(SIM_GPUS),
                   runners={"local": LocalRunner.of(svc.settings)}, clock=svc.clock)
    try:
        yield svc2
    finally:
        svc2.close()
