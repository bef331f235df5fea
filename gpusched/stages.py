"""TAO stages as jobs: build the job from a stage request, resolve references to upstream
results when the stage becomes runnable, and judge the result when it ends.

Success is never the exit code alone: the exit code, TAO's ``Execution status: PASS|FAIL``
line, the last ``status`` in status.json and the expected artifacts must all agree (the ``tao``
launcher exits 0 on failure, and an interrupted run can exit 0 with FAILURE in status.json).
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gpusched import parsers
from gpusched.config import Settings
from gpusched.errors import SpecError
from gpusched.models import GpuRequest, JobSpec, Mount
from gpusched.policy import is_under
from gpusched.progress import MAX_SPEC, read_spec_facts
from gpusched.safefs import (
    UnsafeFile,
    list_user_dir,
    read_user_bytes,
    read_user_file,
    user_file_size,
)
from gpusched.tao import (
    REF_KINDS,
    REF_ROOT,
    SLURM_GPU_INDEX,
    TAO_ENV,
    TaoStage,
    export_output_file,
    prune_output_file,
    set_flag,
    set_gpu_index,
    stage_argv,
    status_json_path,
    to_container,
)

REF_PREFIX = "@"
CSV_GLOB = "*training_log*.csv"
#: bytes of a model file searched for its QAT layers (Keras writes model_config first)
QAT_PROBE_BYTES = 16 * 1024 * 1024
_QAT_MARKS = (b'"class_name": "QDQ"', b'"class_name": "QuantizedConv2D"',
              b'"class_name": "QuantizedDepthwiseConv2D"',
              b'"class_name": "QuantizedConv2DTranspose"')


class StageRequest(BaseModel):
    """What `gpusched tao` and pipelines send: a stage plus where and how to run it."""

    model_config = ConfigDict(extra="forbid")

    stage: dict[str, Any]  # TaoStage fields; "model" may be a reference "@best_checkpoint:12"
    name: str | None = Field(default=None, max_length=200)
    on: list[str] | None = None  # pin GPUs (indices or UUIDs)
    gpu_type: str | None = None
    mem_mib: int | None = Field(default=None, ge=0)
    priority: int = Field(default=0, ge=-1000, le=1000)
    after: list[int] = Field(default_factory=list)
    runner: str | None = None  # None: tao.runner
    image: str | None = None
    mounts: list[Mount] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    shm_size: str | None = None
    user: str | None = None
    hold: bool = False
    retries: int = Field(default=0, ge=0, le=100)
    time_limit_s: float | None = Field(default=None, gt=0)  # --time
    notify_cmd: str | None = None  # --notify
    notify_url: str | None = None  # --notify-url
    pipeline_id: int | None = None
    branch: dict[str, Any] | None = None  # pipeline bookkeeping: stage, branch, value, round
    # `--set` / pipeline `overrides`: the spec the user named and what was changed in it
    # (stage.spec is then the derived file written beside it, as the user)
    spec_original: str | None = None
    overrides: dict[str, Any] | None = None


def parse_ref(value: str | None) -> tuple[str, int] | None:
    if not value or not value.startswith(REF_PREFIX):
        return None
    kind, _, job = value[1:].partition(":")
    if kind not in REF_KINDS or not job.isdigit():
        raise SpecError(f"bad reference {value!r}: use @KIND:JOB with KIND one of "
                        f"{', '.join(REF_KINDS)}")
    return kind, int(job)


def _stage_with(stage: dict[str, Any], resolved: dict[str, str]) -> TaoStage:
    return TaoStage.model_validate({**stage, **resolved})


def read_spec_file(path: str, owner_uid: int | None) -> dict[str, Any]:
    """The spec file's facts (see ``_read_spec``)."""
    return _read_spec(path, owner_uid)[0]


def _read_spec(path: str, owner_uid: int | None) -> tuple[dict[str, Any], bool]:
    """The spec file's facts, read once at submission: through safefs (never a FIFO, never a
    user's symlink) and, with ``owner_uid``, only if that user could read it themselves (the
    daemon reads as root on the submitter's behalf)."""
    try:
        data = read_user_bytes(path, max_bytes=MAX_SPEC, owner_uid=owner_uid)
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except UnsafeFile as err:
        raise SpecError(f"spec file refused: {err}") from None
    except OSError as err:
        raise SpecError(f"cannot read spec file {path}: {err.strerror or err}") from None
    text = data.decode(errors="replace")
    qat = parsers.read_spec_fields(text).get("training_config.enable_qat")
    return parsers.spec_facts(text), qat is not None and qat.lower() in ("true", "t", "1")


