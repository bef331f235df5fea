"""Spec overrides without hand edits (issue 13, point 6): ``--set training_config.num_epochs=10``
and pipeline ``overrides`` edit TAO's protobuf-text spec in place, typed, refusing unknown paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpusched.errors import SpecError
from gpusched.parsers import read_spec_fields
from gpusched.specedit import apply_overrides, parse_set

SPECS = Path(__file__).resolve().parents[2] / "examples/specs"
TRAIN = (SPECS / "ssd_train_resnet18_kitti.txt").read_text()


def test_parse_set_types_values() -> None:
    assert parse_set(["training_config.num_epochs=10", "training_config.enable_qat=true",
                      "a.b=2e-2", "a.c=\"/x/y.hdf5\"", "a.d=SAMPLE", "a.e=0.5"]) == {
        "training_config.num_epochs": 10, "training_config.enable_qat": True, "a.b": 0.02,
        "a.c": "/x/y.hdf5", "a.d": "SAMPLE", "a.e": 0.5}
    with pytest.raises(SpecError, match="PATH=VALUE"):
        parse_set(["training_config.num_epochs"])
    with pytest.raises(SpecError, match="dotted field names"):
        parse_set(["training config=1"])


def test_the_seed_notebook_edits_apply_and_nothing_else_changes() -> None:
    out = apply_overrides(TRAIN, {"training_config.num_epochs": 10,
                                  "training_config.checkpoint_interval": 5,
                                  "training_config.enable_qat": True,
                                  "training_config.batch_size_per_gpu": 8,
                                  "training_config.learning_rate.soft_start_annealing_schedule"
                                  ".max_learning_rate": 0.01,
                                  "eval_config.average_precision_mode": "INTEGRATE",
                                  "ssd_config.arch": "resnet"})
    f = read_spec_fields(out)
    assert f["training_config.num_epochs"] == "10"
    assert f["training_config.checkpoint_interval"] == "5"
    assert f["training_config.enable_qat"] == "true"
    assert f["training_config.batch_size_per_gpu"] == "8"
    assert f["training_config.learning_rate.soft_start_annealing_schedule.max_learning_rate"] \
        == "0.01"
    assert f["eval_config.average_precision_mode"] == "INTEGRATE"
    assert '  arch: "resnet"\n' in out  # a string stays quoted
    before, after = read_spec_fields(TRAIN), f
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"training_config.num_epochs", "training_config.checkpoint_interval",
                       "training_config.enable_qat", "training_config.batch_size_per_gpu",
                       "training_config.learning_rate.soft_start_annealing_schedule."
                       "max_learning_rate", "eval_config.average_precision_mode"}
    assert out.splitlines()[0] == TRAIN.splitlines()[0]  # the comment is kept
    assert apply_overrides(TRAIN, {}) == TRAIN


def test_repeated_blocks_are_picked_by_index() -> None:
    out = apply_overrides(TRAIN, {"dataset_config.target_class_mapping[1].value": "person"})
    assert 'key: "pedestrian"\n    value: "person"' in out
    with pytest.raises(SpecError, match=r"has 3 target_class_mapping"):
        apply_overrides(TRAIN, {"dataset_config.target_class_mapping[3].value": "x"})


def test_a_path_the_spec_does_not_hold_names_the_nearest() -> None:
    with pytest.raises(SpecError, match=r"no training_config.num_epoch\b.*did you mean num_epochs"):
        apply_overrides(TRAIN, {"training_config.num_epoch": 10})
    with pytest.raises(SpecError, match=r"no trainig_config.*did you mean training_config"):
        apply_overrides(TRAIN, {"trainig_config.num_epochs": 10})
    with pytest.raises(SpecError, match="is a block; set one of its fields"):
        apply_overrides(TRAIN, {"training_config.learning_rate": 0.1})
    with pytest.raises(SpecError, match="is a value, not a block"):
        apply_overrides(TRAIN, {"training_config.num_epochs.x": 1})


def test_values_of_the_wrong_kind_are_refused() -> None:
    with pytest.raises(SpecError, match="is a number"):
        apply_overrides(TRAIN, {"training_config.num_epochs": "ten"})
    with pytest.raises(SpecError, match="whole number"):
        apply_overrides(TRAIN, {"training_config.num_epochs": 2.5})
    with pytest.raises(SpecError, match="is a bool"):
        apply_overrides(TRAIN, {"training_config.enable_qat": "yes"})
    assert "num_epochs: 12\n" in apply_overrides(TRAIN, {"training_config.num_epochs": 12.0})


def test_other_spec_forms() -> None:
    text = 'a: { b: 1, c: "x" "y" }  # c\nd < e: 2 >\nlist: [1, 2]\n'
    out = apply_overrides(text, {"a.b": 3, "a.c": "z", "d.e": 4})
    assert out == 'a: { b: 3, c: "z" }  # c\nd < e: 4 >\nlist: [1, 2]\n'
    with pytest.raises(SpecError, match="is a list"):
        apply_overrides(text, {"list": 3})
    with pytest.raises(SpecError, match="not closed"):
        apply_overrides("a { b: 1\n", {"a.b": 2})
