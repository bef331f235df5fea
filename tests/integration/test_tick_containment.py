"""One bad job or pipeline must never stop the scheduler for everyone (issue 11, points 6 and 14).

The tick runs against a real SQLite file and real local processes with a FakeClock. A job or
pipeline whose own stored data makes a step raise fails with the reason; every other step and
job goes on.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from gpusched.pipelines import GateDef, PipelineDef, gate_decision
from gpusched.service import Service
from gpusched.testing.ticks import TERMINAL, restarted, run_until, status, submit


def corrupt(svc: Service, sql: str, *params: object) -> None:
    """Write a row the way an older gpusched (or a bug) could have left it."""
    conn = sqlite3.connect(svc.settings.db_path, timeout=30)
    with conn:
        conn.execute(sql, params)
    conn.close()


def test_a_job_whose_request_cannot_be_read_fails_alone(service: Service) -> None:
    bad = submit(service, "true")
    corrupt(service, "UPDATE jobs SET request = ? WHERE id = ?", '{"count": "many"}', bad)
    good = submit(service, "sh", "-c", "echo fine")
    run_until(service, lambda: status(service, good) in TERMINAL)
    assert status(service, good) == "succeeded"
    row = service.store.get_job(bad)
    assert row["status"] == "failed"
    assert "GPU request cannot be read" in row["reason"]
    assert service.daemon.step_errors == {}


def test_a_stage_that_cannot_be_built_at_launch_fails_alone(service: Service) -> None:
    """A TAO stage whose stored request is bad (a pruning threshold of 0 from an old gate)
    raised on every tick before launch and stopped every launch behind it."""
    upstream = submit(service, "true")
    run_until(service, lambda: status(service, upstream) in TERMINAL)
    service.store.record_artifacts(upstream, 1, [{"kind": "best_checkpoint",
                                                  "path": "/tmp/model.hdf5"}],
                                   service.clock.now())
    stage = submit(service, "true", kind="tao:prune", stage={
        "refs": {"model": f"@best_checkpoint:{upstream}"},
        "request": {"stage": {"task": "prune", "threshold": 0.0}}})
    good = submit(service, "sh", "-c", "echo fine")
    run_until(service, lambda: status(service, good) in TERMINAL and
              status(service, stage) in TERMINAL)
    assert status(service, good) == "succeeded"
    assert status(service, stage) == "failed"
    assert "bad stage" in service.store.get_job(stage)["reason"]


def test_a_pipeline_whose_gate_breaks_fails_alone(service: Service) -> None:
    """A stored pipeline whose gate raises fails with the reason; jobs keep launching."""
    pid = service.store.create_pipeline("broken", owner_uid=os.getuid(), owner="tester",
                                        spec_json='{"def": {"name": "x"}}',
                                        now=service.clock.now())
    good = submit(service, "sh", "-c", "echo fine")
    run_until(service, lambda: status(service, good) in TERMINAL)
    assert status(service, good) == "succeeded"
    row = service.store.get_pipeline(pid)
    assert row["status"] == "failed"
    assert "the gate could not go on" in row["reason"]
    assert service.daemon.health()["checks"]["daemon"]["ok"]


def test_a_failing_step_does_not_stop_the_steps_after_it(service: Service,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a whole step that raises (here: the dependency step) leaves launches running, and
    health names the step."""
    def broken(after_event: int = 0) -> dict[int, tuple[int, str]]:
        raise RuntimeError("boom")

    monkeypatch.setattr(service.store, "broken_dependencies", broken)
    good = submit(service, "sh", "-c", "echo fine")
    run_until(service, lambda: status(service, good) in TERMINAL)
    assert status(service, good) == "succeeded"
    check = service.daemon.health()["checks"]["daemon"]
    assert not check["ok"] and "step dependencies failed: RuntimeError: boom" in check["detail"]


GATE = {"candidate": "eval_pruned", "baseline": "eval"}


def _pipeline(threshold: object, **gate: object) -> dict[str, object]:
    return {"name": "p", "workdir": "/tmp", "gate": {**GATE, **gate}, "stages": {
        "train": {"task": "train", "spec": "s.txt"},
        "eval": {"task": "evaluate", "spec": "s.txt", "needs": ["train"]},
        "prune": {"task": "prune", "threshold": threshold, "needs": ["train"],
                  "model": "best_checkpoint:train"},
        "eval_pruned": {"task": "evaluate", "spec": "s.txt", "needs": ["prune"]}}}


@pytest.mark.parametrize(("threshold", "gate", "needle"), [
    ([0.1, 0.2], {"retry_thresholds": [0.0]}, "gate.retry_thresholds: 0 is not a pruning"),
    ([0.1, 0.2], {"retry_thresholds": [1.5]}, "gate.retry_thresholds: 1.5 is not a pruning"),
    ([0.0003, 0.2], {"backoff": 0.1, "retries": 3}, "reaches a threshold of 0 in retry round"),
    ([0.0, 0.2], {}, "threshold: 0 is not a pruning threshold"),
    ([], {}, "an empty list fans out into no branch"),
    ([round(0.01 * i, 2) for i in range(1, 34)], {}, "at most 32 branches"),
])
def test_gate_ranges_are_checked_at_submission(threshold: object, gate: dict[str, object],
                                               needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        PipelineDef.model_validate(_pipeline(threshold, **gate))


def test_a_gate_stored_before_the_checks_stops_instead_of_pruning_at_zero() -> None:
    gate = GateDef(candidate="a", baseline="b", backoff=0.1, retries=5)
    assert gate_decision(0.7, [], gate, 1, [0.0004]) == ("failed", None)
    assert gate_decision(0.7, [], gate, 1, [0.01]) == ("retry", [0.001])


def test_epochs_after_an_adoption_keep_the_gpu_model(service: Service) -> None:
    """Right after a restart the first tick reads new epochs before it polls the inventory:
    the rows must still name the GPU model (an H200 showed a '?' GPU set)."""
    trigger = service.settings.state_dir / "go"
    line = 'GPUSCHED_EPOCH {"epoch": 1, "max_epoch": 2, "seconds": 4.5}'
    job = submit(service, "sh", "-c", f"while [ ! -e {trigger} ]; do sleep 0.05; done; "
                 f"echo '{line}'; sleep 30", name="adopted")
    run_until(service, lambda: status(service, job) == "running")
    log_path = Path(service.store.attempt(job, 1)["log_path"])  # type: ignore[index]
    with restarted(service) as svc2:
        trigger.touch()
        deadline = time.monotonic() + 15
        while "GPUSCHED_EPOCH" not in log_path.read_text():
            assert time.monotonic() < deadline, "the job never printed its epoch"
            time.sleep(0.02)
        svc2.daemon.tick(svc2.clock.now())  # the first tick of the restarted daemon
        rows = svc2.store.epochs(job_id=job)
        assert [(r["epoch"], r["seconds"]) for r in rows] == [(1, 4.5)]
        assert json.loads(rows[0]["gpu_models"]) == ["RTX 2070"]
        svc2.store.request_cancel(job, actor="tester", now=svc2.clock.now())
        run_until(svc2, lambda: status(svc2, job) in TERMINAL)
