"""The built-in task samplers: proportional, uniform, temperature and round-robin."""

from __future__ import annotations

from dataclasses import dataclass

from multitune.config.parse import field
from multitune.sampling.base import SAMPLERS, SamplerConfig, TaskSampler


def _normalised(names: list[str], weights) -> dict[str, float]:
    total = float(sum(weights))
    return {n: float(w) / total for n, w in zip(names, weights)}


@SAMPLERS.register("proportional")
class ProportionalSampler(TaskSampler):
    """Tasks in proportion to their training-set sizes (examples-proportional mixing, Raffel et al. 2020)."""

    def probabilities(self) -> dict[str, float]:
        return _normalised(self.names, self.sizes)


@SAMPLERS.register("uniform")
class UniformSampler(TaskSampler):
    """Every task equally often, whatever its size."""

    def probabilities(self) -> dict[str, float]:
        return _normalised(self.names, [1.0] * len(self.names))


@dataclass
class TemperatureConfig(SamplerConfig):
    temperature: float = field(2.0, help="T in p ~ n^(1/T): 1 is proportional, large T tends to uniform", gt=0.0)


@SAMPLERS.register("temperature")
class TemperatureSampler(TaskSampler):
    """p(task) proportional to size^(1/T) (Arivazhagan et al. 2019): up-samples small tasks."""

    config_class = TemperatureConfig

    def probabilities(self) -> dict[str, float]:
        return _normalised(self.names, self.sizes ** (1.0 / self.config.temperature))


@SAMPLERS.register("round_robin")
class RoundRobinSampler(TaskSampler):
    """Tasks in a fixed cycle, one batch each."""

    def __init__(self, sizes, config, seed):
        super().__init__(sizes, config, seed)
        self.position = 0

    def probabilities(self) -> dict[str, float]:
        return _normalised(self.names, [1.0] * len(self.names))

    def next_task(self) -> str:
        name = self.names[self.position % len(self.names)]
        self.position += 1
        return name

    def state_dict(self) -> dict:
        return {**super().state_dict(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.position = state["position"]
