"""A fake of TAO's SSD container entrypoint for machines without TAO or a GPU.

    python -m gpusched.testing.fake_tao ssd <task> [args]     (task: train evaluate prune export inference)

It follows TAO 5's open source, NVIDIA/tao_tensorflow1_backend (``nvidia_tao_tf1/...``, cited
per behaviour below): the entrypoint's flags and GPU checks
(``cv/common/entrypoint/entrypoint.py``), each task's argparse and status.json lines
(``cv/ssd/scripts/{train,evaluate,prune,export,inference}.py``, ``cv/common/magnet_prune.py``,
``cv/common/export/app.py``), the status logger (``cv/common/logging/logging.py``) and the Keras
callbacks that write the CSV, checkpoints and epoch lines (``cv/common/callbacks/loggers.py``,
``cv/common/callbacks/enc_model_saver_callback.py``, ``cv/ssd/callbacks/
detection_metric_callback_bg.py``, ``cv/common/callbacks/base_metric_callback.py``,
``cv/common/utils.py:OneIndexedCSVLogger``), and Keras 2.2's ``Progbar`` for stdout.
Exit codes are the entrypoint's: 0 with ``Execution status: PASS`` (also after an interrupt),
255 with ``Execution status: FAIL`` when the task raised, 1 (a traceback, no Execution status)
when the entrypoint's own asserts fail (GPU checks, ``--gpus N>1`` or ``--use_amp`` outside
train), 2 for argparse errors. Fake model files start with a one-line JSON header
(``{"fake_tao_model": true, "pth": 0.2, "epoch": 80, "map": 0.71, ...}``) and padding bytes.

Standard library only, no gpusched imports: it may run inside a minimal container where only
this file and a Python are mounted.

Environment:
  GPUSCHED_SIMULATED_HOST_GPUS  the GPUs ``nvidia-smi -L`` would list, in host index order:
                            ``uuid0=name0,uuid1=name1`` (the simulated inventory). ``--gpu_index``
                            is checked against their count and picks from them, as TAO does.
                            Absent: the GPUs of GPUSCHED_GPU_NAMES (what a container that sees
                            only its own GPUs would list).
  GPUSCHED_GPU_NAMES        comma-separated GPU model names given to the job (index order)
  GPUSCHED_FAKE_TAO_SCALE   multiplies every epoch time (default 1.0; tests use ~0.002)
  GPUSCHED_FAKE_TAO_SIZE_SCALE  real file size / nominal size (default 0.001)
  GPUSCHED_FAKE_TAO_SEED    changes the mAP curve's noise (default 0)
  GPUSCHED_FAKE_TAO_FAIL    "<task>:<mode>[@epoch]"[,...]; mode error (the task raises: FAILURE,
                            exit 255) or interrupt (KeyboardInterrupt in the task: FAILURE
                            "<Task> was interrupted", yet ``Execution status: PASS`` and exit 0)
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
EXIT_FAIL = 255  # entrypoint.py: sys.exit(-1) after "Execution status: FAIL"
MB = 1 << 20  # cv/common/utils.py: get_model_file_size divides by 1 << 20
UNPRUNED_MB = 101.7
PARAMS_PER_MB = 0.262  # million parameters per nominal MB of a fake model
DATASET_IMAGES = 11872  # 742 steps of 16
DEFAULT_CLASSES = ("car", "cyclist", "pedestrian")
# reference s/epoch for one GPU (substring of the model name, lower case)
SINGLE_GPU_S = {"a4000": 48.0, "2070": 67.0, "h200": 10.0, "h100": 12.0, "a100": 14.0, "v100": 30.0}
PAIR_S = {frozenset({"a4000", "2070"}): 40.0}  # measured: RTX A4000 + RTX 2070 together
UNKNOWN_GPU_S = 60.0
VALIDATION_SHARE = 0.1  # validation epochs take this much longer (not in Keras' seconds)
LOGGER = {"train": "__main__", "evaluate": "__main__", "inference": "__main__",
          "prune": "nvidia_tao_tf1.cv.common.magnet_prune",
          "export": "nvidia_tao_tf1.cv.common.export.app"}


class TaoError(Exception):
    """An exception in the task script: FAILURE in status.json, ``Execution status: FAIL``, 255."""


class Interrupted(Exception):
    """The injected KeyboardInterrupt: the script writes FAILURE "<Task> was interrupted" and
    returns normally, so the entrypoint prints ``Execution status: PASS`` and exits 0."""


# ------------------------------------------------------------------------------ output


class Run:
    """Output of one task: its stdout (the ``--log_file`` instead, when given: the entrypoint
    sends the task's output there only) and its status.json."""

    def __init__(self, task: str, log_file: str | None) -> None:
        self.task = task
        self.log_file = log_file
        self.status_path: Path | None = None
        # logging.py's BaseLogger keeps graphical/kpi/categorical and repeats them on every
        # later line until replaced
        self.graphical: dict[str, Any] = {}
        self.kpi: dict[str, Any] = {}
        self.gpu_names: list[str] = []

    def say(self, text: str) -> None:
        if self.log_file:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        else:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def log(self, message: str, name: str | None = None, line: int = 0) -> None:
        """A Python logging line in TAO's format (``logging.basicConfig`` of each script)."""
        now = dt.datetime.now()
        self.say(f"{now:%Y-%m-%d %H:%M:%S},{now.microsecond // 1000:03d} [TAO Toolkit] [INFO] "
                 f"{name or LOGGER[self.task]} {line}: {message}")

    def status(self, status: str, message: str, data: dict[str, Any] | None = None) -> None:
        """One line as logging.py's ``StatusLogger.write`` makes it: data first, then date, time
        (local, not zero-padded), status, verbosity, message, graphical and kpi when non-empty."""
        if self.status_path is None:  # the default BaseLogger: verbosity DISABLE, writes nothing
            return
        now = dt.datetime.now()
        line: dict[str, Any] = dict(data or {})
        line.update({"date": f"{now.month}/{now.day}/{now.year}",
                     "time": f"{now.hour}:{now.minute}:{now.second}",
                     "status": status, "verbosity": "INFO", "message": message})
        if self.graphical:
            line["graphical"] = self.graphical
        if self.kpi:
            line["kpi"] = self.kpi
        self.log(message, "root", 198)  # write() also logging.log()s the message
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
    numbered = nlayers is not None and arch in ("resnet", "darknet", "vgg")  # train.py's arch_name
    backbone = f"{arch}{int(nlayers or 0)}" if numbered else arch
    return {"num_epochs": int(num("num_epochs", 0) or 0),
            # train.py: save_period = training_config.checkpoint_interval or 1 (proto3: absent is 0)
            "checkpoint_interval": int(num("checkpoint_interval", 0) or 0) or 1,
            "validation_period": int(num("validation_period_during_training", 0) or 0),
            # the fake's stand-in for len(val_dataset) > 0: a dataset_config without
            # validation_data_sources has no validation set (a spec without dataset_config has one)
            "has_validation": "dataset_config" not in text or "validation_data_sources" in text,
            "batch_size": int(num("batch_size_per_gpu", 16) or 16),
            "max_lr": num("max_learning_rate", 0.01) or 0.01,
            "network": "dssd" if re.search(r"\bdssd_config\b", text) else "ssd",
            "backbone": backbone, "classes": classes}


def _validate_train_spec(spec: dict[str, Any]) -> None:
    """spec_loader.validate_train_spec -> spec_validator.check_value's assertion messages."""
    for key, value in (("num_epochs", spec["num_epochs"]),
                       ("validation_period_during_training", spec["validation_period"])):
        if not value > 0:
            raise TaoError(f"AssertionError: Experiment Spec Setting Error: {key} should > 0. "
                           f"Wrong value: {value}")


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


def _inherit(header: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in header.items() if k not in ("fake_tao_model", "size_mb")}


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


# ------------------------------------------------------------------------------ GPUs


def host_gpus() -> list[tuple[str, str]]:
    """``(uuid, name)`` of the GPUs ``nvidia-smi -L`` would list, in index order."""
    raw = os.environ.get("GPUSCHED_SIMULATED_HOST_GPUS", "").strip()
    if raw:
        out = []
        for item in raw.split(","):
            uuid, sep, name = item.strip().partition("=")
            if uuid:
                out.append((uuid.strip(), name.strip() if sep else "unknown"))
        return out
    names = [n.strip() for n in os.environ.get("GPUSCHED_GPU_NAMES", "").split(",") if n.strip()]
    given = [u.strip() for u in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    uuids = given if len(given) == len(names) and all(u.startswith("GPU-") for u in given) else [
        f"fake-gpu-{i}" for i in range(len(names))]
    return list(zip(uuids, names, strict=True))


def check_valid_gpus(num_gpus: int, gpu_ids: Sequence[int], host: Sequence[tuple[str, str]]) -> list[int]:
    """entrypoint.py's ``check_valid_gpus``: the indices are host indices (``nvidia-smi -L``
    order), checked against the host's GPU count; then ``CUDA_VISIBLE_DEVICES`` is set to them,
    replacing whatever the launcher gave. AssertionError with TAO's messages."""
    ids = sorted(set(gpu_ids))
    assert num_gpus > 0, "At least 1 GPU required to run any task."
    available = len(host)
    assert min(ids) >= 0, "GPU ids cannot be negative."
    assert len(ids) == num_gpus, (  # (TAO's message has the two values swapped)
        f"The number of GPUs ({ids}) must be the same as the number of GPU indices ({num_gpus}) provided.")
    assert max(ids) < available and num_gpus <= available, "Checking for valid GPU ids and num_gpus."
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
    return ids


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
    """``"{:<14}{:<6}{}".format(cls, 'AP', round(ap, d))``: 5 decimals during training
    (detection_metric_callback_bg.py), 3 in evaluate.py; round(), so trailing zeros vanish."""
    rows = ["*" * 31]
    rows += ["{:<14}{:<6}{}".format(c, "AP", round(v, decimals)) for c, v in aps.items()]
    rows += ["{:<14}{:<6}{}".format("", "mAP", round(m, decimals)), "*" * 31]
    return rows


def _fmt(x: float) -> str:
    return repr(round(x, 6))


def _eta(seconds: float) -> str:
    """Keras 2.2 Progbar's ETA: ``%ds`` up to a minute, ``M:SS`` up to an hour, then ``H:MM:SS``."""
    if seconds > 3600:
        return f"{seconds // 3600:.0f}:{(seconds % 3600) // 60:02.0f}:{seconds % 60 // 1:02.0f}"
    if seconds > 60:
        return f"{seconds // 60:.0f}:{seconds % 60 // 1:02.0f}"
    return f"{int(seconds)}s"


def _per_step(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.0f}s/step"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.0f}ms/step"
    return f"{seconds * 1e6:.0f}us/step"


def _bar(done: int, steps: int) -> str:
    """Keras 2.2 Progbar's bar (width 30, the count right-aligned to the target's digits)."""
    width = int(30 * done / steps)
    bar = f"{done:{len(str(steps))}d}/{steps} ["
    if width > 0:
        bar += "=" * (width - 1) + (">" if done < steps else "=")
    return bar + "." * (30 - width) + "]"


# ------------------------------------------------------------------------------ tasks


def train(a: argparse.Namespace, run: Run) -> None:
    """cv/ssd/scripts/train.py. ``--initial_epoch`` is 1-based (default 1): Keras runs
    ``fit(initial_epoch=init_epoch - 1)``, so ``--initial_epoch 71`` trains epochs 71..N and
    resumes (optimizer state from ``-m``) only when it is not 1; with 1, ``-m`` is pretrained
    weights (or a pruned model to retrain)."""
    results = Path(a.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    run.status_path = results / "status.json"  # StatusLogger(append=True): survives resumes
    if run.status_path.exists():
        run.log(f"Log file already exists at {run.status_path}",
                "nvidia_tao_tf1.cv.common.logging.logging", 209)
    spec = _spec(a.experiment_spec_file)
    _validate_train_spec(spec)
    if a.arch and a.arch != spec["network"]:
        raise TaoError(f"AssertionError: The spec file specifies {spec['network']} but you typed "
                       f"{a.arch} in command line.")
    resume = a.resume_model_weights is not None and a.initial_epoch != 1
    header = read_model(a.resume_model_weights, required_fake=resume) if a.resume_model_weights else {}
    qat = bool(re.search(r"\benable_qat\s*:\s*true\b", Path(a.experiment_spec_file).read_text(
        encoding="utf-8", errors="replace"), re.IGNORECASE))
    if header and (resume or header.get("pruned")):  # the loaded model is the one checked
        if not qat and header.get("qat"):
            raise TaoError("ValueError: QAT training is disabled but the pretrained model is a QAT model.")
        if qat and not header.get("qat"):
            raise TaoError("ValueError: QAT training is enabled but the pretrained model is not a QAT model.")
    if a.resume_model_weights:
        run.log("Loading pretrained weights. This may take a while...", line=296)
    run.say("Resume optimizer from pretrained model" if resume else "Initialize optimizer")
    pth = float(header.get("pth", 0.0))
    size_mb = float(header.get("size_mb", UNPRUNED_MB))
    offset = 0 if resume else int(header.get("epoch", 0))  # a retrain continues the mAP curve
    n_epochs, ci, vp = spec["num_epochs"], spec["checkpoint_interval"], spec["validation_period"]
    classes, backbone, net = spec["classes"], spec["backbone"], spec["network"]
    validation = spec["has_validation"]
    base = epoch_seconds(run.gpu_names) * float(os.environ.get("GPUSCHED_FAKE_TAO_SCALE", "1.0"))
    steps = math.ceil(DATASET_IMAGES / (spec["batch_size"] * a.gpus))
    run.log(f"Number of images in the training dataset:\t{DATASET_IMAGES:>6}", line=403)
    csv_path = results / f"{net}_training_log_{backbone}.csv"
    columns = ["epoch", *sorted([*(f"AP_{c}" for c in classes), "loss", "lr", "mAP", "validation_loss"]
                                if validation else ["loss", "lr"])]
    # OneIndexedCSVLogger(append=False): a resume truncates it; Keras writes the header with
    # the first row
    csv_path.write_text("", encoding="utf-8")
    run.status("STARTED", "Starting Training Loop.")  # TAOStatusLogger.on_train_begin
    for epoch in range(a.initial_epoch, n_epochs + 1):
        t0 = time.monotonic()
        _check_injected("train", epoch)
        train_s = base * (1.15 if epoch == 1 else 1.0) * (1 + random.Random(epoch).uniform(-0.02, 0.02))
        validated = validation and epoch % vp == 0  # base_metric_callback.py
        total_s = train_s * (1 + VALIDATION_SHARE if validated else 1.0)
        loss = 2.0 + 18.0 * math.exp(-(epoch + offset) / 12.0) + random.Random(f"l{epoch}").uniform(0, 0.2)
        lr = spec["max_lr"] * a.gpus * min(1.0, epoch / max(1, n_epochs * 0.1)) * (
            1.0 if epoch < n_epochs * 0.7 else 0.1)
        run.say(f"Epoch {epoch}/{n_epochs}")  # ProgbarLogger.on_epoch_begin
        run.say("")  # without a TTY each Progbar update starts with "\n"
        for q in (1, 2, 3):
            time.sleep(max(0.0, t0 + train_s * q / 4 - time.monotonic()))
            eta = _eta(train_s * (4 - q) / 4)
            run.say(f"{_bar(steps * q // 4, steps)} - ETA: {eta} - loss: {loss + 0.3:.4f}")
        time.sleep(max(0.0, t0 + train_s - time.monotonic()))
        run.say(f"{_bar(steps, steps)} - {train_s:.0f}s {_per_step(train_s / steps)} - loss: {loss:.4f}")
        m = map_at(epoch, offset=offset, pth=pth)
        aps = class_aps(m, classes)
        vloss = loss * 0.9 + 0.1
        if epoch % ci == 0:  # KerasModelSaver runs before the metric callback
            ckpt = results / "weights" / f"{net}_{backbone}_epoch_{epoch:03d}.hdf5"
            write_model(ckpt, {"epoch": epoch + offset, "map": m, "pth": pth, "backbone": backbone,
                               "classes": classes, "qat": qat,
                               "params_m": float(header.get("params_m", size_mb * PARAMS_PER_MB))}, size_mb)
            run.say("")
            run.say(f"Epoch {epoch:05d}: saving model to {ckpt}")  # '%05d' in the callback
        if validated:
            run.say("Producing predictions: 100%|██████████| 24/24 [00:01<00:00, 17.43it/s]")
            for line in eval_table(aps, m, 5):
                run.say(line)
            run.say(f"Validation loss: {vloss!r}")
            run.graphical = {"validation loss": round(vloss, 8), "mean average precision": round(m, 5)}
            run.status("RUNNING", "Evaluation metrics generated.")
        time.sleep(max(0.0, t0 + total_s - time.monotonic()))
        row: dict[str, str] = {"epoch": str(epoch), "loss": _fmt(loss), "lr": _fmt(lr)}
        if validation:
            row.update({f"AP_{c}": _fmt(v) if validated else "nan" for c, v in aps.items()})
            row.update({"mAP": _fmt(m) if validated else "nan",
                        "validation_loss": _fmt(vloss) if validated else "nan"})
        with open(csv_path, "a", newline="", encoding="utf-8") as f:
            if epoch == a.initial_epoch:
                f.write(",".join(columns) + "\r\n")
            f.write(",".join(row[c] for c in columns) + "\r\n")
        # loggers.py TAOStatusLogger.on_epoch_end: values are str(); mAP is also the kpi
        run.graphical = {"loss": _fmt(loss), "learning_rate": _fmt(lr)}
        run.kpi = {}
        if validation:
            run.graphical.update({"validation_loss": row["validation_loss"],
                                  "mean average precision": row["mAP"]})
            run.kpi = {"mean average precision": row["mAP"]}
        run.status("RUNNING", "Training loop in progress", {
            "epoch": epoch, "max_epoch": n_epochs,
            "time_per_epoch": str(dt.timedelta(seconds=round(total_s, 6))),
            "eta": str(dt.timedelta(seconds=round(total_s * (n_epochs - epoch), 6)))})
    run.status("RUNNING", "Training loop complete.")  # TAOStatusLogger.on_train_end
    run.status("SUCCESS", "Training finished successfully.")
    run.log("Training finished successfully.", line=587)


def evaluate(a: argparse.Namespace, run: Run) -> None:
    """cv/ssd/scripts/evaluate.py: status.json in ``-r``, else next to the model
    (``os.path.dirname(model_path)``); the mAP as a float in the SUCCESS line's kpi."""
    spec = _spec(a.experiment_spec)  # loaded before the status logger exists
    log_dir = a.results_dir if a.results_dir is not None else os.path.dirname(a.model_path)
    run.status_path = Path(log_dir) / "status.json"
    run.status("STARTED", f"Starting {spec['network'].upper()} evaluation.")
    header = read_model(a.model_path)
    _check_injected("evaluate")
    run.say("Using TLT model for inference, setting batch size to the one in eval_config: 16")
    run.say("Producing predictions: 100%|██████████| 24/24 [00:01<00:00, 17.43it/s]")
    m = float(header.get("map", 0.0))
    aps = class_aps(m, list(header.get("classes") or spec["classes"]))
    for line in eval_table(aps, m, 3):
        run.say(line)
    run.kpi["mAP"] = m
    run.status("SUCCESS", "Evaluation finished successfully.")


def _side_status(results_dir: str | None, task: str) -> Path | None:
    """magnet_prune.py / export/app.py: a status file only with ``--results_dir``; TAO's own
    /workspace/logs gets a timestamped name."""
    if results_dir is None:
        return None
    name = f"status_{task}_{int(time.time())}.json" if results_dir == "/workspace/logs" else "status.json"
    return Path(results_dir) / name


def prune(a: argparse.Namespace, run: Run) -> None:
    """cv/common/magnet_prune.py: no STARTED line; the ratio is a parameter-count ratio; ``-o``
    gets ``.hdf5`` appended when missing, yet the kpi's ``size`` is read from the ``-o`` path as
    given (``get_model_file_size(args.output_file)``), so without the suffix TAO 5 saves the
    model and then fails with FileNotFoundError."""
    run.status_path = _side_status(a.results_dir, "prune")
    if a.results_dir:
        Path(a.results_dir).mkdir(parents=True, exist_ok=True)
    if a.equalization_criterion not in ("arithmetic_mean", "geometric_mean", "union", "intersection"):
        raise TaoError("AssertionError: Equalization criterion are [arithmetic_mean, geometric_mean, "
                       "union, intersection].")
    if a.normalizer not in ("L2", "max"):
        raise TaoError("AssertionError: normalizer options are [L2, max].")
    header = read_model(a.model)
    _check_injected("prune")
    if a.pruning_granularity <= 0:
        raise TaoError(f"ValueError: pruning granularity must be positive, got {a.pruning_granularity}")
    if not 0.0 < a.pruning_threshold < 1.0:
        raise TaoError(f"ValueError: pruning threshold must be in (0, 1), got {a.pruning_threshold}")
    if a.min_num_filters <= 0:
        raise TaoError(f"ValueError: min_num_filters must be positive, got {a.min_num_filters}")
    parent_mb = float(header.get("size_mb", UNPRUNED_MB))
    parent_params = float(header.get("params_m", parent_mb * PARAMS_PER_MB))
    pth = max(a.pruning_threshold, float(header.get("pth", 0.0)))
    new_mb = min(parent_mb, pruned_mb(pth) * (1.03 if a.normalizer == "L2" else 1.0))
    new_params = parent_params * new_mb / parent_mb
    ratio = new_params / parent_params
    run.log(f"Pruning ratio (pruned model / original model): {ratio}", line=233)
    output = a.output_file if a.output_file.endswith(".hdf5") else f"{a.output_file}.hdf5"
    parent_map = float(header.get("map", 0.0))
    pruned_map = round(max(0.0, parent_map - 0.5 * pth), 6)  # before retraining: much worse
    write_model(Path(output), {**_inherit(header), "pth": pth, "map": pruned_map, "parent_map": parent_map,
                               "pruned": True, "params_m": new_params}, new_mb)
    if not os.path.exists(a.output_file):
        raise TaoError(f"FileNotFoundError: Model file wasn't found at {a.output_file}")
    # TAO reports the saved file's size; the fake's file is a stand-in scaled down by
    # GPUSCHED_FAKE_TAO_SIZE_SCALE (like its epoch times), so the size it stands for is reported
    size_scale = float(os.environ.get("GPUSCHED_FAKE_TAO_SIZE_SCALE", "0.001"))
    run.kpi = {"pruning_ratio": ratio, "size": os.path.getsize(a.output_file) / MB / size_scale,
               "param_count": new_params}
    run.status("RUNNING", f"Pruning ratio (pruned model / original model): {ratio}")
    run.status("SUCCESS", "Pruning finished successfully.")


def export(a: argparse.Namespace, run: Run) -> None:
    """cv/common/export/app.py run_export: ``-o`` defaults to ``<model>.onnx`` and gets
    ``.onnx`` appended when the backend's name is not in it (a substring test, as TAO does);
    status lines only with ``--results_dir``."""
    run.status_path = _side_status(a.results_dir, "export")
    if a.results_dir:
        Path(a.results_dir).mkdir(parents=True, exist_ok=True)
    out = a.output_file if a.output_file is not None else f"{os.path.splitext(a.model)[0]}.onnx"
    if "onnx" not in out:
        out = f"{out}.onnx"
    run.log(f"Saving exported model to {out}", line=283)
    if os.path.exists(out):
        raise TaoError(f"AssertionError: Default output file {out} already exists")
    run.status("RUNNING", "Building exporter object.")
    header = read_model(a.model)
    spec = _spec(a.experiment_spec) if a.experiment_spec else {"classes": list(DEFAULT_CLASSES)}
    run.status("RUNNING", "Exporting the model.")
    _check_injected("export")
    path = Path(out)
    write_model(path, {**_inherit(header), "format": "onnx"}, float(header.get("size_mb", UNPRUNED_MB)) / 2)
    if a.gen_ds_config:  # keras_exporter.py: labels.txt and nvinfer_config.txt beside the .onnx
        classes = list(header.get("classes") or spec["classes"])
        (path.parent / "labels.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
        (path.parent / "nvinfer_config.txt").write_text(
            "net-scale-factor=1.0\noffsets=103.939;116.779;123.68\ninfer-dims=3;384;1248\n"
            f"onnx-file={path.name}\nlabelfile-path=labels.txt\nnetwork-type=0\n"
            f"num-detected-classes={len(classes)}\nmodel-color-format=1\nmaintain-aspect-ratio=0\n"
            "output-tensor-meta=0\n", encoding="utf-8")
    run.status("SUCCESS", "Export finished successfully.")


def inference(a: argparse.Namespace, run: Run) -> None:
    """cv/ssd/scripts/inference.py: status.json in ``-r`` or next to the model; the outputs go
    to ``-r`` (without it TAO fails joining None)."""
    spec = _spec(a.experiment_spec)
    log_dir = a.results_dir if a.results_dir is not None else os.path.dirname(a.model_path)
    run.status_path = Path(log_dir) / "status.json"
    run.status("STARTED", f"Starting {spec['network'].upper()} Inference.")
    header = read_model(a.model_path)
    if a.results_dir is None:
        raise TaoError("TypeError: expected str, bytes or os.PathLike object, not NoneType")
    results = Path(a.results_dir)
    images = Path(a.image_dir)
    if not images.is_dir():
        raise TaoError(f"FileNotFoundError: image directory {a.image_dir} does not exist")
    _check_injected("inference")
    classes = list(header.get("classes") or spec["classes"])
    (results / "images_annotated").mkdir(parents=True, exist_ok=True)
    (results / "labels").mkdir(parents=True, exist_ok=True)
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
    run.status("SUCCESS", "Inference finished successfully.")


TASK_FUNCS = {"train": train, "evaluate": evaluate, "prune": prune, "export": export, "inference": inference}
INTERRUPTED = {"train": "Training", "evaluate": "Evaluation", "prune": "Pruning", "export": "Export",
               "inference": "Inference"}


# ------------------------------------------------------------------------------ entrypoint

#: every flag of the entrypoint and of each task's ``build_command_line_parser``, as TAO 5
#: declares them (hidden ``argparse.SUPPRESS`` flags included): (flags, argparse keywords)
ENTRYPOINT_FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [  # entrypoint.py
    (("--num_processes", "-np"), {"type": int, "default": -1}),
    (("--gpus",), {"type": int, "default": 1}),
    (("--gpu_index",), {"type": int, "nargs": "+", "default": None}),
    (("--use_amp",), {"action": "store_true"}),
    (("--log_file",), {"default": None}),
    (("--mpirun-arg",), {"default": ""}),
    (("--multi-node",), {"action": "store_true"}),
    (("--launch_cuda_blocking",), {"action": "store_true"}),
]
_KEY = (("-k", "--key"), {"default": ""})
TASK_FLAGS: dict[str, list[tuple[tuple[str, ...], dict[str, Any]]]] = {
    "train": [  # cv/ssd/scripts/train.py
        (("-e", "--experiment_spec_file"), {"required": True}),
        (("-r", "--results_dir"), {"required": True}),
        _KEY,
        (("-m", "--resume_model_weights"), {"default": None}),
        (("--initial_epoch",), {"type": int, "default": 1}),
        (("--arch",), {"choices": [None, "ssd", "dssd"], "default": None}),
        (("--use_multiprocessing",), {"action": "store_true"}),
    ],
    "evaluate": [  # cv/ssd/scripts/evaluate.py
        (("-m", "--model_path"), {"required": True}),
        _KEY,
        (("-e", "--experiment_spec"), {"required": True}),
        (("-r", "--results_dir"), {"default": None}),
        (("-i", "--image_dir"), {"default": None}),
        (("-l", "--label_dir"), {"default": None}),
        (("-b", "--batch_size"), {"type": int, "default": 1}),
    ],
    "prune": [  # cv/common/magnet_prune.py (no choices: the script asserts instead)
        (("-m", "--model"), {"required": True}),
        (("-o", "--output_file"), {"required": True}),
        (("--results_dir",), {"default": None}),
        _KEY,
        (("-n", "--normalizer"), {"default": "max"}),
        (("-eq", "--equalization_criterion"), {"default": "union"}),
        (("-pg", "--pruning_granularity"), {"type": int, "default": 8}),
        (("-pth", "--pruning_threshold"), {"type": float, "default": 0.1}),
        (("-nf", "--min_num_filters"), {"type": int, "default": 16}),
        (("-el", "--excluded_layers"), {"nargs": "*", "default": []}),
        (("-v", "--verbose"), {"action": "store_true"}),
    ],
    "export": [  # cv/common/export/app.py
        (("-m", "--model"), {"required": True}),
        _KEY,
        (("-o", "--output_file"), {"default": None}),
        (("--force_ptq",), {"action": "store_true"}),
        (("--cal_data_file",), {"default": ""}),
        (("--cal_image_dir",), {"default": ""}),
        (("--cal_json_file",), {"default": ""}),
        (("--data_type",), {"choices": ["fp32", "fp16", "int8"], "default": "fp32"}),
        (("-s", "--strict_type_constraints"), {"action": "store_true"}),
        (("--gen_ds_config",), {"action": "store_true"}),
        (("--cal_cache_file",), {"default": "./cal.bin"}),
        (("--batches",), {"type": int, "default": 10}),
        (("--max_workspace_size",), {"type": int, "default": 2 * (1 << 30)}),
        (("--max_batch_size",), {"type": int, "default": 1}),
        (("--batch_size",), {"type": int, "default": 16}),
        (("--min_batch_size",), {"type": int, "default": 1}),
        (("--opt_batch_size",), {"type": int, "default": 1}),
        (("--onnx_route",), {"default": "keras2onnx"}),
        (("-e", "--experiment_spec"), {"default": None}),
        (("--engine_file",), {"default": None}),
        (("--static_batch_size",), {"type": int, "default": -1}),
        (("--target_opset",), {"type": int, "default": 12}),
        (("--results_dir",), {"default": None}),
        (("-v", "--verbose"), {"action": "store_true"}),
    ],
    "inference": [  # cv/ssd/scripts/inference.py
        (("-m", "--model_path"), {"required": True}),
        (("-i", "--image_dir"), {"required": True}),
        _KEY,
        (("-e", "--experiment_spec"), {"required": True}),
        (("-t", "--threshold"), {"type": float, "default": 0.3}),
        (("-r", "--results_dir"), {"default": None}),
        (("-b", "--batch_size"), {"type": int, "default": 1}),
    ],
}


def _parser(task: str) -> argparse.ArgumentParser:
    """The entrypoint's task subparser: its own flags (``parents=[parser]``) plus the task's."""
    p = argparse.ArgumentParser(prog=f"ssd {task}")
    for flags, kw in ENTRYPOINT_FLAGS + TASK_FLAGS[task]:
        p.add_argument(*flags, **kw)
    return p


def _traceback(exc: BaseException, where: str) -> str:
    text = str(exc)
    kind = text.split(":", 1)[0] if re.match(r"^\w+(Error|Exception): ", text) else type(exc).__name__
    body = text if kind != type(exc).__name__ or text.startswith(kind) else f"{kind}: {text}"
    return f"Traceback (most recent call last):\n  File \"{where}\", line 1, in <module>\n{body}"


def _message(exc: BaseException) -> str:
    """``str(e)`` as the scripts write it to status.json: the message without its type."""
    m = re.match(r"^\w+(?:Error|Exception): (.*)$", str(exc), re.DOTALL)
    return m[1] if m else str(exc)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "ssd":
        args = args[1:]
    # entrypoint.py looks for the task in the first argument only
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
    host = host_gpus()
    try:  # entrypoint.py launch_job: uncaught AssertionErrors, exit 1, no Execution status
        assert a.gpus > 0, "At least 1 GPU required to run any task."
        if a.gpus > 1:
            assert task == "train", (f"Please use only 1 GPU for the task {task}. Only the following "
                                     "tasks are supported to run with multiple GPUs, ['train']")
        if (a.num_processes if a.num_processes >= 0 else a.gpus) > 1:
            assert a.gpus > 1, "Number of GPUs must be > 1 for data parallelized training(np > 1)."
        if a.use_amp:
            assert task == "train", "AMP is currently supported only for training."
        ids = check_valid_gpus(a.gpus, a.gpu_index if a.gpu_index is not None else range(a.gpus), host)
    except AssertionError as exc:
        print(_traceback(exc, "/usr/local/bin/ssd"), file=sys.stderr)
        return 1
    run = Run(task, a.log_file)
    run.gpu_names = [host[i][1] for i in ids]
    print(f"fake TAO: running on host GPU index(es) {' '.join(map(str, ids))} ({', '.join(run.gpu_names)}); "
          f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} "
          f"({', '.join(host[i][0] for i in ids)})", flush=True)
    try:
        TASK_FUNCS[task](a, run)
    except Interrupted:  # each script catches (KeyboardInterrupt, SystemExit) and returns
        run.status("FAILURE", f"{INTERRUPTED[task]} was interrupted")
        if task == "train":
            run.log("Training was interrupted.", line=590)
    except (TaoError, OSError) as exc:  # the script writes FAILURE str(e) and re-raises
        run.status("FAILURE", _message(exc))
        run.say(_traceback(exc, f"nvidia_tao_tf1/cv/ssd/scripts/{task}.py"))
        print("Execution status: FAIL", flush=True)
        return EXIT_FAIL
    print("Execution status: PASS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
