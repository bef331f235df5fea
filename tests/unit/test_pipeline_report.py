"""Issue 13, points 7-11, the pure parts: stage names in `ls`, the pipeline's result and its
summary table, failed branches, and spec overrides in a pipeline TOML."""

from __future__ import annotations

from typing import Any

import pytest

from gpusched import render
from gpusched.errors import SpecError
from gpusched.pipeline_runner import _gate_failure
from gpusched.pipelines import (
    BranchResult,
    GateDef,
    derive_specs,
    derived_spec_path,
    gate_decision,
    load,
)

SPEC = "training_config {\n  num_epochs: 80\n  checkpoint_interval: 10\n}\n"


# -- 7: ls ------------------------------------------------------------------------------------


def test_ls_keeps_the_stage_and_branch_of_long_pipeline_names() -> None:
    names = [f"ssd_resnet18_kitti/{s}[threshold={v}]" for s in ("prune", "retrain",
                                                                 "evaluate_retrained")
             for v in ("0.1", "0.2", "0.0001")]
    shown = [render.short_name(n) for n in names]
    assert len(set(shown)) == len(names)
    for n, s in zip(names, shown, strict=True):
        assert len(s) <= render.NAME_WIDTH
        assert s.endswith(n.split("/", 1)[1]), s
    assert render.short_name("ssd_resnet18_kitti/evaluate_retrained[threshold=0.1]") == (
        "ssd_r…/evaluate_retrained[threshold=0.1]")
    assert render.short_name("short/train") == "short/train"
    long = "x" * 30 + "/" + "stage_with_a_very_long_name[threshold=0.25]"
    assert render.short_name(long).endswith("[threshold=0.25]")
    assert len(render.short_name(long)) == render.NAME_WIDTH


def job(name: str, jid: int) -> dict[str, Any]:
    return {"id": jid, "name": name, "status": "queued", "gpu_indices": [], "owner": "ann",
            "submitted_at": None, "request": {"count": 1, "ids": None}, "command": ["ssd"],
            "exit_code": None, "reason": None}


def test_the_jobs_table_tells_branches_apart_and_still_escapes() -> None:
    out = render.jobs_table([job(f"ssd_resnet18_kitti/retrain[threshold={v}]", i)
                             for i, v in enumerate(("0.1", "0.2"), 1)]
                            + [job("\x1b]0;evil\x07" * 8 + "/retrain[threshold=0.3]", 3)])
    assert "retrain[threshold=0.1]" in out and "retrain[threshold=0.2]" in out
    assert "/retrain[threshold=0.3]" in out
    assert "\x1b" not in out and "\x07" not in out


# -- 8, 9, 10: the summary, the result ---------------------------------------------------------


def branch(**kw: Any) -> dict[str, Any]:
    b = BranchResult(threshold=0.1, size_mib=20.0, map=0.70, drop=0.01, passed=True,
                     s_per_epoch=41.23, round=1, status="succeeded", gpu_models=["RTX 2070"],
                     gpus="RTX 2070", model="/x/retrain/weights/ssd_resnet18_epoch_010.hdf5")
    return {**b.__dict__, **kw}


def test_the_summary_names_the_model_and_the_gpu_set_of_each_branch() -> None:
    failed = branch(threshold=0.3, map=None, drop=None, passed=False, s_per_epoch=None,
                    gpus=None, model=None, failed_stage="retrain[threshold=0.3]",
                    status="retrain[threshold=0.3] failed: exit code 255: RuntimeError: "
                           "out of memory")
    best = branch()
    summary = {"baseline_map": 0.71, "model": best["model"], "result": best,
               "branches": [best, branch(threshold=0.2, s_per_epoch=23.9,
                                         gpus="2× RTX A4000", passed=False, drop=0.05),
                            failed]}
    out = render.pipeline_summary(summary)
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln[:1].isdigit()}
    assert "41.2 (RTX 2070)" in rows["0.1"] and "pass" in rows["0.1"]
    assert "23.9 (2× RTX A4000)" in rows["0.2"] and rows["0.2"].endswith("fail")
    assert rows["0.3"].endswith("retrain[threshold=0.3] failed: exit code 255: RuntimeError: "
                                "out of memory")
    assert f"model: {best['model']}" in out
    # summaries stored before gpus/model existed still render
    old = {k: v for k, v in best.items() if k not in ("gpus", "model", "gpu_models")}
    assert "41.2" in render.pipeline_summary({"baseline_map": 0.71, "result": old,
                                              "branches": [old]})


