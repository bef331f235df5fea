"""Whole TAO pipelines through the real daemon and CLI, on the fake TAO entrypoint.

The example pipeline (examples/ssd_resnet18_kitti.toml) with smaller specs: every stage gets
the right upstream result (`-m`), the gate's decision follows from the recorded mAPs, a failing
stage fails only what depends on it, and a gate nobody passes prunes again, then gives up.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpusched.testing.harness import DaemonProcess, fake_tao_env, short_tmpdir

pytestmark = pytest.mark.acceptance

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCALE = "GPUSCHED_FAKE_TAO_SCALE=0.003"
NAME = "ssd_resnet18_kitti"


def _edit(text: str, **values: Any) -> str:
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^(\s*{key}\s*[:=]\s*)(\[[^\]\n]*\]|[^\s#]+)",
                          rf"\g<1>{value}", text)
        assert n == 1, key
    return text


def example_pipeline(root: Path, *, train_epochs: int = 20, retrain_epochs: int = 10,
                     **toml_values: Any) -> Path:
    """The example pipeline and its specs under ``root``, with fewer epochs (and any TOML
    values replaced: ``threshold="[0.7, 0.8]"``, ``max_drop=0.0001``)."""
    (root / "specs").mkdir()
    for name, epochs in (("ssd_train_resnet18_kitti.txt", train_epochs),
                         ("ssd_retrain_resnet18_kitti.txt", retrain_epochs)):
        text = (EXAMPLES / "specs" / name).read_text()
        (root / "specs" / name).write_text(_edit(text, num_epochs=epochs, checkpoint_interval=5,
                                                 validation_period_during_training=5))
    toml = (EXAMPLES / "ssd_resnet18_kitti.toml").read_text()
    path = root / "pipeline.toml"
    path.write_text(_edit(toml, **toml_values))
    return path


def show(d: DaemonProcess, job_id: int) -> dict[str, Any]:
    r = d.cli("show", str(job_id), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def artifacts(d: DaemonProcess, job_id: int) -> list[dict[str, Any]]:
    r = d.cli("artifacts", str(job_id), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def artifact(d: DaemonProcess, job_id: int, kind: str) -> dict[str, Any]:
    found = [a for a in artifacts(d, job_id) if a["kind"] == kind]
    assert len(found) == 1, (job_id, kind, found)
    return found[0]


def status(d: DaemonProcess, pid: int) -> dict[str, Any]:
    r = d.cli("pipeline", "status", str(pid), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def run_pipeline(d: DaemonProcess, path: Path, *env: str, timeout: float = 90) -> dict[str, Any]:
    """Queue the pipeline, poll until it is decided; its final status."""
    args = [a for e in (SCALE, *env) for a in ("-e", e)]
    r = d.cli("pipeline", "run", str(path), *args)
    assert r.returncode == 0, r.stderr
    m = re.match(r"pipeline (\d+) \(" + NAME + r"\) queued with (\d+) stage", r.stdout)
    assert m, r.stdout
    pid = int(m[1])
    deadline = time.monotonic() + timeout
    while True:
        p = status(d, pid)
        if p["status"] != "running":
            return p
        assert time.monotonic() < deadline, f"pipeline still running: {p}\n{d.log()}"
        time.sleep(0.25)


def flag(command: list[str], name: str) -> str:
    """A TAO flag's value in a stage's command (after the entrypoint's ``ssd TASK``)."""
    tao = command[command.index("ssd"):]
    assert tao.count(name) == 1, (name, tao)
    return tao[tao.index(name) + 1]


def stage_of(job: dict[str, Any]) -> str:
    return job["name"].split("/", 1)[1]


@pytest.fixture(scope="module")
def example_run() -> Iterator[tuple[DaemonProcess, dict[str, Any]]]:
    """The example pipeline, run once for the tests that read its outcome."""
    root = short_tmpdir("gse")
    d = DaemonProcess(root / "state", env=fake_tao_env()).start()
    try:
        # 0.6 prunes too much to stay within max_drop: the gate must tell the branches apart
        path = example_pipeline(root, threshold="[0.1, 0.3, 0.6]")
        p = run_pipeline(d, path)
        p["toml"] = str(path)  # for the tests that run it again
        yield d, p
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_example_pipeline_end_to_end(example_run: tuple[DaemonProcess, dict[str, Any]]
                                     ) -> None:
    d, p = example_run
    jobs = {stage_of(j): j for j in p["jobs"]}
    assert p["status"] == "succeeded", (p["reason"], {k: (j["status"], j["reason"])
                                                      for k, j in jobs.items()})
    assert p["rounds"] == 1
    values = ("0.1", "0.3", "0.6")
    assert sorted(jobs) == sorted(["train", "evaluate",
                                   *(f"{s}[threshold={v}]" for s in ("prune", "retrain",
                                                                     "evaluate_retrained")
                                     for v in values)])
    assert all(j["status"] == "succeeded" for j in jobs.values())
    cmd = {k: show(d, j["id"])["command"] for k, j in jobs.items()}
    assert len(show(d, jobs["train"]["id"])["gpu_indices"]) == 2  # gpus = 2 in the TOML

    # evaluate and every prune get train's best checkpoint, not its latest
    best = artifact(d, jobs["train"]["id"], "best_checkpoint")
    assert best["path"].endswith(f"ssd_resnet18_epoch_{best['epoch']:03d}.hdf5")
    assert flag(cmd["evaluate"], "-m") == best["path"]
    for v in values:
        prune = cmd[f"prune[threshold={v}]"]
        assert flag(prune, "-m") == best["path"]
        assert flag(prune, "-pth") == v
        # each retrain starts from its own branch's pruned model ...
        pruned = artifact(d, jobs[f"prune[threshold={v}]"]["id"], "pruned_model")
        assert pruned["path"] == flag(prune, "-o")
        assert flag(cmd[f"retrain[threshold={v}]"], "-m") == pruned["path"]
        # ... and each candidate evaluation reads its own retrain's best checkpoint
        rbest = artifact(d, jobs[f"retrain[threshold={v}]"]["id"], "best_checkpoint")
        assert flag(cmd[f"evaluate_retrained[threshold={v}]"], "-m") == rbest["path"]
    assert len({flag(cmd[f"retrain[threshold={v}]"], "-m") for v in values}) == 3

    # the gate, recomputed from the recorded numbers
    max_drop = 0.02
    base = artifact(d, jobs["evaluate"]["id"], "evaluation")["metrics"]["mAP"]
    summary = p["summary"]
    assert summary["baseline_map"] == pytest.approx(base)
    by_threshold = {f"{b['threshold']:g}": b for b in summary["branches"]}
    assert sorted(by_threshold) == list(values)
    passing = []
    for v in values:
        cand = artifact(d, jobs[f"evaluate_retrained[threshold={v}]"]["id"],
                        "evaluation")["metrics"]["mAP"]
        size = artifact(d, jobs[f"prune[threshold={v}]"]["id"], "pruned_model")["metrics"][
            "size_mib"]
        b = by_threshold[v]
        assert b["map"] == pytest.approx(cand)
        assert b["drop"] == pytest.approx(base - cand)
        assert b["size_mib"] == pytest.approx(size)
        assert b["passed"] is (base - cand <= max_drop)
        if b["passed"]:
            passing.append((size, v))
    assert 0 < len(passing) < len(values), summary  # some pass, some do not
    smallest = min(passing)
    assert summary["result"] is not None
    assert f"{summary['result']['threshold']:g}" == smallest[1]
    assert summary["result"]["size_mib"] == pytest.approx(smallest[0])

    # the summary table
    r = d.cli("pipeline", "status", str(p["id"]))
    assert r.returncode == 0, r.stderr
    header = next(ln for ln in r.stdout.splitlines() if "THRESHOLD" in ln)
    for col in ("THRESHOLD", "SIZE", "mAP", "DROP"):
        assert col in header, header
    assert f"result: the pruned model at threshold {smallest[1]}" in r.stdout


def chosen_threshold(p: dict[str, Any]) -> str:
    return f"{p['summary']['result']['threshold']:g}"


def test_the_result_names_the_file_to_deploy(example_run: tuple[DaemonProcess, dict[str, Any]]
                                             ) -> None:
    """The chosen branch's retrained best checkpoint: in the summary, in `pipeline status`
    (table and --json) and alone on stdout from `pipeline result` (by name or id)."""
    d, p = example_run
    jobs = {stage_of(j): j for j in p["jobs"]}
    chosen = artifact(d, jobs[f"retrain[threshold={chosen_threshold(p)}]"]["id"],
                      "best_checkpoint")
    assert status(d, p["id"])["summary"]["model"] == chosen["path"]
    assert p["summary"]["result"]["model"] == chosen["path"]
    r = d.cli("pipeline", "status", NAME)
    assert f"\nmodel: {chosen['path']}\n" in r.stdout + "\n", r.stdout
    for ref in (NAME, str(p["id"])):
        res = d.cli("pipeline", "result", ref)
        assert (res.returncode, res.stdout, res.stderr) == (0, chosen["path"] + "\n", "")


def test_s_per_epoch_names_the_gpu_set_of_each_branch(
        example_run: tuple[DaemonProcess, dict[str, Any]]) -> None:
    d, p = example_run
    jobs = {stage_of(j): j for j in p["jobs"]}
    names = {g["uuid"]: g["name"] for g in json.loads(d.cli("gpus", "--json").stdout)}
    r = d.cli("pipeline", "status", str(p["id"]))
    branches = {f"{b['threshold']:g}": b for b in p["summary"]["branches"]}
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines()
            if ln.split() and ln.split()[0] in branches}
    assert sorted(rows) == sorted(branches), r.stdout
    for v, b in branches.items():
        ran_on = [names[u] for u in show(d, jobs[f"retrain[threshold={v}]"]["id"])["gpus"]]
        assert len(ran_on) == 1  # retrain has gpus = 1
        assert b["gpus"] == ran_on[0] and b["gpu_models"] == ran_on
        assert f"{b['s_per_epoch']:.3g} ({ran_on[0]})" in rows[v], rows[v]


