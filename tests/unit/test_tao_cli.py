"""TAO command lines as users already have them (issue 13, points 4 and 5): TAO 5's
``model ssd train``, TAO's long flags, a notebook's ``--gpu_index``, gpusched options in the
wrong place; export's ``--results_dir`` kept; where each task writes status.json and models."""

from __future__ import annotations

import pytest

from gpusched.errors import SpecError
from gpusched.tao import (
    TaoStage,
    export_output_file,
    parse_tao_argv,
    parse_tao_command,
    prune_output_file,
    stage_argv,
    status_json_path,
)


def test_tao5_shape_and_tao3_shape_are_the_same_stage() -> None:
    old = parse_tao_argv(["ssd", "train", "-e", "/w/s.txt", "-r", "/w/r", "--gpus", "2"])
    new = parse_tao_argv(["model", "ssd", "train", "-e", "/w/s.txt", "-r", "/w/r", "--gpus", "2"])
    pasted = parse_tao_argv(["tao", "model", "ssd", "train", "-e", "/w/s.txt", "-r", "/w/r",
                             "--gpus", "2"])
    assert old == new == pasted
    assert new.gpus == 2 and new.task == "train"


@pytest.mark.parametrize(("argv", "expect"), [
    (["ssd", "train", "--experiment_spec_file", "/w/s.txt", "--results_dir", "/w/r",
      "--resume_model_weights", "/w/m.hdf5", "--initial_epoch", "5", "--key", "k"],
     {"spec": "/w/s.txt", "results_dir": "/w/r", "model": "/w/m.hdf5", "initial_epoch": 5,
      "key": "k"}),
    (["ssd", "evaluate", "--model_path", "/w/m.hdf5", "--experiment_spec", "/w/s.txt",
      "--results_dir", "/w/e"],
     {"spec": "/w/s.txt", "model": "/w/m.hdf5", "results_dir": "/w/e"}),
    (["ssd", "prune", "--model", "/w/m.hdf5", "--output_file", "/w/p", "--results_dir", "/w/pr",
      "--normalizer", "L2", "--equalization_criterion", "intersection",
      "--pruning_granularity", "4", "--pruning_threshold", "0.3", "--min_num_filters", "8",
      "--excluded_layers", "a", "b"],
     {"model": "/w/m.hdf5", "output": "/w/p", "results_dir": "/w/pr", "normalizer": "L2",
      "equalization": "intersection", "granularity": 4, "threshold": 0.3, "min_filters": 8,
      "excluded_layers": ["a", "b"]}),
    (["ssd", "export", "--model", "/w/m.hdf5", "--experiment_spec", "/w/s.txt",
      "--output_file", "/w/x.onnx", "--results_dir", "/w/ex", "--gen_ds_config"],
     {"model": "/w/m.hdf5", "spec": "/w/s.txt", "output": "/w/x.onnx", "results_dir": "/w/ex",
      "gen_ds_config": True}),
])
def test_taos_long_flag_names(argv: list[str], expect: dict[str, object]) -> None:
    stage = parse_tao_argv(argv)
    assert {k: getattr(stage, k) for k in expect} == expect


def test_export_keeps_its_results_dir_in_the_command() -> None:
    stage = parse_tao_argv(["ssd", "export", "-m", "/w/m.hdf5", "-o", "/w/model",
                            "--results_dir", "/w/ex"])
    argv = stage_argv(stage, None)
    assert argv[argv.index("--results_dir") + 1] == "/w/ex"
    assert status_json_path(stage) == "/w/ex/status.json"


def test_a_notebooks_gpu_index_becomes_a_pinned_request_with_a_note() -> None:
    cmd = parse_tao_command(["ssd", "train", "-e", "/w/s.txt", "-r", "/w/r", "--gpus", "2",
                             "--gpu_index", "0", "1"])
    assert cmd.pin == [0, 1] and cmd.stage.gpus == 2
    assert any("--on 0,1" in n for n in cmd.notes)
    only_index = parse_tao_command(["ssd", "evaluate", "-e", "/w/s.txt", "-m", "/w/m.hdf5",
                                    "--gpu_index", "3"])
    assert only_index.pin == [3] and only_index.stage.gpus == 1
    with pytest.raises(SpecError, match="as many indices as GPUs"):
        parse_tao_command(["ssd", "train", "-e", "/w/s.txt", "-r", "/w/r", "--gpus", "2",
                           "--gpu_index", "1"])


@pytest.mark.parametrize("opt", [["--on", "0,1"], ["--name", "x"], ["--priority", "3"],
                                 ["--image", "i"], ["--mount", "/a:/b"], ["--after", "3"],
                                 ["--hold"], ["--name=x"]])
def test_gpusched_options_after_the_task_get_a_hint(opt: list[str]) -> None:
    with pytest.raises(SpecError, match=r"gpusched option.*`gpusched tao --\w+.* ssd train"):
        parse_tao_command(["ssd", "train", "-e", "/w/s.txt", "-r", "/w/r", *opt])


def test_resume_set_and_overwrite_after_the_task() -> None:
    cmd = parse_tao_command(["ssd", "train", "-e", "/w/s.txt", "-r", "/w/r", "--resume",
                             "--set", "training_config.num_epochs=10", "--overwrite"])
    assert cmd.stage.resume and cmd.overwrite
    assert cmd.sets == ["training_config.num_epochs=10"]
    with pytest.raises(SpecError):
        parse_tao_command(["ssd", "evaluate", "-e", "/w/s.txt", "-m", "/w/m.hdf5", "--resume"])
    with pytest.raises(SpecError, match="not both"):
        parse_tao_command(["ssd", "train", "-e", "/w/s.txt", "-r", "/w/r", "--resume",
                           "-m", "/w/c.hdf5", "--initial_epoch", "3"])


def test_tao5_suffixes_and_where_status_json_is() -> None:
    assert prune_output_file("/w/pruned") == "/w/pruned.hdf5"
    assert prune_output_file("/w/pruned.hdf5") == "/w/pruned.hdf5"
    export = TaoStage(task="export", model="/w/m.hdf5", output="/w/model")
    assert export_output_file(export) == "/w/model.onnx"
    assert export_output_file(TaoStage(task="export", model="/w/m.hdf5")) == "/w/m.onnx"
    assert export_output_file(TaoStage(task="export", model="/w/m.hdf5",
                                       output="/w/x.onnx")) == "/w/x.onnx"
    assert status_json_path(export) is None  # export writes status.json only with --results_dir
    ev = TaoStage(task="evaluate", model="/w/run/weights/m.hdf5", spec="/w/s.txt")
    assert status_json_path(ev) == "/w/run/weights/status.json"  # next to the model