def pipeline(**kw: Any) -> dict[str, Any]:
    return {"id": 4, "name": "p", "status": "succeeded", "rounds": 1, "reason": None,
            "summary": {"baseline_map": 0.7, "result": branch(), "model": "/m.hdf5",
                        "branches": [branch()]}, **kw}


@pytest.mark.parametrize(("kw", "why"), [
    ({"status": "running", "summary": None}, "pipeline 4 (p) is still running: no result yet"),
    ({"status": "running", "rounds": 2}, "is still running (round 2)"),
    ({"status": "failed", "reason": "no branch could be judged in round 1: retrain failed"},
     "pipeline 4 (p) failed: no branch could be judged in round 1: retrain failed"),
    ({"summary": None}, "has no gate, so it chose no model"),
    ({"summary": {"baseline_map": 0.7, "result": None, "branches": []}},
     "no branch passed the gate"),
    ({"redacted": True, "summary": None}, "is not yours"),
    ({"name": "p\x1b[2J", "status": "failed", "reason": "r\r"}, "(p\\x1b[2J) failed: r\\r"),
])
def test_pipeline_result_says_why_there_is_no_model(kw: dict[str, Any], why: str) -> None:
    model, text = render.pipeline_model(pipeline(**kw))
    assert model is None and why in text, text


def test_pipeline_result_is_the_chosen_model() -> None:
    assert render.pipeline_model(pipeline()) == ("/m.hdf5", "")


def result(threshold: float, status: str = "succeeded", round_no: int = 1) -> BranchResult:
    failed = None if status == "succeeded" else f"retrain[threshold={threshold:g}]"
    return BranchResult(threshold=threshold, size_mib=None, map=None if failed else 0.6,
                        drop=None if failed else 0.1, passed=False, s_per_epoch=None,
                        round=round_no, status=status if not failed else
                        f"{failed} failed: {status}", failed_stage=failed)


def test_a_round_whose_every_branch_failed_is_not_pruned_again() -> None:
    gate = GateDef(candidate="c", baseline="b", retries=2)
    branches = [result(0.1, "exit code 255"), result(0.2, "exit code 255")]
    assert gate_decision(0.7, branches, gate, 1, [0.1, 0.2]) == ("failed", None)
    why = _gate_failure(branches, gate.max_drop, 1)
    assert why.startswith("no branch could be judged in round 1: retrain[threshold=0.1] "
                          "failed: exit code 255; retrain[threshold=0.2] failed"), why
    assert "max_drop" not in why
    # one judged branch: the gate may still prune again, and its failure names both
    mixed = [result(0.1), result(0.2, "exit code 255")]
    assert gate_decision(0.7, mixed, gate, 1, [0.1, 0.2]) == ("retry", [0.05])
    why = _gate_failure(mixed, gate.max_drop, 1)
    assert "max_drop = 0.02" in why and "failed: retrain[threshold=0.2] failed" in why, why


# -- 11: overrides -------------------------------------------------------------------------------


def toml(**stage: Any) -> dict[str, Any]:
    return {"name": "p", "stages": {"train": {"task": "train", "spec": "specs/t.txt",
                                              "results": "out", **stage},
                                    "evaluate": {"task": "evaluate", "needs": ["train"],
                                                 "spec": "specs/t.txt",
                                                 "model": "best_checkpoint:train"}}}


