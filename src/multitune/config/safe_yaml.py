"""Read YAML written by a user: the safe loader, with bounds on what a small file may turn into.

YAML aliases let a file of a few hundred bytes stand for gigabytes (a "billion laughs": nine lists of nine
aliases to the list before), and deep nesting exhausts Python's recursion limit. A config is neither, so the
loader refuses both at the line where the bound is crossed, and a file larger than a config ever is is not
read at all. The same loader reads ``--set`` values and a run directory's saved ``config.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from multitune.errors import ConfigError, printable, shown

#: largest config file read (a config names its data files, it does not hold the data)
MAX_CONFIG_BYTES = 1024 * 1024
#: deepest nesting of lists and mappings, counting what aliases bring in
MAX_DEPTH = 100
#: most values (scalars, lists, mappings) that all the aliases of one document may stand for together
MAX_ALIAS_VALUES = 100_000


def _name(anchor: str) -> str:
    text = printable(anchor)
    return text if len(text) <= 40 else text[:40] + "..."


class YamlLimitError(yaml.composer.ComposerError):
    """The document is valid YAML but crosses one of the bounds above."""


class BoundedLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (plain YAML keeps the last one silently, so a
    task defined twice would lose its first definition), nesting deeper than :data:`MAX_DEPTH`, a recursive
    alias, and aliases that together stand for more than :data:`MAX_ALIAS_VALUES` values."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: list[str] = []  # anchors of the nodes being composed (an alias to one is a cycle)
        self._alias_values = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height), for aliased nodes

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise YamlLimitError(None, None, f"alias *{_name(event.anchor)} refers to a value that "
                                                 f"contains it (a recursive alias)", event.start_mark)
            node = super().compose_node(parent, index)
            values, height = self._measure(node)
            self._alias_values += values
            if self._alias_values > MAX_ALIAS_VALUES:
                raise YamlLimitError(None, None, f"aliases stand for more than {MAX_ALIAS_VALUES:,} values in "
                                                 f"all (at alias *{_name(event.anchor)}); a config needs no "
                                                 f"more", event.start_mark)
            if self._depth + height >= MAX_DEPTH:  # the aliased value starts one level below
                raise YamlLimitError(None, None, self._too_deep(), event.start_mark)
            return node
        if self._depth >= MAX_DEPTH:
            raise YamlLimitError(None, None, self._too_deep(), event.start_mark)
        anchor = getattr(event, "anchor", None)
        self._depth += 1
        if anchor is not None:
            self._open_anchors.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open_anchors.pop()

    @staticmethod
    def _too_deep() -> str:
        return f"values are nested more than {MAX_DEPTH} levels deep; a config needs no more"

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        """How many values ``node`` stands for once its aliases are expanded, and how deep it nests. Each node is
        measured once, so this is linear in the size of the file; the recursion is bounded by :data:`MAX_DEPTH`
        (every node composed so far nests at most that deep)."""
        known = self._measured.get(id(node))
        if known is not None:
            return known
        values, height = 1, 0
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            for child in children:
                v, h = self._measure(child)
                values, height = values + v, max(height, h + 1)
        self._measured[id(node)] = (values, height)
        return values, height

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {shown(key)} is given twice in one mapping (first on line {first[key]})",
                        key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML ``text`` with :class:`BoundedLoader`.

    Args:
        text: the document.
        where: the file it came from (or e.g. ``--set``), named in errors with the line.

    Raises:
        ConfigError: invalid YAML, or a bound crossed (nesting, aliases), naming ``where`` and the line.
    """
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except YamlLimitError as exc:
        mark = exc.problem_mark
        raise ConfigError("", f"{where}:{mark.line + 1}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("", f"{at}: invalid YAML: {problem}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a file of at most :data:`MAX_CONFIG_BYTES`.

    Raises:
        ConfigError: the file is missing, unreadable, too large, not UTF-8, not valid YAML (with its line),
            crosses a bound of :class:`BoundedLoader`, or is not a mapping.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(MAX_CONFIG_BYTES + 1)  # a device or a pipe has no size: never read more than this
    except FileNotFoundError:
        raise ConfigError("", f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot read the config: {exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        actual = f"{size / 2**20:.1f} MB" if size > MAX_CONFIG_BYTES else f"more than {MAX_CONFIG_BYTES:,} bytes"
        raise ConfigError("", f"{path}: the config file is {actual}; a config is at most "
                              f"{MAX_CONFIG_BYTES // 2**20} MB (it names data files, it does not hold the data)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: cannot read the config: {exc}") from None
    data = load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data
