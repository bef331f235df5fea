"""Traces for the simulator: a box of GPUs, the TRUE speed of each workload on it, and jobs.

A trace keeps apart what the planner may know from what only the simulator knows. The planner
sees a GPU's name, memory and *prior* ``speed`` (what ``[gpus] speed`` or the NVML-derived
prior would give it) and, like the daemon, only learns real seconds per epoch from the epochs
that finished. The truth (``true_speed``, each workload's ``base_s`` and explicit ``truth``
entries) decides how long a job really runs and is never handed to the planner, so a policy
cannot be flattered by knowing the future.

Built-in traces are TOML files in this package (``seed``, ``mixed``) read with
``importlib.resources``, plus ``big``: 1,000 jobs generated from a fixed seed, so every run and
every machine sees the same trace. A user's own trace is any TOML file in the same schema (see
``seed.toml``); it is validated field by field and errors name the file, the job and the field.

Pure layer-3 code: standard library only (``tomllib``, ``random``), no I/O but reading the
trace file.
"""

from __future__ import annotations

import random
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gpusched.errors import SpecError
from gpusched.throughput import gpu_set_key
from gpusched.units import parse_size_mib

BUILTIN = ("seed", "mixed", "big")
#: scaling efficiency of an N-GPU gang when neither the workload nor the trace gives one
DEFAULT_EFFICIENCY = 0.85


@dataclass(frozen=True)
class TraceGpu:
    """One GPU model: what the planner sees (name, memory, prior speed) and its true speed."""

    name: str
    memory_mib: int
    speed: float  # the prior handed to the planner's SpeedModel
    true_speed: float  # truth: a workload runs base_s / true_speed s/epoch on one such card


@dataclass(frozen=True)
class Workload:
    """True seconds per epoch of one workload: explicit entries per GPU set, a rule elsewhere."""

    name: str
    base_s: float  # true s/epoch on one card of true_speed 1.0
    efficiency: float  # true scaling efficiency of an N-GPU gang (rule for unlisted sets)
    truth: dict[str, float] = field(default_factory=dict)  # gpu_set_key -> true s/epoch


@dataclass(frozen=True)
class TraceJob:
    """One submission. ``epochs`` (training) or ``duration_s`` (a stage of fixed length)."""

    key: str  # the trace's own id, used by ``after``
    user: str
    submit_s: float
    workload: str | None
    epochs: int | None
    duration_s: float | None  # truth and the user's --time alike: short stages do not vary
    gpus_min: int
    gpus_max: int  # > gpus_min: elastic ("1-2")
    after: tuple[str, ...] = ()
    short: bool = False
    priority: int = 0
    mem_mib: int | None = None


@dataclass(frozen=True)
class Trace:
    """A whole trace: GPU models, one or more boxes made of them, workloads and jobs."""

    name: str
    description: str
    gpu_models: dict[str, TraceGpu]
    boxes: dict[str, tuple[str, ...]]  # box name -> GPU model names, in index order
    workloads: dict[str, Workload]
    jobs: tuple[TraceJob, ...]  # sorted by submit time, then file order

    def true_s_per_epoch(self, workload: str, gpu_names: tuple[str, ...] | list[str]) -> float:
        """The truth for one workload on one GPU set: the trace's explicit entry when it has
        one, else base × the slowest card's factor (1 / true_speed) / (N × efficiency) for a
        gang, base / true_speed for one card (a synchronous gang runs at its slowest card)."""
        w = self.workloads[workload]
        key = gpu_set_key(gpu_names)
        if key in w.truth:
            return w.truth[key]
        slowest = min(self.gpu_models[n].true_speed for n in gpu_names)
        n = len(gpu_names)
        return w.base_s / slowest if n == 1 else w.base_s / slowest / (n * w.efficiency)

    def true_duration_s(self, job: TraceJob, gpu_names: tuple[str, ...] | list[str]) -> float:
        """How long the job really runs on these GPUs (what the planner never sees)."""
        if job.epochs is not None and job.workload is not None:
            return job.epochs * self.true_s_per_epoch(job.workload, gpu_names)
        assert job.duration_s is not None
        return job.duration_s


# ------------------------------------------------------------------------------ loading


