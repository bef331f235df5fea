"""The fake TAO entrypoint behaves as TAO 5's own source does (NVIDIA/tao_tensorflow1_backend,
cited in gpusched/testing/fake_tao.py), and gpusched's parsers read what it then writes:
host GPU indices, 1-based resumes, TAO 5 file suffixes, status.json lines (issue 13)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from gpusched import parsers
from gpusched.testing import fake_tao

SPEC = """training_config {{
  batch_size_per_gpu: 16
  num_epochs: {epochs}
  {ci}
}}
eval_config {{ validation_period_during_training: {vp} }}
ssd_config {{ arch: "resnet" nlayers: 18 }}
"""
HOST = "GPU-aaaa-0=NVIDIA RTX A4000,GPU-bbbb-1=NVIDIA GeForce RTX 2070"


def spec(tmp: Path, epochs: int = 6, ci: int | None = 2, vp: int = 3, name: str = "spec.txt") -> Path:
    path = tmp / name
    path.write_text(SPEC.format(epochs=epochs, ci="" if ci is None else f"checkpoint_interval: {ci}",
                                vp=vp), encoding="utf-8")
    return path


def fake(tmp: Path, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("GPUSCHED_") and k != "CUDA_VISIBLE_DEVICES"}
    full_env.update({"GPUSCHED_FAKE_TAO_SCALE": "0.002", "GPUSCHED_GPU_NAMES": "NVIDIA RTX A4000", **env})
    return subprocess.run([sys.executable, "-m", "gpusched.testing.fake_tao", "ssd", *map(str, args)],
                          cwd=tmp, env=full_env, capture_output=True, text=True, timeout=60, check=False)


def records(path: Path) -> list[dict[str, object]]:
    return [r for r in map(parsers.parse_status_line, path.read_text(encoding="utf-8").splitlines()) if r]


def header(path: Path) -> dict[str, object]:
    head = json.loads(path.read_bytes().split(b"\n", 1)[0])
    assert isinstance(head, dict)
    return head


def median_epoch_s(out: Path) -> float:
    return statistics.median(e.seconds for e in parsers.epochs_from_status(records(out / "status.json"))
                             if e.seconds)


# -- 1. --gpu_index is a host index, checked and then put in CUDA_VISIBLE_DEVICES ---------------


def test_gpu_index_picks_the_host_gpu_and_replaces_cuda_visible_devices(tmp_path: Path) -> None:
    s = spec(tmp_path, epochs=5, ci=100, vp=100)
    # the launcher gave host GPU 1 (the 2070) but passed --gpu_index 0, as gpusched's local runner did
    launcher = {"GPUSCHED_SIMULATED_HOST_GPUS": HOST, "CUDA_VISIBLE_DEVICES": "GPU-bbbb-1",
                "GPUSCHED_GPU_NAMES": "NVIDIA GeForce RTX 2070"}
    wrong = fake(tmp_path, "train", "-e", s, "-r", tmp_path / "wrong", "--gpus", "1", "--gpu_index", "0",
                 **launcher)
    right = fake(tmp_path, "train", "-e", s, "-r", tmp_path / "right", "--gpus", "1", "--gpu_index", "1",
                 **launcher)
    assert wrong.returncode == right.returncode == 0, wrong.stderr + right.stderr
    assert ("fake TAO: running on host GPU index(es) 0 (NVIDIA RTX A4000); CUDA_VISIBLE_DEVICES=0 "
            "(GPU-aaaa-0)") in wrong.stdout
    assert ("fake TAO: running on host GPU index(es) 1 (NVIDIA GeForce RTX 2070); CUDA_VISIBLE_DEVICES=1 "
            "(GPU-bbbb-1)") in right.stdout
    ratio = median_epoch_s(tmp_path / "right") / median_epoch_s(tmp_path / "wrong")
    assert ratio == pytest.approx(67 / 48, rel=0.05)  # epoch times follow the GPU actually used


@pytest.mark.parametrize(("args", "message"), [
    (["--gpu_index", "2"], "AssertionError: Checking for valid GPU ids and num_gpus."),
    (["--gpus", "3", "--gpu_index", "0", "1", "2"], "Checking for valid GPU ids and num_gpus."),
    (["--gpus", "1", "--gpu_index", "0", "1"], "must be the same as the number of GPU indices"),
    (["--gpu_index", "-1"], "GPU ids cannot be negative."),
])
def test_gpu_index_out_of_range_fails_like_tao(tmp_path: Path, args: list[str], message: str) -> None:
    proc = fake(tmp_path, "train", "-e", spec(tmp_path), "-r", tmp_path / "out", *args,
                GPUSCHED_SIMULATED_HOST_GPUS=HOST)
    assert proc.returncode == 1 and message in proc.stderr, proc.stdout + proc.stderr
    assert parsers.parse_execution_status(proc.stdout) is None  # the entrypoint died first
    assert not (tmp_path / "out").exists()


def test_host_gpus_fall_back_to_the_jobs_gpus(tmp_path: Path) -> None:
    # no host map: a container that only sees its own GPUs (nvidia-smi -L lists those)
    proc = fake(tmp_path, "train", "-e", spec(tmp_path), "-r", tmp_path / "out", "--gpu_index", "1")
    assert proc.returncode == 1 and "Checking for valid GPU ids" in proc.stderr


# -- 2. resume: 1-based --initial_epoch, a new CSV, status.json appended ------------------------


def test_resume_is_one_based_truncates_the_csv_and_appends_status(tmp_path: Path) -> None:
    s = spec(tmp_path, epochs=8, ci=2, vp=2)
    out = tmp_path / "out"
    first = fake(tmp_path, "train", "-e", s, "-r", out, GPUSCHED_FAKE_TAO_FAIL="train:error@6")
    assert first.returncode == 255
    ckpt = out / "weights" / "ssd_resnet18_epoch_004.hdf5"
    proc = fake(tmp_path, "train", "-e", s, "-r", out, "-m", ckpt, "--initial_epoch", "5")
    assert proc.returncode == 0, proc.stdout
    assert "Resume optimizer from pretrained model" in proc.stdout and "Epoch 5/8" in proc.stdout
    assert "Epoch 4/8" not in proc.stdout
    rows = parsers.parse_training_csv((out / "ssd_training_log_resnet18.csv").read_text(encoding="utf-8"))
    assert [r.epoch for r in rows] == [5, 6, 7, 8]
    recs = records(out / "status.json")
    assert [r["status"] for r in recs if r.get("message") in (
        "Starting Training Loop.", "Training finished successfully.")] == ["STARTED", "STARTED", "SUCCESS"]
    assert [e.epoch for e in parsers.epochs_from_status(recs)] == list(range(1, 9))
    assert header(out / "weights" / "ssd_resnet18_epoch_006.hdf5")["epoch"] == 6  # absolute epochs


def test_best_checkpoint_after_a_resume_reads_status_json_too() -> None:
    # epochs 1-80 in status.json (the first run 1-70, the resumed one 71-80); CSV only 71-80
    status = [{"epoch": e, "max_epoch": 80, "status": "RUNNING", "message": "Training loop in progress",
               "graphical": {"mean average precision": str(m)}}
              for e, m in ((60, 0.701), (70, 0.734), (71, "nan"), (80, 0.710))]
    csv = "epoch,loss,lr,mAP\r\n71,3.1,0.001,nan\r\n80,3.0,0.001,0.71\r\n"
    rows = parsers.training_rows(parsers.parse_training_csv(csv), parsers.epochs_from_status(status))
    assert [(r.epoch, r.map) for r in rows] == [(60, 0.701), (70, 0.734), (71, None), (80, 0.71)]
    pick = parsers.best_checkpoint(rows, [60, 70, 80], 10)
    assert (pick.epoch, pick.map, pick.warning) == (70, 0.734, None)
    old_pick = parsers.best_checkpoint(parsers.parse_training_csv(csv), [60, 70, 80], 10)
    assert old_pick.epoch == 80


def test_training_rows_prefer_the_csv_and_keep_its_aps() -> None:
    csv = "epoch,AP_car,loss,lr,mAP,validation_loss\r\n5,0.8,2.0,0.01,0.61,1.5\r\n"
    status = [{"epoch": 5, "graphical": {"mean average precision": "0.6", "loss": "2.5"}},
              {"epoch": 6, "graphical": {"mean average precision": "nan", "loss": "2.4"}}]
    rows = parsers.training_rows(parsers.parse_training_csv(csv), parsers.epochs_from_status(status))
    assert rows == [parsers.CsvRow(5, 2.0, 0.01, 0.61, 1.5, {"car": 0.8}), parsers.CsvRow(6, 2.4)]


# -- 3. TAO 5 suffixes and where status.json goes ---------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("m")
    proc = fake(tmp, "train", "-e", spec(tmp, epochs=4, ci=2, vp=2), "-r", tmp / "out")
    assert proc.returncode == 0, proc.stdout
    return tmp / "out" / "weights" / "ssd_resnet18_epoch_004.hdf5"


def test_prune_appends_hdf5_then_fails_sizing_the_name_given(model: Path, tmp_path: Path) -> None:
    # magnet_prune.py saves f"{output_file}.hdf5" but sizes get_model_file_size(args.output_file)
    proc = fake(tmp_path, "prune", "-m", model, "-o", tmp_path / "pruned", "--results_dir", tmp_path / "r")
    assert (tmp_path / "pruned.hdf5").is_file() and not (tmp_path / "pruned").exists()
    assert proc.returncode == 255 and parsers.parse_execution_status(proc.stdout) == "FAIL"
    status, message, _ = parsers.final_status(records(tmp_path / "r" / "status.json"))
    assert status == "FAILURE" and message == f"Model file wasn't found at {tmp_path / 'pruned'}"


def test_prune_status_lines_and_kpi(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.hdf5"
    proc = fake(tmp_path, "prune", "-m", model, "-o", out, "--results_dir", tmp_path / "r", "-pth", "0.2")
    assert proc.returncode == 0, proc.stdout
    recs = records(tmp_path / "r" / "status.json")
    ratio = parsers.parse_prune_ratio(proc.stdout)
    assert [(r["status"], r["message"]) for r in recs] == [
        ("RUNNING", f"Pruning ratio (pruned model / original model): {ratio}"),  # no STARTED line
        ("SUCCESS", "Pruning finished successfully.")]
    kpi = recs[0]["kpi"]
    assert isinstance(kpi, dict) and kpi == recs[1]["kpi"]
    # from the file, which stands for the model at GPUSCHED_FAKE_TAO_SIZE_SCALE (0.001)
    assert kpi["size"] == pytest.approx(out.stat().st_size / (1 << 20) / 0.001)
    parent, pruned = header(model), header(out)
    assert kpi["param_count"] == pruned["params_m"]
    assert kpi["pruning_ratio"] == ratio == pytest.approx(
        float(pruned["params_m"]) / float(parent["params_m"]))  # type: ignore[arg-type]
    assert not (tmp_path / "status.json").exists()
    assert fake(tmp_path, "prune", "-m", model, "-o", tmp_path / "p2.hdf5").returncode == 0
    assert not (tmp_path / "status.json").exists()  # no --results_dir: no status file


def test_export_adds_the_suffix_and_writes_status_only_with_results_dir(model: Path, tmp_path: Path) -> None:
    # (a tmp_path named after a test with "onnx" in its name would defeat TAO's substring test)
    proc = fake(tmp_path, "export", "-m", model, "-o", tmp_path / "e" / "model", "--gen_ds_config")
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "e" / "model.onnx").is_file() and not (tmp_path / "e" / "model").exists()
    quirk = fake(tmp_path, "export", "-m", model, "-o", tmp_path / "onnx_models" / "model")
    assert quirk.returncode == 0 and (tmp_path / "onnx_models" / "model").is_file()  # "onnx" in the path
    assert not list(tmp_path.rglob("status*.json"))
    proc = fake(tmp_path, "export", "-m", model, "--output_file", tmp_path / "f" / "model.onnx",
                "--results_dir", tmp_path / "res", "--experiment_spec", model.parents[2] / "spec.txt")
    assert proc.returncode == 0, proc.stdout
    recs = records(tmp_path / "res" / "status.json")
    assert [r["message"] for r in recs] == ["Building exporter object.", "Exporting the model.",
                                            "Export finished successfully."]
    again = fake(tmp_path, "export", "-m", model, "-o", tmp_path / "f" / "model",
                 "--results_dir", tmp_path / "res")
    assert again.returncode == 255 and "already exists" in again.stdout


def test_evaluate_without_r_writes_status_next_to_the_model(model: Path, tmp_path: Path) -> None:
    status_path = model.parent / "status.json"
    status_path.unlink(missing_ok=True)
    proc = fake(tmp_path, "evaluate", "--model_path", model,
                "--experiment_spec", model.parents[2] / "spec.txt")
    assert proc.returncode == 0, proc.stdout
    recs = records(status_path)
    assert [(r["status"], r["message"]) for r in recs] == [
        ("STARTED", "Starting SSD evaluation."), ("SUCCESS", "Evaluation finished successfully.")]
    full = header(model)["map"]
    assert recs[-1]["kpi"] == {"mAP": full}
    table = parsers.parse_evaluate_table(proc.stdout)
    assert table is not None and table.map == round(full, 3) != full  # type: ignore[call-overload]
    assert parsers.evaluate_map(recs) == full


def test_evaluate_map_takes_the_last_run_in_a_shared_file() -> None:
    lines = [{"status": "STARTED"}, {"status": "SUCCESS", "kpi": {"mAP": 0.61234567}},
             {"status": "STARTED"}, {"status": "FAILURE", "message": "boom"}]
    assert parsers.evaluate_map(lines[:2]) == 0.61234567
    assert parsers.evaluate_map(lines) is None
    assert parsers.evaluate_map([{"status": "SUCCESS", "kpi": {"mAP": "junk"}}]) is None


# -- 4. the rest of TAO's output --------------------------------------------------------------


def test_train_status_lines_as_taos_callbacks_write_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = fake(tmp_path, "train", "-e", spec(tmp_path, epochs=6, ci=None, vp=3), "-r", out)
    assert proc.returncode == 0, proc.stdout
    recs = records(out / "status.json")
    validation = [r for r in recs if r.get("message") == "Evaluation metrics generated."]
    assert len(validation) == 2 and all("categorical" not in r and "epoch" not in r for r in validation)
    for r in validation:
        g = r["graphical"]
        assert isinstance(g, dict) and set(g) == {"validation loss", "mean average precision"}
        assert all(isinstance(v, float) for v in g.values())
    assert [r["message"] for r in recs[-2:]] == ["Training loop complete.", "Training finished successfully."]
    assert [r["status"] for r in recs[-2:]] == ["RUNNING", "SUCCESS"]
    # checkpoint_interval absent (proto3: 0) means every epoch
    assert list(parsers.checkpoint_epochs(p.name for p in (out / "weights").iterdir())) == [1, 2, 3, 4, 5, 6]
    assert f"Epoch 00003: saving model to {out}/weights/ssd_resnet18_epoch_003.hdf5" in proc.stdout
    for line in proc.stdout.splitlines():
        if " - ETA: " in line:
            assert line.split(" [")[0] in ("185/742", "371/742", "556/742")


def test_keras_progbar_formats() -> None:
    assert [fake_tao._eta(s) for s in (5.7, 60.0, 61.2, 599.0, 3725.0)] == ["5s", "60s", "1:01", "9:59",
                                                                          "1:02:05"]
    assert fake_tao._bar(1, 742) == "  1/742 [" + "." * 30 + "]"
    assert fake_tao._bar(371, 742) == "371/742 [" + "=" * 14 + ">" + "." * 15 + "]"
    assert fake_tao._bar(742, 742) == "742/742 [" + "=" * 30 + "]"
    assert parsers.parse_keras_stdout("Epoch 3/9\n\n" + fake_tao._bar(742, 742) + " - 222s 299ms/step") == [
        (3, 9, 222.0)]


def test_validation_period_zero_is_refused_like_tao(tmp_path: Path) -> None:
    proc = fake(tmp_path, "train", "-e", spec(tmp_path, vp=0), "-r", tmp_path / "out")
    assert proc.returncode == 255
    _, message, _ = parsers.final_status(records(tmp_path / "out" / "status.json"))
    assert message == ("Experiment Spec Setting Error: validation_period_during_training should > 0. "
                       "Wrong value: 0")


def test_interrupted_train_prints_pass_and_exits_0(tmp_path: Path) -> None:
    proc = fake(tmp_path, "train", "-e", spec(tmp_path), "-r", tmp_path / "out",
                GPUSCHED_FAKE_TAO_FAIL="train:interrupt@2")
    assert proc.returncode == 0 and parsers.parse_execution_status(proc.stdout) == "PASS"
    assert "Training was interrupted." in proc.stdout
    assert parsers.final_status(records(tmp_path / "out" / "status.json"))[:2] == (
        "FAILURE", "Training was interrupted")


def test_taos_long_flag_names(model: Path, tmp_path: Path) -> None:
    s = model.parents[2] / "spec.txt"
    train = fake(tmp_path, "train", "--experiment_spec_file", s, "--results_dir", tmp_path / "t",
                 "--resume_model_weights", model, "--initial_epoch", "4", "--key", "k", "--arch", "ssd")
    assert train.returncode == 0, train.stdout + train.stderr
    ev = fake(tmp_path, "evaluate", "--model_path", model, "--experiment_spec", s, "--results_dir",
              tmp_path / "ev", "--batch_size", "4")
    assert ev.returncode == 0, ev.stderr
    pr = fake(tmp_path, "prune", "--model", model, "--output_file", tmp_path / "p.hdf5", "--normalizer", "L2",
              "--equalization_criterion", "intersection", "--pruning_granularity", "8",
              "--pruning_threshold", "0.2", "--min_num_filters", "16", "--excluded_layers", "conv1")
    assert pr.returncode == 0, pr.stderr
    ex = fake(tmp_path, "export", "--model", model, "--output_file", tmp_path / "x.onnx",
              "--target_opset", "12")
    assert ex.returncode == 0, ex.stderr
    # TAO 3's evaluate spelling is not a TAO 5 flag
    assert fake(tmp_path, "evaluate", "-m", model, "--experiment_spec_file", s).returncode == 2


def test_use_amp_outside_train_is_the_entrypoints_assertion(model: Path, tmp_path: Path) -> None:
    proc = fake(tmp_path, "evaluate", "-m", model, "-e", model.parents[2] / "spec.txt", "--use_amp")
    assert proc.returncode == 1 and "AMP is currently supported only for training." in proc.stderr


def test_spec_summary_reads_absent_numbers_as_tao_does() -> None:
    empty = parsers.spec_summary("training_config { num_epochs: 10 }")
    assert empty["checkpoint_interval"] == 1 and empty["validation_period"] is None
    zero = parsers.spec_summary("training_config { checkpoint_interval: 0 }")
    assert zero["checkpoint_interval"] == 1
