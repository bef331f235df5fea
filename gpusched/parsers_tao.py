"""Parsers of TAO's text output: Keras stdout, the evaluate table, prune and execution-status
lines, and the protobuf-text experiment spec. Pure functions on strings; re-exported by
:mod:`gpusched.parsers`, which is the module to import."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|NaN|inf"
_EPOCH_RE = re.compile(r"^\s*Epoch (\d+)/(\d+)\s*$")
# final Keras bar: "742/742 [==============================] - 222s 299ms/step - loss: 19.3283"
_BAR_RE = re.compile(r"^\s*(\d+)/(\d+) \[=+\] - (\d+(?:\.\d+)?)s\b")
_STARS_RE = re.compile(r"^\s*\*{20,}\s*$")
_MAP_ROW_RE = re.compile(rf"^\s*mAP\s+({_NUMBER})\s*$")
_AP_ROW_RE = re.compile(rf"^(?P<cls>.*?)\s*AP\s+(?P<v>{_NUMBER})\s*$")
_PRUNE_RE = re.compile(rf"Pruning ratio \(pruned model / original model\):\s*({_NUMBER})")
_EXEC_RE = re.compile(r"Execution status:\s*(PASS|FAIL)\b")


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------ Keras stdout


def parse_keras_stdout(text: str) -> list[tuple[int, int, float | None]]:
    """``(epoch, max_epoch, seconds)`` per ``Epoch N/M`` header, seconds from the epoch's final
    progress bar (training time only, no validation); None while the epoch has not finished.
    Handles both one-update-per-line (no TTY) and ``\\r``-separated (TTY) progress output."""
    out: list[tuple[int, int, float | None]] = []
    for line in re.split(r"[\r\n]+", text):
        m = _EPOCH_RE.match(line)
        if m:
            out.append((int(m[1]), int(m[2]), None))
            continue
        b = _BAR_RE.match(line)
        if b and out and out[-1][2] is None and b[1] == b[2]:
            epoch, max_epoch, _ = out[-1]
            out[-1] = (epoch, max_epoch, float(b[3]))
    return out


# ------------------------------------------------------------------------------ evaluate table


@dataclass
class EvalResult:
    """One evaluate table: mAP and per-class AP (fractions 0-1; None/omitted for nan)."""

    map: float | None
    ap: dict[str, float] = field(default_factory=dict)


def _table(lines: list[str]) -> EvalResult | None:
    result = EvalResult(map=None)
    seen = False
    for line in lines:
        if not line.strip():
            continue
        m = _MAP_ROW_RE.match(line)
        if m:
            result.map, seen = _float(m[1]), True
            continue
        a = _AP_ROW_RE.match(line)
        if a and a["cls"].strip():
            seen = True
            value = _float(a["v"])
            if value is not None:
                result.ap[a["cls"].strip()] = value
    return result if seen else None


def parse_evaluate_table(text: str) -> EvalResult | None:
    """The LAST table between lines of ``*`` in ``text`` (evaluate's 3-decimal table or the
    5-decimal one printed during training). Class names longer than the 14-wide column glue onto
    ``AP`` (``traffic_light_bigAP    0.500``) and are split off again."""
    lines = text.replace("\r", "\n").split("\n")
    stars = [i for i, line in enumerate(lines) if _STARS_RE.match(line)]
    # pair from the end: the last closing line and the star line before it
    for k in range(len(stars) - 1, 0, -1):
        result = _table(lines[stars[k - 1] + 1:stars[k]])
        if result is not None:
            return result
    return None


# ------------------------------------------------------------------------------ one-liners


def parse_prune_ratio(text: str) -> float | None:
    """The last ``Pruning ratio (pruned model / original model): R`` value."""
    found = _PRUNE_RE.findall(text)
    return _float(found[-1]) if found else None


def parse_execution_status(text: str) -> str | None:
    """``"PASS"``/``"FAIL"`` from the last ``Execution status:`` line, None when absent."""
    found = _EXEC_RE.findall(text)
    return found[-1] if found else None


# ------------------------------------------------------------------------------ spec (protobuf text)

_TOKEN_RE = re.compile(r"""
    \s+ | \#[^\n]* |                                   # whitespace, comments
    (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*') |
    (?P<punct>[{}<>\[\]:,;]) |
    (?P<word>[^\s{}<>\[\]:,;"'\#]+)
""", re.VERBOSE)


def _tokens(text: str) -> list[tuple[str, str]]:
    toks: list[tuple[str, str]] = []
    for m in _TOKEN_RE.finditer(text):
        kind = m.lastgroup
        if kind == "str":
            raw = m["str"][1:-1]
            value = re.sub(r"\\(.)", r"\1", raw)
            if toks and toks[-1][0] == "str":  # adjacent strings concatenate
                toks[-1] = ("str", toks[-1][1] + value)
            else:
                toks.append(("str", value))
        elif kind is not None:
            toks.append((kind, m[kind]))
    return toks


def read_spec_fields(text: str) -> dict[str, str]:
    """Flat ``section.sub.key -> value`` for every scalar field of a protobuf-text spec.

    Strings are unquoted; ``key: value``, ``key { ... }``, ``key: { ... }`` and ``key < ... >``
    forms, ``#`` comments and ``[a, b]`` lists (joined with ",") are handled. Repeated fields
    keep the last value, as protobuf does for scalars. Unbalanced input is read as far as it goes.
    """
    toks = _tokens(text)
    out: dict[str, str] = {}
    stack: list[str] = []
    i, n = 0, len(toks)
    while i < n:
        kind, value = toks[i]
        if kind == "punct" and value in "}>":
            if stack:
                stack.pop()
            i += 1
            continue
        if kind != "word":
            i += 1
            continue
        key = ".".join([*stack, value])
        j = i + 1
        if j < n and toks[j] == ("punct", ":"):
            j += 1
        if j >= n:
            break
        nkind, nvalue = toks[j]
        if nkind == "punct" and nvalue in "{<":
            stack.append(value)
            i = j + 1
        elif nkind == "punct" and nvalue == "[":
            items: list[str] = []
            j += 1
            while j < n and toks[j] != ("punct", "]"):
                if toks[j][0] != "punct":
                    items.append(toks[j][1])
                j += 1
            out[key] = ",".join(items)
            i = j + 1
        elif nkind in ("word", "str"):
            out[key] = nvalue
            i = j + 1
        else:
            i = j
    return out


def _spec_int(fields: dict[str, str], key: str) -> int | None:
    try:
        return int(fields[key])
    except (KeyError, ValueError):
        return None


def spec_summary(text: str) -> dict[str, Any]:
    """The spec facts gpusched plans with: num_epochs, checkpoint_interval, validation_period,
    batch_size_per_gpu, arch, nlayers, network, backbone.

    As TAO 5 reads them (NVIDIA/tao_tensorflow1_backend, nvidia_tao_tf1/cv/ssd/scripts/train.py
    and spec_loader.py; proto3, so an absent number is 0): ``checkpoint_interval`` absent or 0
    means every epoch (``checkpoint_interval or 1``); ``validation_period`` absent or 0 is None,
    a spec TAO's validator refuses (``validation_period_during_training should > 0``)."""
    fields = read_spec_fields(text)
    network = "dssd" if any(k.startswith("dssd_config.") for k in fields) else "ssd"
    arch = fields.get(f"{network}_config.arch")
    nlayers = _spec_int(fields, f"{network}_config.nlayers")
    ckpt = _spec_int(fields, "training_config.checkpoint_interval")
    val = _spec_int(fields, "eval_config.validation_period_during_training")
    backbone = None if arch is None else f"{arch}{nlayers}" if nlayers is not None else arch
    width = _spec_int(fields, "augmentation_config.output_width")
    height = _spec_int(fields, "augmentation_config.output_height")
    return {
        "num_epochs": _spec_int(fields, "training_config.num_epochs"),
        "checkpoint_interval": ckpt if ckpt else 1,
        "validation_period": val if val else None,
        "batch_size_per_gpu": _spec_int(fields, "training_config.batch_size_per_gpu"),
        "arch": arch,
        "nlayers": nlayers,
        "network": network,
        "backbone": backbone,
        "input_size": f"{height}x{width}" if width and height else None,
        "dataset": _dataset_name(fields),
    }


def _dataset_name(fields: dict[str, str]) -> str | None:
    """A short name for the training data: the last folder or file pattern of its first
    source, without glob characters (``.../tfrecords/kitti_train*`` -> ``kitti_train``)."""
    for key in ("dataset_config.data_sources.tfrecords_path",
                "dataset_config.data_sources.image_directory_path",
                "dataset_config.data_sources.label_directory_path"):
        path = fields.get(key)
        if path:
            parts = [p for p in path.replace("\\", "/").split("/") if p.strip("*?[]")]
            if parts:
                # it becomes part of a name shown to every user: keep it plain
                name = re.sub(r"[^A-Za-z0-9._+-]", "", parts[-1]).strip("_-.")
                return name[:40] or None
    return None


def spec_facts(text: str) -> dict[str, Any]:
    """What a stage records of its spec file at submission, so that nothing re-reads a file
    its user controls later: :func:`spec_summary` plus ``digest`` (8 hex digits of the text's
    SHA-256, part of the workload key)."""
    return {**spec_summary(text), "digest": hashlib.sha256(text.encode()).hexdigest()[:8]}


def workload_key(facts: dict[str, Any], pruning_ratio: float | None = None) -> str:
    """The workload TAO training epochs are grouped by, named for humans by what decides its
    speed: network/backbone, input size, batch size per GPU, dataset, and for a pruned model
    its size class (``ssd/resnet18 384x1248 bs16 kitti_train pruned to 30%``). Two specs that
    differ only in learning rate or epochs are one workload; the spec hash stays in the
    stage's recorded facts as detail."""
    parts = [f"{facts.get('network') or 'ssd'}/{facts.get('backbone') or '?'}"]
    if facts.get("input_size"):
        parts.append(str(facts["input_size"]))
    parts.append(f"bs{facts.get('batch_size_per_gpu') or '?'}")
    if facts.get("dataset"):
        parts.append(str(facts["dataset"]))
    if pruning_ratio is not None and 0 < pruning_ratio < 1:
        parts.append(f"pruned to {size_class(pruning_ratio)}")
    return " ".join(parts)


def size_class(pruning_ratio: float) -> str:
    """The size class of a pruned model: the share of parameters kept, to the nearest 10 %
    (5 % below 10 %), so retrains of similar size share their timing."""
    pct = pruning_ratio * 100
    step = 5 if pct < 10 else 10
    return f"{max(step, round(pct / step) * step):.0f}%"