def load_trace(name_or_path: str) -> Trace:
    """A built-in trace by name (``seed``, ``mixed``, ``big``) or a TOML file by path."""
    if name_or_path == "big":
        return generate_big()
    if name_or_path in BUILTIN:
        text = resources.files(__name__).joinpath(f"{name_or_path}.toml").read_text("utf-8")
        return parse_trace_text(text, f"{name_or_path}.toml")
    path = Path(name_or_path)
    if not path.is_file():
        raise SpecError(f"no trace {name_or_path!r}: give one of {', '.join(BUILTIN)} "
                        "or the path of a TOML trace file")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"trace {path}: cannot be read: {err}") from err
    return parse_trace_text(text, str(path))


def parse_trace_text(text: str, source: str) -> Trace:
    """Parse and validate a TOML trace; every error names ``source`` and what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"trace {source}: not valid TOML: {err}") from err
    return parse_trace(data, source)


def _check_keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise SpecError(f"{where}: unknown field(s) {', '.join(extra)} "
                        f"(allowed: {', '.join(sorted(allowed))})")


def _number(d: dict[str, Any], key: str, where: str, *, default: float | None = None,
            positive: bool = True) -> float:
    raw = d.get(key, default)
    if raw is None:
        raise SpecError(f"{where}: needs {key}")
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise SpecError(f"{where}: {key} must be a number, not {raw!r}")
    if positive and raw <= 0:
        raise SpecError(f"{where}: {key} must be above zero, not {raw!r}")
    return float(raw)


def _clock(raw: Any, where: str) -> float:
    """Submit time: seconds from the trace's start, or "H:MM" / "H:MM:SS" (may pass 24:00)."""
    if isinstance(raw, int | float) and not isinstance(raw, bool) and raw >= 0:
        return float(raw)
    if isinstance(raw, str):
        parts = raw.split(":")
        if 2 <= len(parts) <= 3 and all(p.isdigit() for p in parts):
            h, m, s = (int(p) for p in [*parts, "0"][:3])
            if m < 60 and s < 60:
                return float(h * 3600 + m * 60 + s)
    raise SpecError(f"{where}: submit must be seconds (>= 0) or \"H:MM[:SS]\", not {raw!r}")


def _gpus(raw: Any, where: str) -> tuple[int, int]:
    """``1``, ``"2"`` or ``"1-2"`` (elastic: the planner picks the count at launch)."""
    text = str(raw).strip() if isinstance(raw, int | str) and not isinstance(raw, bool) else ""
    lo_s, _, hi_s = text.partition("-")
    if lo_s.isdigit() and (not hi_s or hi_s.isdigit()):
        lo, hi = int(lo_s), int(hi_s or lo_s)
        if 1 <= lo <= hi <= 64:
            return lo, hi
    raise SpecError(f"{where}: gpus must be a count (\"2\") or a range (\"1-2\"), not {raw!r}")


