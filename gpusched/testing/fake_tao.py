"""A fake of TAO's SSD container entrypoint for machines without TAO or a GPU.

    python -m gpusched.testing.fake_tao ssd <task> [args]     (task: train evaluate prune export inference)

It takes TAO's real flags and writes TAO's real formats (see /work/shared/tao-facts.md):
Keras-style stdout, an appended status.json, the CRLF training CSV, checkpoints named
``weights/ssd_<backbone>_epoch_NNN.hdf5``, evaluate tables, prune ratios, ``Execution status``
lines and TAO's exit codes (0 PASS, 255 FAIL, 1 for ``--gpus N>1`` outside train, 2 for bad
arguments). Fake model files start with a one-line JSON header
(``{"fake_tao_model": true, "pth": 0.2, "epoch": 80, "map": 0.71, ...}``) and padding bytes.

Standard library only, no gpusched imports: it may run inside a minimal container where only
this file and a Python are mounted.

Environment:
  GPUSCHED_GPU_NAMES        comma-separated GPU model names visible to the job (index order)
  GPUSCHED_FAKE_TAO_SCALE   multiplies every epoch time (default 1.0; tests use ~0.002)
  GPUSCHED_FAKE_TAO_SIZE_SCALE  real file size / nominal size (default 0.001)
  GPUSCHED_FAKE_TAO_SEED    changes the mAP curve's noise (default 0)
  GPUSCHED_FAKE_TAO_FAIL    "<task>:<mode>[@epoch]"[,...]; mode error (FAILURE, exit 255) or
                            interrupt (FAILURE "Training was interrupted", exit 0, no PASS line)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS = ("train", "evaluate", "prune", "export", "inference")
EXIT_FAIL = 255
UNPRUNED_MB = 101.7
DATASET_IMAGES = 11872  # 742 steps of 16
DEFAULT_CLASSES = ("car", "cyclist", "pedestrian")
# reference s/epoch for one GPU (substring of the model name, lower case)
SINGLE_GPU_S = {"a4000": 48.0, "2070": 67.0, "h200": 10.0, "h100": 12.0, "a100": 14.0, "v100": 30.0}
PAIR_S = {frozenset({"a4000", "2070"}): 40.0}  # measured: RTX A4000 + RTX 2070 together
UNKNOWN_GPU_S = 60.0
VALIDATION_SHARE = 0.1  # validation epochs take this much longer (not in Keras' seconds)


class TaoError(Exception):
    """A task failure: FAILURE in status.json, ``Execution status: FAIL``, exit 255."""


class Interrupted(Exception):
    """The injected interrupt: FAILURE "Training was interrupted" but exit 0, no PASS line."""


# ------------------------------------------------------------------------------ output


class Run:
    """Output of one task: stdout (plus --log_file) and status.json."""

    def __init__(self, log_file: str | None) -> None:
        self.log_file = log_file
        self.status_path: Path | None = None
        self.kpi: dict[str, Any] | None = None

    def say(self, text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        if self.log_file:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(text + "\n")

    def status(self, status: str, message: str, **extra: Any) -> None:
        if self.status_path is None:
            return
        now = dt.datetime.now(dt.UTC)  # TAO writes local time; containers run in UTC
        line: dict[str, Any] = dict(extra)
        line.update({"date": f"{now.month}/{now.day}/{now.year}",
                     "time": f"{now.hour}:{now.minute}:{now.second}",
                     "status": status, "verbosity": "INFO", "message": message})
        if self.kpi is not None and "kpi" not in line:
            line["kpi"] = self.kpi  # TAO's status logger repeats its kpi on later lines
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.status_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


# ------------------------------------------------------------------------------ inputs


def _spec(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise TaoError(f"FileNotFoundError: [Errno 2] No such file or directory: '{path}'")
    text = re.sub(r"#[^\n]*", "", p.read_text(encoding="utf-8", errors="replace"))

    def num(key: str, default: float | None) -> float | None:
        m = re.findall(rf"\b{key}\s*:\s*([-+0-9.eE]+)", text)
        return float(m[-1]) if m else default

    def word(key: str) -> str | None:
        m = re.findall(rf"\b{key}\s*:\s*\"?([A-Za-z0-9_]+)", text)
        return m[-1] if m else None

    classes = sorted({m for block in re.findall(r"target_class_mapping\s*:?\s*\{([^}]*)\}", text)
                      for m in re.findall(r"value\s*:\s*\"([^\"]+)\"", block)}) or list(DEFAULT_CLASSES)
    arch, nlayers = word("arch") or "resnet", num("nlayers", 18)
    backbone = f"{arch}{int(nlayers)}" if nlayers is not None else arch
    return {"num_epochs": int(num("num_epochs", 0) or 0),
            "checkpoint_interval": int(num("checkpoint_interval", 10) or 10),
            "validation_period": int(num("validation_period_during_training", 10) or 0),
            "batch_size": int(num("batch_size_per_gpu", 16) or 16),
            "max_lr": num("max_learning_rate", 0.01) or 0.01,
            "backbone": backbone, "classes": classes}


def read_model(path: str, *, required_fake: bool = True) -> dict[str, Any]:
    """The fake model's header; a real (non-fake) file is fine only as pretrained weights."""
    p = Path(path)
    if not p.is_file():
        raise TaoError(f"OSError: Unable to open file (unable to open file: name = '{path}', "
                       "errno = 2, error message = 'No such file or directory')")
    with open(p, "rb") as f:
        first = f.readline(4096)
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if isinstance(header, dict) and header.get("fake_tao_model"):
        return header
    if required_fake:
        raise TaoError(f"OSError: Unable to open file (file signature not found): '{path}'")
    return {}


