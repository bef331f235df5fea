"""Tolerant parsers of what TAO's SSD tasks write.

The formats are TAO 5's, from its open source (github.com/NVIDIA/tao_tensorflow1_backend,
``nvidia_tao_tf1/...``): ``status.json`` is one JSON object per line, appended, written by the
status logger (``cv/common/logging/logging.py``; ``date`` "7/14/2023" and ``time`` "10:2:5" not
zero-padded) and by the epoch callback (``cv/common/callbacks/loggers.py``: ``epoch``,
``max_epoch``, ``time_per_epoch`` as ``str(timedelta)``, ``graphical`` values as strings, ``nan``
off validation epochs; validation lines may hold a bare ``NaN``). The training CSV
``ssd_training_log_<backbone>.csv`` is Keras' CSVLogger made 1-based
(``cv/common/utils.py:OneIndexedCSVLogger``): CRLF lines, a header ``epoch`` then the sorted
metric keys (``AP_<class>``, ``loss``, ``lr``, ``mAP``, ``validation_loss``), ``nan`` where an
epoch was not validated; a resumed run truncates it and restarts at the resume epoch.
Checkpoints are ``weights/ssd_<backbone>_epoch_NNN.hdf5`` (``.tlt`` before TAO 5), 3-digit,
1-based, every ``checkpoint_interval`` epochs (``cv/common/callbacks/enc_model_saver_callback.py``).
The evaluate table is printed by ``cv/ssd/scripts/evaluate.py`` (``{:<14}{:<6}{}``: class, AP,
the value rounded to 3 places, then an ``mAP`` row, between lines of 31 ``*``).

Pure functions on strings: no I/O, no project imports. Every parser accepts partial or
garbled input (a file that is still being written, a container that died mid-line) and returns
``None`` or skips the bad piece instead of raising, except :func:`parse_timedelta`, which
raises ``ValueError`` (use :func:`timedelta_seconds` for the tolerant form).

The text-output parsers (Keras stdout, evaluate table, prune and execution-status lines, the
experiment spec) live in :mod:`gpusched.parsers_tao` and are re-exported here.
"""

from __future__ import annotations

import calendar
import csv
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gpusched.parsers_tao import (
    EvalResult,
    parse_evaluate_table,
    parse_execution_status,
    parse_keras_stdout,
    parse_prune_ratio,
    read_spec_fields,
    spec_facts,
    spec_summary,
    workload_key,
)

__all__ = [
    "BestPick",
    "CsvRow",
    "EpochRecord",
    "EvalResult",
    "StatusFollower",
    "best_checkpoint",
    "checkpoint_epochs",
    "epochs_from_status",
    "evaluate_map",
    "final_status",
    "parse_epoch_line",
    "parse_evaluate_table",
    "parse_execution_status",
    "parse_keras_stdout",
    "parse_prune_ratio",
    "parse_status_line",
    "parse_timedelta",
    "parse_training_csv",
    "read_spec_fields",
    "spec_facts",
    "spec_summary",
    "split_lines",
    "timedelta_seconds",
    "training_rows",
    "workload_key",
]

EPOCH_LINE_PREFIX = "GPUSCHED_EPOCH"
RUN_STATUSES = frozenset({"STARTED", "RUNNING", "SUCCESS", "FAILURE", "SKIPPED"})

# str(timedelta): "[-]N day[s], H:MM:SS[.ffffff]"
_TIMEDELTA_RE = re.compile(
    r"^\s*(?:(?P<days>-?\d+)\s+days?,\s*)?(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d+)?)\s*$")
_CHECKPOINT_RE = re.compile(r"_epoch_(\d+)\.(hdf5|tlt)$")
_DATE_RE = re.compile(r"^\s*(\d{1,2})/(\d{1,2})/(\d{4})\s*$")
_TIME_RE = re.compile(
    r"^\s*(\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.\d+)?\s*(?:(?P<z>Z)|(?P<sign>[+-])(?P<oh>\d{2}):?(?P<om>\d{2}))?\s*$")


# ---------------------------------------------------------------------------------- basics


def parse_timedelta(text: str) -> float:
    """Seconds in ``str(timedelta)``: "0:08:30.300586", "1 day, 2:03:04.5". ValueError if not."""
    m = _TIMEDELTA_RE.match(text)
    if not m:
        raise ValueError(f"not a timedelta: {text!r}")
    days = int(m["days"] or 0)
    return days * 86400 + int(m["h"]) * 3600 + int(m["m"]) * 60 + float(m["s"])


