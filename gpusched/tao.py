"""TAO Toolkit stages: validated models of the SSD tasks, and how a stage becomes a job.

Pure: no I/O. ``gpusched tao ssd train -e SPEC -r RESULTS --gpus 2`` takes TAO's own command
line (swap ``tao model`` for ``gpusched tao``), validates it before anything is queued, and turns
it into a container command ``ssd train ... --gpus N --gpu_index 0..N-1`` with host paths
translated to container paths through the job's mounts.
"""

from __future__ import annotations

import argparse
import posixpath
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpusched.errors import SpecError
from gpusched.models import Mount
from gpusched.units import parse_gpu_count

TASKS = ("train", "evaluate", "prune", "retrain", "export", "inference")
NETWORKS = ("ssd",)
DEFAULT_IMAGE = "nvcr.io/nvidia/tao/tao-toolkit:5.0.0-tf1.15.5"
TAO_ENV = {"TELEMETRY_OPT_OUT": "yes"}
#: placeholder root for a path that a later stage receives from an earlier one at launch
REF_ROOT = "/gpusched-ref/"
#: what a later stage can ask of an earlier one (``model = "best_checkpoint:train"``)
REF_KINDS = ("best_checkpoint", "latest_checkpoint", "pruned_model", "exported_model")

Task = Literal["train", "evaluate", "prune", "retrain", "export", "inference"]


class TaoStage(BaseModel):
    """One TAO task with TAO's flags and defaults. Paths are host paths."""

    model_config = ConfigDict(extra="forbid")

    network: Literal["ssd"] = "ssd"
    task: Task
    spec: str | None = None  # -e
    results_dir: str | None = None  # -r (train, evaluate, inference), --results_dir (prune)
    key: str | None = None  # -k
    model: str | None = None  # -m: weights, a checkpoint, or the pruned model for retrain
    initial_epoch: int | None = Field(default=None, ge=0)  # TAO's is 1-based (default 1)
    resume: bool = False  # gpusched: continue from the latest checkpoint of results_dir
    output: str | None = None  # -o
    gpus: int = Field(default=1, ge=1, le=64)
    gpus_max: int | None = Field(default=None, ge=2, le=64)  # elastic: --gpus 1-2
    use_amp: bool = False
    # prune (TAO's defaults)
    normalizer: Literal["max", "L2"] = "max"
    equalization: Literal["union", "intersection", "arithmetic_mean", "geometric_mean"] = "union"
    granularity: int = Field(default=8, gt=0)
    threshold: float = Field(default=0.1, gt=0, lt=1)
    min_filters: int = Field(default=16, gt=0)
    excluded_layers: list[str] = Field(default_factory=list)
    # export / inference
    gen_ds_config: bool = False
    images: str | None = None  # -i
    box_threshold: float = Field(default=0.3, ge=0, le=1)  # inference -t

    @field_validator("spec", "results_dir", "model", "output", "images")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not posixpath.isabs(v):
            raise ValueError(f"{v!r} must be an absolute path")
        return posixpath.normpath(v) if v else v

    @model_validator(mode="after")
    def _task_rules(self) -> TaoStage:
        need: dict[str, tuple[str, ...]] = {
            "train": ("spec", "results_dir"), "retrain": ("spec", "results_dir", "model"),
            "evaluate": ("spec", "model"), "prune": ("model", "output"),
            "export": ("model",), "inference": ("model", "images", "spec", "results_dir"),
        }
        flags = {"spec": "-e", "results_dir": "-r", "model": "-m", "output": "-o",
                 "images": "-i"}
        missing = [flags[f] for f in need[self.task] if getattr(self, f) is None]
        if missing:
            raise ValueError(f"ssd {self.task} needs {' '.join(missing)}")
        if self.gpus_max is not None and self.gpus_max <= self.gpus:
            raise ValueError(f"bad GPU range {self.gpus}-{self.gpus_max}")
        if (self.gpus_max or self.gpus) > 1 and self.task not in ("train", "retrain"):
            raise ValueError(f"TAO runs only train on more than one GPU; ssd {self.task} "
                             f"takes --gpus 1 (got {self.gpus})")
        if self.use_amp and self.task not in ("train", "retrain"):
            raise ValueError("--use_amp is a train option")
        if self.resume and self.task not in ("train", "retrain"):
            raise ValueError("--resume is a train option")
        if self.resume and self.initial_epoch is not None:
            raise ValueError("give --resume (gpusched finds the latest checkpoint) or -m CKPT "
                             "--initial_epoch K, not both")
        return self

    @property
    def tao_task(self) -> str:
        """Retrain is TAO's train started from the pruned model (``-m``)."""
        return "train" if self.task == "retrain" else self.task

    def host_paths(self) -> list[str]:
        return [p for p in (self.spec, self.results_dir, self.model, self.output, self.images)
                if p]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit; we raise a clear error
        raise SpecError(f"gpusched tao: {message}")


