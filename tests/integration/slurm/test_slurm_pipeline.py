"""The TAO SSD pipeline (examples/ssd_resnet18_kitti.toml, fewer epochs) end to end through
Slurm on the fake TAO: every stage is a Slurm job of the pipeline's owner, TAO gets the GPUs
Slurm allocated as its --gpu_index, the three pruning branches fan out and the gate decides."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpusched.testing.harness import short_tmpdir
from gpusched.testing.slurm import SlurmDaemon
from gpusched.testing.users import as_user

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"


def fake_tao_command() -> list[str]:
    """The fake TAO as the job's user runs it on the node: a Python that user can execute (a
    virtualenv's interpreter may live under root's 0700 home), the checkout on PYTHONPATH
    (the fake TAO needs only the standard library)."""
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    return ["/usr/bin/env", f"PYTHONPATH={ROOT}", python, "-m", "gpusched.testing.fake_tao"]


@pytest.fixture
def pipeline_dir(users: dict[str, object]) -> Iterator[Path]:
    root = short_tmpdir("gsslp")
    (root / "specs").mkdir()
    for name in ("ssd_train_resnet18_kitti.txt", "ssd_retrain_resnet18_kitti.txt"):
        text = (EXAMPLES / "specs" / name).read_text()
        for key, value in (("num_epochs", 10), ("checkpoint_interval", 5),
                           ("validation_period_during_training", 5)):
            text = re.sub(rf"(?m)^(\s*{key}\s*:\s*)\S+", rf"\g<1>{value}", text)
        (root / "specs" / name).write_text(text)
    toml = (EXAMPLES / "ssd_resnet18_kitti.toml").read_text()
    (root / "pipeline.toml").write_text(
        re.sub(r"(?m)^threshold = \[[^\]]*\]", "threshold = [0.1, 0.3, 0.6]", toml))
    user = users["gsuser1"]
    for p in (root, *root.rglob("*")):
        os.chown(p, user.pw_uid, user.pw_gid)  # type: ignore[attr-defined]
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_the_ssd_pipeline_runs_through_slurm(slurm_daemon_factory: Callable[..., SlurmDaemon],
                                             pipeline_dir: Path) -> None:
    d = slurm_daemon_factory(
        GPUSCHED_TAO__RUNNER="slurm", GPUSCHED_DOCKER__MOUNT_ROOTS=json.dumps(["/tmp"]),
        GPUSCHED_TAO__LOCAL_COMMAND=json.dumps(fake_tao_command()))
    r = as_user(d, d.user, "pipeline", "run", str(pipeline_dir / "pipeline.toml"),
                "-e", "GPUSCHED_FAKE_TAO_SCALE=0.003", cwd=pipeline_dir)
    assert r.returncode == 0, r.stderr
    pid = int(re.match(r"pipeline (\d+) ", r.stdout)[1])  # type: ignore[index]
    deadline = time.monotonic() + 240
    while True:
        p = json.loads(d.cli("pipeline", "status", str(pid), "--json").stdout)
        if p["status"] != "running":
            break
        assert time.monotonic() < deadline, f"pipeline still running: {p}\n{d.log()}"
        time.sleep(0.25)
    jobs = {j["name"].split("/", 1)[1]: j for j in p["jobs"]}
    assert p["status"] == "succeeded", (p["reason"], {k: (j["status"], j["reason"])
                                                      for k, j in jobs.items()})
    assert len(jobs) == 11  # train, evaluate, 3 x (prune, retrain, evaluate_retrained)
    inst = d.env["GPUSCHED_SLURM__INSTANCE"]
    for name, j in jobs.items():
        att = d.attempt(j["id"])
        assert att["runner"] == "slurm" and att["slurm_job_id"], (name, att)
        assert d.cluster.with_comment(f"gpusched:{inst}:{j['id']}:1") == [att["slurm_job_id"]]
    train = d.output(jobs["train"]["id"])
    # TAO ran on both GPUs Slurm gave it, as host indices (its entrypoint's CUDA_VISIBLE_DEVICES)
    assert "running on host GPU index(es) 0 1 (RTX A4000, RTX 2070)" in train, train[-2000:]
    summary = p["summary"]
    assert summary["result"] is not None and len(summary["branches"]) == 3, summary