def test_ls_tells_the_branches_apart(example_run: tuple[DaemonProcess, dict[str, Any]]
                                     ) -> None:
    d, p = example_run
    jobs = {stage_of(j): j for j in p["jobs"]}
    r = d.cli("ls", "--all")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "NAME"]
    shown = {int(ln.split()[0]): ln.split()[1] for ln in lines[1:]}
    for key, j in jobs.items():
        assert shown[j["id"]].endswith(f"/{key}"), (key, shown[j["id"]])
    assert len(set(shown.values())) == len(jobs)


def test_a_failing_stage_fails_its_dependants(tao_daemon: DaemonProcess, root: Path) -> None:
    """evaluate fails (injected): every stage after it fails without running; train is fine."""
    d = tao_daemon
    p = run_pipeline(d, example_pipeline(root), "GPUSCHED_FAKE_TAO_FAIL=evaluate:error")
    jobs = {stage_of(j): j for j in p["jobs"]}
    assert p["status"] == "failed"
    assert p["reason"] and "evaluate" in p["reason"], p["reason"]
    assert jobs["train"]["status"] == "succeeded"

    ev = show(d, jobs["evaluate"]["id"])
    assert ev["status"] == "failed" and ev["exit_code"] == 255
    assert "exit code 255" in ev["reason"] and "injected failure" in ev["reason"]
    assert len(ev["attempts"]) == 1

    dependants = [k for k in jobs if k not in ("train", "evaluate")]
    assert len(dependants) == 9
    for k in dependants:
        j = show(d, jobs[k]["id"])
        assert j["status"] == "failed", (k, j["status"])
        assert j["attempts"] == [], k  # never ran
        assert j["started_at"] is None, k
        assert any(f"dependency job {a} failed" in j["reason"] for a in j["after"]), (
            k, j["reason"], j["after"])
    for v in ("0.1", "0.2", "0.3"):
        prune = show(d, jobs[f"prune[threshold={v}]"]["id"])
        assert f"dependency job {ev['id']} failed" in prune["reason"]


