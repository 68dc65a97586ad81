"""Everything a task's data goes through before tokenisation: read, clean, sample, split."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from multitune.config.schema import SplitFractions, TaskDataConfig
from multitune.data.cleaning import clean_examples
from multitune.data.examples import SPLIT_BY_KEY, read_split_with_labels
from multitune.data.readers import infer_format, source_name
from multitune.data.splits import sample_examples, split_examples
from multitune.errors import ConfigError, DataError

logger = logging.getLogger("multitune.data")


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
                   required: Sequence[str], stratify_key: str | None = None,
                   task_names: Sequence[str] | None = None) -> TaskData:
    """Read, clean, sample and split one task's data.

    Each configured split (train, and validation/test when set) is read and cleaned (a split with
    ``split_by`` keeps only the rows whose value in that column is ``task_name``), then cut to its
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
        task_names: the names of all the run's tasks: a split with ``split_by`` warns about values that name none
            of them (None: no such check).

    Returns:
        The examples of every split, the counts of each step, and the class names of train's ``ClassLabel``
        columns.

    Raises:
        ConfigError: no data or no train split configured, a missing or unreadable file, an unknown format.
        DataError: a bad record (see :func:`~multitune.data.read_split`), a split with no examples left
            after cleaning or none of whose rows is the task's (``split_by``), or too little train data to
            carve a validation split out of.
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
        if spec.split_by:
            read = rows_of_task(read, task_name, spec.split_by, f"{field_path}.split_by", task_names)
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


def rows_of_task(examples: Sequence[dict], task_name: str, column: str, field_path: str,
                 task_names: Sequence[str] | None = None) -> list[dict]:
    """The examples of one task in a file of several: those whose ``split_by`` value is ``task_name``.

    Values are compared as text (surrounding spaces ignored). Rows whose value names no task of the run are
    skipped with a warning that lists those values, so that a file may hold tasks a run leaves out and a
    misspelt task name is still seen.

    Args:
        examples: examples read with ``split_by`` set (their value under ``SPLIT_BY_KEY``).
        task_name: the task whose rows are kept.
        column: the ``split_by`` column, for messages.
        field_path: config path of the ``split_by`` field, for messages.
        task_names: all the run's task names (None: no warning about unknown values).

    Returns:
        The kept examples, without their ``SPLIT_BY_KEY`` entry.

    Raises:
        DataError: no row has the task's name (naming the values the column holds).
    """
    kept: list[dict] = []
    counts: Counter[str] = Counter()
    for ex in examples:
        value = ex.get(SPLIT_BY_KEY)
        name = "" if value is None else str(value).strip()
        counts[name] += 1
        if name == task_name:
            kept.append({k: v for k, v in ex.items() if k != SPLIT_BY_KEY})
    found = ", ".join(f"{v!r} ({_rows(n)})" for v, n in counts.most_common(10))
    if not kept:
        file = str(examples[0].get("_file", "<input>")) if examples else "<input>"
        raise DataError(file, f"no row has {task_name!r} in column {column!r} ({field_path}); its values: "
                              f"{found or 'none'}")
    if task_names is not None:
        unknown = [(v, n) for v, n in counts.most_common() if v not in task_names]
        if unknown:
            rows = sum(n for _, n in unknown)
            shown = ", ".join(f"{v!r} ({_rows(n)})" for v, n in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            logger.warning("multitune: warning: %s: %s of %s name%s no task of this run in column %r, so no "
                           "task trains on %s: %s%s", field_path, _rows(rows),
                           examples[0].get("_file", "<input>"), "s" if rows == 1 else "", column,
                           "them" if rows > 1 else "it", shown, more)
    return kept


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"
