"""Metric-driven re-weighting: tasks that lag get more of the batches, and give them back once they catch up.

The sampler starts from the ``temperature`` shares (p ~ n^(1/T)). After every validation evaluation the
training loop hands it the results (``needs_evaluations``), and for each task it draws from:

- with a ``reference`` (the task's single-task score on its main validation metric): the task *lags* while
  it does worse than the reference, by the relative gap ``(reference - score) / |reference|`` (on the
  higher-is-better scale), and has *caught up* once it reaches it;
- without one: the task *lags* once its main metric has not improved (by more than ``min_delta``) for
  ``patience`` evaluations, and has caught up when it improves again.

A lagging task's weight is multiplied by ``factor ** (gap / largest gap)``: the task that lags its reference
most (and any task that has stopped improving) by ``factor``, one that lags less by less. References are
usually scores reached at the end of single-task training, so early on every task lags; the graded step
then still moves batches towards the tasks that are furthest behind. A raise that does not change the
shares (the task is at ``max_share``, or the others are at ``min_share``) is not made. A task that has
caught up divides its weight by ``factor`` at each evaluation until it is back at its base share. Shares
are the weights normalised and then held within ``[min_share, max_share]``.

Weights are kept as exponents of ``factor`` (the lowest held at 0, the highest at most where the bounds
decide the shares), so the shares are a deterministic function of the evaluations seen, and the whole state
(exponents, best scores, evaluations without improvement, the generator) is in
:meth:`AdaptiveSampler.state_dict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from multitune.config.parse import field
from multitune.errors import ConfigError
from multitune.sampling.base import SAMPLERS, SamplerConfig, TaskSampler

_AT_BOUND = 1e-9


@dataclass
class AdaptiveConfig(SamplerConfig):
    temperature: float = field(2.0, help="base shares p ~ n^(1/T), as the temperature strategy (1 is "
                                         "proportional, large T tends to uniform)", gt=0.0)
    reference: dict[str, float] | None = field(None, help="task -> its single-task score on its main validation "
                                                          "metric (accuracy, f1, pearson, ...: the metric's own "
                                                          "scale); a task that does worse is raised")
    patience: int = field(2, help="a task without a reference is raised once its main metric has not improved "
                                  "for this many evaluations", min=1)
    min_delta: float = field(0.0, help="smallest change of the main metric that counts as an improvement", min=0.0)
    factor: float = field(1.5, help="per evaluation, a lagging task's weight is multiplied by up to this (the "
                                    "task furthest behind its reference by all of it), and a task that has "
                                    "caught up divides it by this", gt=1.0)
    min_share: float = field(0.02, help="no task's share goes below this", min=0.0, max=1.0)
    max_share: float = field(0.8, help="no task's share goes above this", gt=0.0, max=1.0)

    def validate(self, path: str) -> None:
        if self.min_share > self.max_share:
            raise ConfigError(f"{path}.min_share" if path else "min_share",
                              f"must be at most max_share ({self.max_share:g}), got {self.min_share:g}")


def bounded_shares(weights: Sequence[float], low: float, high: float) -> list[float]:
    """``weights`` normalised to shares within ``[low, high]``: the shares ``clip(c * w, low, high)`` with
    the one ``c`` that makes them sum to 1 (found by bisection; deterministic). Bounds that no set of
    shares can meet (``n * low > 1`` or ``n * high < 1``) are relaxed to ``1 / n``."""
    w = np.asarray(weights, dtype=float)
    n = len(w)
    low, high = min(low, 1.0 / n), max(high, 1.0 / n)
    w = w / w.sum()

    def total(c: float) -> float:
        return float(np.clip(c * w, low, high).sum())

    lo, hi = 0.0, high / float(w.min())  # total(lo) = n * low <= 1 <= n * high = total(hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        if total(mid) < 1.0:
            lo = mid
        else:
            hi = mid
    shares = np.clip(hi * w, low, high)
    return [float(s) for s in shares / shares.sum()]


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return all(abs(a[n] - b[n]) <= _AT_BOUND for n in a)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


@SAMPLERS.register("adaptive")
class AdaptiveSampler(TaskSampler):
    """Temperature shares, re-weighted after every validation evaluation towards the tasks that lag their
    single-task reference or have stopped improving (see the module docstring)."""

    config_class = AdaptiveConfig
    needs_evaluations = True

    def __init__(self, sizes, config, seed):
        super().__init__(sizes, config, seed)
        self.base = self.sizes ** (1.0 / config.temperature)
        self.exponents = dict.fromkeys(self.names, 0.0)  # weight = base * factor ** exponent
        self.best: dict[str, float | None] = dict.fromkeys(self.names)  # best score (higher is better)
        self.stale = dict.fromkeys(self.names, 0)  # evaluations since the last improvement
        self.evaluations = 0
        # past this exponent the bounds decide the shares (a raised task at max_share or the others at
        # min_share): raising further would only make the way back longer
        spread = float(self.base.max() / self.base.min()) * config.max_share / max(config.min_share, 1e-6)
        self.cap = float(np.log(spread) / np.log(config.factor))
        self._shares = self._compute()

    @classmethod
    def check_config(cls, config: AdaptiveConfig, tasks: Sequence[str], path: str = "sampling") -> None:
        for name in config.reference or {}:
            if name not in tasks:
                raise ConfigError(f"{path}.reference.{name}", f"unknown task; tasks: {', '.join(tasks)}")
        n = len(tasks)
        if n > 1 and config.min_share * n > 1:
            raise ConfigError(f"{path}.min_share", f"{n} tasks cannot each get {config.min_share:g} of the batches; "
                                                   f"use at most {1 / n:.4g}")
        if n > 1 and config.max_share * n < 1:
            raise ConfigError(f"{path}.max_share", f"{n} tasks cannot share the batches with at most "
                                                   f"{config.max_share:g} each; use at least {1 / n:.4g}")

    def _compute(self, exponents: dict[str, float] | None = None) -> dict[str, float]:
        exponents = self.exponents if exponents is None else exponents
        weights = [b * self.config.factor ** exponents[n] for n, b in zip(self.names, self.base)]
        shares = bounded_shares(weights, self.config.min_share, self.config.max_share)
        return dict(zip(self.names, shares))

    def probabilities(self) -> dict[str, float]:
        return dict(self._shares)

    def observe(self, step, results, tasks):
        self.evaluations += 1
        reference = self.config.reference or {}
        reasons: dict[str, str] = {}
        lagging: dict[str, float | None] = {}  # task -> relative gap to its reference (None: stopped improving)
        caught_up: list[str] = []
        for name in self.names:
            metrics = results.get(name)
            if metrics is None:
                continue
            task = tasks[name]
            score = float(task.selection_score(metrics))
            value = float(metrics[task.main_metric])
            best = self.best[name]
            if best is None or score > best + self.config.min_delta:
                self.best[name], self.stale[name] = score, 0
            else:
                self.stale[name] += 1
            if name in reference:
                target = float(task.selection_score({task.main_metric: reference[name]}))
                lags = score < target
                gap = (target - score) / max(abs(target), 1e-6) if lags else None
                ref = reference[name]  # shown on the metric's own scale (mse lags when above it)
                why = (f"lags reference {_fmt(value)} {'<' if value < ref else '>'} {_fmt(ref)} ({gap:.0%} behind)"
                       if lags else
                       f"caught up with reference {_fmt(value)} {'>=' if value >= ref else '<='} {_fmt(ref)}")
            else:
                lags, gap = self.stale[name] >= self.config.patience, None
                why = (f"no improvement for {self.stale[name]} evaluations ({task.main_metric} {_fmt(value)})"
                       if lags else f"improving again ({task.main_metric} {_fmt(value)})")
            if lags and self._shares[name] < self.config.max_share - _AT_BOUND:
                lagging[name] = gap
                reasons[name] = why
            elif not lags and self.exponents[name] > 0:
                caught_up.append(name)
                reasons[name] = why
        before = dict(self.exponents)
        largest = max((g for g in lagging.values() if g is not None), default=1.0)
        for name, gap in lagging.items():
            self.exponents[name] = min(self.cap, self.exponents[name] + (1.0 if gap is None else gap / largest))
        for name in caught_up:
            self.exponents[name] = max(0.0, self.exponents[name] - 1.0)
        # raises that give no more share (the others are at min_share) are taken back, one by one and then
        # all together: a weight the shares do not show would only delay the way back
        raised = self._compute()
        for name in lagging:
            without = self._compute({**self.exponents, name: before[name]})
            if raised[name] <= without[name] + _AT_BOUND:
                self.exponents[name] = before[name]
                reasons.pop(name)
        if lagging and _same(self._compute(), self._shares):
            for name in lagging:
                self.exponents[name] = before[name]
                reasons.pop(name, None)
        lowest = min(self.exponents.values())  # raising every task alike leaves the shares as they are
        self.exponents = {n: e - lowest for n, e in self.exponents.items()}
        previous, self._shares = self._shares, self._compute()
        if not reasons or _same(previous, self._shares):
            return None
        return {"shares": dict(self._shares), "reasons": reasons}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "exponents": dict(self.exponents), "best": dict(self.best),
                "stale": dict(self.stale), "evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.exponents = dict(state["exponents"])
        self.best = dict(state["best"])
        self.stale = dict(state["stale"])
        self.evaluations = state["evaluations"]
        self._shares = self._compute()