def write_model(path: Path, header: dict[str, Any], nominal_mb: float) -> None:
    scale = float(os.environ.get("GPUSCHED_FAKE_TAO_SIZE_SCALE", "0.001"))
    head = (json.dumps({"fake_tao_model": True, **header, "size_mb": nominal_mb}) + "\n").encode()
    size = max(len(head), int(nominal_mb * 1024 * 1024 * scale))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(head + b"\0" * (size - len(head)))


def _failure(task: str) -> tuple[str, int | None] | None:
    for item in os.environ.get("GPUSCHED_FAKE_TAO_FAIL", "").split(","):
        m = re.fullmatch(r"\s*(\w+):(error|interrupt)(?:@(\d+))?\s*", item)
        if m and m[1] == task:
            return m[2], int(m[3]) if m[3] else None
    return None


def _check_injected(task: str, epoch: int | None = None) -> None:
    fail = _failure(task)
    if fail is None or (fail[1] is not None and fail[1] != epoch):
        return
    if fail[0] == "interrupt":
        raise Interrupted()
    where = f" at epoch {epoch}" if epoch is not None else ""
    raise TaoError(f"RuntimeError: injected failure{where} (GPUSCHED_FAKE_TAO_FAIL)")


# ------------------------------------------------------------------------------ models of time and accuracy


def _gpu_key(name: str) -> str | None:
    low = name.lower()
    return next((k for k in SINGLE_GPU_S if k in low), None)


def epoch_seconds(names: Sequence[str]) -> float:
    """Reference s/epoch for a GPU set, before scale, warm-up and jitter."""
    keys = [_gpu_key(n) for n in names] or [None]
    singles = [SINGLE_GPU_S[k] if k else UNKNOWN_GPU_S for k in keys]
    n = len(singles)
    if n == 1:
        return singles[0]
    pair = PAIR_S.get(frozenset(k for k in keys if k)) if n == 2 and None not in keys else None
    if pair is not None:
        return pair
    if len(set(singles)) == 1:
        return singles[0] / (0.9 * n)
    return max(singles) / (0.9 * n) * 1.08  # mixed cards: the slowest paces synchronous steps


def job_gpus(gpus: int, gpu_index: list[int] | None) -> list[str]:
    names = [n.strip() for n in os.environ.get("GPUSCHED_GPU_NAMES", "").split(",") if n.strip()]
    idx = gpu_index[:gpus] if gpu_index else list(range(gpus))
    picked = [names[i] for i in idx if 0 <= i < len(names)]
    return picked + ["unknown"] * (gpus - len(picked))


