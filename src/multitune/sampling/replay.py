"""Experience replay for sequential training: a share of batches from the tasks of earlier stages."""

from __future__ import annotations

import numpy as np

from multitune.sampling.base import TaskSampler


class ReplaySampler:
    """With probability ``replay`` the batch comes from an earlier stage's task (chosen by ``previous``),
    else from a current task (chosen by ``current``). A simple mitigation of catastrophic forgetting
    (e.g. de Masson d'Autume et al. 2019; Rolnick et al. 2019).

    Args:
        current: sampler over the stage's own tasks.
        previous: sampler over the tasks of earlier stages.
        replay: share of replayed batches, in [0, 1).
        seed: seed of the generator that picks between the two.
    """

    def __init__(self, current: TaskSampler, previous: TaskSampler, replay: float, seed: int):
        self.current, self.previous, self.replay = current, previous, replay
        self.rng = np.random.default_rng(seed)

    def probabilities(self) -> dict[str, float]:
        out = {n: (1 - self.replay) * p for n, p in self.current.probabilities().items()}
        for n, p in self.previous.probabilities().items():
            out[n] = out.get(n, 0.0) + self.replay * p
        return out

    def next_task(self) -> str:
        source = self.previous if self.rng.random() < self.replay else self.current
        return source.next_task()

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "current": self.current.state_dict(),
                "previous": self.previous.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.current.load_state_dict(state["current"])
        self.previous.load_state_dict(state["previous"])