def previous_output(task: str, names: list[str], weights: list[str]) -> list[str]:
    """What another run left in a results directory (entry names of the directory and of its
    ``weights/``), worded for a message; [] when there is none. Hidden entries (where
    ``--overwrite`` moved an old run) do not count."""
    found: list[str] = []
    visible = [n for n in names if not n.startswith(".")]
    # evaluate may share a dir (TAO's notebooks give it train's -r): it writes a STARTED line
    # and is judged only from its own lines after it; the others could take a train's verdict
    if "status.json" in visible and task != "evaluate":
        found.append("status.json")
    if task in ("train", "retrain"):
        ckpts = parsers.checkpoint_epochs(weights)
        if ckpts:
            found.append(f"weights/ ({len(ckpts)} checkpoint{'s' * (len(ckpts) > 1)}, up to "
                         f"epoch {max(ckpts)})")
        found += [n for n in visible if fnmatch.fnmatchcase(n, CSV_GLOB)]
    if task == "inference":
        found += [n + "/" for n in ("labels", "images_annotated") if n in visible]
    return found


def movable_output(task: str, names: list[str]) -> list[str]:
    """The entries that ``--overwrite`` moves aside (the CLI, as the user)."""
    keep = ({"status.json", "weights", "events"} if task in ("train", "retrain") else
            {"labels", "images_annotated"} if task == "evaluate" else
            {"status.json", "labels", "images_annotated"})
    return [n for n in names if not n.startswith(".") and (
        n in keep or (task in ("train", "retrain") and fnmatch.fnmatchcase(n, CSV_GLOB)))]


def _check_results_dir(stage: TaoStage, owner_uid: int | None) -> None:
    if not stage.results_dir or stage.results_dir.startswith(REF_ROOT):
        return
    res = Path(stage.results_dir)
    names = list_user_dir(res, owner_uid=owner_uid) or []
    weights = list_user_dir(res / "weights", owner_uid=owner_uid) or [] if "weights" in names \
        else []
    manual_resume = (stage.task in ("train", "retrain") and (stage.initial_epoch or 1) > 1
                     and bool(stage.model) and is_under(str(stage.model), str(res / "weights")))
    if manual_resume:
        return  # TAO's own resume: -m a checkpoint of this dir, --initial_epoch K+1
    if stage.resume:
        if not parsers.checkpoint_epochs(weights):
            raise SpecError(f"--resume: {res}/weights holds no checkpoint to resume from")
        return
    found = previous_output(stage.task, names, weights)
    if found:
        raise SpecError(f"{res} holds another run's output ({', '.join(found)}); gpusched never "
                        f"reads a previous run's results as this one's: give another -r, or "
                        f"--overwrite to move them aside (into {res}/.gpusched-old-<time>/)"
                        + (", or --resume to continue that run" if stage.task in (
                            "train", "retrain") and "weights/" in " ".join(found) else ""))


def model_is_qat(path: str, owner_uid: int | None) -> bool | None:
    """Whether a model file holds QAT layers (TAO's check_for_quantized_layers: QDQ,
    QuantizedConv2D...), from the class names in the Keras model_config of an .hdf5; the fake
    TAO's JSON header says it with ``qat``. None when it cannot tell (an encrypted .tlt)."""
    try:
        data = read_user_bytes(path, max_bytes=QAT_PROBE_BYTES, owner_uid=owner_uid)
    except OSError:
        return None
    if data.startswith(b"{"):
        try:
            header = json.loads(data.split(b"\n", 1)[0])
        except ValueError:
            header = None
        if isinstance(header, dict) and header.get("fake_tao_model"):
            return bool(header.get("qat", False))
    if not data.startswith(b"\x89HDF"):
        return None
    if any(mark in data for mark in _QAT_MARKS):
        return True
    return False if b'"class_name": "Conv2D"' in data else None


