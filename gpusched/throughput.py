"""The throughput model: seconds per epoch per workload × GPU set, recommendations, ETAs.

Pure layer-3 code: plain dicts in (epoch rows as the store returns them), dataclasses and
numbers out. No I/O, standard library only.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: the least samples a set needs before :func:`recommend` speaks about it
MIN_SAMPLES_TO_RECOMMEND = 2
#: speed ratios closer to 1 than this are reported as "about as fast"
_SAME_SPEED = 1.05


def gpu_set_key(models: Iterable[str]) -> str:
    """The model multiset as one canonical string: ``"RTX 2070 + RTX A4000"``, ``"2× H200"``."""
    counts = Counter(m.strip() for m in models)
    if not counts:
        return "?"
    return " + ".join(name if n == 1 else f"{n}× {name}" for name, n in sorted(counts.items()))


@dataclass(frozen=True)
class SetStats:
    """Epoch timing of one workload on one GPU set (a multiset of models)."""

    workload: str | None
    gpu_set: str
    gpu_models: tuple[str, ...]
    gpu_count: int
    samples: int  # training epochs used (warm-up and validation epochs excluded)
    median_s: float
    p90_s: float
    validation_median_s: float | None
    epochs_per_hour: float
    confidence: str  # "low" < 3 samples, "medium" < 10, "high"
    scaling_efficiency: float | None  # best single-GPU median / (N × this median); N > 1 only


def _models(row: dict[str, Any]) -> list[str]:
    raw = row.get("gpu_models")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = [raw]
    return [str(m) for m in raw] if isinstance(raw, list | tuple) else []


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _confidence(n: int) -> str:
    return "low" if n < 3 else "medium" if n < 10 else "high"


def summarize(
    epochs: Iterable[dict[str, Any]], *, exclude_warmup: bool = True, workload: str | None = None
) -> list[SetStats]:
    """Group epoch rows by (workload, GPU set) and describe each group's seconds per epoch.

    The warm-up epoch (epoch 1, and the lowest epoch seen for each job attempt, which is where a
    resumed attempt pays for graph building and data loading) is left out. Validated epochs
    include evaluation time, so they only feed ``validation_median_s``. Groups without a single
    training epoch are left out. Values are sorted before any statistic, so the result does not
    depend on the order the rows arrive in.
    """
    rows = [r for r in epochs if workload is None or r.get("workload") == workload]
    first: dict[tuple[Any, Any], int] = {}
    for r in rows:
        key = (r.get("job_id"), r.get("attempt"))
        first[key] = min(first.get(key, r["epoch"]), r["epoch"])

    train: dict[tuple[str | None, str], list[float]] = defaultdict(list)
    valid: dict[tuple[str | None, str], list[float]] = defaultdict(list)
    models_of: dict[tuple[str | None, str], tuple[str, ...]] = {}
    for r in rows:
        secs = r.get("seconds")
        if secs is None or not math.isfinite(secs) or secs <= 0:
            continue
        if exclude_warmup and (r["epoch"] <= 1 or r["epoch"] == first[(r.get("job_id"), r.get("attempt"))]):
            continue
        models = _models(r)
        group = (r.get("workload"), gpu_set_key(models))
        models_of[group] = tuple(sorted(models))
        (valid if r.get("validated") else train)[group].append(float(secs))

    medians: dict[tuple[str | None, str], float] = {g: statistics.median(sorted(v)) for g, v in train.items()}
    out = []
    for group, values in train.items():
        values.sort()
        set_models = models_of[group]
        n_gpus = len(set_models) or 1
        median = medians[group]
        efficiency = None
        if n_gpus > 1:
            singles = [medians[(group[0], m)] for m in set(set_models) if (group[0], m) in medians]
            if singles:
                efficiency = min(singles) / (n_gpus * median)
        vals = valid.get(group)
        out.append(SetStats(
            workload=group[0], gpu_set=group[1], gpu_models=set_models, gpu_count=n_gpus,
            samples=len(values), median_s=median, p90_s=_percentile(values, 0.9),
            validation_median_s=statistics.median(sorted(vals)) if vals else None,
            epochs_per_hour=3600.0 / median, confidence=_confidence(len(values)),
            scaling_efficiency=efficiency))
    out.sort(key=lambda s: (s.workload is None, s.workload or "", s.gpu_count, s.median_s, s.gpu_set))
    return out


_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def _fmt_rate(x: float) -> str:
    return f"{x:.0f}"


def fmt_seconds(x: float) -> str:
    """48 -> '48', 0.24 -> '0.24': whole seconds for real runs, significant digits for short
    (scaled or toy) epochs."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


