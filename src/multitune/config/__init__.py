"""Run configuration: YAML -> typed config, overrides, validation with field paths."""

from multitune.config.loader import load_config, parse_config, save_config
from multitune.config.schema import RunConfig, SplitConfig, TaskConfig, TrainingConfig

__all__ = ["RunConfig", "SplitConfig", "TaskConfig", "TrainingConfig", "load_config", "parse_config",
           "save_config"]
