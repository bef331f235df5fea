"""The daemon's side of pipelines: queue a whole graph at once, and run the gate when a round
has ended (prune again at lower thresholds, or record the result and the summary table)."""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from typing import Any

from gpusched import policy
from gpusched.config import Settings
from gpusched.errors import SpecError, StoreError
from gpusched.models import JobSpec, Mount
from gpusched.pipelines import (
    BranchResult,
    PipelineDef,
    Planned,
    best_of,
    expand,
    fan_stage,
    gate_decision,
    judge_branch,
    model_ref,
    retry_round_thresholds,
)
from gpusched.stages import StageRequest, build_job
from gpusched.store import Row, Store
from gpusched.throughput import gpu_set_key

log = logging.getLogger(__name__)
TERMINAL = ("succeeded", "failed", "cancelled", "lost")


class PipelineRunner:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        # the daemon's commit of its tick so far (False: not saved, the round waits)
        self.before_advance: Callable[[], bool] = lambda: True

    # -- submission -----------------------------------------------------------------------

    def submit(self, pdef: PipelineDef, *, owner_uid: int, owner: str, now: float,
               mounts: list[Mount], env: dict[str, str],
               validate: Callable[[JobSpec], None] | None = None,
               idempotency: tuple[str, str] | None = None) -> int:
        """Queue every stage of round 1. Every stage is validated first, with the same checks
        as `gpusched tao` (``validate``: runner, image allowlist, GPU count...), so nothing is
        stored on bad input."""
        extra = {"mounts": [m.model_dump() for m in mounts], "env": {**env, **pdef.env}}
        plan = expand(pdef)
        fake_ids = {p.key: i + 1 for i, p in enumerate(plan)}
        for p in plan:  # validation pass with stand-in ids
            spec = build_job(self._request(pdef, p, fake_ids, None, 1, extra), self.settings,
                             owner_uid=owner_uid)
            if validate is not None:
                validate(spec)
        # the gate's later rounds are built from the tick, hours later: check their stages
        # (results directories free, paths allowed) now, while the user is there to hear it
        later = [p for value in retry_round_thresholds(pdef)
                 for p in expand(pdef, thresholds=[value])]
        for p in later:
            fake_ids.setdefault(p.key, len(fake_ids) + 1)
            build_job(self._request(pdef, p, fake_ids, None, 2, extra), self.settings,
                      owner_uid=owner_uid)
        writers: dict[str, str] = {}  # two stages writing one directory mix their results
        for p in [*plan, *later]:
            where = p.fields.get("results_dir") if p.fields.get("task") != "evaluate" else None
            if where in writers and writers[where] != p.key:
                raise SpecError(f"stages {writers[where]} and {p.key} both write {where}: give "
                                "each its own results directory (e.g. with {threshold})")
            if where:
                writers[where] = p.key
        with self.store.write():  # the pipeline, its key and every job of round 1, or nothing
            pid = self.store.create_pipeline(pdef.name, owner_uid=owner_uid, owner=owner,
                                             now=now, idempotency=idempotency,
                                             spec_json=json.dumps({"def": pdef.model_dump(),
                                                                   "extra": extra}))
            self._submit_plan(pdef, plan, pid, {}, 1, extra, owner_uid, owner, now)
        return pid

    def _request(self, pdef: PipelineDef, p: Planned, ids: dict[str, int], pid: int | None,
                 round_no: int, extra: dict[str, Any]) -> StageRequest:
        fields = dict(p.fields)
        for fld, (kind, key) in p.refs.items():
            fields[fld] = f"@{kind}:{ids[key]}"
        return StageRequest(
            stage=fields, name=f"{pdef.name}/{p.key}", after=sorted({ids[k] for k in p.needs}),
            runner=pdef.runner, image=pdef.image, pipeline_id=pid, on=p.gpus.get("on"),
            gpu_type=p.gpus.get("gpu_type"), priority=p.gpus.get("priority") or 0,
            branch={"stage": p.stage, "branch": p.branch, "value": p.value, "round": round_no},
            **extra)

    def _submit_plan(self, pdef: PipelineDef, plan: list[Planned], pid: int,
                     ids: dict[str, int], round_no: int, extra: dict[str, Any], owner_uid: int,
                     owner: str, now: float) -> None:
        for p in plan:
            spec = build_job(self._request(pdef, p, ids, pid, round_no, extra), self.settings,
                             owner_uid=owner_uid)
            if spec.runner == "docker":  # stored resolved, as validate_spec stores a job's
                spec = policy.resolve_mounts(spec, self.settings.docker)
            ids[p.key] = self.store.submit(spec, owner_uid=owner_uid, owner=owner, now=now)

    # -- the gate -------------------------------------------------------------------------

    def step(self, now: float) -> bool:
        """Advance every running pipeline whose jobs have all ended; True if jobs were added."""
        added = False
        for row in self.store.pipelines("running"):
            jobs = self.store.pipeline_jobs(row["id"])
            if any(j["status"] not in TERMINAL for j in jobs):
                continue
            try:
                # a gate round checks stage specs (the user's paths, maybe slow): the tick's
                # open transaction is committed first, so no submission waits on that
                if not self.before_advance():
                    return added
                with self.store.unbatched():
                    added |= self._advance(row, jobs, now)
            except StoreError:
                raise  # the state disk: nothing is this pipeline's fault; the tick retries
            except Exception as err:  # one pipeline's bad data fails that pipeline only
                if not isinstance(err, SpecError):
                    log.exception("pipeline %s: the gate failed", row["id"])
                why = err.message if isinstance(err, SpecError) else (
                    f"the gate could not go on: {type(err).__name__}: {err}")
                self.store.update_pipeline(row["id"], now=now, status="failed", reason=why)
        return added

    def _advance(self, row: Row, jobs: list[Row], now: float) -> bool:
        data = json.loads(row["spec"])
        pdef = PipelineDef.model_validate(data["def"])
        by_stage: dict[str, list[Row]] = {}
        for j in jobs:
            info = (json.loads(j["spec"]).get("stage") or {}).get("request", {}).get("branch")
            by_stage.setdefault((info or {}).get("stage", "?"), []).append(j)
        failed = [j for j in jobs if j["status"] != "succeeded"]
        if pdef.gate is None:
            status = "failed" if failed else "succeeded"
            reason = (f"stage {failed[0]['name']} {failed[0]['status']}: {failed[0]['reason']}"
                      if failed else None)
            self.store.update_pipeline(row["id"], now=now, status=status, reason=reason)
            return False
        gate = pdef.gate
        base_jobs = by_stage.get(gate.baseline, [])
        base_map = self._eval_map(base_jobs[-1]) if base_jobs else None
        if base_map is None:
            why = (f"the baseline stage {gate.baseline} did not produce an mAP"
                   + (f" ({base_jobs[-1]['status']}: {base_jobs[-1]['reason']})"
                      if base_jobs else ""))
            self.store.update_pipeline(row["id"], now=now, status="failed", reason=why)
            return False
        branches = self._branches(pdef, jobs, base_map)
        rounds = int(row["rounds"])
        tried = [b.threshold for b in branches if b.threshold is not None]
        decision, nxt = gate_decision(base_map, [b for b in branches if b.round == rounds],
                                      gate, rounds, tried)
        if decision == "passed" or any(b.passed for b in branches):
            best = best_of(branches)
            summary = self._summary(base_map, branches, best)
            self.store.update_pipeline(row["id"], now=now, status="succeeded",
                                       summary=json.dumps(summary), reason=None)
            return False
        if decision == "retry" and nxt:
            log.info("pipeline %s: no branch within %.3f mAP; pruning again at %s",
                     pdef.name, gate.max_drop, nxt)
            ids = self._trunk_ids(pdef, jobs)
            plan = expand(pdef, thresholds=nxt)
            with self.store.write():  # a round's jobs and its count, or nothing
                self._submit_plan(pdef, plan, row["id"], ids, rounds + 1, data["extra"],
                                  row["owner_uid"], row["owner"], now)
                self.store.update_pipeline(row["id"], now=now, rounds=rounds + 1,
                                           summary=json.dumps(self._summary(base_map, branches,
                                                                            None)))
            return True
        self.store.update_pipeline(
            row["id"], now=now, status="failed",
            summary=json.dumps(self._summary(base_map, branches, None)),
            reason=_gate_failure(branches, gate.max_drop, rounds))
        return False

    def _trunk_ids(self, pdef: PipelineDef, jobs: list[Row]) -> dict[str, int]:
        fan = fan_stage(pdef)
        ids: dict[str, int] = {}
        for j in jobs:
            info = json.loads(j["spec"])["stage"]["request"]["branch"]
            if info["branch"] is None and info["stage"] != fan:
                ids[info["stage"]] = j["id"]
        return ids

    def _eval_map(self, job: Row) -> float | None:
        if job["status"] != "succeeded":
            return None
        art = next((a for a in self.store.artifacts(job["id"]) if a["kind"] == "evaluation"), None)
        m = art["metrics"].get("mAP") if art else None
        return float(m) if isinstance(m, int | float) else None

    def _branches(self, pdef: PipelineDef, jobs: list[Row], base_map: float) -> list[BranchResult]:
        gate = pdef.gate
        assert gate is not None
        groups: dict[tuple[int, str], dict[str, Row]] = {}
        for j in jobs:
            info = json.loads(j["spec"])["stage"]["request"]["branch"]
            if info["branch"]:
                groups.setdefault((info["round"], info["branch"]), {})[info["stage"]] = j
        cand_ref = model_ref(pdef.stages[gate.candidate].model)
        out = []
        for (round_no, label), stages in sorted(groups.items()):
            value = json.loads(next(iter(stages.values()))["spec"])["stage"]["request"][
                "branch"]["value"]
            cand = stages.get(gate.candidate)
            cand_map = self._eval_map(cand) if cand else None
            passed, drop = judge_branch(base_map, cand_map, gate)
            size = None
            for j in stages.values():
                for a in self.store.artifacts(j["id"]):
                    if a["kind"] == "pruned_model":
                        size = a["metrics"].get("size_mib")
            secs, models = self._epoch_time([j for j in stages.values()
                                             if j["kind"] in ("tao:train", "tao:retrain")])
            # the root cause is the first stage (in submission order) that did not succeed:
            # its dependants only say "dependency job N failed"
            bad_stage, bad = next(((s, j) for s, j in sorted(stages.items(),
                                                             key=lambda sj: sj[1]["id"])
                                   if j["status"] != "succeeded"), (None, None))
            failed_stage = None
            if bad_stage is not None and bad is not None:
                failed_stage = f"{bad_stage}[{label}]"
                status = f"{failed_stage} {bad['status']}: {bad['reason'] or 'no reason given'}"
            elif cand_map is None:
                failed_stage = f"{gate.candidate}[{label}]"
                status = f"{failed_stage} recorded no mAP"
            else:
                status = "succeeded"
            model = None
            if cand_ref and cand_ref[1] in stages:
                model = next((a["path"] for a in self.store.artifacts(stages[cand_ref[1]]["id"])
                              if a["kind"] == cand_ref[0]), None)
            out.append(BranchResult(threshold=value, size_mib=size, map=cand_map, drop=drop,
                                    passed=passed, s_per_epoch=secs, round=round_no,
                                    status=status, gpu_models=models,
                                    gpus=gpu_set_key(models) if models else None, model=model,
                                    failed_stage=failed_stage))
        return out

    def _epoch_time(self, jobs: list[Row]) -> tuple[float | None, list[str] | None]:
        """Median s/epoch of the training in ``jobs`` and the GPU set it ran on: that of the
        latest attempt, whose epochs are the only ones counted (a retry on other GPUs would
        otherwise blend two speeds under one name)."""
        rows = [e for j in jobs for e in self.store.epochs(job_id=j["id"])
                if e["seconds"] and e["epoch"] > 1 and not e["validated"]]
        if not rows:
            return None, None
        last = max(rows, key=lambda e: (e["job_id"], e["attempt"], e["epoch"]))
        models = _models(last)
        same = [e["seconds"] for e in rows if _models(e) == models]
        return statistics.median(same), models or None

    @staticmethod
    def _summary(base_map: float, branches: list[BranchResult],
                 best: BranchResult | None) -> dict[str, Any]:
        return {"baseline_map": base_map,
                "branches": [b.__dict__ for b in branches],
                "result": best.__dict__ if best else None,
                "model": best.model if best else None}


def _gate_failure(branches: list[BranchResult], max_drop: float, rounds: int) -> str:
    """Why no branch passed: the stages that failed, by name and with their reasons, and the
    gate only for the branches it judged."""
    def listed(bs: list[BranchResult]) -> str:
        return "; ".join(b.status for b in bs[:3]) + (
            f"; and {len(bs) - 3} more" if len(bs) > 3 else "")

    last = [b for b in branches if b.round == rounds]
    if last and all(b.failed_stage for b in last):
        return f"no branch could be judged in round {rounds}: {listed(last)}"
    why = (f"no pruned model within gate.max_drop = {max_drop:g} mAP of the unpruned model "
           f"after {rounds} round(s)")
    failed = [b for b in branches if b.failed_stage]
    return f"{why}; failed: {listed(failed)}" if failed else why


def _models(epoch: Row) -> list[str]:
    raw = epoch.get("gpu_models")
    try:
        models = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return []
    return [str(m) for m in models] if isinstance(models, list) else []