def _tables(data: dict[str, Any], key: str, source: str,
            allowed: set[str], *, required: bool = True) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(name, table, where-for-errors) of each ``[key."NAME"]`` table, its fields checked."""
    raw = data.get(key)
    if raw is None and not required:
        return
    if not isinstance(raw, dict) or (required and not raw):
        raise SpecError(f"trace {source}: needs [{key}.\"NAME\"] tables "
                        f"({', '.join(sorted(allowed))})")
    for name, table in raw.items():
        where = f"trace {source}: {key}.{name!r}"
        if not isinstance(table, dict):
            raise SpecError(f"{where}: must be a table")
        _check_keys(table, allowed, where)
        yield name, table, where


def _parse_gpu_models(data: dict[str, Any], source: str) -> dict[str, TraceGpu]:
    out = {}
    for name, g, where in _tables(data, "gpu_models", source, {"memory", "speed", "true_speed"}):
        if "memory" not in g:
            raise SpecError(f"{where}: needs memory (e.g. \"16G\")")
        mem = parse_size_mib(g["memory"])
        if mem <= 0:
            raise SpecError(f"{where}: memory must be above zero")
        speed = _number(g, "speed", where)
        out[name] = TraceGpu(name=name, memory_mib=mem, speed=speed,
                             true_speed=_number(g, "true_speed", where, default=speed))
    return out


def _parse_workloads(data: dict[str, Any], source: str, models: dict[str, TraceGpu],
                     efficiency: float) -> dict[str, Workload]:
    out = {}
    for name, w, where in _tables(data, "workloads", source, {"base_s", "efficiency", "truth"},
                                    required=False):
        truth: dict[str, float] = {}
        for i, t in enumerate(w.get("truth", [])):
            twhere = f"{where}: truth[{i}]"
            if not isinstance(t, dict):
                raise SpecError(f"{twhere}: must be {{ gpus = [...], s = N }}")
            _check_keys(t, {"gpus", "s"}, twhere)
            names = t.get("gpus")
            if not isinstance(names, list) or not names or not all(n in models for n in names):
                raise SpecError(f"{twhere}: gpus must list GPU models of [gpu_models] "
                                f"({', '.join(models)}), not {names!r}")
            truth[gpu_set_key(names)] = _number(t, "s", twhere)
        eff = _number(w, "efficiency", where, default=efficiency)
        if eff > 1:
            raise SpecError(f"{where}: efficiency must be at most 1, not {eff}")
        out[name] = Workload(name=name, base_s=_number(w, "base_s", where), efficiency=eff,
                             truth=truth)
    return out


_JOB_KEYS = {"id", "user", "submit", "workload", "epochs", "duration_s", "gpus", "after", "short",
             "priority", "mem"}


def _parse_job(j: Any, i: int, source: str, workloads: dict[str, Workload],
               seen: set[str]) -> TraceJob:
    where = f"trace {source}: jobs[{i}]"
    if not isinstance(j, dict):
        raise SpecError(f"{where}: must be a table")
    key = j.get("id")
    if not isinstance(key, str) or not key:
        raise SpecError(f"{where}: needs an id (a string)")
    where = f"trace {source}: job {key!r}"
    if key in seen:
        raise SpecError(f"{where}: the id is used twice")
    _check_keys(j, _JOB_KEYS, where)
    after = j.get("after", [])
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise SpecError(f"{where}: after must be a list of job ids")
    for a in after:
        if a not in seen:  # earlier jobs only: this also rules out cycles
            raise SpecError(f"{where}: after names {a!r}, which is not a job listed before it")
    workload = j.get("workload")
    if workload is not None and workload not in workloads:
        raise SpecError(f"{where}: workload {workload!r} is not in [workloads] "
                        f"({', '.join(workloads) or 'none'})")
    if ("epochs" in j) == ("duration_s" in j):
        raise SpecError(f"{where}: give exactly one of epochs (training) and duration_s")
    epochs = None
    if "epochs" in j:
        if workload is None:
            raise SpecError(f"{where}: epochs needs a workload (its speed comes from there)")
        epochs = j["epochs"]
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise SpecError(f"{where}: epochs must be a whole number above zero, not {epochs!r}")
    duration = _number(j, "duration_s", where) if "duration_s" in j else None
    lo, hi = _gpus(j.get("gpus", 1), where)
    short, priority = j.get("short", False), j.get("priority", 0)
    if not isinstance(short, bool):
        raise SpecError(f"{where}: short must be true or false")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise SpecError(f"{where}: priority must be a whole number")
    return TraceJob(key=key, user=str(j.get("user", "user")), submit_s=_clock(j.get("submit", 0), where),
                    workload=workload, epochs=epochs, duration_s=duration, gpus_min=lo, gpus_max=hi,
                    after=tuple(after), short=short, priority=priority,
                    mem_mib=parse_size_mib(j["mem"]) if "mem" in j else None)


def parse_trace(data: dict[str, Any], source: str) -> Trace:
    """Validate a trace's TOML tables (see ``seed.toml`` for the schema)."""
    _check_keys(data, {"name", "description", "efficiency", "gpu_models", "boxes", "workloads",
                       "jobs"}, f"trace {source}")
    models = _parse_gpu_models(data, source)
    boxes_raw = data.get("boxes")
    if not isinstance(boxes_raw, dict) or not boxes_raw:
        raise SpecError(f"trace {source}: needs [boxes] with at least one NAME = [GPU models]")
    boxes: dict[str, tuple[str, ...]] = {}
    for bname, names in boxes_raw.items():
        if not isinstance(names, list) or not names or not all(n in models for n in names):
            raise SpecError(f"trace {source}: box {bname!r} must list GPU models of [gpu_models] "
                            f"({', '.join(models)}), not {names!r}")
        boxes[bname] = tuple(names)
    efficiency = _number(data, "efficiency", f"trace {source}", default=DEFAULT_EFFICIENCY)
    workloads = _parse_workloads(data, source, models, efficiency)
    raw_jobs = data.get("jobs")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        raise SpecError(f"trace {source}: needs jobs (a list of tables)")
    seen: set[str] = set()
    jobs = []
    for i, j in enumerate(raw_jobs):
        job = _parse_job(j, i, source, workloads, seen)
        seen.add(job.key)
        jobs.append(job)
    for bname, names in boxes.items():
        for job in jobs:
            fits = [n for n in names if models[n].memory_mib >= (job.mem_mib or 0)]
            if len(fits) < job.gpus_min:
                raise SpecError(f"trace {source}: job {job.key!r} can never run on box {bname!r} "
                                f"(needs {job.gpus_min} GPU(s) with {job.mem_mib or 0} MiB; "
                                f"{len(fits)} fit)")
    order = {j.key: i for i, j in enumerate(jobs)}
    jobs.sort(key=lambda j: (j.submit_s, order[j.key]))
    return Trace(name=str(data.get("name", Path(source).stem)),
                 description=str(data.get("description", "")).strip(), gpu_models=models,
                 boxes=boxes, workloads=workloads, jobs=tuple(jobs))