def _seed() -> str:
    return os.environ.get("GPUSCHED_FAKE_TAO_SEED", "0")


def map_at(epoch: int, *, offset: int = 0, pth: float = 0.0) -> float:
    """Deterministic mAP after ``epoch`` (+``offset`` epochs already trained): rises towards ~0.70,
    lower for pruned models, with noise so the last epoch is not always the best."""
    e = epoch + offset
    cap = 0.70 - (0.3 * pth * pth + 0.05 * pth)
    noise = random.Random(f"map:{_seed()}:{e}").gauss(0.0, 0.006)
    return round(max(0.0, min(1.0, cap * (1 - 0.85 * math.exp(-e / 16.0)) + noise)), 6)


def class_aps(m: float, classes: Sequence[str]) -> dict[str, float]:
    """Per-class AP whose mean is ``m``."""
    n = len(classes)
    offs = [0.0] if n == 1 else [0.12 * (1 - 2 * i / (n - 1)) for i in range(n)]
    return {c: round(m + o, 6) for c, o in zip(classes, offs, strict=True)}


def pruned_mb(pth: float) -> float:
    """Nominal pruned size: 101.7 MB unpruned, 22.5 at pth 0.1, 9.8 at 0.3, smooth in between."""
    return 9.544 + 92.156 * math.exp(-pth / 0.05097)


def eval_table(aps: dict[str, float], m: float, decimals: int) -> list[str]:
    rows = ["*" * 31]
    rows += [f"{c:<14}AP    {v:.{decimals}f}" for c, v in aps.items()]
    rows += [" " * 14 + f"mAP   {m:.{decimals}f}", "*" * 31]
    return rows


def _fmt(x: float) -> str:
    return repr(round(x, 6))


# ------------------------------------------------------------------------------ tasks


