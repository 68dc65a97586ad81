"""Everything a task's data goes through before tokenisation: read, clean, sample, split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from multitune.config.schema import TaskDataConfig
from multitune.data.cleaning import clean_examples
from multitune.data.readers import read_split
from multitune.data.splits import sample_examples, split_examples
from multitune.errors import DataError


@dataclass
class TaskData:
    """A task's examples per split, with the cleaning counts of each split."""

    splits: dict[str, list[dict]]
    report: dict[str, dict[str, int]]


def load_task_data(task_name: str, data: TaskDataConfig, base_dir: Path, seed: int, fields: Sequence[str],
                   required: Sequence[str], stratify_key: str | None = None) -> TaskData:
    """Read train (and validation/test when configured), clean each split, apply ``max_examples`` and, when
    validation is absent, carve validation (and test) out of train with ``data.split`` fractions
    (default validation 0.1, test 0.1).

    Raises:
        ConfigError, DataError: from the readers, or a split left empty after cleaning.
    """
    splits, report = {}, {}
    for split in ("train", "validation", "test"):
        spec = getattr(data, split)
        if spec is None:
            continue
        path = f"tasks.{task_name}.data.{split}"
        raw = read_split(spec, base_dir, split, path, fields, required)
        kept, counts = clean_examples(raw)
        if not kept:
            file = spec.path or spec.target_path or path
            raise DataError(str(file), f"no examples left after cleaning (read {counts['read']}, empty "
                                       f"{counts['empty']}, duplicates {counts['duplicates']})")
        kept = sample_examples(kept, spec.max_examples, seed)
        counts["sampled"] = len(kept)
        splits[split], report[split] = kept, counts
    if "validation" not in splits:
        frac = data.split
        fractions = {"validation": frac.validation if frac else 0.1,
                     "test": 0.0 if "test" in splits else (frac.test if frac else 0.1)}
        carved = split_examples(splits.pop("train"), fractions, seed, stratify_key)
        for name, examples in carved.items():
            splits[name] = examples
            if name == "train":
                report["train"]["after_split"] = len(examples)
            else:
                report[name] = {"kept": len(examples), "carved_from_train": 1}
    return TaskData(splits, report)