@pytest.fixture(scope="module")
def gate_failed() -> Iterator[tuple[DaemonProcess, dict[str, Any]]]:
    """Thresholds so high that no retrained model gets near the unpruned one."""
    root = short_tmpdir("gsg")
    d = DaemonProcess(root / "state", env=fake_tao_env()).start()
    try:
        path = example_pipeline(root, threshold="[0.7, 0.8]", max_drop=0.0001, retries=1,
                                backoff=0.9)
        yield d, run_pipeline(d, path)
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_gate_nobody_passes_prunes_again_then_fails(
        gate_failed: tuple[DaemonProcess, dict[str, Any]]) -> None:
    """One more round at the lowest threshold × backoff, then the pipeline fails."""
    d, p = gate_failed
    assert p["status"] == "failed", p
    assert p["rounds"] == 2
    assert "0.0001" in p["reason"] and "2 round" in p["reason"], p["reason"]
    jobs = {stage_of(j): j for j in p["jobs"]}
    second = "threshold=0.63"  # round(min(0.7, 0.8) * 0.9, 4)
    assert sorted(jobs) == sorted(["train", "evaluate",
                                   *(f"{s}[threshold={v}]" for s in ("prune", "retrain",
                                                                     "evaluate_retrained")
                                     for v in ("0.7", "0.8", "0.63"))])
    assert all(j["status"] == "succeeded" for j in jobs.values())
    prune2 = show(d, jobs[f"prune[{second}]"]["id"])
    assert prune2["spec"]["stage"]["request"]["branch"]["round"] == 2
    assert flag(prune2["command"], "-pth") == "0.63"
    # the new round reuses the trunk: train's best checkpoint, no second train
    best = artifact(d, jobs["train"]["id"], "best_checkpoint")
    assert flag(prune2["command"], "-m") == best["path"]
    retrain2 = show(d, jobs[f"retrain[{second}]"]["id"])
    assert flag(retrain2["command"], "-m") == artifact(d, prune2["id"], "pruned_model")["path"]

    base = artifact(d, jobs["evaluate"]["id"], "evaluation")["metrics"]["mAP"]
    branches = p["summary"]["branches"]
    assert sorted((b["round"], f"{b['threshold']:g}") for b in branches) == [
        (1, "0.7"), (1, "0.8"), (2, "0.63")]
    for b in branches:
        cand = artifact(d, jobs[f"evaluate_retrained[threshold={b['threshold']:g}]"]["id"],
                        "evaluation")["metrics"]["mAP"]
        assert b["map"] == pytest.approx(cand)
        assert base - cand > 0.0001 and b["passed"] is False
    assert p["summary"]["result"] is None
    r = d.cli("pipeline", "status", str(p["id"]))
    assert r.returncode == 1 and "round 2" in r.stdout


