"""The fake TAO SSD entrypoint, run as a subprocess the way a runner would start it, read back
with gpusched's own parsers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from gpusched.parsers import (
    best_checkpoint,
    checkpoint_epochs,
    epochs_from_status,
    final_status,
    parse_evaluate_table,
    parse_execution_status,
    parse_keras_stdout,
    parse_prune_ratio,
    parse_status_line,
    parse_training_csv,
)
from gpusched.testing import fake_tao

SPEC = """training_config {{
  batch_size_per_gpu: 16
  num_epochs: {epochs}
  checkpoint_interval: {ci}
  enable_qat: false
}}
eval_config {{ validation_period_during_training: {vp} }}
ssd_config {{ arch: "resnet" nlayers: 18 }}
"""


def spec(tmp: Path, epochs: int = 20, ci: int = 5, vp: int = 5, name: str = "spec.txt") -> Path:
    path = tmp / name
    path.write_text(SPEC.format(epochs=epochs, ci=ci, vp=vp), encoding="utf-8")
    return path


def fake(tmp: Path, *args: str | Path, gpus: str = "RTX A4000",
         **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSCHED_")}
    full_env.update({"GPUSCHED_FAKE_TAO_SCALE": "0.002", "GPUSCHED_GPU_NAMES": gpus, **env})
    return subprocess.run([sys.executable, "-m", "gpusched.testing.fake_tao", "ssd", *map(str, args)],
                          cwd=tmp, env=full_env, capture_output=True, text=True, timeout=60, check=False)


def records(path: Path) -> list[dict[str, object]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [r for r in (parse_status_line(line) for line in lines) if r is not None]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("train")
    proc = fake(tmp, "train", "-e", spec(tmp), "-r", tmp / "out", "-k", "nvidia_tlt")
    return tmp, proc


def test_train_outputs(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    tmp, proc = trained
    out = tmp / "out"
    assert proc.returncode == 0, proc.stderr
    assert parse_execution_status(proc.stdout) == "PASS"
    ckpts = checkpoint_epochs(p.name for p in (out / "weights").iterdir())
    assert list(ckpts) == [5, 10, 15, 20]
    assert ckpts[20] == "ssd_resnet18_epoch_020.hdf5"

    raw = (out / "ssd_training_log_resnet18.csv").read_bytes()
    assert raw.startswith(b"epoch,AP_car,AP_cyclist,AP_pedestrian,loss,lr,mAP,validation_loss\r\n")
    rows = parse_training_csv(raw.decode())
    assert [r.epoch for r in rows] == list(range(1, 21))
    for row in rows:
        validated = row.epoch % 5 == 0
        assert (row.map is not None) == validated and (row.validation_loss is not None) == validated
        assert (len(row.ap) == 3) == validated and row.loss is not None and row.lr is not None

    text = (out / "status.json").read_text(encoding="utf-8")
    assert '"time_per_epoch": "0:00:00.' in text
    recs = records(out / "status.json")
    epochs = epochs_from_status(recs)
    assert [e.epoch for e in epochs] == list(range(1, 21))
    assert all(e.seconds and e.at for e in epochs) and [e.validated for e in epochs] == [
        r.epoch % 5 == 0 for r in rows]
    assert [e.map for e in epochs] == [r.map for r in rows]
    assert final_status(recs)[:2] == ("SUCCESS", "Training finished successfully.")
    assert recs[0]["status"] == "STARTED" and recs[0]["message"] == "Starting Training Loop."
    assert sum(1 for r in recs if r.get("message") == "Evaluation metrics generated.") == 4

    assert [(e, m) for e, m, _ in parse_keras_stdout(proc.stdout)] == [(e, 20) for e in range(1, 21)]
    table = parse_evaluate_table(proc.stdout)
    assert table is not None and table.map == pytest.approx(rows[-1].map, abs=1e-5)
    assert f"mAP   {round(rows[-1].map, 5)}\n" in proc.stdout  # type: ignore[arg-type]  # round(m, 5)

    pick = best_checkpoint(rows, ckpts)
    scored = [(r.map, r.epoch) for r in rows if r.map is not None and r.epoch in ckpts]
    assert pick.epoch is not None and pick.epoch == max(scored)[1] and pick.warning is None
    header = json.loads((out / "weights" / ckpts[pick.epoch]).read_bytes().split(b"\n", 1)[0])
    assert header["map"] == pytest.approx(pick.map) and header["epoch"] == pick.epoch


def test_evaluate_reports_the_models_map(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    tmp, _ = trained
    model = tmp / "out" / "weights" / "ssd_resnet18_epoch_015.hdf5"
    header = json.loads(model.read_bytes().split(b"\n", 1)[0])
    proc = fake(tmp, "evaluate", "-m", model, "-e", tmp / "spec.txt", "-r", tmp / "eval")
    assert proc.returncode == 0 and parse_execution_status(proc.stdout) == "PASS"
    table = parse_evaluate_table(proc.stdout)
    assert table is not None and table.map == round(header["map"], 3) and set(table.ap) == {
        "car", "cyclist", "pedestrian"}
    status, _, kpi = final_status(records(tmp / "eval" / "status.json"))
    assert status == "SUCCESS" and kpi == {"mAP": header["map"]}


def test_resume_truncates_csv_and_appends_status(trained: tuple[Path, subprocess.CompletedProcess[str]],
                                                 tmp_path: Path) -> None:
    src, _ = trained
    out = tmp_path / "out"
    (out / "weights").mkdir(parents=True)
    for name in ("status.json", "ssd_training_log_resnet18.csv", "weights/ssd_resnet18_epoch_010.hdf5"):
        (out / name).write_bytes((src / "out" / name).read_bytes())
    proc = fake(tmp_path, "train", "-e", spec(tmp_path), "-r", out, "--initial_epoch", "11",
                "-m", out / "weights" / "ssd_resnet18_epoch_010.hdf5")
    assert proc.returncode == 0, proc.stdout
    rows = parse_training_csv((out / "ssd_training_log_resnet18.csv").read_text(encoding="utf-8"))
    assert [r.epoch for r in rows] == list(range(11, 21))
    recs = records(out / "status.json")
    assert sum(1 for r in recs if r.get("status") == "STARTED") == 2
    assert [e.epoch for e in epochs_from_status(recs)] == list(range(1, 21))
    assert list(checkpoint_epochs(p.name for p in (out / "weights").iterdir())) == [10, 15, 20]


def test_prune_sizes_fall_with_threshold(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    tmp, _ = trained
    model = tmp / "out" / "weights" / "ssd_resnet18_epoch_020.hdf5"
    sizes, kpis = {}, {}
    for pth in ("0.1", "0.3"):
        res = tmp / f"prune_{pth}"
        proc = fake(tmp, "prune", "-m", model, "-o", res / "ssd_resnet18_pruned.hdf5", "--results_dir", res,
                    "-pth", pth, "-eq", "union", "-n", "max", "-pg", "8", "-nf", "16")
        assert proc.returncode == 0 and parse_execution_status(proc.stdout) == "PASS", proc.stdout
        sizes[pth] = (res / "ssd_resnet18_pruned.hdf5").stat().st_size
        status, _, kpis[pth] = final_status(records(res / "status.json"))
        assert status == "SUCCESS" and kpis[pth]["pruning_ratio"] == parse_prune_ratio(proc.stdout)
    assert model.stat().st_size > sizes["0.1"] > sizes["0.3"]
    for pth, nominal in (("0.1", 22.5), ("0.3", 9.8)):  # size: of the file, unscaled
        assert kpis[pth]["size"] == pytest.approx(sizes[pth] / (1 << 20) / 0.001)
        header = json.loads((tmp / f"prune_{pth}" / "ssd_resnet18_pruned.hdf5").read_bytes().split(b"\n")[0])
        assert header["size_mb"] == pytest.approx(nominal, abs=0.05)
    assert kpis["0.1"]["param_count"] > kpis["0.3"]["param_count"]
    assert kpis["0.1"]["pruning_ratio"] == pytest.approx(22.5 / 101.7, rel=1e-3)


def test_retrain_from_pruned_model_reaches_lower_map(trained: tuple[Path, subprocess.CompletedProcess[str]],
                                                     tmp_path: Path) -> None:
    tmp, _ = trained
    pruned = tmp_path / "pruned.hdf5"
    assert fake(tmp_path, "prune", "-m", tmp / "out" / "weights" / "ssd_resnet18_epoch_020.hdf5",
                "-o", pruned, "-pth", "0.3").returncode == 0
    proc = fake(tmp_path, "train", "-e", spec(tmp_path, epochs=5), "-r", tmp_path / "retrain", "-m", pruned)
    assert proc.returncode == 0
    ckpt = tmp_path / "retrain/weights/ssd_resnet18_epoch_005.hdf5"
    header = json.loads(ckpt.read_bytes().split(b"\n")[0])
    assert header["pth"] == 0.3 and header["size_mb"] == pytest.approx(9.8, abs=0.05)
    assert header["map"] < fake_tao.map_at(5, offset=20)  # same training age, unpruned
    assert fake_tao.map_at(60, pth=0.3) < fake_tao.map_at(60, pth=0.1) < fake_tao.map_at(60)


def test_multi_gpu_only_for_train(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    tmp, _ = trained
    model = tmp / "out/weights/ssd_resnet18_epoch_020.hdf5"
    proc = fake(tmp, "prune", "--gpus", "2", "-m", model, "-o", "x.hdf5")
    assert proc.returncode == 1 and "Please use only 1 GPU for the task prune" in proc.stderr
    assert not (tmp / "x.hdf5").exists()


def test_bad_arguments_and_inputs(tmp_path: Path) -> None:
    assert fake(tmp_path, "-e", "spec.txt", "train").returncode == 2  # the task must come first
    assert fake(tmp_path, "train", "-e", "spec.txt").returncode == 2  # -r is required
    proc = fake(tmp_path, "prune", "-m", "m", "-o", "o", "-n", "L1")  # magnet_prune asserts, no choices
    assert proc.returncode == 255 and "normalizer options are [L2, max]" in proc.stdout
    proc = fake(tmp_path, "train", "-e", tmp_path / "missing.txt", "-r", tmp_path / "out")
    assert proc.returncode == 255 and parse_execution_status(proc.stdout) == "FAIL"
    status, message, _ = final_status(records(tmp_path / "out" / "status.json"))
    assert status == "FAILURE" and message and "missing.txt" in message
    proc = fake(tmp_path, "evaluate", "-m", tmp_path / "nope.hdf5", "-e", spec(tmp_path),
                "-r", tmp_path / "ev")
    assert proc.returncode == 255 and final_status(records(tmp_path / "ev" / "status.json"))[0] == "FAILURE"
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"\x89HDF\r\n")
    assert fake(tmp_path, "prune", "-m", junk, "-o", tmp_path / "p.hdf5").returncode == 255
    assert fake(tmp_path, "prune", "-m", junk, "-o", tmp_path / "p.hdf5", "-pth", "1.5").returncode == 255


def test_failure_injection(tmp_path: Path) -> None:
    s = spec(tmp_path, epochs=6, ci=1, vp=3)
    proc = fake(tmp_path, "train", "-e", s, "-r", tmp_path / "err", GPUSCHED_FAKE_TAO_FAIL="train:error@3")
    assert proc.returncode == 255 and parse_execution_status(proc.stdout) == "FAIL"
    recs = records(tmp_path / "err" / "status.json")
    assert [e.epoch for e in epochs_from_status(recs)] == [1, 2]
    status, message, _ = final_status(recs)
    assert status == "FAILURE" and message and "epoch 3" in message
    assert list(checkpoint_epochs(p.name for p in (tmp_path / "err" / "weights").iterdir())) == [1, 2]

    proc = fake(tmp_path, "train", "-e", s, "-r", tmp_path / "int",
                GPUSCHED_FAKE_TAO_FAIL="train:interrupt@5")
    assert proc.returncode == 0 and parse_execution_status(proc.stdout) == "PASS"  # as TAO does
    recs = records(tmp_path / "int" / "status.json")
    assert final_status(recs)[:2] == ("FAILURE", "Training was interrupted")
    assert [e.epoch for e in epochs_from_status(recs)] == [1, 2, 3, 4]

    model = tmp_path / "int" / "weights" / "ssd_resnet18_epoch_003.hdf5"
    proc = fake(tmp_path, "evaluate", "-m", model, "-e", s, "-r", tmp_path / "ev",
                GPUSCHED_FAKE_TAO_FAIL="prune:error,evaluate:error")
    assert proc.returncode == 255 and final_status(records(tmp_path / "ev" / "status.json"))[0] == "FAILURE"
    proc = fake(tmp_path, "evaluate", "-m", model, "-e", s, GPUSCHED_FAKE_TAO_FAIL="train:error")
    assert proc.returncode == 0  # injection is per task


def test_export_and_inference(trained: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    src, _ = trained
    model = src / "out" / "weights" / "ssd_resnet18_epoch_020.hdf5"
    onnx = tmp_path / "export" / "ssd_resnet18.onnx"
    proc = fake(tmp_path, "export", "-m", model, "-o", onnx, "-e", src / "spec.txt", "--gen_ds_config")
    assert proc.returncode == 0 and onnx.is_file()
    assert (tmp_path / "export" / "labels.txt").read_text(encoding="utf-8").split() == ["car", "cyclist",
                                                                                       "pedestrian"]
    nvinfer = (tmp_path / "export" / "nvinfer_config.txt").read_text(encoding="utf-8")
    assert "num-detected-classes=3" in nvinfer
    again = fake(tmp_path, "export", "-m", model, "-o", onnx)
    assert again.returncode == 255 and "exists" in again.stdout

    images = tmp_path / "images"
    images.mkdir()
    for name in ("000001.png", "000002.jpg"):
        (images / name).write_bytes(b"fake image")
    log = tmp_path / "tao.log"
    log.write_text("earlier\n", encoding="utf-8")
    proc = fake(tmp_path, "inference", "-m", model, "-i", images, "-e", src / "spec.txt",
                "-r", tmp_path / "inf", "-t", "0.3", "--log_file", log)
    assert proc.returncode == 0 and parse_execution_status(proc.stdout) == "PASS"
    annotated = sorted(p.name for p in (tmp_path / "inf" / "images_annotated").iterdir())
    assert annotated == ["000001.png", "000002.jpg"]
    assert sorted(p.name for p in (tmp_path / "inf" / "labels").iterdir()) == ["000001.txt", "000002.txt"]
    logged = log.read_text(encoding="utf-8")
    # the entrypoint sends the task's output to --log_file (appended), its own lines to stdout
    assert logged.startswith("earlier\n") and "Inference finished successfully." in logged
    assert "Execution status" not in logged


def test_epoch_time_follows_the_gpus(tmp_path: Path) -> None:
    s = spec(tmp_path, epochs=7, ci=100, vp=100)
    medians = {}
    for label, names, extra in (("a4000", "NVIDIA RTX A4000", ()),
                                ("2070", "NVIDIA GeForce RTX 2070", ()),
                                ("both", "NVIDIA RTX A4000,NVIDIA GeForce RTX 2070", ("--gpus", "2"))):
        out = tmp_path / label
        proc = fake(tmp_path, "train", "-e", s, "-r", out, *extra, gpus=names)
        assert proc.returncode == 0, proc.stdout
        epochs = epochs_from_status(records(out / "status.json"))
        assert len(epochs) == 7 and epochs[0].seconds and epochs[0].seconds > epochs[3].seconds  # type: ignore[operator]
        medians[label] = statistics.median(e.seconds for e in epochs if e.seconds)
    assert medians["2070"] / medians["a4000"] == pytest.approx(67 / 48, rel=0.05)
    assert medians["both"] / medians["a4000"] == pytest.approx(40 / 48, rel=0.05)
    assert medians["a4000"] == pytest.approx(48 * 0.002, rel=0.05)


def test_epoch_seconds_table(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fake_tao.epoch_seconds(["NVIDIA H200"]) == 10
    assert fake_tao.epoch_seconds(["Tesla V100-SXM2-16GB"] * 2) == pytest.approx(30 / 1.8)
    assert fake_tao.epoch_seconds(["Some GPU"]) == 60
    monkeypatch.delenv("GPUSCHED_SIMULATED_HOST_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("GPUSCHED_GPU_NAMES", "NVIDIA RTX A4000, NVIDIA GeForce RTX 2070")
    host = fake_tao.host_gpus()
    assert [name for _, name in host] == ["NVIDIA RTX A4000", "NVIDIA GeForce RTX 2070"]
    assert fake_tao.check_valid_gpus(1, [1], host) == [1]
    assert fake_tao.check_valid_gpus(2, [1, 0, 1], host) == [0, 1]  # sorted, deduplicated
    with pytest.raises(AssertionError, match="Checking for valid GPU ids"):
        fake_tao.check_valid_gpus(1, [5], host)


def test_map_curve_best_is_not_the_last_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUSCHED_FAKE_TAO_SEED", raising=False)
    maps = {e: fake_tao.map_at(e) for e in range(10, 81, 10)}
    assert max(maps, key=lambda e: maps[e]) == 70 and 0.65 < maps[70] < 0.75
    assert maps[10] < maps[40] < maps[70]
    monkeypatch.setenv("GPUSCHED_FAKE_TAO_SEED", "3")
    assert fake_tao.map_at(70) != maps[70]
