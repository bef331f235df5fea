"""Pipelines: a graph of TAO stages from a TOML file, fanned out over a parameter list, with
the source workflow's acceptance gate. Pure: parsing, expansion and the gate's decision.

A stage names what it needs by meaning (``model = "best_checkpoint:train"``); the daemon hands
the real path over when the stage becomes runnable. A stage whose parameter is a list (e.g.
``threshold = [0.1, 0.2, 0.3]``) fans out into one branch per value, and every stage that
depends on it follows along per branch. The gate compares each branch's candidate mAP with the
baseline's; when no branch passes, pruning runs again at lower thresholds, a bounded number of
times. The result is the smallest model that passes.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gpusched.errors import SpecError, explain_validation
from gpusched.tao import REF_KINDS, TASKS
from gpusched.units import parse_gpu_count

PATH_KEYS = {"spec": "spec", "results": "results_dir", "output": "output", "model": "model",
             "images": "images"}
PASSTHROUGH = ("key", "gpus", "use_amp", "normalizer", "equalization", "granularity",
               "threshold", "min_filters", "excluded_layers", "gen_ds_config", "box_threshold",
               "initial_epoch")


class StageDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["train", "evaluate", "prune", "retrain", "export", "inference"]
    needs: list[str] = Field(default_factory=list)
    spec: str | None = None
    results: str | None = None
    output: str | None = None
    model: str | None = None  # a path, or "KIND:STAGE" (best_checkpoint:train)
    images: str | None = None
    key: str | None = None
    gpus: int | str = 1  # a count, or "1-2": the scheduler picks at launch
    use_amp: bool = False
    normalizer: str | None = None
    equalization: str | None = None
    granularity: int | None = None
    threshold: float | list[float] | None = None
    min_filters: int | None = None
    excluded_layers: list[str] | None = None
    gen_ds_config: bool = False
    box_threshold: float | None = None
    initial_epoch: int | None = None
    on: list[str] | None = None
    gpu_type: str | None = None
    priority: int = 0
    # spec edits ("training_config.num_epochs" = 10): the CLI applies them as the user, writes
    # the derived spec beside the original and sends ``spec`` pointing at it; the original
    # path is kept in ``spec_original`` so the record says what was derived from what
    overrides: dict[str, Any] = Field(default_factory=dict)
    spec_original: str | None = None

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}")
        return v

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: int | str) -> int | str:
        try:
            lo, hi = parse_gpu_count(v)
        except SpecError as err:
            raise ValueError(err.message) from None
        if lo < 1 or lo > 64 or (hi or lo) > 64:
            raise ValueError(f"gpus must be 1 to 64, or a range such as 1-2 (got {v!r})")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | list[float] | None) -> float | list[float] | None:
        values = v if isinstance(v, list) else [] if v is None else [v]
        if isinstance(v, list) and not v:
            raise ValueError("threshold: an empty list fans out into no branch")
        if isinstance(v, list) and len(v) > MAX_BRANCHES:
            raise ValueError(f"threshold: {len(v)} values; a pipeline fans out into at most "
                             f"{MAX_BRANCHES} branches (submit another pipeline for more)")
        for t in values:
            _check_threshold(t, "threshold")
        return v

    @model_validator(mode="after")
    def _overrides(self) -> StageDef:
        if self.overrides and self.spec is None:
            raise ValueError("overrides edit the stage's spec; give the stage a spec")
        if self.overrides and self.spec_original is None:
            # only the CLI can read the user's spec; a definition that reaches the daemon with
            # overrides it never applied would silently run the unedited spec
            raise ValueError("overrides were not applied to the spec: queue the pipeline with "
                             "`gpusched pipeline run`, which writes the edited spec file")
        return self


class GateDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate: str  # the stage whose evaluation mAP is judged (per branch)
    baseline: str  # the stage whose evaluation mAP is the reference
    max_drop: float = Field(default=0.02, ge=0, lt=1)  # absolute mAP (0.02 = 2 points)
    retries: int = Field(default=2, ge=0, le=10)  # rounds of pruning again, lower thresholds
    backoff: float = Field(default=0.5, gt=0, lt=1)  # next threshold = lowest tried × backoff
    retry_thresholds: list[float] | None = None  # or exactly these, one per round

    @field_validator("retry_thresholds")
    @classmethod
    def _retry_thresholds(cls, v: list[float] | None) -> list[float] | None:
        for t in v or []:
            _check_threshold(t, "gate.retry_thresholds")
        return v


MIN_THRESHOLD = 1e-4  # thresholds are rounded to 4 digits; below this TAO would get 0
MAX_BRANCHES = 32  # one submission must stay small: it is built and committed in one go


def _check_threshold(t: float, where: str) -> None:
    """A pruning threshold TAO accepts: 0 < t < 1 (TAO's -pth)."""
    if not MIN_THRESHOLD <= t < 1:
        raise ValueError(f"{where}: {t:g} is not a pruning threshold; it must be at least "
                         f"{MIN_THRESHOLD:g} and below 1 (0.1 prunes filters whose norm is "
                         "below a tenth of the largest)")


def retry_round_thresholds(p: PipelineDef) -> list[float]:
    """The thresholds the gate's retry rounds would try, in order, at most (the gate stops
    earlier when a branch passes): what submission checks and ``--overwrite`` clears too."""
    fan = next((n for n, s in p.stages.items() if isinstance(s.threshold, list)), None)
    if p.gate is None or fan is None:
        return []
    if p.gate.retry_thresholds is not None:
        return list(p.gate.retry_thresholds[:p.gate.retries])
    raw = p.stages[fan].threshold
    return backoff_thresholds(min(raw) if isinstance(raw, list) else 0.1, p.gate)


def backoff_thresholds(lowest: float, gate: GateDef) -> list[float]:
    """The thresholds the gate's backoff would try, one per retry round."""
    out, t = [], lowest
    for _ in range(gate.retries):
        t = round(t * gate.backoff, 4)
        out.append(t)
    return out


class PipelineDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    workdir: str  # relative paths resolve here
    key: str | None = None
    runner: str | None = None
    image: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    stages: dict[str, StageDef]
    gate: GateDef | None = None

    @model_validator(mode="after")
    def _graph(self) -> PipelineDef:
        for name, st in self.stages.items():
            for need in st.needs:
                if need not in self.stages:
                    raise ValueError(f"stage {name!r} needs unknown stage {need!r}")
            ref = _ref(st.model)
            if ref and ref[1] not in self.stages:
                raise ValueError(f"stage {name!r}: model refers to unknown stage {ref[1]!r}")
            if ref and ref[1] not in _ancestors(self.stages, name):
                raise ValueError(f"stage {name!r} uses a result of {ref[1]!r} but does not "
                                 f"need it (add it to needs)")
        topo_order(self.stages)  # raises on cycles
        fanned = [n for n, s in self.stages.items() if isinstance(s.threshold, list)]
        if len(fanned) > 1:
            raise ValueError(f"only one stage may fan out over a list; found {fanned}")
        if self.gate:
            for which in (self.gate.candidate, self.gate.baseline):
                if which not in self.stages or self.stages[which].task != "evaluate":
                    raise ValueError(f"gate: {which!r} must be an evaluate stage")
            if fanned and self.gate.retry_thresholds is None:
                raw = self.stages[fanned[0]].threshold
                lowest = min(raw) if isinstance(raw, list) else 0.1
                series = backoff_thresholds(lowest, self.gate)
                if series and series[-1] < MIN_THRESHOLD:
                    k = next(i for i, t in enumerate(series, 1) if t < MIN_THRESHOLD)
                    raise ValueError(
                        f"gate: backoff {self.gate.backoff:g} from threshold {lowest:g} reaches "
                        f"a threshold of 0 in retry round {k} of {self.gate.retries}; raise "
                        "gate.backoff, lower gate.retries, or list gate.retry_thresholds")
        return self


def _ref(value: str | None) -> tuple[str, str] | None:
    if value and ":" in value and not value.startswith("/"):
        kind, _, stage = value.partition(":")
        if kind not in REF_KINDS:
            raise SpecError(f"bad reference {value!r}: KIND must be one of {', '.join(REF_KINDS)}")
        return kind, stage
    return None


def model_ref(value: str | None) -> tuple[str, str] | None:
    """``"best_checkpoint:retrain"`` -> ("best_checkpoint", "retrain"); a path -> None."""
    return _ref(value)


def _ancestors(stages: dict[str, StageDef], name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(stages[name].needs)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += stages[n].needs if n in stages else []
    return seen


def topo_order(stages: dict[str, StageDef]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ValueError(f"the stages form a cycle: {' -> '.join([*path, n])}")
        state[n] = 1
        for m in stages[n].needs:
            visit(m, [*path, n])
        state[n] = 2
        order.append(n)

    for n in sorted(stages):
        visit(n, [])
    return order


def load(data: dict[str, Any], base_dir: str) -> PipelineDef:
    """A parsed TOML document -> a validated pipeline; ``workdir`` defaults to the file's
    directory and relative paths resolve against it."""
    data = dict(data)
    data.setdefault("workdir", base_dir)
    if not posixpath.isabs(data["workdir"]):
        data["workdir"] = posixpath.normpath(posixpath.join(base_dir, data["workdir"]))
    try:
        return PipelineDef.model_validate(data)
    except ValidationError as err:
        raise SpecError(explain_validation(err, "bad pipeline")) from err
    except ValueError as err:
        raise SpecError(f"bad pipeline: {err}") from err


def derived_spec_path(original: str, text: str) -> str:
    """Where an edited spec goes: beside the original (so the mounts that show the original
    show it too), named after the original and the edited text's hash, so the same edits
    give the same file and different edits never overwrite each other."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    stem = original[:-4] if original.endswith(".txt") else original
    return f"{stem}.gpusched-{digest}.txt"  # as `gpusched tao --set` names it


def derive_specs(data: dict[str, Any], base_dir: str,
                 read: Callable[[str], str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply each stage's ``overrides`` to its spec: the definition to send (those stages'
    ``spec`` pointing at the edited file, ``spec_original`` at the original) and the files to
    write ({path: text}). ``read`` reads a spec as the user; nothing is written here."""
    from gpusched.specedit import apply_overrides

    data = dict(data)
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return data, {}
    workdir = str(data.get("workdir") or base_dir)
    if not posixpath.isabs(workdir):
        workdir = posixpath.normpath(posixpath.join(base_dir, workdir))
    out_stages: dict[str, Any] = {}
    files: dict[str, str] = {}
    for name, st in stages.items():
        if not isinstance(st, dict) or not st.get("overrides"):
            out_stages[name] = st
            continue
        where = f"stage {name!r}"
        if "spec_original" in st:
            raise SpecError(f"{where}: spec_original is gpusched's record of an edited spec; "
                            "give spec and overrides only")
        overrides, spec = st["overrides"], st.get("spec")
        if not isinstance(overrides, dict):
            raise SpecError(f'{where}: overrides must be a table, e.g. overrides = '
                            '{ "training_config.num_epochs" = 10 }')
        if not isinstance(spec, str) or not spec:
            raise SpecError(f"{where}: overrides edit the stage's spec; give the stage a spec")
        if "{threshold}" in spec:
            raise SpecError(f"{where}: overrides need one spec file, not one per branch "
                            f"({spec!r} names {{threshold}})")
        original = spec if posixpath.isabs(spec) else posixpath.normpath(
            posixpath.join(workdir, spec))
        try:
            text = apply_overrides(read(original), overrides)
        except OSError as err:
            raise SpecError(f"{where}: cannot read its spec {original}: "
                            f"{err.strerror or err}") from err
        except SpecError as err:
            raise SpecError(f"{where}: overrides for {original}: {err.message}") from err
        derived = derived_spec_path(original, text)
        files[derived] = text
        out_stages[name] = {**st, "spec": derived, "spec_original": original}
    data["stages"] = out_stages
    return data, files


@dataclass
class Planned:
    """One stage instance to submit: its TAO fields, what it waits for, what it refers to."""

    key: str  # "train", "prune[threshold=0.1]"
    stage: str
    branch: str | None
    value: float | None
    fields: dict[str, Any]
    needs: list[str] = field(default_factory=list)  # keys of other Planned
    refs: dict[str, tuple[str, str]] = field(default_factory=dict)  # field -> (kind, key)
    gpus: dict[str, Any] = field(default_factory=dict)


def fan_stage(p: PipelineDef) -> str | None:
    return next((n for n, s in p.stages.items() if isinstance(s.threshold, list)), None)


def downstream(p: PipelineDef, root: str) -> set[str]:
    return {n for n in p.stages if n == root or root in _ancestors(p.stages, n)}


def expand(p: PipelineDef, thresholds: list[float] | None = None,
           existing: dict[str, int] | None = None) -> list[Planned]:
    """Stage instances in dependency order. With ``thresholds``, only the fanned stage and
    its dependants are planned (a new gate round); ``existing`` maps trunk stages to job ids."""
    fan = fan_stage(p)
    fanned = downstream(p, fan) if fan else set()
    values: list[float | None]
    if fan is None:
        values = [None]
    else:
        raw = p.stages[fan].threshold
        values = list(thresholds if thresholds is not None else raw)  # type: ignore[arg-type]
    out: list[Planned] = []
    for name in topo_order(p.stages):
        if thresholds is not None and name not in fanned:
            continue
        for value in (values if name in fanned else [None]):
            branch = f"threshold={value:g}" if value is not None else None
            key = f"{name}[{branch}]" if branch else name
            st = p.stages[name]
            fields = _fields(p, st, value)
            planned = Planned(key=key, stage=name, branch=branch, value=value, fields=fields,
                              gpus={"on": st.on, "gpu_type": st.gpu_type,
                                    "priority": st.priority})
            for need in st.needs:
                planned.needs.append(_key_for(need, fanned, branch))
            ref = _ref(st.model)
            if ref:
                planned.refs["model"] = (ref[0], _key_for(ref[1], fanned, branch))
            out.append(planned)
    return out


def _key_for(stage: str, fanned: set[str], branch: str | None) -> str:
    return f"{stage}[{branch}]" if branch and stage in fanned else stage


def _fields(p: PipelineDef, st: StageDef, value: float | None) -> dict[str, Any]:
    def path(v: str) -> str:
        v = v.replace("{threshold}", f"{value:g}" if value is not None else "")
        return v if posixpath.isabs(v) else posixpath.normpath(posixpath.join(p.workdir, v))

    fields: dict[str, Any] = {"task": st.task}
    for src, dst in PATH_KEYS.items():
        v = getattr(st, src)
        if v is not None and not (src == "model" and _ref(v)):
            fields[dst] = path(v)
    for k in PASSTHROUGH:
        v = getattr(st, k)
        if v is not None and v is not False:
            fields[k] = v
    lo, hi = parse_gpu_count(st.gpus)
    fields["gpus"] = lo
    if hi is not None:
        fields["gpus_max"] = hi
    if value is not None:
        fields["threshold"] = value
    if p.key and "key" not in fields:
        fields["key"] = p.key
    return fields


# -- the gate -------------------------------------------------------------------------------


@dataclass
class BranchResult:
    threshold: float | None
    size_mib: float | None
    map: float | None
    drop: float | None
    passed: bool
    s_per_epoch: float | None
    round: int
    status: str  # succeeded, or "STAGE failed: reason" for the first stage that did not succeed
    gpu_models: list[str] | None = None  # the GPU set the branch's training ran on
    gpus: str | None = None  # that set in words: "RTX 2070", "2× RTX A4000"
    model: str | None = None  # the file to deploy: what the candidate evaluation judged
    failed_stage: str | None = None  # "retrain[threshold=0.2]" when status is not succeeded


def gate_decision(baseline_map: float, branches: list[BranchResult], gate: GateDef,
                  rounds_done: int, tried: list[float]) -> tuple[str, list[float] | None]:
    """('passed', None) | ('retry', next thresholds) | ('failed', None)."""
    if any(b.passed for b in branches):
        return "passed", None
    if branches and all(b.failed_stage for b in branches):
        # nothing was judged: a stage failed in every branch, and pruning less would run
        # into the same failure (the job's own retries are where transient errors go)
        return "failed", None
    if rounds_done > gate.retries:
        return "failed", None
    if gate.retry_thresholds is not None:
        if rounds_done - 1 < len(gate.retry_thresholds):
            return "retry", [gate.retry_thresholds[rounds_done - 1]]
        return "failed", None
    lowest = min(tried) if tried else 0.1
    nxt = round(lowest * gate.backoff, 4)
    if nxt < MIN_THRESHOLD:  # submission refuses such gates; stored ones stop here
        return "failed", None
    return "retry", [nxt]


def judge_branch(baseline_map: float, cand_map: float | None, gate: GateDef) -> tuple[
        bool, float | None]:
    if cand_map is None:
        return False, None
    drop = baseline_map - cand_map
    return drop <= gate.max_drop + 1e-12, drop


def best_of(branches: list[BranchResult]) -> BranchResult | None:
    """The smallest model that passes."""
    passing = [b for b in branches if b.passed and b.size_mib is not None]
    return min(passing, key=lambda b: (b.size_mib, -(b.map or 0))) if passing else None