def test_the_gate_failure_names_max_drop(gate_failed: tuple[DaemonProcess, dict[str, Any]]
                                         ) -> None:
    _d, p = gate_failed
    assert "max_drop" in p["reason"], p["reason"]


# -- a pipeline is validated like `gpusched tao` ----------------------------------------------


def one_stage_pipeline(root: Path, extra: str, stage: str = "") -> Path:
    (root / "specs").mkdir(exist_ok=True)
    spec = root / "specs" / "train.txt"
    spec.write_text((EXAMPLES / "specs" / "ssd_train_resnet18_kitti.txt").read_text())
    path = root / "one.toml"
    path.write_text(f'name = "{NAME}"\n{extra}\n[stages.train]\ntask = "train"\n'
                    f'spec = "specs/train.txt"\nresults = "out"\n{stage}\n')
    return path


@pytest.mark.parametrize("case", ["three GPUs", "docker runner"])
def test_a_pipeline_is_refused_like_gpusched_tao(tao_daemon: DaemonProcess, root: Path,
                                                 case: str) -> None:
    d = tao_daemon
    if case == "three GPUs":
        path = one_stage_pipeline(root, "", "gpus = 3")
        tao_args = ["ssd", "train", "--gpus", "3"]
        message = "asks for 3 GPUs; this host has 2"
    else:
        path = one_stage_pipeline(root, 'runner = "docker"\n'
                                  'image = "docker.io/someone/else:latest"')
        tao_args = ["--runner", "docker", "--image", "docker.io/someone/else:latest",
                    "-v", f"{root}:/workspace", "ssd", "train"]
        message = "the docker runner is not enabled on this daemon"
    # what `gpusched tao` says about the same stage
    r = d.cli("tao", *tao_args, "-e", str(root / "specs" / "train.txt"), "-r", str(root / "out"))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    # the pipeline must be refused the same way, with nothing stored
    r = d.cli("pipeline", "run", str(path), "-v", f"{root}:/workspace")
    queued = json.loads(d.cli("ls", "--all", "--json").stdout)
    pipelines = json.loads(d.cli("pipeline", "ls", "--json").stdout)
    assert (r.returncode, queued, pipelines) == (2, [], []), r.stdout
    assert message in r.stderr