def timedelta_seconds(value: Any) -> float | None:
    """:func:`parse_timedelta` that returns None for anything unparseable (or a plain number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    try:
        return parse_timedelta(value)
    except ValueError:
        return None


def _num(value: Any) -> float | None:
    """A finite float from a number or a numeric string; "nan", NaN, junk -> None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def split_lines(buffer: str) -> tuple[list[str], str]:
    """Complete lines of ``buffer`` (without their LF/CRLF) and the unterminated remainder.

    A caller tailing a growing file feeds ``remainder + new_chunk`` each time; the remainder is
    a line still being written and must not be parsed yet.
    """
    parts = buffer.split("\n")
    rest = parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts], rest


class StatusFollower:
    """Incremental reader of a growing status.json: feed chunks, get complete parsed records."""

    #: longest partial line held back; past it the line is dropped up to its newline (a job
    #: printing without newlines must not grow the daemon's memory, or slow each pass)
    MAX_PENDING = 64 * 1024

    def __init__(self) -> None:
        self._rest = ""
        self._skipping = False  # dropping an over-long line until its newline

    def feed_lines(self, chunk: str) -> list[str]:
        if self._skipping:
            end = chunk.find("\n")
            if end < 0:
                return []
            chunk, self._skipping = chunk[end + 1:], False
        lines, self._rest = split_lines(self._rest + chunk)
        if len(self._rest) > self.MAX_PENDING:
            self._rest, self._skipping = "", True
        return lines

    def feed(self, chunk: str) -> list[dict[str, Any]]:
        records = (parse_status_line(line) for line in self.feed_lines(chunk))
        return [r for r in records if r is not None]

    @property
    def pending(self) -> str:
        """The partial last line held back until its newline arrives."""
        return self._rest


# ------------------------------------------------------------------------------ status.json


def parse_status_line(line: str) -> dict[str, Any] | None:
    """One status.json line as a dict (bare NaN/Infinity accepted); garbage or partial -> None."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


@dataclass
class EpochRecord:
    """One finished epoch from a status.json epoch line."""

    epoch: int
    max_epoch: int | None = None
    seconds: float | None = None  # time_per_epoch: includes validation and checkpoint saving
    loss: float | None = None
    lr: float | None = None
    map: float | None = None  # fraction 0-1, None off validation epochs ("nan")
    validation_loss: float | None = None
    validated: bool = False
    at: float | None = None  # unix time of the line, see parse_status_time


def parse_status_time(date: Any, time: Any) -> float | None:
    """Unix time from TAO's non-padded ``"7/14/2023"`` (M/D/Y) and ``"10:2:5"``.

    TAO writes the container's local time without a zone; containers run in UTC unless told
    otherwise, so the pair is interpreted as UTC unless the time carries an offset
    (``"10:2:5+02:00"`` or ``"10:2:5Z"``). None when unparseable.
    """
    if not isinstance(date, str) or not isinstance(time, str):
        return None
    d, t = _DATE_RE.match(date), _TIME_RE.match(time)
    if not d or not t:
        return None
    month, day, year = (int(x) for x in d.groups())
    hour, minute, second = int(t[1]), int(t[2]), int(t[3])
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 62):
        return None
    try:
        stamp = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    if t["sign"]:
        offset = int(t["oh"]) * 3600 + int(t["om"]) * 60
        stamp -= offset if t["sign"] == "+" else -offset
    return float(stamp)


def _epoch_record(rec: dict[str, Any]) -> EpochRecord | None:
    epoch = _int(rec.get("epoch"))
    if epoch is None:
        return None
    graphical = rec.get("graphical") if isinstance(rec.get("graphical"), dict) else {}
    kpi = rec.get("kpi") if isinstance(rec.get("kpi"), dict) else {}
    assert isinstance(graphical, dict) and isinstance(kpi, dict)
    m = _num(graphical.get("mean average precision", kpi.get("mean average precision")))
    return EpochRecord(
        epoch=epoch,
        max_epoch=_int(rec.get("max_epoch")),
        seconds=timedelta_seconds(rec.get("time_per_epoch")),
        loss=_num(graphical.get("loss")),
        lr=_num(graphical.get("learning_rate", graphical.get("lr"))),
        map=m,
        validation_loss=_num(graphical.get("validation_loss")),
        validated=m is not None,
        at=parse_status_time(rec.get("date"), rec.get("time")),
    )


def epochs_from_status(records: Iterable[dict[str, Any]]) -> list[EpochRecord]:
    """Epoch lines, by epoch; a later line for the same epoch (after a resume) replaces it."""
    by_epoch: dict[int, EpochRecord] = {}
    for rec in records:
        er = _epoch_record(rec)
        if er is not None:
            by_epoch[er.epoch] = er
    return [by_epoch[e] for e in sorted(by_epoch)]


def final_status(records: Iterable[dict[str, Any]]) -> tuple[str | None, str | None, dict[str, Any]]:
    """(last run status, its message, last kpi dict seen) from parsed status.json records.

    Run lines are those without an ``epoch`` key (STARTED, validation RUNNING lines, SUCCESS,
    FAILURE). The kpi is the last dict seen on any line: evaluate's ``{"mAP": float}``, prune's
    ``{"pruning_ratio", "size" (MiB), "param_count" (millions)}``.
    """
    status: str | None = None
    message: str | None = None
    kpi: dict[str, Any] = {}
    for rec in records:
        if isinstance(rec.get("kpi"), dict):
            kpi = rec["kpi"]
        if "epoch" in rec:
            continue
        st = rec.get("status")
        if isinstance(st, str) and st.upper() in RUN_STATUSES:
            status = st.upper()
            msg = rec.get("message")
            message = msg if isinstance(msg, str) else None
    return status, message, kpi


def evaluate_map(records: Iterable[dict[str, Any]]) -> float | None:
    """Evaluate's mAP at full precision: the float kpi ``mAP`` of the ``SUCCESS`` line that
    ends the last evaluation in the file (TAO 5 evaluate.py: ``s_logger.kpi.update({'mAP':
    float(...)})`` before "Evaluation finished successfully."). Without ``-r`` evaluate appends
    to the status.json next to the model, which other runs may share: only lines after the last
    ``STARTED`` count. None when that run has no SUCCESS with a number (read the table then)."""
    found: float | None = None
    for rec in records:
        status = rec.get("status")
        if status == "STARTED":
            found = None
        elif status == "SUCCESS" and isinstance(rec.get("kpi"), dict):
            found = _num(rec["kpi"].get("mAP"))
    return found


def parse_epoch_line(line: str) -> dict[str, Any] | None:
    """gpusched's own progress line ``GPUSCHED_EPOCH {"epoch": 3, ...}``; only epoch required."""
    text = line.strip()
    if not text.startswith(EPOCH_LINE_PREFIX):
        return None
    obj = parse_status_line(text[len(EPOCH_LINE_PREFIX):])
    if obj is None or _int(obj.get("epoch")) is None:
        return None
    obj["epoch"] = _int(obj["epoch"])
    return obj


