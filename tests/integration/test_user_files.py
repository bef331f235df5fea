"""The files a TAO stage names, read by the root daemon on its user's behalf (issue 11, point
4): the spec file is read once, at submission, through safefs and as the submitting user could
read it; what gpusched plans with is recorded, so the tick and `show` never read it again."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusched.config import DockerSettings, Settings, TaoSettings
from gpusched.errors import SpecError
from gpusched.parsers import spec_facts
from gpusched.progress import recorded_spec_facts, workload_of
from gpusched.stages import StageRequest, build_job, judge, resolve

EXAMPLE_SPEC = Path(__file__).resolve().parents[2] / "examples/specs/ssd_train_resnet18_kitti.txt"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to other uids")
OTHER = 54321  # a uid without a passwd entry


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="gsuf", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def settings(root: Path) -> Settings:
    return Settings(docker=DockerSettings(mount_roots=[str(root)]),
                    tao=TaoSettings(runner="local", local_command=["fake-tao"]))


def train(root: Path, spec: Path, **extra: Any) -> StageRequest:
    return StageRequest(stage={"task": "train", "spec": str(spec),
                               "results_dir": str(root / "results"), **extra})


def test_the_spec_is_read_once_at_submission_and_its_facts_recorded(root: Path) -> None:
    spec = root / "spec.txt"
    spec.write_text(EXAMPLE_SPEC.read_text())
    job = build_job(train(root, spec), settings(root))
    facts = (job.stage or {})["spec_facts"]
    assert facts == spec_facts(EXAMPLE_SPEC.read_text())
    dumped = job.model_dump(mode="json")
    key = workload_of(dumped)
    # the file is gone (or a FIFO now): the tick's workload key and the ETA need no file
    spec.unlink()
    os.mkfifo(spec)
    assert workload_of(dumped) == key
    assert recorded_spec_facts(dumped)["num_epochs"] == facts["num_epochs"]
    # resolving references at launch carries the recorded facts, reading nothing
    assert resolve(job, settings(root), lambda j, k: None).stage == job.stage


def test_specs_stored_before_facts_were_recorded_are_read_through_safefs(root: Path) -> None:
    spec = root / "spec.txt"
    spec.write_text(EXAMPLE_SPEC.read_text())
    dumped = build_job(train(root, spec), settings(root)).model_dump(mode="json")
    del dumped["stage"]["spec_facts"]
    key = workload_of(dumped)
    assert key == "ssd/resnet18 384x1248 bs16 kitti_train"  # read from the file, through safefs
    spec.unlink()
    os.mkfifo(spec)  # never blocks: read as a missing file
    assert workload_of(dumped) == workload_of({**dumped, "stage": {
        **dumped["stage"], "spec_facts": spec_facts("")}})
    assert recorded_spec_facts(dumped)["num_epochs"] is None


def test_a_spec_that_is_not_a_regular_file_is_refused(root: Path) -> None:
    fifo = root / "spec.txt"
    os.mkfifo(fifo)
    with pytest.raises(SpecError, match="not a regular file"):
        build_job(train(root, fifo), settings(root))
    with pytest.raises(SpecError, match="does not exist"):
        build_job(train(root, root / "missing.txt"), settings(root))
    place = root / "users"
    place.mkdir()
    os.chmod(place, 0o1777)
    (root / "real.txt").write_text(EXAMPLE_SPEC.read_text())
    (place / "spec.txt").symlink_to(root / "real.txt")
    with pytest.raises(SpecError, match="symlink"):
        build_job(train(root, place / "spec.txt"), settings(root))


@needs_root
def test_a_user_cannot_have_the_daemon_read_a_spec_they_could_not_read(root: Path) -> None:
    secret = root / "secret.txt"
    secret.write_text(EXAMPLE_SPEC.read_text())
    os.chmod(secret, 0o600)
    with pytest.raises(SpecError, match="may not read"):
        build_job(train(root, secret), settings(root), owner_uid=OTHER)
    os.chown(secret, OTHER, OTHER)  # their own 0600 spec: fine
    job = build_job(train(root, secret), settings(root), owner_uid=OTHER)
    assert (job.stage or {})["spec_facts"]["num_epochs"] is not None


def test_judging_does_not_follow_a_status_json_symlink_out_of_the_results(root: Path) -> None:
    spec = root / "spec.txt"
    spec.write_text(EXAMPLE_SPEC.read_text())
    results = root / "results"
    results.mkdir()
    os.chmod(results, 0o1777)  # a directory its user controls
    job = build_job(train(root, spec), settings(root))  # before the run writes (issue 13, 3)
    outside = root / "outside.json"
    outside.write_text('{"status": "FAILURE", "message": "outside"}\n')
    (results / "status.json").symlink_to(outside)
    log = root / "log"
    log.write_text("Execution status: PASS\n")
    ok, reason, artifacts = judge(job, 0, log)
    assert not ok
    assert "outside" not in (reason or "")
    assert reason == "exit 0, but the expected checkpoint is missing"
    assert artifacts == []