#: gpusched's own options of ``gpusched tao``: given after ``ssd`` they are a misplaced option,
#: not a TAO flag (TAO would reject them after minutes of start-up, or take ``--on`` for nothing)
GPUSCHED_OPTIONS = ("--on", "--name", "--priority", "--image", "--mount", "--after", "--hold",
                    "--runner", "--gpu-type", "--gpu-mem", "--mem", "--retries", "--env",
                    "--time", "--notify", "--notify-url", "--json")


@dataclass
class TaoCommand:
    """A parsed ``gpusched tao`` command line: the stage and what goes around it."""

    stage: TaoStage
    pin: list[int] | None = None  # from a notebook's --gpu_index: host indices to pin
    notes: list[str] = dc_field(default_factory=list)  # said on stderr, not errors
    sets: list[str] = dc_field(default_factory=list)  # --set PATH=VALUE given after the task
    overwrite: bool = False


def parse_tao_argv(argv: list[str]) -> TaoStage:
    """``ssd train -e SPEC -r RES --gpus 2 -k KEY`` (TAO's own flags) -> a validated stage."""
    return parse_tao_command(argv).stage


def _misplaced(rest: list[str], task: str) -> None:
    for arg in rest:
        opt = arg.split("=", 1)[0]
        if opt in GPUSCHED_OPTIONS:
            shown = arg if "=" in arg or opt in ("--hold", "--json") else f"{opt} X"
            raise SpecError(f"{opt} is a gpusched option, not a TAO flag: put it before the "
                            f"network, e.g. `gpusched tao {shown} ssd {task} ...`")


