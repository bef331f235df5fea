"""TAO stages as real users run them (issue 13, points 1-4 and 6, stage side): the GPUs TAO is
told at launch, resuming from the latest checkpoint, refusing a results directory that holds
another run, TAO 5's file suffixes, and a QAT spec with a non-QAT model refused at submission.
The CLI's ``--set`` and ``--overwrite`` run as the user, before anything is sent."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gpusched.config import DockerSettings, Settings, TaoSettings
from gpusched.errors import SpecError
from gpusched.models import Mount
from gpusched.stages import StageRequest, build_job, collect, for_launch, judge, resolve

EXAMPLE_SPEC = Path(__file__).resolve().parents[2] / "examples/specs/ssd_train_resnet18_kitti.txt"


def settings(root: Path, runner: str = "local") -> Settings:
    return Settings(docker=DockerSettings(mount_roots=[str(root)]),
                    tao=TaoSettings(runner=runner, local_command=["fake-tao"]))


def model(path: Path, **header: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fake_tao_model": True, **header}) + "\n")
    return path


def train_req(root: Path, **stage: Any) -> StageRequest:
    extra = {k: stage.pop(k) for k in ("runner", "mounts", "on") if k in stage}
    return StageRequest(stage={"task": "train", "spec": str(root / "spec.txt"),
                               "results_dir": str(root / "results"), **stage}, **extra)


def flag(argv: list[str], name: str) -> list[str]:
    i = argv.index(name) + 1
    j = i
    while j < len(argv) and not argv[j].startswith("-"):
        j += 1
    return argv[i:j]


# -- point 1: the GPUs TAO is told ---------------------------------------------------------


def test_the_local_runner_passes_the_host_indices_of_the_allocated_gpus(root: Path) -> None:
    job = build_job(train_req(root, gpus=2), settings(root))
    assert flag(job.command, "--gpu_index") == ["0", "1"]  # not known before launch
    launched = for_launch(job, attempt=1, gpu_indices=[1, 3], owner_uid=None)
    assert flag(launched.command, "--gpu_index") == ["1", "3"]
    assert launched.command[:3] == job.command[:3]
    assert job.command != launched.command  # the stored spec is not changed


def test_a_container_sees_only_its_gpus_and_gets_0_to_n(root: Path) -> None:
    req = train_req(root, gpus=2, runner="docker",
                    mounts=[Mount(source=str(root), target="/workspace")])
    job = build_job(req, settings(root, "docker"))
    launched = for_launch(job, attempt=1, gpu_indices=[1, 3], owner_uid=None)
    assert flag(launched.command, "--gpu_index") == ["0", "1"]


def test_plain_jobs_are_unchanged(root: Path) -> None:
    from gpusched.models import JobSpec

    plain = JobSpec(command=["python", "x.py", "--gpu_index", "0"])
    assert for_launch(plain, attempt=2, gpu_indices=[3], owner_uid=None) == plain


# -- point 2: a retry or --resume continues from the latest checkpoint ---------------------


def test_a_retry_continues_from_the_latest_checkpoint_with_a_1_based_initial_epoch(
        root: Path) -> None:
    job = build_job(train_req(root), settings(root))
    first = for_launch(job, attempt=1, gpu_indices=[2], owner_uid=None)
    assert "--initial_epoch" not in first.command and "-m" not in first.command
    weights = root / "results" / "weights"
    for e in (10, 20, 30):
        model(weights / f"ssd_resnet18_epoch_{e:03d}.hdf5", epoch=e)
    again = for_launch(job, attempt=2, gpu_indices=[2], owner_uid=None)
    assert flag(again.command, "-m") == [str(weights / "ssd_resnet18_epoch_030.hdf5")]
    assert flag(again.command, "--initial_epoch") == ["31"]
    assert again.stage and again.stage["launch"]["initial_epoch"] == 31
    # the entrypoint's flags stay last, with the host index
    assert again.command[-4:] == ["--gpus", "1", "--gpu_index", "2"]


def test_a_retried_retrain_resumes_its_checkpoint_not_the_pruned_model(root: Path) -> None:
    pruned = model(root / "pruned.hdf5", pth=0.1)
    req = train_req(root, task="retrain", model=str(pruned), runner="docker",
                    mounts=[Mount(source=str(root), target="/workspace")])
    job = build_job(req, settings(root, "docker"))
    model(root / "results" / "weights" / "ssd_resnet18_epoch_005.hdf5")
    again = for_launch(job, attempt=2, gpu_indices=[4], owner_uid=None)
    assert flag(again.command, "-m") == ["/workspace/results/weights/ssd_resnet18_epoch_005.hdf5"]
    assert again.command.count("-m") == 1
    assert flag(again.command, "--initial_epoch") == ["6"]


def test_resume_at_the_first_attempt(root: Path) -> None:
    with pytest.raises(SpecError, match="no checkpoint to resume from"):
        build_job(train_req(root, resume=True), settings(root))
    model(root / "results" / "weights" / "ssd_resnet18_epoch_070.hdf5")
    (root / "results" / "status.json").write_text('{"status": "STARTED"}\n')
    job = build_job(train_req(root, resume=True), settings(root))  # its own run: allowed
    launched = for_launch(job, attempt=1, gpu_indices=[0], owner_uid=None)
    assert flag(launched.command, "--initial_epoch") == ["71"]


# -- point 3: another run's output is refused at submission --------------------------------


@pytest.mark.parametrize("left", ["status.json", "weights/ssd_resnet18_epoch_080.hdf5",
                                  "ssd_training_log_resnet18.csv"])
def test_a_results_dir_with_another_runs_output_is_refused(root: Path, left: str) -> None:
    path = root / "results" / left
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}\n")
    with pytest.raises(SpecError) as err:
        build_job(train_req(root), settings(root))
    msg = err.value.message
    assert left.split("/")[0] in msg and "another -r" in msg and "--overwrite" in msg


def test_hidden_old_runs_and_launch_time_resolution_do_not_refuse(root: Path) -> None:
    old = root / "results" / ".gpusched-old-20250101-000000"
    old.mkdir(parents=True)
    (old / "status.json").write_text("{}\n")
    pruned = model(root / "pruned.hdf5")
    req = train_req(root, task="retrain", model="@pruned_model:1")
    job = build_job(req, settings(root))
    (root / "results" / "status.json").write_text("{}\n")  # an earlier attempt of this stage
    resolved = resolve(job, settings(root), lambda j, k: {"path": str(pruned)})
    assert flag(resolved.command, "-m") == [str(pruned)]


# -- point 4: TAO 5 suffixes, export's results dir, evaluate's status.json -----------------


def test_prune_and_export_find_the_suffixed_files(root: Path, tmp_path: Path) -> None:
    from gpusched.tao import TaoStage

    model(root / "p" / "pruned.hdf5")
    prune = TaoStage(task="prune", model=str(root / "m.hdf5"), output=str(root / "p/pruned"))
    arts = collect(prune, "", {})
    assert [(a["kind"], a["path"]) for a in arts] == [("pruned_model",
                                                       str(root / "p/pruned.hdf5"))]
    (root / "x").mkdir()
    (root / "x" / "model.onnx").write_bytes(b"onnx")
    export = TaoStage(task="export", model=str(root / "m.hdf5"), output=str(root / "x/model"))
    arts = collect(export, "", {})
    assert [(a["kind"], a["path"]) for a in arts] == [("exported_model",
                                                       str(root / "x/model.onnx"))]


def test_export_and_evaluate_are_judged_from_their_status_json(root: Path) -> None:
    log = root / "job.log"
    log.write_text("Execution status: PASS\n")
    (root / "ex").mkdir()
    (root / "ex" / "status.json").write_text(
        '{"status": "STARTED", "message": "Starting export."}\n'
        '{"status": "FAILURE", "message": "Default output file exists"}\n')
    (root / "x").mkdir()
    (root / "x" / "model.onnx").write_bytes(b"onnx")
    model(root / "m.hdf5")
    from gpusched.models import JobSpec

    def spec(stage: dict[str, Any]) -> JobSpec:
        return JobSpec(command=["fake-tao"], kind=f"tao:{stage['task']}",
                       stage={"stage": stage, "spec_facts": {}})

    ok, reason, _ = judge(spec({"task": "export", "model": str(root / "m.hdf5"),
                                "output": str(root / "x/model"),
                                "results_dir": str(root / "ex")}), 0, log)
    assert not ok and reason and "Default output file exists" in reason
    weights = root / "run" / "weights"
    model(weights / "ssd_resnet18_epoch_010.hdf5")
    (weights / "status.json").write_text(  # an earlier evaluation, then this one
        '{"status": "STARTED"}\n{"status": "SUCCESS", "kpi": {"mAP": 0.5}}\n'
        '{"status": "STARTED"}\n{"status": "SUCCESS", "kpi": {"mAP": 0.6543219}}\n')
    log.write_text("Execution status: PASS\n*" * 31 + "\n   mAP   0.654\n")
    ok, reason, arts = judge(spec({"task": "evaluate", "spec": str(root / "spec.txt"),
                                   "model": str(weights / "ssd_resnet18_epoch_010.hdf5")}), 0,
                             log)
    assert ok, reason
    assert arts[0]["metrics"]["mAP"] == pytest.approx(0.6543219)  # not the 3-decimal table


def test_after_a_resume_the_best_epoch_comes_from_status_json_too(root: Path) -> None:
    from gpusched.tao import TaoStage

    res = root / "results"
    for e in (70, 80):
        model(res / "weights" / f"ssd_resnet18_epoch_{e:03d}.hdf5")
    # the resumed run's CSV restarts at epoch 71; status.json was appended
    (res / "ssd_training_log_resnet18.csv").write_text(
        "epoch,loss,lr,mAP\r\n71,2.0,0.001,nan\r\n80,2.0,0.001,0.710\r\n")
    records = [{"epoch": 70, "graphical": {"mean average precision": "0.734"}},
               {"epoch": 80, "graphical": {"mean average precision": "0.710"}}]
    stage = TaoStage(task="train", spec=str(root / "spec.txt"), results_dir=str(res))
    best = next(a for a in collect(stage, "", {}, {"checkpoint_interval": 10},
                                   records=records) if a["kind"] == "best_checkpoint")
    assert best["epoch"] == 70 and best["metrics"]["mAP"] == pytest.approx(0.734)


# -- point 6: QAT mismatch refused at submission; --set and --overwrite in the CLI ---------


def test_a_qat_spec_with_a_non_qat_pruned_model_is_refused(root: Path) -> None:
    from gpusched.specedit import apply_overrides

    qat = root / "qat.txt"
    qat.write_text(apply_overrides(EXAMPLE_SPEC.read_text(), {"training_config.enable_qat": True}))
    plain_model = model(root / "pruned.hdf5", pth=0.1)
    qat_model = model(root / "pruned_qat.hdf5", pth=0.1, qat=True)

    def retrain(spec: Path, m: Path) -> StageRequest:
        return StageRequest(stage={"task": "retrain", "spec": str(spec), "model": str(m),
                                   "results_dir": str(root / f"r-{spec.stem}-{m.stem}")})

    with pytest.raises(SpecError, match=r"enables QAT.*not a QAT model"):
        build_job(retrain(qat, plain_model), settings(root))
    with pytest.raises(SpecError, match="is a QAT model but the spec has QAT off"):
        build_job(retrain(root / "spec.txt", qat_model), settings(root))
    build_job(retrain(qat, qat_model), settings(root))
    build_job(retrain(root / "spec.txt", plain_model), settings(root))
    # a real .hdf5: the Keras model_config names the QAT layers
    real = root / "real.hdf5"
    real.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64 + b'{"class_name": "Conv2D"}')
    with pytest.raises(SpecError, match="not a QAT model"):
        build_job(retrain(qat, real), settings(root))
    real.write_bytes(b"\x89HDF\r\n\x1a\n" + b'{"class_name": "QuantizedConv2D"}')
    build_job(retrain(qat, real), settings(root))


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    from gpusched import cli

    got: list[dict[str, Any]] = []

    def submit(path: str, body: Any) -> Any:
        got.append(body)
        return {"id": 7, "status": "queued", "command": []}

    monkeypatch.setattr(cli, "_submit", submit)
    monkeypatch.setenv("HOME", "/nonexistent-gpusched-home")
    return got


def test_set_writes_a_derived_spec_and_the_stage_records_both(root: Path,
                                                              sent: list[dict[str, Any]]) -> None:
    from gpusched.cli import app
    from gpusched.parsers import read_spec_fields

    r = CliRunner().invoke(app, ["tao", "--set", "training_config.num_epochs=10", "ssd",
                                 "train", "-e", str(root / "spec.txt"), "-r",
                                 str(root / "results"), "--set",
                                 "training_config.checkpoint_interval=5"])
    assert r.exit_code == 0, r.output
    req = sent[0]
    derived = Path(req["stage"]["spec"])
    assert derived.parent == root and derived.name.startswith("spec.gpusched-")
    fields = read_spec_fields(derived.read_text())
    assert fields["training_config.num_epochs"] == "10"
    assert fields["training_config.checkpoint_interval"] == "5"
    assert req["spec_original"] == str(root / "spec.txt")
    assert req["overrides"] == {"training_config.num_epochs": 10,
                                "training_config.checkpoint_interval": 5}
    job = build_job(StageRequest.model_validate(req), settings(root))
    assert job.stage and job.stage["overrides"] == req["overrides"]
    assert job.stage["spec_facts"]["num_epochs"] == 10
    bad = CliRunner().invoke(app, ["tao", "--set", "training_config.num_epoch=10", "ssd",
                                   "train", "-e", str(root / "spec.txt"), "-r",
                                   str(root / "results")])
    assert bad.exit_code == 2 and "did you mean num_epochs" in bad.output
    assert len(sent) == 1


def test_overwrite_moves_the_old_run_aside_as_the_user(root: Path,
                                                       sent: list[dict[str, Any]]) -> None:
    from gpusched.cli import app

    res = root / "results"
    model(res / "weights" / "ssd_resnet18_epoch_080.hdf5")
    (res / "status.json").write_text("{}\n")
    (res / "ssd_training_log_resnet18.csv").write_text("epoch\r\n")
    (res / "notes.txt").write_text("mine")
    with pytest.raises(SpecError, match="another run's output"):
        build_job(train_req(root), settings(root))
    r = CliRunner().invoke(app, ["tao", "ssd", "train", "-e", str(root / "spec.txt"), "-r",
                                 str(res), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in res.iterdir() if not p.name.startswith(".")) == ["notes.txt"]
    old = next(res.glob(".gpusched-old-*"))
    assert sorted(p.name for p in old.iterdir()) == ["ssd_training_log_resnet18.csv",
                                                     "status.json", "weights"]
    build_job(StageRequest.model_validate(sent[0]), settings(root))  # now accepted


def test_a_notebooks_gpu_index_is_sent_as_on(root: Path, sent: list[dict[str, Any]]) -> None:
    from gpusched.cli import app

    r = CliRunner().invoke(app, ["tao", "model", "ssd", "train", "-e", str(root / "spec.txt"),
                                 "-r", str(root / "results"), "--gpus", "2", "--gpu_index",
                                 "0", "1"])
    assert r.exit_code == 0, r.output
    assert sent[0]["on"] == ["0", "1"] and sent[0]["stage"]["gpus"] == 2
    assert "--on 0,1" in r.output  # the note (stderr is mixed into output here)


# -- what a review found -------------------------------------------------------------------


def test_a_container_retry_resumes_through_a_symlinked_mount(root: Path) -> None:
    """~/tao-experiments -> /big/disk: the stored mounts' sources are resolved, -r is as
    given; the resumed checkpoint is named under the command's own -r."""
    from gpusched import policy

    (root / "real").mkdir()
    (root / "link").symlink_to(root / "real")
    (root / "link" / "spec.txt").write_text(EXAMPLE_SPEC.read_text())
    req = StageRequest(stage={"task": "train", "spec": str(root / "link" / "spec.txt"),
                              "results_dir": str(root / "link" / "results")},
                       runner="docker", mounts=[Mount(source=str(root / "link"),
                                                      target="/workspace")])
    job = policy.resolve_mounts(build_job(req, settings(root, "docker")), DockerSettings(
        mount_roots=[str(root)]))
    assert job.mounts[0].source == str(root / "real")
    model(root / "real" / "results" / "weights" / "ssd_resnet18_epoch_010.hdf5", epoch=10)
    again = for_launch(job, attempt=2, gpu_indices=[0], owner_uid=None)
    assert flag(again.command, "-m") == ["/workspace/results/weights/ssd_resnet18_epoch_010.hdf5"]
    assert flag(again.command, "--initial_epoch") == ["11"]


