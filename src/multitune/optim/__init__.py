"""Optimizer parameter groups, layer-wise learning rates, freezing and learning-rate schedules."""

from multitune.optim.freezing import GradualUnfreezer, apply_freezing
from multitune.optim.groups import build_optimizer, build_param_groups, layer_learning_rate, parameter_table
from multitune.optim.layers import parameter_depths
from multitune.optim.schedules import build_scheduler

__all__ = ["GradualUnfreezer", "apply_freezing", "build_optimizer", "build_param_groups", "build_scheduler", "layer_learning_rate",
           "parameter_depths", "parameter_table"]