def parse_tao_command(argv: list[str]) -> TaoCommand:
    """TAO's command line as users have it: ``ssd train ...`` (TAO 3/4) or ``model ssd train
    ...`` (TAO 5), with TAO's short or long flags. A notebook's ``--gpus 2 --gpu_index 0 1``
    becomes a pinned request with a note; gpusched options given after the task are refused
    with a hint that names the right place."""
    args = list(argv)
    if args[:1] == ["tao"]:
        args = args[1:]
    if args[:1] == ["model"]:  # TAO 5: tao model ssd train
        args = args[1:]
    if len(args) < 2:
        raise SpecError("usage: gpusched tao ssd TASK [TAO flags...], e.g. "
                        "gpusched tao ssd train -e spec.txt -r results --gpus 2")
    network, task, rest = args[0], args[1], args[2:]
    if network not in NETWORKS:
        raise SpecError(f"unknown network {network!r}: gpusched runs {', '.join(NETWORKS)}")
    if task not in TASKS:
        raise SpecError(f"unknown task {task!r} for ssd: use one of {', '.join(TASKS)}")
    _misplaced(rest, task)
    p = _Parser(prog=f"gpusched tao ssd {task}", add_help=False, allow_abbrev=False)
    # TAO's names per task (tao_tensorflow1_backend): train -e/--experiment_spec_file,
    # -m/--resume_model_weights; evaluate and export -e/--experiment_spec, evaluate
    # -m/--model_path, prune and export -m/--model. All are accepted for every task.
    p.add_argument("-e", "--experiment_spec_file", "--experiment_spec", dest="spec")
    p.add_argument("-r", "--results_dir", dest="results_dir")
    p.add_argument("-k", "--key", dest="key")
    p.add_argument("-m", "--model", "--model_path", "--resume_model_weights", dest="model")
    p.add_argument("-o", "--output_file", dest="output")
    p.add_argument("--gpus")  # N, or gpusched's elastic MIN-MAX
    p.add_argument("--gpu_index", type=int, nargs="+")
    p.add_argument("--use_amp", action="store_true")
    p.add_argument("--log_file")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--overwrite", action="store_true")
    if task in ("train", "retrain"):
        p.add_argument("--initial_epoch", type=int)
        p.add_argument("--resume", action="store_true")
    if task == "prune":
        p.add_argument("-n", "--normalizer", default="max")
        p.add_argument("-eq", "--equalization_criterion", dest="equalization", default="union")
        p.add_argument("-pg", "--pruning_granularity", dest="granularity", type=int, default=8)
        p.add_argument("-pth", "--pruning_threshold", dest="threshold", type=float, default=0.1)
        p.add_argument("-nf", "--min_num_filters", dest="min_filters", type=int, default=16)
        p.add_argument("-el", "--excluded_layers", dest="excluded_layers", nargs="*", default=[])
    if task == "export":
        p.add_argument("--gen_ds_config", action="store_true")
    if task == "inference":
        p.add_argument("-i", "--image_dir", dest="images")
        p.add_argument("-t", "--threshold", dest="box_threshold", type=float, default=0.3)
    ns = p.parse_args(rest)
    fields = {k: v for k, v in vars(ns).items() if v is not None and k not in
              ("gpu_index", "log_file", "sets", "overwrite", "gpus")}
    notes: list[str] = []
    pin: list[int] | None = None
    gpus_max: int | None = None
    gpus: int | None = None
    if ns.gpus is not None:
        gpus, gpus_max = parse_gpu_count(ns.gpus)
    if ns.gpu_index and gpus_max is not None:
        raise SpecError(f"--gpus {ns.gpus} with --gpu_index: a range lets gpusched choose the "
                        "GPUs; give --gpus N --gpu_index ... to pin them")
    if gpus_max is not None:
        fields["gpus_max"] = gpus_max
    if ns.gpu_index:
        pin = list(ns.gpu_index)
        if gpus is None:
            gpus = len(pin)
        if len(pin) != gpus:
            raise SpecError(f"--gpus {gpus} with --gpu_index {' '.join(map(str, pin))}: give "
                            "as many indices as GPUs, or only --gpus N (any N GPUs)")
        if len(set(pin)) != len(pin):
            raise SpecError(f"--gpu_index {' '.join(map(str, pin))} names a GPU twice")
        on = ",".join(map(str, pin))
        notes.append(f"note: --gpu_index {' '.join(map(str, pin))} is read as a pinned request "
                     f"(gpusched tao --on {on} ...): the stage waits for GPUs {on}; give only "
                     f"--gpus {gpus} to take any {gpus} free GPU(s)")
    if gpus is not None:
        fields["gpus"] = gpus
    for key in ("spec", "results_dir", "model", "output", "images"):
        if key in fields:
            fields[key] = posixpath.abspath(fields[key]) if not posixpath.isabs(
                fields[key]) else fields[key]
    try:
        stage = TaoStage(task=task, **fields)  # type: ignore[arg-type]
    except ValueError as err:
        raise SpecError(f"gpusched tao ssd {task}: {_first_error(err)}") from err
    return TaoCommand(stage=stage, pin=pin, notes=notes, sets=list(ns.sets),
                      overwrite=bool(ns.overwrite))


def _first_error(err: ValueError) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        e = errors()[0]
        loc = ".".join(str(x) for x in e.get("loc", ()))
        return f"{loc + ': ' if loc else ''}{e['msg'].removeprefix('Value error, ')}"
    return str(err)


def to_container(path: str, mounts: list[Mount]) -> str:
    """Host path -> container path through the longest mount whose source holds it."""
    best: Mount | None = None
    for m in mounts:
        src = posixpath.normpath(m.source)
        if (path == src or path.startswith(src.rstrip("/") + "/")) and (
                best is None or len(src) > len(posixpath.normpath(best.source))):
            best = m
    if best is None:
        raise SpecError(f"{path} is not under any mount; add --mount SRC:DST or an entry in "
                        "~/.tao_mounts.json that covers it")
    rel = posixpath.relpath(path, posixpath.normpath(best.source))
    return posixpath.normpath(posixpath.join(best.target, rel)) if rel != "." else best.target


