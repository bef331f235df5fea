"""TAO stages through the real daemon and CLI, on the fake TAO entrypoint (local runner).

`gpusched tao ssd TASK ...` takes TAO's own command line: bad input is refused before anything
is queued; a train stage records its checkpoints, the best one (by the CSV's mAP) and its epoch
rows; and success is judged from more than the exit code (exit status, the `Execution status`
line, status.json and the artifacts, as gpusched/stages.py describes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusched.parsers import parse_training_csv
from gpusched.testing.harness import DaemonProcess, fake_tao_env, short_tmpdir

pytestmark = pytest.mark.acceptance

EXAMPLE_SPEC = Path(__file__).resolve().parents[2] / "examples/specs/ssd_train_resnet18_kitti.txt"
SCALE = "GPUSCHED_FAKE_TAO_SCALE=0.003"


def small_spec(dst: Path, *, num_epochs: int, checkpoint_interval: int,
               validation_period: int) -> Path:
    """The example training spec with fewer epochs."""
    text = EXAMPLE_SPEC.read_text()
    for key, value in (("num_epochs", num_epochs), ("checkpoint_interval", checkpoint_interval),
                       ("validation_period_during_training", validation_period)):
        text, n = re.subn(rf"\b{key}: \d+", f"{key}: {value}", text)
        assert n == 1, key
    dst.write_text(text)
    return dst


def show(d: DaemonProcess, job_id: int) -> dict[str, Any]:
    r = d.cli("show", str(job_id), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def queue_stage(d: DaemonProcess, *args: str) -> int:
    r = d.cli("tao", *args)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def wait_ended(d: DaemonProcess, ids: list[int], timeout: float = 60) -> None:
    r = d.cli("wait", *map(str, ids), "--timeout", str(timeout), timeout=timeout + 15)
    assert r.returncode in (0, 1), f"wait: {r.returncode} {r.stdout} {r.stderr}\n{d.log()}"


# -- bad input: a clear error, nothing queued ------------------------------------------------


@pytest.fixture(scope="module")
def bad_input_daemon() -> Iterator[tuple[DaemonProcess, Path]]:
    root = short_tmpdir("gsb")
    d = DaemonProcess(root / "state", env=fake_tao_env()).start()
    small_spec(root / "train.txt", num_epochs=4, checkpoint_interval=2, validation_period=2)
    (root / "model.hdf5").write_text('{"fake_tao_model": true}\n')
    yield d, root
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


OUTSIDE = "/var/tmp/gsched-outside-results"

BAD_INPUT = {
    "unknown task": (["ssd", "fly"], ["unknown task 'fly'"]),
    "prune threshold 1.5": (["ssd", "prune", "-m", "{root}/model.hdf5", "-o", "{root}/p.hdf5",
                             "-pth", "1.5"], ["threshold", "less than 1"]),
    "prune normalizer L3": (["ssd", "prune", "-m", "{root}/model.hdf5", "-o", "{root}/p.hdf5",
                             "-n", "L3"], ["normalizer", "'max' or 'L2'"]),
    "prune equalization median": (["ssd", "prune", "-m", "{root}/model.hdf5", "-o",
                                   "{root}/p.hdf5", "-eq", "median"],
                                  ["equalization", "union"]),
    "missing spec file": (["ssd", "train", "-e", "{root}/nope.txt", "-r", "{root}/res"],
                          ["spec file", "nope.txt", "does not exist"]),
    "results outside the allowed roots": (["ssd", "train", "-e", "{root}/train.txt", "-r",
                                           OUTSIDE], [OUTSIDE, "outside the allowed roots"]),
    "prune on two GPUs": (["ssd", "prune", "-m", "{root}/model.hdf5", "-o", "{root}/p.hdf5",
                           "--gpus", "2"], ["TAO runs only train on more than one GPU"]),
    "evaluate on two GPUs": (["ssd", "evaluate", "-m", "{root}/model.hdf5", "-e",
                              "{root}/train.txt", "--gpus", "2"],
                             ["TAO runs only train on more than one GPU"]),
    # a notebook's --gpus 2 --gpu_index 0 1 is a pinned request (issue 13); a mismatch is not
    "gpu_index": (["ssd", "train", "-e", "{root}/train.txt", "-r", "{root}/res",
                   "--gpus", "2", "--gpu_index", "1"], ["as many indices as GPUs"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_and_nothing_is_queued(
        bad_input_daemon: tuple[DaemonProcess, Path], case: str) -> None:
    d, root = bad_input_daemon
    assert not os.path.realpath(OUTSIDE).startswith("/tmp/")
    argv, expected = BAD_INPUT[case]
    r = d.cli("tao", "-e", SCALE, *(a.format(root=root) for a in argv))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("gpusched: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    for part in expected:
        assert part in r.stderr, f"{part!r} not in {r.stderr!r}"
    jobs = d.cli("ls", "--all", "--json")
    assert jobs.returncode == 0 and json.loads(jobs.stdout) == []
    assert not Path(OUTSIDE).exists()


# -- a train stage ----------------------------------------------------------------------------


def test_train_records_checkpoints_best_checkpoint_and_epochs(tao_daemon: DaemonProcess,
                                                              root: Path) -> None:
    d = tao_daemon
    spec = small_spec(root / "train.txt", num_epochs=12, checkpoint_interval=4,
                      validation_period=2)
    results = root / "unpruned"
    job = queue_stage(d, "-e", SCALE, "ssd", "train", "-e", str(spec), "-r", str(results),
                      "-k", "key")
    wait_ended(d, [job])
    j = show(d, job)
    assert j["status"] == "succeeded", (j["reason"], d.cli("logs", str(job)).stdout[-2000:])
    assert j["exit_code"] == 0 and j["kind"] == "tao:train"

    r = d.cli("artifacts", str(job), "--json")
    assert r.returncode == 0, r.stderr
    arts = json.loads(r.stdout)
    ckpts = sorted((a for a in arts if a["kind"] == "checkpoint"), key=lambda a: a["epoch"])
    assert [a["epoch"] for a in ckpts] == [4, 8, 12]  # exactly every checkpoint_interval
    for a in ckpts:
        assert a["path"] == str(results / "weights" / f"ssd_resnet18_epoch_{a['epoch']:03d}.hdf5")
        assert Path(a["path"]).is_file()
    assert sorted(p.name for p in (results / "weights").iterdir()) == [
        Path(a["path"]).name for a in ckpts]

    # the best checkpoint: argmax of the CSV's mAP over the epochs that have a checkpoint
    csv_path = results / "ssd_training_log_resnet18.csv"
    rows = parse_training_csv(csv_path.read_text())
    assert [r.epoch for r in rows] == list(range(1, 13))
    maps = {r.epoch: r.map for r in rows if r.map is not None}
    assert sorted(maps) == [2, 4, 6, 8, 10, 12]  # validated epochs only
    want = max((maps[a["epoch"]], a["epoch"]) for a in ckpts)
    best = [a for a in arts if a["kind"] == "best_checkpoint"]
    assert len(best) == 1
    assert best[0]["epoch"] == want[1]
    assert best[0]["metrics"]["mAP"] == pytest.approx(want[0])
    assert best[0]["path"] == next(a["path"] for a in ckpts if a["epoch"] == want[1])
    latest = [a for a in arts if a["kind"] == "latest_checkpoint"]
    assert [a["epoch"] for a in latest] == [12]

    # epoch rows: the throughput report has a set for the job's GPU model
    names = {g["index"]: g["name"] for g in json.loads(d.cli("gpus", "--json").stdout)}
    assert len(j["gpu_indices"]) == 1
    model = names[j["gpu_indices"][0]]
    r = d.cli("report", "throughput", "--format", "json")
    assert r.returncode == 0, r.stderr
    sets = json.loads(r.stdout)["sets"]
    mine = [s for s in sets if s["gpu_models"] == [model]]
    assert len(mine) == 1, sets
    # epochs 2..12 minus the validated ones: 3, 5, 7, 9, 11
    assert mine[0]["samples"] == 5 and mine[0]["median_s"] > 0
    assert mine[0]["workload"].startswith("ssd/resnet18 ") and " bs" in mine[0]["workload"]


# -- failure modes: never judged by the exit code alone ----------------------------------------


def test_train_error_and_interrupt_fail_the_job(tao_daemon: DaemonProcess, root: Path) -> None:
    d = tao_daemon
    spec = small_spec(root / "train.txt", num_epochs=8, checkpoint_interval=2,
                      validation_period=2)
    err = queue_stage(d, "-e", SCALE, "-e", "GPUSCHED_FAKE_TAO_FAIL=train:error@3",
                      "ssd", "train", "-e", str(spec), "-r", str(root / "err"))
    intr = queue_stage(d, "-e", SCALE, "-e", "GPUSCHED_FAKE_TAO_FAIL=train:interrupt@3",
                       "ssd", "train", "-e", str(spec), "-r", str(root / "intr"))
    wait_ended(d, [err, intr])

    je = show(d, err)
    assert je["status"] == "failed", je
    assert je["exit_code"] == 255
    assert "exit code 255" in je["reason"]
    assert "injected failure at epoch 3" in je["reason"]  # TAO's message from status.json

    ji = show(d, intr)
    assert ji["status"] == "failed", ji
    assert ji["exit_code"] == 0  # TAO exited 0 ...
    assert "status.json" in ji["reason"] and "FAILURE" in ji["reason"]  # ... but said FAILURE
    assert "interrupted" in ji["reason"]
    log = d.cli("logs", str(intr)).stdout
    # TAO's train catches the interrupt and returns, so its entrypoint says PASS: only
    # status.json's FAILURE tells (nvidia_tao_tf1/cv/ssd/scripts/train.py)
    assert "Training was interrupted." in log and "Execution status: PASS" in log

    for j in (je, ji):
        assert "succeeded" not in {e["to_status"] for e in j["events"]}
        assert [a["state"] for a in j["attempts"]] == ["ended"]


def test_a_host_tao_runs_on_the_gpu_it_was_given(tao_daemon: DaemonProcess, root: Path) -> None:
    """TAO's entrypoint (a host install, the local runner) sets CUDA_VISIBLE_DEVICES from
    --gpu_index itself, checked against the host's GPUs: a stage allocated GPU 1 must be given
    --gpu_index 1, or it runs on GPU 0 beside another job (issue 13, point 1)."""
    d = tao_daemon
    spec = small_spec(root / "train.txt", num_epochs=2, checkpoint_interval=1,
                      validation_period=1)
    job = queue_stage(d, "--on", "1", "--env", SCALE, "ssd", "train", "-e", str(spec),
                      "-r", str(root / "res"))
    wait_ended(d, [job])
    j = show(d, job)
    assert j["status"] == "succeeded", j
    log = d.cli("logs", str(job)).stdout
    assert "fake TAO: running on host GPU index(es) 1 (RTX 2070)" in log, log[:2000]
    assert "--gpu_index 1" in " ".join(json.loads(j["attempts"][-1]["command"]))
    epochs = d.client().get(f"/v1/epochs?job={job}")
    assert {json.dumps(e["gpu_models"]) for e in epochs} == {json.dumps('["RTX 2070"]')}
    shown = d.cli("show", str(job)).stdout
    assert re.search(r"ran as: .*--gpu_index 1\b", shown), shown
