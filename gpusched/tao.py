"""TAO Toolkit stages: validated models of the SSD tasks, and how a stage becomes a job.

Pure: no I/O. ``gpusched tao ssd train -e SPEC -r RESULTS --gpus 2`` takes TAO's own command
line (swap ``tao model`` for ``gpusched tao``), validates it before anything is queued, and turns
it into a container command ``ssd train ... --gpus N --gpu_index 0..N-1`` with host paths
translated to container paths through the job's mounts.
"""

from __future__ import annotations

import argparse
import posixpath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpusched.errors import SpecError
from gpusched.models import Mount

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
    initial_epoch: int | None = Field(default=None, ge=0)
    output: str | None = None  # -o
    gpus: int = Field(default=1, ge=1, le=64)
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
        if self.gpus > 1 and self.task not in ("train", "retrain"):
            raise ValueError(f"TAO runs only train on more than one GPU; ssd {self.task} "
                             f"takes --gpus 1 (got {self.gpus})")
        if self.use_amp and self.task not in ("train", "retrain"):
            raise ValueError("--use_amp is a train option")
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


def parse_tao_argv(argv: list[str]) -> TaoStage:
    """``ssd train -e SPEC -r RES --gpus 2 -k KEY`` (TAO's own flags) -> a validated stage."""
    if len(argv) < 2:
        raise SpecError("usage: gpusched tao ssd TASK [TAO flags...], e.g. "
                        "gpusched tao ssd train -e spec.txt -r results --gpus 2")
    network, task, rest = argv[0], argv[1], argv[2:]
    if network not in NETWORKS:
        raise SpecError(f"unknown network {network!r}: gpusched runs {', '.join(NETWORKS)}")
    if task not in TASKS:
        raise SpecError(f"unknown task {task!r} for ssd: use one of {', '.join(TASKS)}")
    p = _Parser(prog=f"gpusched tao ssd {task}", add_help=False)
    p.add_argument("-e", "--experiment_spec_file", dest="spec")
    p.add_argument("-r", "--results_dir", dest="results_dir")
    p.add_argument("-k", "--key", dest="key")
    p.add_argument("-m", "--model", dest="model")
    p.add_argument("-o", "--output_file", dest="output")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu_index", type=int, nargs="+")
    p.add_argument("--use_amp", action="store_true")
    p.add_argument("--log_file")
    if task in ("train", "retrain"):
        p.add_argument("--initial_epoch", type=int)
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
              ("gpu_index", "log_file")}
    if ns.gpu_index:
        raise SpecError("--gpu_index is chosen by gpusched: give --gpus N (any N GPUs), or pin "
                        "GPUs with `gpusched tao --on 0,1 ssd ...`")
    for key in ("spec", "results_dir", "model", "output", "images"):
        if key in fields:
            fields[key] = posixpath.abspath(fields[key]) if not posixpath.isabs(
                fields[key]) else fields[key]
    try:
        return TaoStage(task=task, **fields)  # type: ignore[arg-type]
    except ValueError as err:
        raise SpecError(f"gpusched tao ssd {task}: {_first_error(err)}") from err


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
               entrypoint: list[str] | None = None) -> list[str]:
    """The command that runs the stage: ``ssd <task> ... --gpus N --gpu_index 0..N-1``.

    ``mounts`` None means host paths are used as they are (the local runner)."""
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
    if stage.task == "prune" and stage.results_dir:
        argv += ["--results_dir", c(stage.results_dir)]
    if stage.model:
        argv += ["-m", c(stage.model)]
    if stage.output:
        argv += ["-o", c(stage.output)]
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
    argv += ["--gpus", str(stage.gpus), "--gpu_index", *[str(i) for i in range(stage.gpus)]]
    return argv


def status_json_path(stage: TaoStage) -> str | None:
    """Where TAO appends the stage's status.json (host path)."""
    return posixpath.join(stage.results_dir, "status.json") if stage.results_dir else None
