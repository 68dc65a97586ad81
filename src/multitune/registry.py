"""Name -> implementation registries for the extension families (tasks, samplers, weighting, adapters).

A registry sits in the lowest layer, its implementations in the layers above: each implementation registers
itself when its module is imported. A lower layer that must look implementations up by name (the config
loader types a ``tasks.NAME`` section by its task type's config class; :func:`multitune.model.load` reads the
model formats that :mod:`multitune.onnx` registers) names the modules that register them, as plugins are
named by entry points, and the registry imports them on its first lookup. The lower layer depends on the
:class:`Registry` interface only, never on the code of the implementations.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from multitune.errors import ConfigError, shown

T = TypeVar("T")

#: The extension families that a run config names (``type:``, ``strategy:``, ``method:``), each as the entry
#: point ``package:REGISTRY`` whose import registers the family's built-in implementations in ``REGISTRY``.
FAMILIES = {
    "tasks": "multitune.tasks:TASKS",
    "sampling": "multitune.sampling:SAMPLERS",
    "weighting": "multitune.weighting:WEIGHTINGS",
    "adapters": "multitune.adapters:METHODS",
}


class Registry(Generic[T]):
    """A named set of implementations of one extension point.

    Implementations register themselves with ``@REGISTRY.register("name")``; a name used
    twice is an error, so two modules can never silently shadow each other.

    Args:
        kind: what an implementation is, for errors (``"task type"``).
        plugins: modules that register implementations here when imported (plugin loading, see the module
            docstring); they are imported on the first lookup (:meth:`get`, :meth:`names`, ``in``), so a
            registry defined in a lower layer is complete without that layer importing the ones above it.
    """

    def __init__(self, kind: str, plugins: Sequence[str] = ()):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._plugins = list(plugins)

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
        self._load_plugins()
        if name not in self._items:
            valid = ", ".join(self.names())
            close = difflib.get_close_matches(name, self.names(), n=1) if isinstance(name, str) and len(name) < 100 \
                else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(field, f"unknown {self.kind} {shown(name)}{hint}; valid: {valid}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._items

    def _load_plugins(self) -> None:
        for module in list(self._plugins):
            importlib.import_module(module)  # a plugin that fails to import is tried again at the next lookup
            if module in self._plugins:  # (a plugin that looks this registry up while importing removed it)
                self._plugins.remove(module)


def family(name: str) -> Registry[Any]:
    """The registry of an extension family, with the family's built-in implementations registered.

    The family's package is imported by the name :data:`FAMILIES` gives (plugin loading, see the module
    docstring): importing it runs the ``@REGISTRY.register`` decorators of its modules. This is how the
    config layer looks up task types, samplers, loss weightings and adapter methods, which sit above it.

    Args:
        name: a family: ``tasks``, ``sampling``, ``weighting`` or ``adapters``.

    Returns:
        The family's registry (``TASKS``, ``SAMPLERS``, ``WEIGHTINGS``, ``METHODS``).

    Raises:
        KeyError: ``name`` is not a family.
    """
    module, _, attribute = FAMILIES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
