"""Placement by measured throughput in the real daemon tick (issue 12): a fresh box puts a lone
job on the faster GPU, the speed model learns from the epochs jobs report and overrides a wrong
prior, `show`'s events say why, and an elastic TAO stage is told the count it got."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusched.config import Settings
from gpusched.daemon import MODEL_MIN_REFIT_S
from gpusched.gpus import SimulatedInventory
from gpusched.models import GpuRequest
from gpusched.runners.local import LocalRunner
from gpusched.service import Service
from gpusched.stages import StageRequest, build_job
from gpusched.testing.clock import FakeClock
from gpusched.testing.ticks import ended, run_until, submit

SPEEDS = "RTX A4000:16G:1.40,RTX 2070:8G:1.0"


@pytest.fixture
def box(settings: Settings, clock: FakeClock) -> Iterator[Service]:
    """The seed's workstation, simulated with prior speeds as the demo runs it."""
    s = settings.model_copy(update={"gpus": settings.gpus.model_copy(update={"simulate": SPEEDS})})
    svc = Service(s, inventory=SimulatedInventory(SPEEDS),
                  runners={"local": LocalRunner.of(s)}, clock=clock)
    yield svc
    svc.close()


def gpus_of(svc: Service, job_id: int) -> list[int]:
    att = svc.store.attempt(job_id, 1)
    index = {g.uuid: g.index for g in svc.daemon.gpus}
    return [index[u] for u in json.loads(att["gpus"])]


def placed_reason(svc: Service, job_id: int) -> str:
    events = svc.store.events(job_id)
    return next(e["reason"] for e in events if e["to_status"] == "starting")


def test_a_lone_job_goes_to_the_a4000_on_a_fresh_box(box: Service) -> None:
    job = submit(box, "true")
    run_until(box, ended(box, job))
    assert gpus_of(box, job) == [0]
    assert placed_reason(box, job).startswith("placed: GPU 0 (RTX A4000)")


def epoch_lines(seconds: float, n: int = 6) -> str:
    return "; ".join(
        f"echo 'GPUSCHED_EPOCH {{\"epoch\": {e}, \"max_epoch\": {n}, \"seconds\": {seconds}}}'"
        for e in range(1, n + 1))


def test_measured_epochs_override_the_prior(box: Service) -> None:
    """The 2070 reports faster epochs of workload `w` than the A4000: the next `w` job goes
    to the 2070 although the prior says the A4000 is 1.4x faster, and says so with times."""
    on_a = submit(box, "sh", "-c", epoch_lines(60.0), name="w", gpus=GpuRequest(ids=("0",)))
    on_b = submit(box, "sh", "-c", epoch_lines(30.0), name="w", gpus=GpuRequest(ids=("1",)))
    run_until(box, ended(box, on_a, on_b))
    # refit soon after jobs that timed epochs end, not only every model_refresh_s (60 s)
    box.clock.advance(MODEL_MIN_REFIT_S)  # type: ignore[attr-defined]
    nxt = submit(box, "true", name="w")
    run_until(box, ended(box, nxt))
    assert gpus_of(box, nxt) == [1]
    m = box.daemon.speed_model
    assert m is not None and m.speed("RTX 2070") > m.speed("RTX A4000")
    # `show` lists this event: the GPUs with what the model now expects of them
    assert placed_reason(box, nxt).startswith("placed: GPU 1 (RTX 2070): 30 s/epoch; GPU 0 "
                                              "(RTX A4000): 60 s/epoch")


def test_an_elastic_stage_is_told_the_count_it_got(box: Service, root: Path) -> None:
    """`--gpus 1-2` on an idle box: the scheduler gangs, and TAO gets --gpus 2 with both
    indices; with another job waiting it would split (unit tests cover the choice)."""
    settings = box.settings.model_copy(update={"tao": box.settings.tao.model_copy(
        update={"runner": "local", "local_command": ["sh", "-c", "exit 0", "fake-tao"]})})
    req = StageRequest(stage={"task": "train", "spec": str(root / "spec.txt"),
                              "results_dir": str(root / "results"), "gpus": 1, "gpus_max": 2})
    spec = build_job(req, settings)
    assert spec.gpus.count == 1 and spec.gpus.count_max == 2
    spec = spec.model_copy(update={"workdir": str(root)})
    job = box.store.submit(spec, owner_uid=os.getuid(), owner="tester", now=box.clock.now())
    run_until(box, lambda: box.store.get_job(job)["status"] != "queued")
    att = box.store.attempt(job, 1)
    ran = json.loads(att["command"])
    assert ran[ran.index("--gpus") + 1] == "2"
    assert ran[ran.index("--gpu_index") + 1:ran.index("--gpu_index") + 3] == ["0", "1"]
    assert "nothing else waits" in placed_reason(box, job)
    run_until(box, ended(box, job))