def _check_qat(stage: TaoStage, qat_spec: bool, owner_uid: int | None) -> None:
    """TAO's train refuses, after minutes of start-up, a model whose QAT-ness differs from
    ``training_config.enable_qat`` when it loads the model as it is: a pruned model (retrain)
    or a checkpoint it resumes from (train.py, "QAT training is enabled but the pretrained
    model is not a QAT model"). Pretrained weights are only copied into a model built from
    the spec, so plain train is not checked."""
    if stage.task not in ("train", "retrain") or not stage.model or stage.model.startswith(
            REF_ROOT):
        return
    if stage.task == "train" and not (stage.initial_epoch or 0) > 1:
        return
    qat_model = model_is_qat(stage.model, owner_uid)
    if qat_model is None or qat_model == qat_spec:
        return
    if qat_spec:
        raise SpecError(f"the spec enables QAT (training_config.enable_qat: true) but -m "
                        f"{stage.model} is not a QAT model: TAO would refuse it after start-up. "
                        "Give a QAT model, or --set training_config.enable_qat=false")
    raise SpecError(f"-m {stage.model} is a QAT model but the spec has QAT off "
                    "(training_config.enable_qat: false): TAO would refuse it after start-up. "
                    "Give a non-QAT model, or --set training_config.enable_qat=true")


def build_job(req: StageRequest, settings: Settings,
              resolved: dict[str, str] | None = None, *, owner_uid: int | None = None,
              spec_facts: dict[str, Any] | None = None,
              check_results: bool | None = None) -> JobSpec:
    """The JobSpec of a stage. Unresolved references stay as placeholders in the command and
    are resolved at launch (``resolve``). Validates before anything is queued.

    The spec file is read here, once (as ``owner_uid`` would read it), and what gpusched
    plans with is recorded in ``stage.spec_facts``; ``spec_facts`` passes earlier ones on.

    At submission (``check_results``, default: when nothing is ``resolved``) a results
    directory holding another run's output is refused, and so is a QAT mismatch between the
    spec and the model; ``resolve`` at launch does not check again (the stage's own earlier
    attempts write there)."""
    if check_results is None:
        check_results = not resolved
    refs = {k: v for k, v in req.stage.items() if isinstance(v, str) and parse_ref(v)}
    placeholders = {k: f"{REF_ROOT}{v[1:].replace(':', '/')}" for k, v in refs.items()}
    stage = _stage_with(req.stage, {**placeholders, **(resolved or {})})
    runner = req.runner or settings.tao.runner
    for path in stage.host_paths():
        if path.startswith(REF_ROOT):
            continue
        if not any(is_under(os.path.realpath(path), os.path.realpath(r))
                   for r in settings.docker.mount_roots):
            raise SpecError(f"{path} is outside the allowed roots "
                            f"({', '.join(settings.docker.mount_roots)}; docker.mount_roots)")
    qat_spec: bool | None = None
    if stage.spec and spec_facts is None:
        spec_facts, qat_spec = _read_spec(stage.spec, owner_uid)
    if stage.model and not stage.model.startswith(REF_ROOT) and not resolved and \
            user_file_size(stage.model, owner_uid=owner_uid) is None:
        # as the submitter could see it: root's answer would tell what exists in others' dirs
        raise SpecError(f"model {stage.model} does not exist (or is not a file you can read)")
    if check_results:
        _check_results_dir(stage, owner_uid)
        if qat_spec is not None:
            _check_qat(stage, qat_spec, owner_uid)
    if req.on and stage.gpus_max is not None:
        raise SpecError(f"--on pins GPUs, --gpus {stage.gpus}-{stage.gpus_max} lets gpusched "
                        "choose them: give one or the other")
    gpus = GpuRequest(count=stage.gpus, count_max=stage.gpus_max,
                      ids=tuple(req.on) if req.on else None,
                      gpu_type=req.gpu_type, mem_mib=req.mem_mib)
    if req.on and len(req.on) != stage.gpus:
        raise SpecError(f"--on names {len(req.on)} GPU(s) but the stage runs on --gpus "
                        f"{stage.gpus}")
    common: dict[str, Any] = dict(
        name=req.name or f"{stage.task}", gpus=gpus, priority=req.priority, after=req.after,
        env={**TAO_ENV, **req.env}, retries=req.retries, hold=req.hold,
        time_limit_s=req.time_limit_s, notify_cmd=req.notify_cmd, notify_url=req.notify_url,
        kind=f"tao:{stage.task}", pipeline_id=req.pipeline_id,
        stage={"request": req.model_dump(mode="json"), "stage": stage.model_dump(mode="json"),
               "refs": refs, "branch": req.branch,
               **({"spec_facts": spec_facts} if spec_facts is not None else {}),
               **({"spec_original": req.spec_original, "overrides": req.overrides}
                  if req.spec_original or req.overrides else {})})
    if runner == "docker":
        mounts = req.mounts
        try:
            command = stage_argv(stage, mounts)
        except SpecError as err:
            raise SpecError(f"{err.message} (ssd {stage.task})") from err
        return JobSpec(command=command, runner="docker", image=req.image or settings.tao.image,
                       mounts=mounts, shm_size=req.shm_size, user=req.user, **common)
    if runner not in ("local", "slurm"):
        raise SpecError(f"unknown runner {runner!r}: use docker, local or slurm")
    workdir = stage.results_dir or posixpath.dirname(stage.output or "/tmp/x")
    command = [*settings.tao.local_command, *stage_argv(stage, None)]
    # slurm: TAO runs on the node as on a host (no container), on the GPUs Slurm gives it
    return JobSpec(command=command, runner="slurm" if runner == "slurm" else "local",
                   workdir=_existing_parent(workdir),
                   **common)