def test_a_docker_stage_with_a_reference_can_be_queued(root: Path) -> None:
    from gpusched.config import DockerSettings, Settings
    from gpusched.models import Mount
    from gpusched.stages import StageRequest, build_job, resolve

    spec = root / "spec.txt"
    spec.write_text((EXAMPLES / "specs" / "ssd_train_resnet18_kitti.txt").read_text())
    ckpt = root / "weights" / "ssd_resnet18_epoch_010.hdf5"
    ckpt.parent.mkdir()
    ckpt.write_text("{}\n")
    settings = Settings(docker=DockerSettings(mount_roots=["/tmp"]))
    req = StageRequest(stage={"task": "evaluate", "spec": str(spec),
                              "model": "@best_checkpoint:1"},
                       runner="docker", mounts=[Mount(source=str(root), target="/workspace")])
    job = build_job(req, settings)  # raises SpecError "... is not under any mount"
    resolved = resolve(job, settings, lambda job_id, kind: {"path": str(ckpt)})
    assert flag(resolved.command, "-m") == "/workspace/weights/ssd_resnet18_epoch_010.hdf5"
    assert flag(resolved.command, "-e") == "/workspace/spec.txt"


# -- failed branches, results, spec overrides -------------------------------------------------


def test_a_failed_retrain_is_reported_with_its_reason(tao_daemon: DaemonProcess,
                                                      root: Path) -> None:
    """Every retrain fails (train has 5 epochs, so only the 10-epoch retrains reach epoch 8):
    the branches and the pipeline say which stage failed and why, not "not within
    gate.max_drop", and no further round prunes into the same failure."""
    d = tao_daemon
    path = example_pipeline(root, train_epochs=5, threshold="[0.1, 0.2]")
    p = run_pipeline(d, path, "GPUSCHED_FAKE_TAO_FAIL=train:error@8")
    jobs = {stage_of(j): j for j in p["jobs"]}
    assert jobs["train"]["status"] == "succeeded"
    assert jobs["retrain[threshold=0.1]"]["status"] == "failed"
    assert p["status"] == "failed", p
    assert p["rounds"] == 1, p["reason"]
    assert "max_drop" not in p["reason"], p["reason"]
    for v in ("0.1", "0.2"):
        assert f"retrain[threshold={v}] failed:" in p["reason"], p["reason"]
    assert "injected failure at epoch 8" in p["reason"], p["reason"]

    branches = {f"{b['threshold']:g}": b for b in p["summary"]["branches"]}
    for v in ("0.1", "0.2"):
        b = branches[v]
        assert b["passed"] is False and b["map"] is None
        assert b["failed_stage"] == f"retrain[threshold={v}]"
        assert b["status"].startswith(f"retrain[threshold={v}] failed: "), b["status"]
        assert "injected failure" in b["status"], b["status"]
    r = d.cli("pipeline", "status", str(p["id"]))
    assert r.returncode == 1
    gate_rows = [ln for ln in r.stdout.splitlines() if ln.startswith(("0.1 ", "0.2 "))]
    assert len(gate_rows) == 2, r.stdout
    for ln in gate_rows:
        assert "retrain[threshold=" in ln and "failed: exit code 255" in ln, ln

    res = d.cli("pipeline", "result", str(p["id"]))
    assert res.returncode == 1 and res.stdout == ""
    assert f"pipeline {p['id']} ({NAME}) failed: no branch could be judged" in res.stderr, (
        res.stderr)


def test_pipeline_result_says_why_there_is_none(tao_daemon: DaemonProcess, root: Path) -> None:
    d = tao_daemon
    r = d.cli("pipeline", "result", "nope")
    assert r.returncode != 0 and r.stdout == "" and "no pipeline 'nope'" in r.stderr
    path = example_pipeline(root)
    r = d.cli("pipeline", "run", str(path), "-e", "GPUSCHED_FAKE_TAO_SCALE=1")
    assert r.returncode == 0, r.stderr
    res = d.cli("pipeline", "result", NAME)
    assert res.returncode == 1 and res.stdout == ""
    assert "is still running: no result yet" in res.stderr, res.stderr


def _db_pipeline_def(d: DaemonProcess, pid: int) -> dict[str, Any]:
    import sqlite3

    conn = sqlite3.connect(f"file:{d.state_dir / 'gpusched.db'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT spec FROM pipelines WHERE id = ?", (pid,)).fetchone()
    finally:
        conn.close()
    return json.loads(row[0])["def"]