TRAIN_WL = "ssd/resnet18 384x1248 bs16 kitti_train"


def _timed(box: Service) -> None:
    """The store has seen the example's train at 48 s/epoch on the A4000, 67 on the 2070."""
    box.daemon.tick(box.clock.now())  # the inventory
    for name, secs in (("RTX A4000", 48.0), ("RTX 2070", 67.0)):
        job = submit(box, "true", hold=True)
        uuid = next(g.uuid for g in box.daemon.gpus if g.name == name)
        box.store.record_epochs(job, 1, [
            {"epoch": e, "max_epoch": 8, "seconds": secs, "validated": 0,
             "started_at": box.clock.now() - secs, "ended_at": box.clock.now()}
            for e in range(1, 9)],
            gpu_uuids=[uuid], gpu_models=[name], workload=TRAIN_WL)


def _train_stage(box: Service, root: Path) -> int:
    settings = box.settings.model_copy(update={"tao": box.settings.tao.model_copy(
        update={"runner": "local", "local_command": ["sh", "-c", "exit 0", "fake-tao"]})})
    req = StageRequest(stage={"task": "train", "spec": str(root / "spec.txt"),
                              "results_dir": str(root / "results")})
    spec = build_job(req, settings).model_copy(update={"workdir": str(root)})
    return box.store.submit(spec, owner_uid=os.getuid(), owner="tester", now=box.clock.now())


HOLDER = ("e=1; while [ $e -lt {stop} ]; do echo \"GPUSCHED_EPOCH {{\\\"epoch\\\": $e, "
          "\\\"max_epoch\\\": $((e+1)), \\\"seconds\\\": 30}}\"; e=$((e+1)); sleep 0.05; done; "
          "sleep 30")


@pytest.mark.parametrize("case", ["sliding", "hung"])
def test_a_wait_for_a_faster_gpu_ends(box: Service, root: Path, monkeypatch: pytest.MonkeyPatch,
                                      case: str) -> None:
    """A holder on the A4000 whose ETA always says 'one more epoch' (sliding), or that stopped
    reporting epochs (hung): a train that waits for the A4000 takes the idle 2070 once it
    has waited daemon.MAX_WAIT_FOR_FASTER_S in all (here 5 s), or once the holder's last
    epoch plus its ETA has passed."""
    import gpusched.daemon as daemon_mod

    monkeypatch.setattr(daemon_mod, "MAX_WAIT_FOR_FASTER_S", 5.0 if case == "sliding" else 1e9)
    _timed(box)
    holder = submit(box, "sh", "-c", HOLDER.format(stop=10**6 if case == "sliding" else 4),
                    gpus=GpuRequest(ids=("0",)))
    run_until(box, lambda: (box.daemon.progress_of(holder, 1) or {}).get("epoch", 0) >= 2)
    box.daemon.speed_model = None  # refit now, with the epochs recorded above
    train = _train_stage(box, root)
    box.daemon.tick(box.clock.now())
    assert box.daemon.waiting.get(train, "").startswith("waits for GPU 0 (RTX A4000)"), \
        box.daemon.waiting
    run_until(box, lambda: box.store.get_job(train)["status"] != "queued", timeout=30)
    assert gpus_of(box, train) == [1]
    assert box.store.get_job(holder)["status"] == "running"  # it never gave the A4000 back
    box.store.request_cancel(holder, actor="tester", now=box.clock.now())
    run_until(box, ended(box, holder, train))


def test_one_bad_job_does_not_stop_placement(box: Service) -> None:
    """A job whose stage the planner cannot read (stored by an older daemon, or forged before
    /v1/jobs refused it) fails with the reason; a job reporting a 1.5e308 s epoch gets no
    timing (it overflowed the speed model's fit); the next job still runs."""
    from gpusched.models import JobSpec

    bad = box.store.submit(JobSpec(command=["true"], kind="tao:train", stage={"refs": ["x"]},
                                   workdir=str(box.settings.state_dir)),
                           owner_uid=os.getuid(), owner="tester", now=box.clock.now())
    huge = submit(box, "sh", "-c", "echo 'GPUSCHED_EPOCH {\"epoch\": 2, \"seconds\": 1.5e308}'")
    run_until(box, ended(box, bad, huge))
    assert box.store.get_job(bad)["status"] == "failed"
    assert "cannot be planned" in (box.store.get_job(bad)["reason"] or "")
    assert [r["seconds"] for r in box.store.epochs(job_id=huge)] == [None]
    box.daemon.speed_model = None  # refit with that row
    nxt = submit(box, "true")
    run_until(box, ended(box, nxt))
    assert box.store.get_job(nxt)["status"] == "succeeded" and not box.daemon.step_errors
