"""Optimizer parameter groups and learning-rate schedules."""

from multitune.optim.groups import build_param_groups, parameter_table
from multitune.optim.schedules import build_scheduler

__all__ = ["build_param_groups", "build_scheduler", "parameter_table"]
