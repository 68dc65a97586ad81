"""Training: one loop (:mod:`~multitune.training.loop`) with callbacks, single runs and plans of runs."""

from multitune.training.callbacks import Callback
from multitune.training.plan import train
from multitune.training.run import Run, StagePlan

__all__ = ["Callback", "Run", "StagePlan", "train"]