def test_stage_overrides_edit_a_derived_spec(tao_daemon: DaemonProcess, root: Path) -> None:
    """`overrides` in a [stages.X] table: the CLI writes the edited spec beside the original,
    the stage runs with it, the original stays as it was, and the pipeline records both."""
    d = tao_daemon
    path = example_pipeline(root, threshold="[0.1]")
    overrides = ('overrides = { "training_config.num_epochs" = 4, '
                 '"training_config.checkpoint_interval" = 2, '
                 '"eval_config.validation_period_during_training" = 2 }')
    text = path.read_text().replace('[stages.retrain]\n', f'[stages.retrain]\n{overrides}\n')
    path.write_text(text)
    original = root / "specs" / "ssd_retrain_resnet18_kitti.txt"
    before = original.read_text()
    p = run_pipeline(d, path)
    jobs = {stage_of(j): j for j in p["jobs"]}
    retrain = show(d, jobs["retrain[threshold=0.1]"]["id"])
    assert retrain["status"] == "succeeded", retrain["reason"]
    derived = Path(flag(retrain["command"], "-e"))
    assert derived.parent == original.parent and derived != original
    assert derived.name.startswith("ssd_retrain_resnet18_kitti.gpusched-")
    assert original.read_text() == before
    edited = derived.read_text()
    assert re.search(r"(?m)^\s*num_epochs\s*:\s*4\s*$", edited), edited
    assert re.search(r"(?m)^\s*checkpoint_interval\s*:\s*2\s*$", edited), edited
    # the retrain ran the edited spec: 4 epochs, checkpoints at 2 and 4
    best = artifact(d, retrain["id"], "best_checkpoint")
    assert best["epoch"] in (2, 4), best
    ckpts = sorted(a["epoch"] for a in artifacts(d, retrain["id"]) if a["kind"] == "checkpoint")
    assert ckpts == [2, 4], ckpts
    # stages without overrides keep their spec; the evaluation of the retrained model too
    ev = show(d, jobs["evaluate_retrained[threshold=0.1]"]["id"])
    assert flag(ev["command"], "-e") == str(original)
    # the pipeline's record: the edited file, the original and the edits
    st = _db_pipeline_def(d, p["id"])["stages"]["retrain"]
    assert st["spec"] == str(derived) and st["spec_original"] == str(original)
    assert st["overrides"] == {"training_config.num_epochs": 4,
                               "training_config.checkpoint_interval": 2,
                               "eval_config.validation_period_during_training": 2}


def test_a_bad_override_is_refused_with_nothing_queued(tao_daemon: DaemonProcess,
                                                       root: Path) -> None:
    d = tao_daemon
    path = one_stage_pipeline(root, "", 'overrides = { "training_config.num_epoch" = 4 }')
    r = d.cli("pipeline", "run", str(path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "stage 'train'" in r.stderr and "num_epoch" in r.stderr, r.stderr
    assert "num_epochs" in r.stderr, r.stderr  # the nearest field
    assert json.loads(d.cli("pipeline", "ls", "--json").stdout) == []
    assert list((root / "specs").iterdir()) == [root / "specs" / "train.txt"]


def test_running_a_pipeline_again_needs_overwrite(example_run: tuple[DaemonProcess,
                                                                     dict[str, Any]]) -> None:
    """The stages' results directories hold the first run's output: a second run is refused
    before anything is queued, and `--overwrite` moves the old output aside (issue 13, 3)."""
    d, p = example_run
    before = len(d.client().get("/v1/jobs?all=1"))
    r = d.cli("pipeline", "run", p["toml"])
    assert r.returncode != 0 and "--overwrite" in r.stderr, (r.stdout, r.stderr)
    assert len(d.client().get("/v1/jobs?all=1")) == before
    # a gate round of a later run would write where an earlier run's round wrote: that too is
    # refused now, not hours later from the tick
    later = Path(p["toml"]).parent / "experiment_dir_retrain" / "pth0.05"
    later.mkdir(parents=True)
    (later / "status.json").write_text("{}\n")
    r = d.cli("pipeline", "run", p["toml"], "--overwrite", "--json")
    assert r.returncode == 0, r.stderr
    assert "aside into" in r.stderr
    assert not (later / "status.json").exists()  # moved aside with the rest
    again = json.loads(r.stdout)
    for j in again["jobs"]:
        d.cli("cancel", str(j["id"]))
