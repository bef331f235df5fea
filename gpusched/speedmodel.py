"""Predicted seconds per epoch for any workload on any GPU set, also pairs never run.

The model (after Gavel's throughput matrix, for one heterogeneous box):

    s/epoch(workload, G) = base(workload) × slowest(G) / (N × efficiency(N))

``base`` is the workload's time on a GPU of speed 1, ``slowest(G)`` is 1/speed of the slowest
card of the set (synchronous data parallel waits for it) and ``efficiency(N)`` is the measured
scaling of N-GPU sets (1 for one GPU). Speeds, efficiencies and bases are fitted together, in
log space, from the median s/epoch of every (workload, GPU set) the store has seen, so the
A4000 : 2070 ratio learned from retrains also predicts the train that only ever ran on both.
The prior (a configured ``speed`` per GPU model, else one derived from NVML, else 1) and the
prior efficiency count as a few pseudo-samples: with no data at all the model is the prior,
and data moves it. A measured (workload, set) median is always preferred over the model.

Pure layer-3 code: plain rows in, numbers out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpusched.throughput import SetStats, gpu_set_key, summarize

#: scaling efficiency of an N-GPU set before any N-GPU set was measured (the seed's A4000 +
#: 2070 pair: 67 s/epoch on the slower card alone, 40 on both: 67 / (2 × 40) = 0.84)
PRIOR_EFFICIENCY = 0.85
#: how many measured samples the prior is worth
PRIOR_WEIGHT = 2.0
#: a measured median with fewer samples than this is blended with the model
_MEASURED_MIN = 2
_ITERATIONS = 30
MIN_EPOCH_S, MAX_EPOCH_S = 1e-6, 1e7
#: how far measurements may move a GPU model's prior speed, as a factor either way
PRIOR_SPAN = 4.0
_SPAN = math.log(PRIOR_SPAN)


@dataclass(frozen=True)
class Estimate:
    """What the model says about one workload on one GPU set."""

    s_per_epoch: float | None  # None: this workload was never timed anywhere
    factor: float  # relative time of the set (slowest/N/eff): lower is faster, always known
    source: str  # "measured" (this workload on this set), "model" (fitted) or "prior"
    samples: int  # epochs behind it: this set's own for "measured", the workload's otherwise

    @property
    def confidence(self) -> str:
        if self.source == "prior" or self.samples < 3:
            return "low"
        return "high" if self.source == "measured" and self.samples >= 10 else "medium"

    def describe(self) -> str:
        return {"measured": f"measured, {self.samples} epochs",
                "model": f"model, {self.samples} epochs of this workload",
                "prior": "prior only"}[self.source]


def _norm(name: str) -> str:
    return " ".join(name.lower().split())


def prior_lookup(prior: Mapping[str, float], name: str) -> float | None:
    """A configured speed for a GPU model: exact name first, then the longest key that is a
    substring of the name ("A4000" matches "NVIDIA RTX A4000"), case-insensitive."""
    n = _norm(name)
    best: tuple[int, float] | None = None
    for key, value in prior.items():
        k = _norm(key)
        if k == n:
            return float(value)
        if k and k in n and (best is None or len(k) > best[0]):
            best = (len(k), float(value))
    return best[1] if best else None


class SpeedModel:
    """Fitted speeds per GPU model, scaling per GPU count and a base per workload."""

    def __init__(self, speeds: dict[str, float], efficiency: dict[int, float],
                 base: dict[str, float], measured: dict[tuple[str, str], SetStats],
                 samples: dict[str, int], prior: Mapping[str, float], prior_efficiency: float,
                 data_models: set[str], efficiency_measured: set[int] | None = None) -> None:
        self.speeds = speeds
        self.efficiency = efficiency
        self.base = base
        self.measured = measured
        self.workload_samples = samples
        self.prior = dict(prior)
        self.prior_efficiency = prior_efficiency
        self.data_models = data_models  # GPU models some timed epoch ran on
        # counts some workload ran both on N GPUs and on one: only there is scaling measured
        # (elsewhere the fitted value stays the prior, which the base absorbs)
        self.efficiency_measured = efficiency_measured or set()

    @classmethod
    def fit(cls, rows: Iterable[dict[str, Any]], prior_speed: Mapping[str, float] | None = None,
            efficiency: float = PRIOR_EFFICIENCY, *,
            stats: Sequence[SetStats] | None = None) -> SpeedModel:
        """Fit from epoch rows (as the store returns them) or from their summary."""
        prior = dict(prior_speed or {})
        groups = list(stats) if stats is not None else summarize(rows)
        # a median outside a microsecond .. 4 months per epoch is no measurement (jobs report
        # their own times); it would only overflow the logs and exps below
        obs = [s for s in groups if s.workload and s.gpu_models
               and math.isfinite(s.median_s) and MIN_EPOCH_S <= s.median_s <= MAX_EPOCH_S]
        models = {m for s in obs for m in s.gpu_models}
        log_speed = {m: math.log(prior_lookup(prior, m) or 1.0) for m in models}
        log_prior = dict(log_speed)
        log_eff: dict[int, float] = {}
        counts = {s.gpu_count for s in obs if s.gpu_count > 1}
        log_eff = {n: math.log(efficiency) for n in counts}
        log_base: dict[str, float] = {}

        def weight(s: SetStats) -> float:
            return float(min(s.samples, 20))

        def slowest(s: SetStats) -> str:
            return min(s.gpu_models, key=lambda m: (log_speed[m], m))

        def rest(s: SetStats) -> float:
            """log t + log N + log eff(N): what is left for base − log speed(slowest)."""
            n = s.gpu_count
            return math.log(s.median_s) + math.log(n) + (log_eff.get(n, 0.0) if n > 1 else 0.0)

        for _ in range(_ITERATIONS):
            acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for s in obs:
                a = acc[str(s.workload)]
                a[0] += weight(s) * (rest(s) + log_speed[slowest(s)])
                a[1] += weight(s)
            log_base = {w: v / wt for w, (v, wt) in acc.items()}
            sp: dict[str, list[float]] = {m: [PRIOR_WEIGHT * log_prior[m], PRIOR_WEIGHT]
                                          for m in models}
            for s in obs:
                m = slowest(s)
                sp[m][0] += weight(s) * (log_base[str(s.workload)] - rest(s))
                sp[m][1] += weight(s)
            # data moves a prior at most PRIOR_SPAN× either way: epoch times are reported by the
            # jobs themselves, and one user's figures must not turn another's placement round
            log_speed = {m: min(log_prior[m] + _SPAN, max(log_prior[m] - _SPAN, v / wt))
                         if prior_lookup(prior, m) is not None else v / wt
                         for m, (v, wt) in sp.items()}
            ef: dict[int, list[float]] = {n: [PRIOR_WEIGHT * math.log(efficiency), PRIOR_WEIGHT]
                                          for n in counts}
            for s in obs:
                n = s.gpu_count
                if n > 1:
                    x = (log_base[str(s.workload)] - log_speed[slowest(s)] - math.log(n)
                         - math.log(s.median_s))
                    ef[n][0] += weight(s) * x
                    ef[n][1] += weight(s)
            # superlinear scaling happens (caches) but not by much; keep it sane
            log_eff = {n: min(math.log(1.2), max(math.log(0.05), v / wt))
                       for n, (v, wt) in ef.items()}

        samples: dict[str, int] = defaultdict(int)
        counts_of: dict[str, set[int]] = defaultdict(set)
        for s in obs:
            samples[str(s.workload)] += s.samples
            counts_of[str(s.workload)].add(s.gpu_count)
        measured_n = {n for c in counts_of.values() if 1 in c for n in c if n > 1}
        return cls(
            speeds={m: math.exp(v) for m, v in log_speed.items()},
            efficiency={n: math.exp(v) for n, v in log_eff.items()},
            base={w: math.exp(v) for w, v in log_base.items()},
            measured={(str(s.workload), s.gpu_set): s for s in obs},
            samples=dict(samples), prior=prior, prior_efficiency=efficiency,
            data_models=models, efficiency_measured=measured_n)

    # -- predictions ------------------------------------------------------------------------

    def speed(self, model: str) -> float:
        """The fitted speed of a GPU model; the prior (or 1) for a model never timed."""
        if model in self.speeds:
            return self.speeds[model]
        return prior_lookup(self.prior, model) or 1.0

    def speed_source(self, model: str) -> str:
        if model in self.data_models:
            return "fitted"
        return "prior" if prior_lookup(self.prior, model) is not None else "default"

    def eff(self, n: int) -> float:
        return 1.0 if n <= 1 else self.efficiency.get(n, self.prior_efficiency)

    def factor(self, gpu_models: Sequence[str]) -> float:
        """Relative time of a set: 1/speed of its slowest card / (N × efficiency(N))."""
        if not gpu_models:
            return 1.0
        n = len(gpu_models)
        return (1.0 / min(self.speed(m) for m in gpu_models)) / (n * self.eff(n))

    def predict(self, workload: str | None, gpu_models: Sequence[str]) -> Estimate:
        f = self.factor(gpu_models)
        if workload:
            m = self.measured.get((workload, gpu_set_key(gpu_models)))
            if m is not None and m.samples >= _MEASURED_MIN:
                return Estimate(m.median_s, f, "measured", m.samples)
            if workload in self.base:
                return Estimate(self.base[workload] * f, f, "model",
                                self.workload_samples.get(workload, 0))
        return Estimate(None, f, "prior", 0)