def test_taos_own_manual_resume_is_not_refused(root: Path) -> None:
    """TAO's documented resume: -m R/weights/..._epoch_070.hdf5 --initial_epoch 71 -r R."""
    ckpt = model(root / "results" / "weights" / "ssd_resnet18_epoch_070.hdf5", epoch=70)
    (root / "results" / "status.json").write_text("{}\n")
    job = build_job(train_req(root, model=str(ckpt), initial_epoch=71), settings(root))
    assert flag(job.command, "--initial_epoch") == ["71"]


def test_evaluate_may_share_the_train_dir_as_taos_notebooks_do(root: Path) -> None:
    ckpt = model(root / "results" / "weights" / "ssd_resnet18_epoch_010.hdf5", epoch=10)
    (root / "results" / "status.json").write_text("{}\n")
    build_job(StageRequest(stage={"task": "evaluate", "spec": str(root / "spec.txt"),
                                  "model": str(ckpt), "results_dir": str(root / "results")}),
              settings(root))
    with pytest.raises(SpecError, match="holds another run's output"):  # prune would misjudge
        build_job(StageRequest(stage={"task": "prune", "model": str(ckpt),
                                      "output": str(root / "p.hdf5"),
                                      "results_dir": str(root / "results")}), settings(root))


def test_overwrite_never_moves_the_model_the_stage_uses(root: Path) -> None:
    from gpusched.cli import app

    ckpt = model(root / "results" / "weights" / "ssd_resnet18_epoch_010.hdf5", epoch=10)
    r = CliRunner().invoke(app, ["tao", "ssd", "train", "-e", str(root / "spec.txt"), "-r",
                                 str(root / "results"), "-m", str(ckpt), "--overwrite"])
    assert r.exit_code != 0 and "would move" in r.output, r.output
    assert ckpt.exists()