def _existing_parent(path: str) -> str:
    p = Path(path)
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return str(p)


def resolve(spec: JobSpec, settings: Settings,
            lookup: Callable[[int, str], dict[str, Any] | None]) -> JobSpec:
    """Replace references with the upstream jobs' artifacts; raises SpecError naming the
    missing one. ``lookup(job_id, kind)`` returns an artifact row or None."""
    info = spec.stage or {}
    refs: dict[str, str] = info.get("refs") or {}
    if not refs:
        return spec
    resolved = {}
    ratio: float | None = None
    for field, ref in refs.items():
        parsed = parse_ref(ref)
        assert parsed is not None
        kind, job = parsed
        art = lookup(job, kind)
        if art is None or not art.get("path"):
            raise SpecError(f"upstream job {job} recorded no {kind.replace('_', ' ')}")
        resolved[field] = art["path"]
        if kind == "pruned_model":
            ratio = pruning_ratio(art)
    req = StageRequest.model_validate(info["request"])
    req.stage = {k: v for k, v in req.stage.items() if k not in refs}
    built = build_job(req, settings, resolved, spec_facts=info.get("spec_facts"),
                      check_results=False)
    stage_info = {**(built.stage or {}), "refs": refs, "resolved": resolved}
    if ratio is not None:  # a retrain of a pruned model is its own, faster workload
        stage_info["model_pruning_ratio"] = ratio
    return built.model_copy(update={"stage": stage_info, "after": spec.after})


def pruning_ratio(artifact: dict[str, Any] | None) -> float | None:
    """The pruning ratio a pruned_model artifact recorded (kept parameters / original)."""
    metrics = (artifact or {}).get("metrics") or {}
    if isinstance(metrics, str):
        try:
            metrics = json.loads(metrics)
        except ValueError:
            return None
    value = metrics.get("pruning_ratio") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, int | float) and 0 < value < 1 else None