#: predicted s/epoch of a workload on a set of GPU models (speedmodel.SpeedModel.predict)
Predict = Callable[[str | None, Sequence[str]], float | None]


def recommend(stats: list[SetStats], predict: Predict | None = None) -> list[str]:
    """Plain-language advice, only where every set involved has enough samples. With a
    ``predict`` (the speed model), a multi-GPU set whose cards never ran the workload alone is
    compared with the model's one-card times, and the advice says they are predicted."""
    recs: list[str] = []
    by_workload: dict[str | None, list[SetStats]] = defaultdict(list)
    for s in stats:
        if s.samples >= MIN_SAMPLES_TO_RECOMMEND:
            by_workload[s.workload].append(s)
    for wl in sorted(by_workload, key=lambda w: (w is None, w or "")):
        sets = by_workload[wl]
        suffix = f" for {wl}" if wl else ""
        singles = sorted((s for s in sets if s.gpu_count == 1), key=lambda s: (s.median_s, s.gpu_set))
        single_by_model = {s.gpu_models[0]: s for s in singles}
        if len(singles) > 1:
            best = singles[0]
            for other in singles[1:]:
                ratio = other.median_s / best.median_s
                if ratio >= _SAME_SPEED:
                    recs.append(f"{best.gpu_set} is {ratio:.2f}× faster than {other.gpu_set}{suffix} "
                                f"({fmt_seconds(best.median_s)} vs {fmt_seconds(other.median_s)} s/epoch).")
                else:
                    recs.append(f"{best.gpu_set} and {other.gpu_set} are about as fast{suffix} "
                                f"({fmt_seconds(best.median_s)} vs {fmt_seconds(other.median_s)} s/epoch).")
        prefix = f"For {wl}: one" if wl else "One"
        for multi in sorted((s for s in sets if s.gpu_count > 1), key=lambda s: (s.gpu_count, s.gpu_set)):
            parts: list[tuple[str, float]] = []
            predicted = False
            for m in multi.gpu_models:
                single = single_by_model.get(m)
                if single is not None:
                    parts.append((single.gpu_set, single.median_s))
                    continue
                guess = predict(wl, [m]) if predict is not None else None
                if guess is None or not math.isfinite(guess) or guess <= 0:
                    break
                parts.append((m, guess))
                predicted = True
            else:
                recs.append(_split_or_gang(prefix, multi, parts, predicted))
    return recs


def _split_or_gang(prefix: str, multi: SetStats, parts: list[tuple[str, float]],
                   predicted: bool) -> str:
    cards = sorted(parts, key=lambda p: (p[1], p[0]))
    separate = sum(3600.0 / secs for _, secs in cards)
    n = multi.gpu_count
    n_word = _COUNT_WORDS.get(n, str(n))
    names = [name for name, _ in cards]
    on_cards = f"each on one {names[0]}" if len(set(names)) == 1 else f"on {_and(names)}"
    fastest_name, fastest_s = cards[0]
    rate = _fmt_rate(multi.epochs_per_hour)
    head = f"{prefix} {n}-GPU job on {multi.gpu_set} gives {rate} epochs/h"
    by = " (one-card times predicted by the speed model)" if predicted else ""
    if separate > multi.epochs_per_hour:
        line = (f"{head}; {n_word} separate 1-GPU jobs {on_cards} give {_fmt_rate(separate)} "
                f"epochs/h together{by}: split when more than one job waits.")
        if multi.median_s < fastest_s:
            line += (f" A lone job still finishes {fastest_s / multi.median_s:.2f}× sooner "
                     f"on {multi.gpu_set} ({fmt_seconds(multi.median_s)} vs "
                     f"{fmt_seconds(fastest_s)} s/epoch on {fastest_name}).")
        else:
            line += f" A lone job is no faster on {multi.gpu_set} than on {fastest_name}."
    else:
        line = (f"{head}, more than {n_word} separate 1-GPU jobs {on_cards} "
                f"({_fmt_rate(separate)} epochs/h together{by}): prefer the {n}-GPU set.")
    return line