def train(a: argparse.Namespace, run: Run) -> None:
    results = Path(a.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    run.status_path = results / "status.json"
    spec = _spec(a.experiment_spec_file)
    if spec["num_epochs"] <= 0:
        raise TaoError("ValueError: training_config.num_epochs must be positive")
    header = read_model(a.model, required_fake=False) if a.model else {}
    pth = float(header.get("pth", 0.0))
    size_mb = float(header.get("size_mb", UNPRUNED_MB))
    start = a.initial_epoch or 0
    offset = 0 if a.initial_epoch else int(header.get("epoch", 0))
    n_epochs, ci, vp = spec["num_epochs"], spec["checkpoint_interval"], spec["validation_period"]
    if start >= n_epochs:
        raise TaoError(f"ValueError: --initial_epoch {start} is not below num_epochs {n_epochs}")
    classes, backbone = spec["classes"], spec["backbone"]
    names = job_gpus(a.gpus, a.gpu_index)
    base = epoch_seconds(names) * float(os.environ.get("GPUSCHED_FAKE_TAO_SCALE", "1.0"))
    steps = math.ceil(DATASET_IMAGES / (spec["batch_size"] * a.gpus))
    csv_path = results / f"ssd_training_log_{backbone}.csv"
    columns = ["epoch", *sorted([*(f"AP_{c}" for c in classes), "loss", "lr", "mAP", "validation_loss"]
                                if vp else ["loss", "lr"])]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:  # a resume truncates it too
        f.write(",".join(columns) + "\r\n")
    run.say(f"Using GPUs: {', '.join(names)}")
    run.status("STARTED", "Starting Training Loop.")
    for epoch in range(start + 1, n_epochs + 1):
        t0 = time.monotonic()
        _check_injected("train", epoch)
        train_s = base * (1.15 if epoch == 1 else 1.0) * (1 + random.Random(epoch).uniform(-0.02, 0.02))
        validated = bool(vp) and epoch % vp == 0
        total_s = train_s * (1 + VALIDATION_SHARE if validated else 1.0)
        loss = 2.0 + 18.0 * math.exp(-(epoch + offset) / 12.0) + random.Random(f"l{epoch}").uniform(0, 0.2)
        lr = spec["max_lr"] * a.gpus * min(1.0, epoch / max(1, n_epochs * 0.1)) * (
            1.0 if epoch < n_epochs * 0.7 else 0.1)
        run.say(f"Epoch {epoch}/{n_epochs}")
        for q in (1, 2, 3):
            time.sleep(max(0.0, t0 + train_s * q / 4 - time.monotonic()))
            done = steps * q // 4
            bar = "=" * (30 * done // steps - 1) + ">" + "." * (30 - 30 * done // steps)
            run.say(f"{done}/{steps} [{bar}] - ETA: {train_s * (4 - q) / 4:.0f}s - loss: {loss + 0.3:.4f}")
        time.sleep(max(0.0, t0 + train_s - time.monotonic()))
        run.say(f"{steps}/{steps} [{'=' * 30}] - {train_s:.0f}s {1000 * train_s / steps:.0f}ms/step"
                f" - loss: {loss:.4f}")
        m = map_at(epoch, offset=offset, pth=pth)
        aps = class_aps(m, classes)
        vloss = loss * 0.9 + 0.1
        if validated:
            for line in eval_table(aps, m, 5):
                run.say(line)
            run.status("RUNNING", "Evaluation metrics generated.",
                       categorical={"average_precision": {**aps, "dontcare": math.nan}},
                       kpi={"mean average precision": m, "validation_loss": round(vloss, 6)})
        if epoch % ci == 0:
            write_model(results / "weights" / f"ssd_{backbone}_epoch_{epoch:03d}.hdf5",
                        {"epoch": epoch + offset, "map": m, "pth": pth, "backbone": backbone,
                         "classes": classes}, size_mb)
        time.sleep(max(0.0, t0 + total_s - time.monotonic()))
        row: dict[str, str] = {"epoch": str(epoch), "loss": _fmt(loss), "lr": _fmt(lr)}
        if vp:
            row.update({f"AP_{c}": _fmt(v) if validated else "nan" for c, v in aps.items()})
            row.update({"mAP": _fmt(m) if validated else "nan",
                        "validation_loss": _fmt(vloss) if validated else "nan"})
        with open(csv_path, "a", newline="", encoding="utf-8") as f:
            f.write(",".join(row[c] for c in columns) + "\r\n")
        graphical = {"loss": _fmt(loss), "learning_rate": _fmt(lr),
                     "validation_loss": _fmt(vloss) if validated else "nan",
                     "mean average precision": _fmt(m) if validated else "nan"}
        run.status("RUNNING", "Training loop in progress", epoch=epoch, max_epoch=n_epochs,
                   time_per_epoch=str(dt.timedelta(seconds=round(total_s, 6))),
                   eta=str(dt.timedelta(seconds=round(total_s * (n_epochs - epoch), 6))),
                   graphical=graphical, kpi={"mean average precision": graphical["mean average precision"]})
    run.status("SUCCESS", "Training finished successfully.")


def evaluate(a: argparse.Namespace, run: Run) -> None:
    if a.results_dir:
        run.status_path = Path(a.results_dir) / "status.json"
    run.status("STARTED", "Starting SSD evaluation.")
    spec = _spec(a.experiment_spec_file)
    header = read_model(a.model)
    _check_injected("evaluate")
    m = float(header.get("map", 0.0))
    aps = class_aps(m, list(header.get("classes") or spec["classes"]))
    for line in eval_table(aps, m, 3):
        run.say(line)
    run.kpi = {"mAP": m}
    run.status("RUNNING", "Evaluation metrics generated.", categorical={"average_precision": aps})
    run.status("SUCCESS", "Evaluation finished successfully.")


def prune(a: argparse.Namespace, run: Run) -> None:
    if a.results_dir:
        run.status_path = Path(a.results_dir) / "status.json"
    run.status("STARTED", "Starting pruning.")
    if a.pruning_granularity <= 0:
        raise TaoError(f"ValueError: pruning granularity must be positive, got {a.pruning_granularity}")
    if not 0.0 < a.pruning_threshold < 1.0:
        raise TaoError(f"ValueError: pruning threshold must be in (0, 1), got {a.pruning_threshold}")
    if a.min_num_filters <= 0:
        raise TaoError(f"ValueError: min_num_filters must be positive, got {a.min_num_filters}")
    header = read_model(a.model)
    _check_injected("prune")
    parent_mb = float(header.get("size_mb", UNPRUNED_MB))
    pth = max(a.pruning_threshold, float(header.get("pth", 0.0)))
    new_mb = min(parent_mb, pruned_mb(pth) * (1.03 if a.normalizer == "L2" else 1.0))
    ratio = new_mb / parent_mb
    out = Path(a.output_file)
    parent_map = float(header.get("map", 0.0))
    pruned_map = round(max(0.0, parent_map - 0.5 * pth), 6)  # before retraining: much worse
    write_model(out, {**{k: v for k, v in header.items() if k not in ("fake_tao_model", "size_mb")},
                      "pth": pth, "map": pruned_map, "parent_map": parent_map, "pruned": True}, new_mb)
    run.say(f"Pruning ratio (pruned model / original model): {ratio}")
    run.kpi = {"pruning_ratio": ratio, "size": round(new_mb, 3), "param_count": round(new_mb * 0.262, 3)}
    run.status("SUCCESS", "Pruning finished successfully.")


def export(a: argparse.Namespace, run: Run) -> None:
    header = read_model(a.model)
    out = Path(a.output_file or os.path.splitext(a.model)[0] + ".onnx")
    run.status_path = out.parent / "status.json"
    run.status("STARTED", "Starting export.")
    if out.exists():
        raise TaoError(f"FileExistsError: Output file already exists at {out}")
    spec = _spec(a.experiment_spec_file) if a.experiment_spec_file else {"classes": list(DEFAULT_CLASSES)}
    _check_injected("export")
    write_model(out, {**{k: v for k, v in header.items() if k not in ("fake_tao_model", "size_mb")},
                      "format": "onnx"}, float(header.get("size_mb", UNPRUNED_MB)) / 2)
    if a.gen_ds_config:
        classes = list(header.get("classes") or spec["classes"])
        (out.parent / "labels.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
        (out.parent / "nvinfer_config.txt").write_text(
            "net-scale-factor=1.0\noffsets=103.939;116.779;123.68\ninfer-dims=3;384;1248\n"
            f"onnx-file={out.name}\nlabelfile-path=labels.txt\nnetwork-type=0\n"
            f"num-detected-classes={len(classes)}\nmodel-color-format=1\nmaintain-aspect-ratio=0\n"
            "output-tensor-meta=0\n", encoding="utf-8")
    run.say(f"Model exported at {out}")
    run.status("SUCCESS", "Export finished successfully.")


def inference(a: argparse.Namespace, run: Run) -> None:
    results = Path(a.results_dir)
    run.status_path = results / "status.json"
    run.status("STARTED", "Starting inference.")
    header = read_model(a.model)
    spec = _spec(a.experiment_spec_file)
    images = Path(a.image_dir)
    if not images.is_dir():
        raise TaoError(f"FileNotFoundError: image directory {a.image_dir} does not exist")
    _check_injected("inference")
    classes = list(header.get("classes") or spec["classes"])
    (results / "images_annotated").mkdir(parents=True, exist_ok=True)
    (results / "labels").mkdir(parents=True, exist_ok=True)
    count = 0
    for img in sorted(images.iterdir()):
        if img.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp"):
            continue
        rng = random.Random(img.name)
        (results / "images_annotated" / img.name).write_bytes(img.read_bytes())
        lines = []
        for _ in range(rng.randint(0, 4)):
            conf = rng.uniform(0.05, 0.99)
            if conf < a.threshold:
                continue
            x, y = rng.uniform(0, 1000), rng.uniform(0, 300)
            lines.append(f"{rng.choice(classes)} 0.00 0 0.00 {x:.2f} {y:.2f} {x + 80:.2f} {y + 60:.2f} "
                         f"0.00 0.00 0.00 0.00 0.00 0.00 0.00 {conf:.3f}")
        label = results / "labels" / f"{img.stem}.txt"
        label.write_text("".join(s + "\n" for s in lines), encoding="utf-8")
        count += 1
    run.say(f"Inference done on {count} images.")
    run.status("SUCCESS", "Inference finished successfully.")


TASK_FUNCS = {"train": train, "evaluate": evaluate, "prune": prune, "export": export, "inference": inference}


# ------------------------------------------------------------------------------ entrypoint


def _parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"ssd {task}")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu_index", type=int, nargs="+", default=None)
    p.add_argument("--use_amp", action="store_true")
    p.add_argument("--log_file", default=None)
    p.add_argument("-k", "--key", default=None)
    if task == "train":
        p.add_argument("-e", "--experiment_spec_file", required=True)
        p.add_argument("-r", "--results_dir", required=True)
        p.add_argument("-m", "--model", default=None)
        p.add_argument("--initial_epoch", type=int, default=0)
    elif task == "evaluate":
        p.add_argument("-m", "--model", required=True)
        p.add_argument("-e", "--experiment_spec_file", required=True)
        p.add_argument("-r", "--results_dir", default=None)
    elif task == "prune":
        p.add_argument("-m", "--model", required=True)
        p.add_argument("-o", "--output_file", required=True)
        p.add_argument("--results_dir", default=None)
        p.add_argument("-n", "--normalizer", choices=["max", "L2"], default="max")
        p.add_argument("-eq", "--equalization_criterion", default="union",
                       choices=["union", "intersection", "arithmetic_mean", "geometric_mean"])
        p.add_argument("-pg", "--pruning_granularity", type=int, default=8)
        p.add_argument("-pth", "--pruning_threshold", type=float, default=0.1)
        p.add_argument("-nf", "--min_num_filters", type=int, default=16)
        p.add_argument("-el", "--excluded_layers", nargs="*", default=[])
    elif task == "export":
        p.add_argument("-m", "--model", required=True)
        p.add_argument("-o", "--output_file", default=None)
        p.add_argument("-e", "--experiment_spec_file", default=None)
        p.add_argument("--gen_ds_config", action="store_true")
    else:
        p.add_argument("-m", "--model", required=True)
        p.add_argument("-i", "--image_dir", required=True)
        p.add_argument("-e", "--experiment_spec_file", required=True)
        p.add_argument("-r", "--results_dir", required=True)
        p.add_argument("-t", "--threshold", type=float, default=0.3)
    return p


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "ssd":
        args = args[1:]
    if not args or args[0] not in TASKS:
        got = args[0] if args else "nothing"
        print(f"usage: ssd {{{','.join(TASKS)}}} ...\nssd: error: the task must come first, got {got}",
              file=sys.stderr)
        return 2
    task = args[0]
    try:
        a = _parser(task).parse_args(args[1:])
    except SystemExit as exc:  # argparse already printed the usage error
        return int(exc.code or 0)
    if a.gpus < 1 or (a.gpus > 1 and task != "train"):
        print(f"ValueError: Multi-GPU is not supported for task '{task}' (--gpus {a.gpus}); "
              "only train runs on more than one GPU.", file=sys.stderr)
        return 1
    if a.use_amp and task != "train":
        print(f"ssd {task}: error: unrecognized arguments: --use_amp", file=sys.stderr)
        return 2
    run = Run(a.log_file)
    try:
        TASK_FUNCS[task](a, run)
    except Interrupted:
        what = "Training" if task == "train" else task.capitalize()
        run.say(f"{what} was interrupted.")
        run.status("FAILURE", f"{what} was interrupted")
        return 0
    except (TaoError, OSError) as exc:
        run.say(f"Error: {exc}")
        run.status("FAILURE", str(exc))
        run.say("Execution status: FAIL")
        return EXIT_FAIL
    run.say("Execution status: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
