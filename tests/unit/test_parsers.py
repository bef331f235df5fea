"""TAO output parsers against fixtures written from the formats described in gpusched/parsers.py
(TAO 5's NVIDIA/tao_tensorflow1_backend sources)."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from gpusched.parsers import (
    CsvRow,
    StatusFollower,
    best_checkpoint,
    checkpoint_epochs,
    epochs_from_status,
    final_status,
    parse_epoch_line,
    parse_evaluate_table,
    parse_execution_status,
    parse_keras_stdout,
    parse_prune_ratio,
    parse_status_line,
    parse_timedelta,
    parse_training_csv,
    read_spec_fields,
    spec_facts,
    spec_summary,
    split_lines,
    timedelta_seconds,
    workload_key,
)
from gpusched.parsers_tao import EvalResult

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "tao"


def fixture(name: str) -> str:
    # newline="" keeps CRLF: the CSV fixtures must reach the parser as TAO writes them
    with open(FIX / name, encoding="utf-8", newline="") as f:
        return f.read()


def status_records(name: str) -> list[dict[str, object]]:
    return [r for r in (parse_status_line(line) for line in fixture(name).splitlines()) if r is not None]


# ------------------------------------------------------------------------------ timedelta, lines


@pytest.mark.parametrize(("text", "seconds"), [
    ("0:08:30.300586", 510.300586),
    ("0:00:48", 48.0),
    ("1 day, 2:03:04.5", 86400 + 7384.5),
    ("2 days, 0:00:01", 2 * 86400 + 1.0),
    ("11:03:03.445708", 39783.445708),
])
def test_parse_timedelta(text: str, seconds: float) -> None:
    assert parse_timedelta(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "48s", "0:00", "nan", "1 day 2:03:04"])
def test_parse_timedelta_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_timedelta(bad)
    assert timedelta_seconds(bad) is None


def test_split_lines_keeps_partial_remainder() -> None:
    assert split_lines("a\r\nb\nc") == (["a", "b"], "c")
    assert split_lines("a\n") == (["a"], "")
    assert split_lines("") == ([], "")


def test_status_follower_feeds_chunks() -> None:
    text = fixture("status_train.json")
    follower = StatusFollower()
    got: list[dict[str, object]] = []
    for i in range(0, len(text), 37):  # odd chunk size: lines split mid-JSON
        got.extend(follower.feed(text[i:i + 37]))
    assert len(got) == 9  # 10 complete lines, one garbage; the partial epoch-5 line held back
    assert follower.pending.startswith('{"epoch": 5')
    assert got == status_records("status_train.json")


# ------------------------------------------------------------------------------ status.json


def test_parse_status_line_accepts_nan_and_rejects_garbage() -> None:
    rec = parse_status_line('{"kpi": {"x": NaN, "y": Infinity}}')
    assert rec is not None and rec["kpi"]["y"] == float("inf")
    for bad in ["", "garbage", '{"epoch": 5, "max_ep', "[1, 2]", "  "]:
        assert parse_status_line(bad) is None


def test_epochs_from_status() -> None:
    epochs = epochs_from_status(status_records("status_train.json"))
    assert [e.epoch for e in epochs] == [1, 2, 3, 4]
    e1, e2, e3, e4 = epochs
    assert e1.seconds == pytest.approx(55.2) and e1.max_epoch == 80
    assert e1.map is None and not e1.validated and e1.loss == 21.5 and e1.lr == 0.001
    assert e2.seconds == 48.0
    # the resumed run's line for epoch 3 replaced the first one
    assert e3.seconds == pytest.approx(86400 + 7384.5)
    assert e3.map == 0.48 and e3.validated and e3.validation_loss == 2.2
    assert e3.at == calendar.timegm((2023, 7, 15, 11, 3, 5, 0, 0, 0))
    assert e4.validation_loss is None and e4.map is None


def test_epoch_record_time_with_offset_and_bad_time() -> None:
    base = {"epoch": 1, "date": "7/14/2023"}
    plain = epochs_from_status([{**base, "time": "10:2:5"}])[0].at
    assert plain == calendar.timegm((2023, 7, 14, 10, 2, 5, 0, 0, 0))
    assert epochs_from_status([{**base, "time": "12:2:5+02:00"}])[0].at == plain
    assert epochs_from_status([{**base, "time": "10:2:5Z"}])[0].at == plain
    assert epochs_from_status([{**base, "time": "25:99"}])[0].at is None
    assert epochs_from_status([{"epoch": 1, "date": "2023-07-14", "time": "10:2:5"}])[0].at is None
    assert epochs_from_status([{"epoch": "x"}, {"epoch": True}, {"message": "no epoch"}]) == []


def test_final_status_train_interrupted() -> None:
    status, message, kpi = final_status(status_records("status_train.json"))
    assert (status, message) == ("FAILURE", "Training was interrupted")
    assert kpi == {"mean average precision": "nan"}


def test_final_status_evaluate_and_prune() -> None:
    status, message, kpi = final_status(status_records("status_evaluate.json"))
    assert status == "SUCCESS" and message == "Evaluation finished successfully."
    assert kpi == {"mAP": pytest.approx(0.6594521)}
    status, _, kpi = final_status(status_records("status_prune.json"))
    assert status == "SUCCESS"
    assert kpi == {"pruning_ratio": 0.2212, "size": 22.5, "param_count": 5.9}
    assert final_status([]) == (None, None, {})


def test_parse_epoch_line() -> None:
    rec = parse_epoch_line('GPUSCHED_EPOCH {"epoch": 3, "max_epoch": 10, "seconds": 1.2, "loss": 0.5, '
                           '"lr": 0.01, "mAP": 0.4}')
    assert rec == {"epoch": 3, "max_epoch": 10, "seconds": 1.2, "loss": 0.5, "lr": 0.01, "mAP": 0.4}
    assert parse_epoch_line('  GPUSCHED_EPOCH {"epoch": 7}\r') == {"epoch": 7}
    for bad in ['GPUSCHED_EPOCH {"loss": 1}', "GPUSCHED_EPOCH {", 'epoch {"epoch": 1}', "",
                'GPUSCHED_EPOCH {"epoch": "x"}']:
        assert parse_epoch_line(bad) is None


# ------------------------------------------------------------------------------ CSV


def test_training_csv_crlf_and_nan() -> None:
    text = fixture("training_log.csv")
    assert "\r\n" in text
    rows = parse_training_csv(text)
    assert [r.epoch for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0] == CsvRow(epoch=1, loss=21.52, lr=0.001, map=None, validation_loss=None, ap={})
    assert rows[2].map == pytest.approx(0.3833333)
    assert rows[2].ap == {"car": 0.61, "cyclist": 0.33, "pedestrian": 0.21}
    assert rows[5].validation_loss == 11.8


def test_training_csv_is_read_as_csv() -> None:
    """Quoted cells (csv.DictWriter quotes a key holding a comma) stay one cell; a stray quote
    or a NUL in a garbled line loses that line only."""
    text = ('epoch,"AP_car, small",loss,lr,mAP\r\n1,0.5,2.0,0.01,0.4\r\n'
            '2,"0.6,bad\r\n\x00,1\r\n3,0.7,1.5,0.01,0.6\r\n')
    rows = parse_training_csv(text)
    assert rows == [CsvRow(1, 2.0, 0.01, 0.4, ap={"car, small": 0.5}),
                    CsvRow(3, 1.5, 0.01, 0.6, ap={"car, small": 0.7})]


def test_training_csv_resumed_partial_and_noval() -> None:
    resumed = parse_training_csv(fixture("training_log_resumed.csv"))
    assert [r.epoch for r in resumed] == [41, 42, 43, 44, 45] and resumed[-1].map == 0.71
    partial = parse_training_csv(fixture("training_log_partial.csv"))
    assert [r.epoch for r in partial] == [1, 2] and partial[1].map == 0.4
    noval = parse_training_csv(fixture("training_log_noval.csv"))
    assert noval == [CsvRow(1, 21.52, 0.001), CsvRow(2, 19.31, 0.005)]
    assert parse_training_csv("") == []
    assert parse_training_csv("epoch,loss\r\n1,2,3\r\nx,1\r\n2,0.5\r\n") == [CsvRow(2, 0.5)]


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoint_epochs() -> None:
    names = ["weights/ssd_resnet18_epoch_080.hdf5", "ssd_resnet18_epoch_010.tlt",
             "ssd_mobilenet_v2_epoch_020.hdf5", "ssd_resnet18_epoch_010.hdf5",
             "ssd_resnet18_epoch_030.hdf5.tmp", "status.json", "epoch_040.hdf5"]
    assert checkpoint_epochs(names) == {10: "ssd_resnet18_epoch_010.hdf5",
                                        20: "ssd_mobilenet_v2_epoch_020.hdf5",
                                        80: "weights/ssd_resnet18_epoch_080.hdf5"}


def _rows(maps: dict[int, float | None], last: int) -> list[CsvRow]:
    return [CsvRow(epoch=e, map=maps.get(e)) for e in range(1, last + 1)]


def test_best_checkpoint_argmax_among_checkpoints() -> None:
    rows = _rows({10: 0.6, 20: 0.7, 30: 0.69, 40: 0.7}, 40)
    pick = best_checkpoint(rows, [10, 20, 30, 40])
    assert (pick.epoch, pick.map, pick.warning) == (40, 0.7, None)  # tie -> later epoch
    rows = _rows({10: 0.6, 20: 0.72, 30: 0.69, 40: 0.7}, 40)
    assert best_checkpoint(rows, [10, 20, 30, 40]).epoch == 20  # not always the last


def test_best_checkpoint_warns_when_best_epoch_has_no_checkpoint() -> None:
    rows = _rows({15: 0.6, 30: 0.69, 40: 0.700, 45: 0.712}, 50)
    pick = best_checkpoint(rows, [10, 20, 30, 40, 50], checkpoint_interval=10)
    assert (pick.epoch, pick.map) == (40, 0.7)
    assert pick.warning == ("the best validated epoch (45, mAP 0.712) has no checkpoint "
                            "(checkpoint_interval 10); picked epoch 40 (mAP 0.700)")


def test_best_checkpoint_fallbacks() -> None:
    rows = _rows({15: 0.6, 45: 0.7}, 50)  # validation every 15, checkpoints every 10: never meet
    pick = best_checkpoint(rows, [10, 20, 30, 40, 50])
    assert (pick.epoch, pick.map) == (50, None)
    assert pick.warning and "latest checkpoint, epoch 50" in pick.warning and "interval 10" in pick.warning
    pick = best_checkpoint([], [5, 10])
    assert (pick.epoch, pick.map) == (10, None) and pick.warning
    pick = best_checkpoint(rows, [])
    assert (pick.epoch, pick.map) == (None, None)


# ------------------------------------------------------------------------------ stdout


def test_parse_keras_stdout() -> None:
    expected = [(69, 80, 221.0), (70, 80, 222.0), (71, 80, None)]
    assert parse_keras_stdout(fixture("keras_stdout.txt")) == expected
    tty = "Epoch 1/2\r 10/742 [>....] - ETA: 5s\r742/742 [==============================] - 48s 65ms/step\n"
    assert parse_keras_stdout(tty) == [(1, 2, 48.0)]
    assert parse_keras_stdout("") == []


def test_parse_evaluate_table_standalone_with_glued_class() -> None:
    result = parse_evaluate_table(fixture("evaluate_stdout.txt"))
    assert result == EvalResult(map=0.619, ap={"car": 0.824, "cyclist": 0.601, "pedestrian": 0.552,
                                               "traffic_light_big": 0.5})


def test_parse_evaluate_table_takes_last_5_decimal_table() -> None:
    result = parse_evaluate_table(fixture("train_stdout_tables.txt"))
    assert result is not None and result.map == 0.71234
    assert result.ap == {"car": 0.8, "very_long_class_name": 0.61234}  # nan AP left out
    assert parse_evaluate_table("no table here") is None
    assert parse_evaluate_table("*" * 31 + "\ncar           AP    0.8\n") is None  # still being printed


def test_parse_prune_ratio_and_execution_status() -> None:
    assert parse_prune_ratio(fixture("prune.log")) == pytest.approx(0.22123893805309736)
    assert parse_prune_ratio("nothing") is None
    assert parse_execution_status(fixture("prune.log")) == "PASS"
    assert parse_execution_status(fixture("train_stdout_tables.txt")) == "FAIL"
    assert parse_execution_status("Execution status: PASS\nExecution status: FAIL\n") == "FAIL"
    assert parse_execution_status("") is None


# ------------------------------------------------------------------------------ spec


def test_read_spec_fields() -> None:
    fields = read_spec_fields(fixture("ssd_train_kitti.txt"))
    assert fields["random_seed"] == "42"
    assert fields["training_config.num_epochs"] == "80"
    assert fields["training_config.enable_qat"] == "false"
    assert fields["training_config.learning_rate.soft_start_annealing_schedule.max_learning_rate"] == "2e-2"
    assert fields["training_config.regularizer.type"] == "L1"
    assert fields["ssd_config.arch"] == "resnet"
    assert fields["ssd_config.aspect_ratios_global"] == "[1.0, 2.0, 0.5, 3.0, 1.0/3.0]"
    assert fields["dataset_config.data_sources.tfrecords_path"].endswith("kitti_train*")
    assert fields["dataset_config.target_class_mapping.value"] == "pedestrian"  # repeated: last wins
    assert fields["eval_config.validation_period_during_training"] == "5"


def test_read_spec_fields_inline_and_odd_forms() -> None:
    text = ('training_config { batch_size_per_gpu: 16 num_epochs: 80 checkpoint_interval: 10 '
            'enable_qat: false } eval_config { validation_period_during_training: 10 } '
            'ssd_config < arch: \'resnet\' nlayers: 34 > x: [1, 2, 3] # trailing } comment\n'
            'name: "a\\"b" "c" unterminated { k: 1')
    fields = read_spec_fields(text)
    assert fields["training_config.checkpoint_interval"] == "10"
    assert fields["ssd_config.nlayers"] == "34" and fields["ssd_config.arch"] == "resnet"
    assert fields["x"] == "1,2,3" and fields["name"] == 'a"bc' and fields["unterminated.k"] == "1"


def test_spec_summary() -> None:
    assert spec_summary(fixture("ssd_train_kitti.txt")) == {
        "num_epochs": 80, "checkpoint_interval": 10, "validation_period": 5, "batch_size_per_gpu": 16,
        "arch": "resnet", "nlayers": 18, "network": "ssd", "backbone": "resnet18",
        "input_size": None, "dataset": "kitti_train"}
    empty = spec_summary("")
    assert empty["checkpoint_interval"] == 1 and empty["validation_period"] is None  # as TAO reads them
    assert empty["num_epochs"] is None and empty["backbone"] is None


def test_spec_facts_and_the_workload_key() -> None:
    """What a stage records of its spec at submission, and the workload key built from it
    (the same key workload_of built by re-reading the file before)."""
    import hashlib

    text = fixture("ssd_train_kitti.txt")
    facts = spec_facts(text)
    assert facts == {**spec_summary(text), "digest": hashlib.sha256(text.encode()).hexdigest()[:8]}
    assert workload_key(facts) == "ssd/resnet18 bs16 kitti_train"


def test_workload_names_say_what_decides_speed() -> None:
    """Train and retrain of one model, one dataset and one input size are one workload
    whatever their learning rate or epochs; a pruned model's retrain is its size class; the
    spec hash is not part of the name; user text in it is kept plain."""
    example = (Path(__file__).resolve().parents[2] / "examples" / "specs")
    train = spec_facts((example / "ssd_train_resnet18_kitti.txt").read_text())
    retrain = spec_facts((example / "ssd_retrain_resnet18_kitti.txt").read_text())
    assert train["digest"] != retrain["digest"]
    assert workload_key(train) == workload_key(retrain) == "ssd/resnet18 384x1248 bs16 kitti_train"
    assert workload_key(retrain, 0.31) == "ssd/resnet18 384x1248 bs16 kitti_train pruned to 30%"
    assert workload_key(retrain, 0.34) == workload_key(retrain, 0.26)
    assert workload_key(retrain, 0.04).endswith("pruned to 5%")
    assert workload_key(retrain, 1.0) == workload_key(retrain)  # not pruned at all
    assert workload_key(spec_facts("")) == workload_key({}) == "ssd/? bs?"
    hostile = spec_facts('dataset_config { data_sources { tfrecords_path: "/d/\x1b[2Jevil name*" } }')
    assert hostile["dataset"] == "2Jevilname"


def test_a_line_without_end_is_held_back_only_up_to_a_cap() -> None:
    """A job printing without newlines must not grow the daemon's memory: past the cap the
    partial line is dropped up to its newline, and the lines after it are read as usual."""
    from gpusched.parsers import StatusFollower

    f = StatusFollower()
    for _ in range(50):  # 50 × 4 KiB: over the 64 KiB cap
        assert f.feed_lines("a" * 4096) == []
    assert len(f.pending) <= StatusFollower.MAX_PENDING
    assert f.feed_lines("still the same line\nnext\nlast") == ["next"]
    assert f.pending == "last"