def eta(
    done_epochs: int, max_epoch: int, recent_seconds: list[float], fallback_s_per_epoch: float | None
) -> float | None:
    """Seconds left for a running job: remaining epochs × the median of its recent epochs.

    Without recent epochs the fallback (e.g. the workload's median on this GPU set) is used;
    with neither the ETA is unknown.
    """
    remaining = max(0, max_epoch - done_epochs)
    if remaining == 0:
        return 0.0
    recent = sorted(s for s in recent_seconds if s is not None and math.isfinite(s) and s > 0)
    per_epoch = statistics.median(recent) if recent else fallback_s_per_epoch
    if per_epoch is None or not math.isfinite(per_epoch) or per_epoch <= 0:
        return None
    return remaining * per_epoch


def queue_etas(
    running: Sequence[tuple[Hashable, float | None] | tuple[Hashable, float | None, int]],
    queued: Sequence[tuple[Hashable, float | None, int]],
    gpu_count: int,
) -> dict[Hashable, float | None]:
    """Expected start offset (seconds from now) of each queued job, in queue order.

    Greedy list scheduling: each queued job, in order, takes the GPUs that free up earliest.
    A running job holds one GPU unless its tuple carries a third element (GPUs held). A job whose
    start depends on a GPU freed at an unknown time gets None, and so does one that can never
    fit on this host.
    """
    free_at: list[float] = [0.0] * max(0, gpu_count)
    slot = 0
    for item in running:
        left = item[1]
        held = item[2] if len(item) > 2 else 1
        for _ in range(held):
            if slot >= len(free_at):
                break
            free_at[slot] = math.inf if left is None else max(0.0, float(left))
            slot += 1
    out: dict[Hashable, float | None] = {}
    for job_id, total_s, needed in queued:
        if needed <= 0:
            out[job_id] = 0.0
            continue
        if needed > len(free_at):
            out[job_id] = None
            continue
        free_at.sort()
        start = free_at[needed - 1]
        if math.isinf(start):
            # it cannot start at a known time, so it reserves nothing: later, smaller jobs may
            # still use the GPUs that do free up (as the placement policy backfills)
            out[job_id] = None
            continue
        out[job_id] = start
        end = math.inf if total_s is None else start + max(0.0, float(total_s))
        for i in range(needed):
            free_at[i] = end
    return out


def span_uuids(span: dict[str, Any]) -> list[str]:
    raw = span.get("gpu_uuids") or []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = [raw]
    return [str(u) for u in raw]


def clip_span(span: dict[str, Any], since: float, until: float) -> tuple[float, float] | None:
    """The part of a span inside [since, until] (a running span ends at ``until``), or None."""
    start = span.get("started_at")
    if start is None:
        return None
    end = span.get("ended_at")
    lo = max(float(start), since)
    hi = min(until if end is None else float(end), until)
    return (lo, hi) if hi > lo else None


def busy_fraction(
    spans: list[dict[str, Any]], gpus: list[dict[str, Any]], since: float, until: float
) -> dict[str, float]:
    """The fraction of [since, until] during which each GPU had a job (overlaps counted once)."""
    window = until - since
    per_gpu: dict[str, list[tuple[float, float]]] = {g["uuid"]: [] for g in gpus}
    for span in spans:
        clipped = clip_span(span, since, until)
        if clipped is None:
            continue
        for uuid in span_uuids(span):
            if uuid in per_gpu:
                per_gpu[uuid].append(clipped)
    out: dict[str, float] = {}
    for uuid, intervals in per_gpu.items():
        covered = 0.0
        cur_lo = cur_hi = -math.inf
        for lo, hi in sorted(intervals):
            if lo > cur_hi:
                covered += max(0.0, cur_hi - cur_lo) if cur_hi > -math.inf else 0.0
                cur_lo, cur_hi = lo, hi
            else:
                cur_hi = max(cur_hi, hi)
        if cur_hi > -math.inf:
            covered += cur_hi - cur_lo
        out[uuid] = min(1.0, covered / window) if window > 0 else 0.0
    return out
