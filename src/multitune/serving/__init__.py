"""HTTP serving of a trained model: every task from one backbone pass per batch (needs ``multitune[serve]``).

The app and the server are imported on first use, so that :mod:`multitune.serving.settings` (which the
``multitune`` command reads for its ``serve`` flags) loads without FastAPI and uvicorn installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ServerSettings", "create_app", "serve", "uvicorn_config"]
_HOMES = {"ServerSettings": "settings", "create_app": "app", "serve": "app", "uvicorn_config": "protocol"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"multitune.serving.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'multitune.serving' has no attribute {name!r}")