def test_two_stages_never_write_one_results_dir_at_once(root: Path, service: Any) -> None:
    """The first is still queued, so the directory is empty yet: the second is refused all
    the same (they would mix their checkpoints, and a retry would resume the other's)."""
    req = StageRequest(stage={"task": "train", "spec": str(root / "spec.txt"),
                              "results_dir": str(root / "results")}, runner="local", hold=True)
    first = build_job(req, service.settings)
    service.validate_spec(first, os.getuid())
    job = service.store.submit(first, owner_uid=os.getuid(), owner="t", now=0.0)
    second = build_job(req, service.settings)
    with pytest.raises(SpecError, match=f"results directory of job {job}, which has not ended"):
        service.validate_spec(second, os.getuid())
    ev = build_job(StageRequest(stage={"task": "evaluate", "spec": str(root / "spec.txt"),
                                       "model": str(model(root / "m.hdf5")),
                                       "results_dir": str(root / "results")}, runner="local"),
                   service.settings)
    service.validate_spec(ev, os.getuid())  # evaluate may share it


def test_pipeline_branches_that_would_share_a_results_dir_are_refused(root: Path,
                                                                       service: Any) -> None:
    from gpusched.pipelines import load

    pdef = load({"name": "p", "runner": "local", "stages": {
        "train": {"task": "train", "spec": "spec.txt", "results": "unpruned"},
        "prune": {"task": "prune", "threshold": [0.1, 0.2], "needs": ["train"],
                  "model": "best_checkpoint:train", "output": "pruned/p{threshold}.hdf5",
                  "results": "pruned"}}}, str(root))
    with pytest.raises(SpecError, match=r"both write .*/pruned: give each its own"):
        service.daemon.pipelines.submit(pdef, owner_uid=os.getuid(), owner="t", now=0.0,
                                        mounts=[], env={})
    assert service.store.pipelines() == []