# ------------------------------------------------------------------------------ training CSV


@dataclass
class CsvRow:
    """One row of ``ssd_training_log_<backbone>.csv``; None where the file holds ``nan``."""

    epoch: int
    loss: float | None = None
    lr: float | None = None
    map: float | None = None
    validation_loss: float | None = None
    ap: dict[str, float] = field(default_factory=dict)  # class -> AP, from AP_<class> columns


def _csv_cells(line: str) -> list[str]:
    """One line's cells; each line is read on its own, so a stray quote in a garbled line
    cannot swallow the lines after it."""
    try:
        return [c.strip() for c in next(csv.reader([line]), [])]
    except csv.Error:
        return []


def parse_training_csv(text: str) -> list[CsvRow]:
    """Rows of TAO's training CSV (CRLF or LF), read with :mod:`csv` (Keras' CSVLogger writes it
    with ``csv.DictWriter``, so a quoted cell may hold a comma). An unterminated last line is
    still being written and is dropped; malformed rows are skipped; a repeated header restarts
    the column map."""
    lines, _partial = split_lines(text)
    header: list[str] | None = None
    rows: list[CsvRow] = []
    for line in lines:
        cells = _csv_cells(line)
        if not any(cells):
            continue
        if cells[0] == "epoch":
            header = cells
            continue
        if header is None or len(cells) != len(header):
            continue
        values = dict(zip(header, cells, strict=True))
        epoch = _int(values["epoch"])
        if epoch is None:
            continue
        ap = {k[3:]: v for k, c in values.items() if k.startswith("AP_") and (v := _num(c)) is not None}
        rows.append(CsvRow(epoch=epoch, loss=_num(values.get("loss")), lr=_num(values.get("lr")),
                           map=_num(values.get("mAP")), validation_loss=_num(values.get("validation_loss")),
                           ap=ap))
    return rows