# ------------------------------------------------------------------------------ generated

#: the seed of ``big``: fixed, so the trace is the same on every run and every machine
BIG_SEED = 12
BIG_JOBS = 1000


def generate_big(n_jobs: int = BIG_JOBS, seed: int = BIG_SEED) -> Trace:
    """``big``: ``n_jobs`` jobs of 12 users over about two days on an 8-GPU box of three models.

    Why these shapes: arrivals are Poisson at a rate that offers the box about its whole
    capacity (so a queue forms and placement matters, without an ever-growing backlog); job
    sizes follow the mix of the ``mixed`` trace (mostly 1 GPU, some fixed 2- and 4-GPU gangs,
    a fifth elastic ``1-2``), and three in ten training jobs are followed by a short evaluate
    that waits for them. The RTX 3090's prior speed (1.6) is deliberately below its truth
    (1.75), as a hand-set ``[gpus] speed`` would be, so the model has to learn it.
    """
    rng = random.Random(seed)
    models = {
        "RTX 3090": TraceGpu("RTX 3090", 24576, speed=1.6, true_speed=1.75),
        "RTX A4000": TraceGpu("RTX A4000", 16384, speed=1.40, true_speed=67.0 / 48.0),
        "RTX 2070": TraceGpu("RTX 2070", 8192, speed=1.0, true_speed=1.0),
    }
    box = ("RTX 3090", "RTX 3090", "RTX A4000", "RTX A4000", "RTX A4000",
           "RTX 2070", "RTX 2070", "RTX 2070")
    # (name, base_s on a speed-1.0 card, efficiency, epochs range)
    kinds = [("ssd/resnet18 384x1248 bs16", 67.0, 0.85, (20, 80)),
             ("yolo_v4/cspdarknet53 544x960 bs8", 110.0, 0.9, (10, 50)),
             ("classification/resnet50 224 bs64", 30.0, 0.8, (20, 100)),
             ("detectnet_v2/resnet18 544x960 bs4", 45.0, 0.75, (20, 120))]
    workloads = {k: Workload(k, base_s=b, efficiency=e) for k, b, e, _ in kinds}
    capacity = sum(models[n].true_speed for n in box)  # speed-1.0 cards' worth
    mean_work = sum(b * (lo + hi) / 2 for _, b, _, (lo, hi) in kinds) / len(kinds)
    train_share = 1 / 1.3  # 3 in 10 trainings bring an evaluate
    interarrival = mean_work / capacity * train_share  # offered load about 1.0
    users = [f"u{i:02d}" for i in range(12)]
    jobs: list[TraceJob] = []
    t = 0.0
    while len(jobs) < n_jobs:
        t += rng.expovariate(1.0 / interarrival)
        name, _, _, (lo, hi) = rng.choice(kinds)
        r = rng.random()
        gmin, gmax = (1, 1) if r < 0.6 else (2, 2) if r < 0.75 else (4, 4) if r < 0.8 else (1, 2)
        key = f"j{len(jobs)}"
        user = rng.choice(users)
        jobs.append(TraceJob(key=key, user=user, submit_s=round(t, 1), workload=name,
                             epochs=rng.randint(lo, hi), duration_s=None, gpus_min=gmin,
                             gpus_max=gmax, priority=1 if rng.random() < 0.05 else 0,
                             mem_mib=12288 if rng.random() < 0.1 else None))
        if len(jobs) < n_jobs and rng.random() < 0.3:
            jobs.append(TraceJob(key=f"{key}e", user=user, submit_s=round(t, 1), workload=None,
                                 epochs=None, duration_s=float(rng.randint(120, 600)), gpus_min=1,
                                 gpus_max=1, after=(key,), short=True))
    return Trace(name="big", description=generate_big.__doc__ or "", gpu_models=models,
                 boxes={"8gpu": box}, workloads=workloads, jobs=tuple(jobs))
