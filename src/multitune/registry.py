"""Name -> implementation registries for the extension families (tasks, samplers, weighting)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from multitune.errors import ConfigError, shown

T = TypeVar("T")


class Registry(Generic[T]):
    """A named set of implementations of one extension point.

    Implementations register themselves with ``@REGISTRY.register("name")``; a name used
    twice is an error, so two modules can never silently shadow each other.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str, field: str = "") -> T:
        """Return the implementation called ``name``.

        Raises:
            ConfigError: naming ``field`` and listing the valid names (with a did-you-mean).
        """
        if name not in self._items:
            valid = ", ".join(self.names())
            close = difflib.get_close_matches(name, self.names(), n=1) if isinstance(name, str) and len(name) < 100 \
                else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(field, f"unknown {self.kind} {shown(name)}{hint}; valid: {valid}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