def training_rows(csv_rows: Iterable[CsvRow], status_epochs: Iterable[EpochRecord]) -> list[CsvRow]:
    """The training CSV's rows united, by epoch, with status.json's epoch lines.

    A resumed TAO train starts a new CSV holding only the epochs from ``--initial_epoch`` on,
    while status.json is appended across runs (NVIDIA/tao_tensorflow1_backend,
    nvidia_tao_tf1/cv/ssd/scripts/train.py: ``CSVLogger(append=False)``, ``StatusLogger(append=
    True)``), so the epochs before the resume, and their mAP, are only in status.json. A CSV
    value wins where both have one (it belongs to the current run); status.json fills the gaps.
    Feed ``epochs_from_status(records)`` (it keeps the latest line per epoch)."""
    by_epoch: dict[int, CsvRow] = {}
    for er in status_epochs:
        by_epoch[er.epoch] = CsvRow(epoch=er.epoch, loss=er.loss, lr=er.lr, map=er.map,
                                    validation_loss=er.validation_loss)
    for row in csv_rows:
        old = by_epoch.get(row.epoch)
        if old is None:
            by_epoch[row.epoch] = row
            continue
        by_epoch[row.epoch] = CsvRow(
            epoch=row.epoch,
            loss=row.loss if row.loss is not None else old.loss,
            lr=row.lr if row.lr is not None else old.lr,
            map=row.map if row.map is not None else old.map,
            validation_loss=row.validation_loss if row.validation_loss is not None else old.validation_loss,
            ap=row.ap or old.ap)
    return [by_epoch[e] for e in sorted(by_epoch)]


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_epochs(filenames: Iterable[str]) -> dict[int, str]:
    """``{epoch: name}`` from ``<network>_<backbone>_epoch_080.hdf5`` (or ``.tlt``) names or paths.
    ``.hdf5`` wins over ``.tlt`` for the same epoch."""
    found: dict[int, str] = {}
    for name in filenames:
        m = _CHECKPOINT_RE.search(name.replace("\\", "/").rsplit("/", 1)[-1])
        if not m:
            continue
        epoch = int(m[1])
        if epoch not in found or m[2] == "hdf5":
            found[epoch] = name
    return dict(sorted(found.items()))


@dataclass
class BestPick:
    """The checkpoint to carry forward. ``epoch`` is None when there are no checkpoints;
    ``map`` is None when the pick has no validation mAP (fallback to the latest checkpoint)."""

    epoch: int | None
    map: float | None
    warning: str | None = None


def _interval(epochs: list[int]) -> int:
    g = 0
    for e in epochs:
        g = math.gcd(g, e)
    return g or 1


def best_checkpoint(rows: Iterable[CsvRow], checkpoint_epochs: Iterable[int],
                    checkpoint_interval: int | None = None) -> BestPick:
    """Argmax mAP over rows with a number, restricted to epochs that have a checkpoint; ties go to
    the later epoch. Warns when the best validated epoch overall has no checkpoint, and falls
    back to the latest checkpoint (with a warning) when no checkpointed epoch has an mAP.
    ``checkpoint_interval`` only words the warning (default: inferred from the epochs)."""
    ckpts = sorted(set(checkpoint_epochs))
    if not ckpts:
        return BestPick(None, None, "no checkpoints found")
    interval = checkpoint_interval or _interval(ckpts)
    maps: dict[int, float] = {}
    for row in rows:
        if row.map is not None:
            maps[row.epoch] = row.map  # a later row for the same epoch wins
    validated = sorted(maps.items(), key=lambda kv: (kv[1], kv[0]))
    candidates = sorted(((m, e) for e, m in maps.items() if e in set(ckpts)))
    if not candidates:
        latest = ckpts[-1]
        why = ("no epoch has a validation mAP" if not validated else
               f"no checkpointed epoch has a validation mAP (checkpoint_interval {interval}, "
               f"validated epochs {', '.join(str(e) for e in sorted(maps))})")
        return BestPick(latest, None, f"{why}; picked the latest checkpoint, epoch {latest}")
    best_map, best_epoch = candidates[-1]
    warning = None
    top_epoch, top_map = validated[-1]
    if top_epoch not in ckpts and top_map > best_map:
        warning = (f"the best validated epoch ({top_epoch}, mAP {top_map:.3f}) has no checkpoint "
                   f"(checkpoint_interval {interval}); picked epoch {best_epoch} (mAP {best_map:.3f})")
    return BestPick(best_epoch, best_map, warning)
