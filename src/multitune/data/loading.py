"""Everything a task's data goes through before tokenisation: read, clean, sample, split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from multitune.config.schema import SplitFractions, TaskDataConfig
from multitune.data.cleaning import clean_examples
from multitune.data.readers import infer_format, read_split_with_labels, source_name
from multitune.data.splits import sample_examples, split_examples
from multitune.errors import ConfigError, DataError


@dataclass
class TaskData:
    """A task's examples per split, with what happened to each split on the way.

    Attributes:
        splits: ``train`` and, when configured or carved out of train, ``validation`` and ``test``
            -> examples (dicts of canonical fields plus ``_file`` and ``_line``).
        report: split -> counts. A split read from a file has the counts of
            :func:`~multitune.data.clean_examples` (``read``, ``empty``, ``duplicates``, ``kept``) plus
            ``sampled`` (after ``max_examples``); when validation/test are carved out of train, train also
            has ``after_split`` and each carved split has ``carved_from_train``.
        label_names: canonical field (``label``, ``tags``) -> its class names in the order of the train
            data's ``ClassLabel`` column (the dataset's id2label), for data read with ``datasets`` features;
            empty otherwise. A task without configured ``labels`` can take its label set from here.
    """

    splits: dict[str, list[dict]]
    report: dict[str, dict[str, int]]
    label_names: dict[str, list[str]] = field(default_factory=dict)


def load_task_data(task_name: str, data: TaskDataConfig, base_dir: Path, seed: int, fields: Sequence[str],
                   required: Sequence[str], stratify_key: str | None = None) -> TaskData:
    """Read, clean, sample and split one task's data.

    Each configured split (train, and validation/test when set) is read and cleaned, then cut to its
    ``max_examples`` with a seeded sample. When validation is not configured, validation (and test, when
    that is not configured either) is carved out of the sampled train data with the ``data.split``
    fractions (default: :class:`~multitune.config.schema.SplitFractions`, validation 0.1 and test 0.1, with or
    without a ``split:`` section), stratified by ``stratify_key`` when given.

    Args:
        task_name: the task's name in the config, for error messages (``tasks.NAME.data.SPLIT``).
        data: the task's data config.
        base_dir: directory that relative data paths resolve against.
        seed: seed of sampling and splitting.
        fields: canonical fields the task reads; ``required``: those every record must have.
        stratify_key: example field to stratify the carved splits by (a classification label), or ``None``.

    Returns:
        The examples of every split, the counts of each step, and the class names of train's ``ClassLabel``
        columns.

    Raises:
        ConfigError: no data or no train split configured, a missing or unreadable file, an unknown format.
        DataError: a bad record (see :func:`~multitune.data.read_split`), a split with no examples left
            after cleaning, or too little train data to carve a validation split out of.
    """
    where = f"tasks.{task_name}.data"
    if data is None or data.train is None:
        raise ConfigError(f"{where}.train" if data is not None else where,
                          "required field is missing (training data)")
    splits: dict[str, list[dict]] = {}
    report: dict[str, dict[str, int]] = {}
    label_names: dict[str, list[str]] = {}
    for split in ("train", "validation", "test"):
        spec = getattr(data, split)
        if spec is None:
            continue
        field_path = f"{where}.{split}"
        read, names = read_split_with_labels(spec, base_dir, split, field_path, fields, required)
        if split == "train":
            label_names = names
        examples, counts = clean_examples(read)
        if not examples:
            file = source_name(spec, infer_format(spec, field_path), split)
            raise DataError(file, f"no examples left after cleaning (read {counts['read']}, empty "
                                  f"{counts['empty']}, duplicates {counts['duplicates']})")
        examples = sample_examples(examples, spec.max_examples, seed)
        counts["sampled"] = len(examples)
        splits[split], report[split] = examples, counts
    if "validation" not in splits:
        carve = data.split if data.split is not None else SplitFractions()  # one set of defaults either way
        fractions = {"validation": carve.validation, "test": carve.test}
        if sum(fractions.values()) >= 1:
            raise ConfigError(f"{where}.split", f"validation + test fractions must leave some training data, "
                                                f"got {fractions}")
        if "test" in splits:  # a configured test file wins over carving one
            fractions["test"] = 0.0
        train = splits["train"]
        if len(train) < 2 and fractions["validation"] > 0:
            raise DataError(source_name(data.train, infer_format(data.train, f"{where}.train"), "train"),
                            f"only {len(train)} training example after cleaning and sampling: too few to "
                            f"carve a validation split out of (set {where}.validation)")
        for name, examples in split_examples(train, fractions, seed, stratify_key).items():
            if name == "train":
                splits["train"] = examples
                report["train"]["after_split"] = len(examples)
            elif examples:
                splits[name] = examples
                report[name] = {"carved_from_train": len(examples)}
    order = [s for s in ("train", "validation", "test") if s in splits]
    return TaskData({s: splits[s] for s in order}, {s: report[s] for s in order}, label_names)