def for_launch(spec: JobSpec, *, attempt: int, gpu_indices: list[int],
               owner_uid: int | None) -> JobSpec:
    """The stage's command for this attempt, once its GPUs are known (called after the claim,
    before the runner starts it; the stored spec is not changed).

    * ``--gpu_index``: the local runner gets the allocated GPUs' host indices (TAO's
      entrypoint checks them against ``nvidia-smi -L`` and sets CUDA_VISIBLE_DEVICES to them,
      replacing gpusched's; with CUDA_DEVICE_ORDER=PCI_BUS_ID they name the same GPUs); a
      container sees only its GPUs and gets 0..N-1.
    * A train/retrain attempt after the first, or one submitted with ``--resume``, continues
      from the latest checkpoint in ``results_dir/weights`` (listed through safefs as
      ``owner_uid``): ``-m <checkpoint> --initial_epoch K+1``. TAO's ``--initial_epoch`` is
      1-based (default 1; Keras gets ``initial_epoch - 1``), so after checkpoint epoch K the
      first epoch trained is K+1. Without a checkpoint the attempt starts over as submitted.

    Plain jobs come back unchanged. Cheap: one directory listing at most."""
    info = spec.stage or {}
    if not spec.kind.startswith("tao:") or "stage" not in info:
        return spec
    stage = TaoStage.model_validate(info["stage"])
    indices = list(gpu_indices) if spec.runner == "local" else list(range(len(gpu_indices)))
    command = set_gpu_index(spec.command, indices) if indices else list(spec.command)
    if stage.task in ("train", "retrain") and indices and "--gpus" in command:
        # an elastic request (--gpus 1-2) learns its count only now. TAO's own flags come
        # last (after tao.local_command, which may hold a `docker run --gpus all`): set the
        # last --gpus, the one stage_argv wrote
        at = len(command) - 1 - command[::-1].index("--gpus")
        if at + 1 < len(command):
            command[at + 1] = str(len(indices))
    launch: dict[str, Any] = {"attempt": attempt, "gpu_index": indices}
    if spec.runner == "slurm":  # TAO's entrypoint replaces CUDA_VISIBLE_DEVICES by these
        command = set_gpu_index(spec.command, [])
        at = command.index("--gpu_index") + 1
        command = [*command[:at], SLURM_GPU_INDEX, *command[at:]]
        launch["gpu_index"] = "slurm"
    if stage.task in ("train", "retrain") and stage.results_dir and (
            attempt > 1 or stage.resume):
        weights = Path(stage.results_dir) / "weights"
        ckpts = parsers.checkpoint_epochs(
            str(weights / n) for n in list_user_dir(weights, owner_uid=owner_uid) or []
            if not n.startswith("."))
        if ckpts:
            epoch = max(ckpts)
            path = ckpts[epoch]
            # in a container: under the command's own -r (its mounts' sources are stored
            # resolved while results_dir is as given, so translating the host path can miss)
            shown = path if spec.runner == "local" else posixpath.join(
                _flag_value(spec.command, "-r") or to_container(stage.results_dir, spec.mounts),
                "weights", posixpath.basename(path))
            command = set_flag(set_flag(command, "-m", shown), "--initial_epoch", str(epoch + 1))
            launch.update({"resumed_from": path, "initial_epoch": epoch + 1})
    return spec.model_copy(update={"command": command, "stage": {**info, "launch": launch}})


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value after ``flag`` in a command (the stage's own argv)."""
    for i, a in enumerate(argv[:-1]):
        if a == flag:
            return argv[i + 1]
    return None


def _read(path: str | Path | None, limit: int = 32 * 1024 * 1024,
          owner_uid: int | None = None) -> str:
    """A file the stage's user controls (results, logs), through safefs; "" when it is missing
    or refused (a FIFO, a symlink out of the user's directory)."""
    data = read_user_file(path, max_bytes=limit, owner_uid=owner_uid)
    return "" if data is None else data.decode(errors="replace")


def judge(spec: JobSpec, exit_code: int | None, log_path: Path, *,
          owner_uid: int | None = None) -> tuple[bool, str | None, list[dict[str, Any]]]:
    """(succeeded, reason if not, artifacts) for a finished TAO stage. Every file is read
    through safefs (as ``owner_uid`` could read it, when given)."""
    stage = TaoStage.model_validate((spec.stage or {})["stage"])
    log_text = _read(log_path)  # the daemon's own file (a container's log is root's, 0600)
    exec_status = parsers.parse_execution_status(log_text)
    records = [r for r in map(parsers.parse_status_line,
                              _read(status_json_path(stage), owner_uid=owner_uid).splitlines())
               if r]
    # status.json is appended: evaluate's next to the model may hold earlier evaluations, so
    # the verdict and kpi are the last run's (from its STARTED line); epochs are all kept
    started = [i for i, r in enumerate(records) if r.get("status") == "STARTED"
               and "epoch" not in r]
    final, message, kpi = parsers.final_status(records[started[-1]:] if started else records)
    facts = (spec.stage or {}).get("spec_facts")
    if not isinstance(facts, dict):  # stored before stages recorded their spec's facts
        facts = (read_spec_facts(stage.spec, owner_uid) if stage.spec else None) or {}
    artifacts = collect(stage, log_text, kpi, facts, owner_uid=owner_uid, records=records)
    reason = None
    if exit_code != 0:
        reason = f"exit code {exit_code}" + (f" (TAO: {message})" if message else "")
    elif exec_status == "FAIL":
        reason = "TAO reported Execution status: FAIL"
    elif final == "FAILURE":
        reason = f"status.json says FAILURE: {message or 'no message'} (exit code was 0)"
    elif exec_status is None and final != "SUCCESS":
        reason = "TAO printed no Execution status and status.json has no SUCCESS"
    else:
        missing = expected_missing(stage, artifacts)
        if missing:
            reason = f"exit 0, but {missing}"
    return reason is None, reason, artifacts


def expected_missing(stage: TaoStage, artifacts: list[dict[str, Any]]) -> str | None:
    kinds = {a["kind"] for a in artifacts}
    need = {"train": "checkpoint", "retrain": "checkpoint", "prune": "pruned_model",
            "evaluate": "evaluation", "export": "exported_model"}.get(stage.task)
    if need and need not in kinds:
        return f"the expected {need.replace('_', ' ')} is missing"
    return None


def collect(stage: TaoStage, log_text: str, kpi: dict[str, Any],
            facts: dict[str, Any] | None = None, *,
            owner_uid: int | None = None,
            records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """What the stage produced, as artifact rows (host paths). ``facts``: the spec file's, as
    recorded at submission. The results are the user's: listed and read through safefs.
    ``records``: status.json's; its epoch lines hold the mAP of epochs that a resumed run's
    CSV (restarted at the resume epoch) no longer has."""
    out: list[dict[str, Any]] = []

    def size_mib(path: str) -> float | None:
        return _size_mib(path, owner_uid)

    def names(path: Path) -> list[str]:  # what glob("*") lists: no hidden entries
        return [n for n in list_user_dir(path, owner_uid=owner_uid) or []
                if not n.startswith(".")]

    if stage.task in ("train", "retrain") and stage.results_dir:
        res = Path(stage.results_dir)
        ckpts = parsers.checkpoint_epochs(str(res / "weights" / n) for n in names(res / "weights"))
        csv_name = next((n for n in names(res) if fnmatch.fnmatchcase(n, CSV_GLOB)), None)
        rows = parsers.parse_training_csv(_read(res / csv_name, owner_uid=owner_uid)) if (
            csv_name) else []
        in_csv = {r.epoch for r in rows if r.map is not None}
        rows = [parsers.CsvRow(epoch=e.epoch, map=e.map)
                for e in parsers.epochs_from_status(records or [])
                if e.map is not None and e.epoch not in in_csv] + rows
        maps = {r.epoch: r.map for r in rows if r.map is not None}
        for epoch, path in sorted(ckpts.items()):
            out.append({"kind": "checkpoint", "path": path, "epoch": epoch,
                        "metrics": {"mAP": maps.get(epoch)}})
        if ckpts:
            latest = max(ckpts)
            out.append({"kind": "latest_checkpoint", "path": ckpts[latest], "epoch": latest,
                        "metrics": {"mAP": maps.get(latest)}})
            pick = parsers.best_checkpoint(rows, ckpts, (facts or {}).get("checkpoint_interval"))
            if pick.epoch is not None:
                out.append({"kind": "best_checkpoint", "path": ckpts[pick.epoch],
                            "epoch": pick.epoch, "metrics": {
                                "mAP": pick.map, "warning": pick.warning,
                                "size_mib": size_mib(ckpts[pick.epoch])}})
    elif stage.task == "evaluate":
        table = parsers.parse_evaluate_table(log_text)
        m = kpi.get("mAP") if isinstance(kpi.get("mAP"), int | float) else None
        if table is not None or m is not None:
            out.append({"kind": "evaluation", "path": stage.model, "metrics": {
                "mAP": m if m is not None else table.map if table else None,
                "ap": table.ap if table else {}}})
    elif stage.task == "prune" and stage.output and size_mib(
            pruned := _saved_as(stage.output, prune_output_file(stage.output),
                                owner_uid)) is not None:
        out.append({"kind": "pruned_model", "path": pruned, "metrics": {
            "threshold": stage.threshold, "size_mib": kpi.get("size", size_mib(pruned)),
            "file_mib": size_mib(pruned),
            "pruning_ratio": kpi.get("pruning_ratio", parsers.parse_prune_ratio(log_text)),
            "param_count_m": kpi.get("param_count")}})
    elif stage.task == "export" and stage.model:
        onnx = export_output_file(stage) or ""
        if stage.output:
            onnx = _saved_as(stage.output, onnx, owner_uid)
        if size_mib(onnx) is not None:
            out.append({"kind": "exported_model", "path": onnx,
                        "metrics": {"size_mib": size_mib(onnx)}})
    elif stage.task == "inference" and stage.results_dir:
        n = sum(1 for name in names(Path(stage.results_dir) / "labels") if name.endswith(".txt"))
        out.append({"kind": "inference", "path": stage.results_dir, "metrics": {"images": n}})
    return out


def _saved_as(given: str, suffixed: str, owner_uid: int | None) -> str:
    """The file TAO saved for ``-o given``: TAO 5 appends the suffix (``pruned`` ->
    ``pruned.hdf5``); the name as given when only that exists (older TAO)."""
    if given == suffixed or user_file_size(suffixed, owner_uid=owner_uid) is not None:
        return suffixed
    return given if user_file_size(given, owner_uid=owner_uid) is not None else suffixed


def _size_mib(path: str, owner_uid: int | None = None) -> float | None:
    size = user_file_size(path, owner_uid=owner_uid)
    return None if size is None else round(size / (1024 * 1024), 3)
