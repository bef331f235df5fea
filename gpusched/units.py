"""Parsing of sizes and ``--gpus`` values, standard library only (the CLI imports it without
pulling in pydantic, so ``gpusched submit`` starts fast)."""

from __future__ import annotations

import re
from typing import Any

from gpusched.errors import SpecError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNIT_MIB = {"": 1 / (1024 * 1024), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def parse_size_mib(text: str | int) -> int:
    """'10G', '512M', '16GiB', '1.5g' -> MiB (binary units; a bare number is MiB)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise SpecError(f"bad size {text!r}: use a number with an optional unit, e.g. 10G or 512M")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit == "" and not m.group(3):
        return int(number)  # bare number: MiB
    return int(number * _UNIT_MIB[unit])


_RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_gpu_count(text: str | int) -> tuple[int, int | None]:
    """``2`` -> (2, None); ``1-2`` -> (1, 2): an elastic count the scheduler picks at launch."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text, None
    raw = str(text).strip()
    if raw.isdigit():
        return int(raw), None
    m = _RANGE_RE.match(raw)
    if not m:
        raise SpecError(f"bad GPU count {raw!r}: give a count (2) or a range (1-2)")
    lo, hi = int(m.group(1)), int(m.group(2))
    if lo < 1 or hi < lo:
        raise SpecError(f"bad GPU range {raw!r}: use MIN-MAX with 1 <= MIN <= MAX, e.g. 1-2")
    return lo, (hi if hi > lo else None)


def parse_gpus(gpus: str | None, gpu_type: str | None = None,
               mem: str | None = None) -> dict[str, Any]:
    """CLI syntax: ``2`` (any two), ``1-2`` (one or two, the scheduler chooses), ``0,1`` or
    ``GPU-uuid,...`` (exactly those), ``1,`` (exactly GPU 1). A bare integer is a count, as in
    ``docker run --gpus 2``. Returns the fields of ``models.GpuRequest``."""
    out: dict[str, Any] = {"gpu_type": gpu_type or None,
                           "mem_mib": parse_size_mib(mem) if mem else None}
    text = (gpus if gpus is not None else "1").strip()
    if "," not in text and not text.upper().startswith(("GPU-", "MIG-")):
        if _RANGE_RE.match(text):
            lo, hi = parse_gpu_count(text)
            return {**out, "count": lo, "count_max": hi}
        if not text.isdigit():
            raise SpecError(f"bad --gpus {text!r}: give a count (2), a range (1-2), a list of "
                            "indices (0,1), one index with a trailing comma (1,) or GPU UUIDs")
        return {**out, "count": int(text)}
    ids = [p.strip() for p in text.split(",") if p.strip()]
    if not ids:
        raise SpecError(f"bad --gpus {text!r}: the list names no GPU")
    for p in ids:
        if not (p.isdigit() or p.upper().startswith(("GPU-", "MIG-"))):
            raise SpecError(f"bad GPU {p!r} in --gpus: use indices or GPU-... UUIDs")
    if len(set(ids)) != len(ids):
        raise SpecError(f"bad --gpus {text!r}: a GPU is named twice")
    return {**out, "count": len(ids), "ids": ids}


_SUFFIX_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SLURM_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time_limit(text: str) -> float:
    """``--time`` in Slurm's formats, seconds out: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM``, ``D-HH:MM:SS`` (a bare number is minutes, as in Slurm), or with a unit:
    ``90s``, ``20m``, ``2h``, ``1d``."""
    t = text.strip().lower()
    bad = SpecError(f"bad --time {text!r}: use Slurm's MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                    "D-HH:MM:SS, or 90s, 20m, 2h")
    if t and t[-1] in _SUFFIX_S and t[:-1].replace(".", "", 1).isdigit():
        seconds = float(t[:-1]) * _SUFFIX_S[t[-1]]
    else:
        m = _SLURM_TIME_RE.match(t)
        if not m:
            raise bad
        days, a, b, c = (int(x) if x is not None else None for x in m.groups())
        if days is not None:  # D-HH[:MM[:SS]]
            seconds = days * 86400 + (a or 0) * 3600 + (b or 0) * 60 + (c or 0)
        elif c is not None:  # HH:MM:SS
            seconds = (a or 0) * 3600 + (b or 0) * 60 + c
        elif b is not None:  # MM:SS
            seconds = (a or 0) * 60 + b
        else:  # MM
            seconds = (a or 0) * 60
    if seconds <= 0:
        raise SpecError(f"bad --time {text!r}: the limit must be more than 0")
    return seconds