def stage_argv(stage: TaoStage, mounts: list[Mount] | None, *,
               entrypoint: list[str] | None = None,
               gpu_indices: list[int] | None = None) -> list[str]:
    """The command that runs the stage: ``ssd <task> ... --gpus N --gpu_index 0..N-1``.

    ``mounts`` None means host paths are used as they are (the local runner). The GPU indices
    are only known at launch: ``stages.for_launch`` rewrites ``--gpu_index`` then (host
    indices for the local runner, whose TAO entrypoint replaces CUDA_VISIBLE_DEVICES with
    them; 0..N-1 in a container that sees only its GPUs)."""
    def c(path: str | None) -> str:
        assert path is not None
        if mounts is None or path.startswith(REF_ROOT):  # a reference is resolved at launch
            return path
        return to_container(path, mounts)

    argv = [*(entrypoint or []), stage.network, stage.tao_task]
    if stage.spec:
        argv += ["-e", c(stage.spec)]
    if stage.task in ("train", "retrain", "evaluate", "inference") and stage.results_dir:
        argv += ["-r", c(stage.results_dir)]
    if stage.task in ("prune", "export") and stage.results_dir:
        argv += ["--results_dir", c(stage.results_dir)]
    if stage.model:
        argv += ["-m", c(stage.model)]
    if stage.output:
        # TAO 5's prune saves "-o x" as x.hdf5 and then looks for x, failing: name the file
        out = prune_output_file(stage.output) if stage.task == "prune" else stage.output
        argv += ["-o", c(out)]
    if stage.key:
        argv += ["-k", stage.key]
    if stage.initial_epoch is not None:
        argv += ["--initial_epoch", str(stage.initial_epoch)]
    if stage.task == "prune":
        argv += ["-n", stage.normalizer, "-eq", stage.equalization, "-pg", str(stage.granularity),
                 "-pth", str(stage.threshold), "-nf", str(stage.min_filters)]
        if stage.excluded_layers:
            argv += ["-el", *stage.excluded_layers]
    if stage.task == "export" and stage.gen_ds_config:
        argv.append("--gen_ds_config")
    if stage.task == "inference":
        argv += ["-i", c(stage.images), "-t", str(stage.box_threshold)]
    if stage.use_amp:
        argv.append("--use_amp")
    indices = gpu_indices if gpu_indices is not None else list(range(stage.gpus))
    argv += ["--gpus", str(stage.gpus), "--gpu_index", *[str(i) for i in indices]]
    return argv


#: the value of ``--gpu_index`` for a stage run through Slurm: the batch script replaces it with
#: the host indices Slurm allocated (its CUDA_VISIBLE_DEVICES), known only on the node
SLURM_GPU_INDEX = "{slurm:gpu_index}"


def set_gpu_index(argv: list[str], indices: list[int]) -> list[str]:
    """``argv`` with the values of its last ``--gpu_index`` replaced (appended when absent):
    TAO's own flags come after any tao.local_command prefix."""
    out = list(argv)
    if "--gpu_index" not in out:
        return [*out, "--gpu_index", *map(str, indices)]
    i = len(out) - out[::-1].index("--gpu_index")
    j = i
    while j < len(out) and out[j].isdigit():
        j += 1
    out[i:j] = [str(x) for x in indices]
    return out


def set_flag(argv: list[str], flag: str, value: str, *, before: str = "--gpus") -> list[str]:
    """``argv`` with ``flag value`` set: the value replaced where the flag is, else inserted
    before ``before`` (the entrypoint's own flags come last)."""
    out = list(argv)
    if flag in out:
        i = out.index(flag)
        if i + 1 < len(out):
            out[i + 1] = value
            return out
    at = out.index(before) if before in out else len(out)
    out[at:at] = [flag, value]
    return out


def prune_output_file(output: str) -> str:
    """Where TAO 5's prune saves ``-o``: ``.hdf5`` is appended when missing."""
    return output if output.endswith(".hdf5") else f"{output}.hdf5"


def export_output_file(stage: TaoStage) -> str | None:
    """Where export saves the model: ``-o``, default ``<model>.onnx``; ``.onnx`` is appended
    when ``onnx`` is nowhere in the name (TAO's own test, ``if not backend in output_file``)."""
    if not stage.model:
        return None
    out = stage.output or posixpath.splitext(stage.model)[0] + ".onnx"
    return out if "onnx" in out else f"{out}.onnx"


def status_json_path(stage: TaoStage) -> str | None:
    """Where TAO appends the stage's status.json (host path): in ``-r``/``--results_dir``;
    evaluate without ``-r`` writes it next to the model; export and prune without
    ``--results_dir`` write none."""
    if stage.results_dir:
        return posixpath.join(stage.results_dir, "status.json")
    if stage.task == "evaluate" and stage.model and not stage.model.startswith(REF_ROOT):
        return posixpath.join(posixpath.dirname(stage.model), "status.json")
    return None
