"""Load a run config: YAML file -> ``--set`` overrides -> typed, validated :class:`RunConfig`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from multitune.backbones.loading import PACKAGED_BACKBONES
from multitune.config.parse import from_dict, to_dict
from multitune.config.schema import RunConfig
from multitune.errors import ConfigError
from multitune.fileio import write_text_atomic


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping.

    Raises:
        ConfigError: the file is missing, is not valid YAML (with its line) or is not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"{path}: cannot read the config: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("", f"{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; the value is read as YAML (``3``, ``1e-4``, ``[a, b]``, ``true``).

    Raises:
        ConfigError: an override without ``=`` or that descends into a non-mapping.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", f"expected dotted.key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is not a mapping, cannot set {key!r}")
            node = nxt
        node[parts[-1]] = value
    return data


def _typed_section(section: Any, registry: Any, key: str, path: str) -> Any:
    if not isinstance(section, dict):
        raise ConfigError(path, f"expected a mapping, got {section!r}")
    name = section.get(key)
    if name is None:
        raise ConfigError(f"{path}.{key}", f"required field is missing; valid: {', '.join(registry.names())}")
    impl = registry.get(name, f"{path}.{key}")
    return from_dict(impl.config_class, section, path)


def parse_config(data: dict[str, Any], base_dir: str | Path | None = None, check_files: bool = True
                 ) -> RunConfig:
    """Validate plain config data and return the typed config, paths resolved against ``base_dir``.

    Raises:
        ConfigError: naming the field path of the first problem found.
    """
    from multitune.sampling import SAMPLERS
    from multitune.tasks import TASKS
    from multitune.weighting import WEIGHTINGS

    if isinstance(data.get("backbone"), str):  # `backbone: NAME` is short for `backbone: {name: NAME}`
        data = {**data, "backbone": {"name": data["backbone"]}}
    config = from_dict(RunConfig, data)
    if not config.tasks:
        raise ConfigError("tasks", "at least one task is required")
    tasks = {}
    for name, section in config.tasks.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"tasks.{name}", "task names use letters, digits, '_' and '-'")
        task_cfg = _typed_section(section, TASKS, "type", f"tasks.{name}")
        if task_cfg.data is None:
            raise ConfigError(f"tasks.{name}.data", "required field is missing (train / validation / test data)")
        tasks[name] = task_cfg
    config.tasks = tasks
    config.sampling = _typed_section(config.sampling, SAMPLERS, "strategy", "sampling")
    config.loss_weighting = _typed_section(config.loss_weighting, WEIGHTINGS, "strategy", "loss_weighting")
    es = config.training.early_stopping
    if es is not None and es.metric != "mean":
        task, _, metric = es.metric.partition("/")
        if task not in tasks or not metric:
            raise ConfigError("training.early_stopping.metric",
                              f"expected 'mean' or 'task/metric' with a task of this run "
                              f"({', '.join(tasks)}), got {es.metric!r}")
    resolve_paths(config, Path(base_dir) if base_dir else Path.cwd(), check_files)
    return config


def resolve_paths(config: RunConfig, base_dir: Path, check_files: bool) -> None:
    """Make data paths, the output directory and a local backbone path absolute (relative to ``base_dir``)."""

    def absolute(p: str) -> str:
        return str(p if os.path.isabs(p) else (base_dir / p).resolve())

    for name, task in config.tasks.items():
        for split in ("train", "validation", "test"):
            spec = getattr(task.data, split)
            if spec is None or spec.format == "hf":
                continue
            for attr in ("path", "source_path", "target_path"):
                value = getattr(spec, attr)
                if value is None:
                    continue
                setattr(spec, attr, absolute(value))
                if check_files:
                    p = Path(getattr(spec, attr))
                    if not p.exists():
                        raise ConfigError(f"tasks.{name}.data.{split}.{attr}", f"file not found: {p}")
                    if not p.is_file():
                        raise ConfigError(f"tasks.{name}.data.{split}.{attr}", f"not a file: {p}")
    config.output_dir = absolute(config.output_dir)
    for attr in ("name", "encoder", "decoder"):
        value = getattr(config.backbone, attr)
        if value is None or value in PACKAGED_BACKBONES:
            continue
        if value.startswith((".", "/", "~")) or (base_dir / value).exists():
            setattr(config.backbone, attr, absolute(os.path.expanduser(value)))


def load_config(path: str | Path, overrides: list[str] | None = None, base_dir: str | Path | None = None,
                check_files: bool = True) -> RunConfig:
    """Read, override and validate a run config file (see :func:`parse_config`)."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    try:
        return parse_config(data, base_dir, check_files)
    except ConfigError as exc:
        message = exc.args[0][len(exc.path) + 2:] if exc.path else exc.args[0]
        raise ConfigError(exc.path, f"{message} (in {path})") from None


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
