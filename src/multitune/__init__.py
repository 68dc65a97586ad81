"""multitune: one config, many tasks, one shared-backbone model.

Public API::

    import multitune
    config = multitune.load_config("examples/configs/seed-mixture.yaml", ["training.max_steps=100"])
    results = multitune.train(config)
    model = multitune.load(config.output_dir)
    model.predict("sentiment", ["a wonderful film"])

Names are imported on first use, so ``import multitune`` (and the CLI) starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "multitune.errors", "DataError": "multitune.errors", "MultituneError": "multitune.errors",
    "RunConfig": "multitune.config", "load_config": "multitune.config", "parse_config": "multitune.config",
    "MultiTaskModel": "multitune.model", "load": "multitune.model", "Registry": "multitune.registry",
    "SAMPLERS": "multitune.sampling", "TASKS": "multitune.tasks", "Task": "multitune.tasks",
    "WEIGHTINGS": "multitune.weighting", "train": "multitune.training", "Callback": "multitune.training",
    "Run": "multitune.training",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'multitune' has no attribute {name!r}")