def test_overrides_derive_a_spec_beside_the_original() -> None:
    reads: list[str] = []

    def read(path: str) -> str:
        reads.append(path)
        return SPEC

    data, files = derive_specs(toml(overrides={"training_config.num_epochs": 10}), "/w", read)
    assert reads == ["/w/specs/t.txt"]
    [(path, text)] = files.items()
    assert path.startswith("/w/specs/t.gpusched-") and path.endswith(".txt")
    assert "num_epochs: 10" in text and "checkpoint_interval: 10" in text
    st = data["stages"]["train"]
    assert st["spec"] == path and st["spec_original"] == "/w/specs/t.txt"
    assert data["stages"]["evaluate"]["spec"] == "specs/t.txt"  # no overrides: untouched
    pdef = load(data, "/w")
    assert pdef.stages["train"].overrides == {"training_config.num_epochs": 10}
    assert pdef.stages["train"].spec_original == "/w/specs/t.txt"
    # the same edits name the same file; other edits another one
    _, files2 = derive_specs(toml(overrides={"training_config.num_epochs": 10}), "/w", read)
    assert files2 == files
    _, files3 = derive_specs(toml(overrides={"training_config.num_epochs": 11}), "/w", read)
    assert list(files3) != list(files)
    assert derived_spec_path("/a/b.txt", "x") == derived_spec_path("/a/b.txt", "x")


def test_workdir_and_absolute_specs_resolve_like_the_daemon() -> None:
    data = {**toml(overrides={"training_config.num_epochs": 3}), "workdir": "exp"}
    out, _ = derive_specs(data, "/w", lambda p: SPEC)
    assert out["stages"]["train"]["spec_original"] == "/w/exp/specs/t.txt"
    out, _ = derive_specs(toml(spec="/abs/s.txt", overrides={"training_config.num_epochs": 3}),
                          "/w", lambda p: SPEC)
    assert out["stages"]["train"]["spec_original"] == "/abs/s.txt"


@pytest.mark.parametrize(("stage", "message"), [
    ({"overrides": {"training_config.num_epoch": 3}}, "did you mean num_epochs"),
    ({"overrides": {"training_config.num_epochs": 3}, "spec": "s{threshold}.txt"},
     "one spec file, not one per branch"),
    ({"overrides": {"training_config.num_epochs": 3}, "spec_original": "/x"},
     "spec_original is gpusched's record"),
    ({"overrides": "num_epochs=3"}, "overrides must be a table"),
])
def test_bad_overrides_are_refused(stage: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match="stage 'train'") as err:
        derive_specs(toml(**stage), "/w", lambda p: SPEC)
    assert message in err.value.message, err.value.message


def test_an_unreadable_spec_is_a_spec_error() -> None:
    def read(path: str) -> str:
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(SpecError, match=r"cannot read its spec /w/specs/t\.txt"):
        derive_specs(toml(overrides={"training_config.num_epochs": 3}), "/w", read)


def test_the_daemon_refuses_overrides_nobody_applied() -> None:
    """A definition sent without the CLI (raw API) would run the unedited spec silently."""
    with pytest.raises(SpecError, match="overrides were not applied"):
        load(toml(overrides={"training_config.num_epochs": 3}), "/w")


def test_derived_specs_are_named_like_gpusched_tao_set() -> None:
    import hashlib

    digest = hashlib.sha256(b"x").hexdigest()[:10]
    assert derived_spec_path("/a/b.txt", "x") == f"/a/b.gpusched-{digest}.txt"
    assert derived_spec_path("/a/b.spec", "x") == f"/a/b.spec.gpusched-{digest}.txt"


def test_the_gates_later_rounds_are_known_at_submission() -> None:
    from gpusched.pipelines import PipelineDef, retry_round_thresholds

    def pdef(**gate: object) -> PipelineDef:
        return PipelineDef.model_validate({
            "name": "p", "workdir": "/tmp", "gate": {"candidate": "e2", "baseline": "e1", **gate},
            "stages": {"t": {"task": "train", "spec": "s"},
                       "e1": {"task": "evaluate", "spec": "s", "needs": ["t"]},
                       "p": {"task": "prune", "threshold": [0.2, 0.4], "needs": ["t"]},
                       "e2": {"task": "evaluate", "spec": "s", "needs": ["p"]}}})

    assert retry_round_thresholds(pdef(retries=2, backoff=0.5)) == [0.1, 0.05]
    assert retry_round_thresholds(pdef(retries=1, retry_thresholds=[0.15, 0.1])) == [0.15]
