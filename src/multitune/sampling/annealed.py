"""Temperature annealing: the sampling temperature moves from a start to an end value over training.

p(task) ~ n_task^(1/T) as in the ``temperature`` sampler, with T a function of the training step: starting
at T = 1 (examples-proportional) lets the large tasks dominate early, and moving towards a large T (close
to uniform) gives the small tasks more of the later steps. The reverse direction (start high, end at 1)
works as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from multitune.config.parse import field
from multitune.sampling.base import SAMPLERS, SamplerConfig, TaskSampler


@dataclass
class AnnealedConfig(SamplerConfig):
    start_temperature: float = field(1.0, help="T at step 0 (1 is proportional, large T tends to uniform)", gt=0.0)
    end_temperature: float = field(5.0, help="T at the end of the schedule", gt=0.0)
    schedule: str = field("linear", help="how T moves from start to end", choices=("linear", "cosine"))
    steps: int | None = field(None, help="steps over which T moves (default: training.max_steps); T stays at "
                                         "end_temperature after them", gt=0)


@SAMPLERS.register("annealed")
class AnnealedSampler(TaskSampler):
    """p(task) ~ size^(1/T(step)), T going from ``start_temperature`` to ``end_temperature``.

    The training loop tells the sampler the step before every optimizer step (``needs_progress``); until it
    does, T is ``start_temperature``.
    """

    config_class = AnnealedConfig
    needs_progress = True

    def __init__(self, sizes, config, seed):
        super().__init__(sizes, config, seed)
        self.step = 0
        self.total: int | None = config.steps

    def set_progress(self, step: int, total_steps: int) -> None:
        self.step = int(step)
        self.total = self.config.steps or int(total_steps)

    def temperature(self) -> float:
        """T at the current step."""
        start, end = self.config.start_temperature, self.config.end_temperature
        if not self.total:
            return start
        frac = min(max(self.step / self.total, 0.0), 1.0)
        if self.config.schedule == "cosine":
            frac = (1.0 - math.cos(math.pi * frac)) / 2.0
        return start + (end - start) * frac

    def probabilities(self) -> dict[str, float]:
        weights = self.sizes ** (1.0 / self.temperature())
        total = float(weights.sum())
        return {n: float(w) / total for n, w in zip(self.names, weights)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "step": self.step, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.step, self.total = state["step"], state["total"]
