"""Cleaning counts, seeded sampling, stratified splits and the whole load_task_data path."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from multitune.config.schema import SplitConfig, SplitFractions, TaskDataConfig
from multitune.data import TaskData, clean_examples, load_task_data, sample_examples, split_examples
from multitune.errors import ConfigError, DataError

CLS = (("text", "text_pair", "label"), ("text", "label"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def labelled(n: int, share_a: float = 0.7) -> list[dict]:
    return [{"text": f"example {i}", "label": "a" if i < n * share_a else "b", "_line": i + 1} for i in range(n)]


# --- cleaning ------------------------------------------------------------------------------------------

def test_cleaning_normalises_whitespace_and_counts_what_it_drops():
    examples = [
        {"text": "  hello \t  world \r\n", "text_pair": " x  y ", "label": 1, "_line": 1},
        {"text": "hello world", "text_pair": "x y", "label": 1, "_line": 2},   # duplicate after cleaning
        {"text": "hello world", "text_pair": "x y", "label": 0, "_line": 3},   # other label: kept
        {"text": " \n ", "label": 1, "_line": 4},                              # empty text
        {"text": None, "label": 1, "_line": 5},                                # null text
        {"text": "ok", "text_pair": "  ", "label": 1, "_line": 6},             # blank pair: still kept
    ]
    kept, counts = clean_examples(examples)
    assert counts == {"read": 6, "empty": 2, "duplicates": 1, "kept": 3}
    assert [ex["_line"] for ex in kept] == [1, 3, 6]
    assert kept[0]["text"] == "hello world" and kept[0]["text_pair"] == "x y"
    assert kept[2]["text_pair"] == ""
    assert examples[0]["text"] == "  hello \t  world \r\n"  # the input is not modified


def test_cleaning_tokens_drops_empty_tokens_with_their_tags():
    examples = [
        # a zero-width space is not whitespace, so that token stays
        {"tokens": [" New  York ", "\u200b ", "is", " "], "tags": ["B-LOC", "O", "O", "O"], "_line": 1},
        {"tokens": [" ", ""], "tags": ["O", "O"], "_line": 4},                 # nothing left: empty
        {"tokens": ["New York", "\u200b", "is"], "tags": ["B-LOC", "O", "O"], "_line": 9},  # duplicate
        {"tokens": ["a", " "], "tags": ["O"], "_line": 12},                    # length mismatch: left for the task
    ]
    kept, counts = clean_examples(examples)
    assert counts == {"read": 4, "empty": 1, "duplicates": 1, "kept": 2}
    assert kept[0]["tokens"] == ["New York", "\u200b", "is"] and kept[0]["tags"] == ["B-LOC", "O", "O"]
    assert kept[1]["tokens"] == ["a", ""] and kept[1]["tags"] == ["O"]


def test_cleaning_source_target_and_unhashable_labels():
    examples = [{"source": " a ", "target": "b", "_line": 1}, {"source": "a", "target": "", "_line": 2},
                {"text": "t", "label": ["x", "y"], "_line": 3}, {"text": "t", "label": ["x", "y"], "_line": 4}]
    kept, counts = clean_examples(examples)
    assert [ex["_line"] for ex in kept] == [1, 3]
    assert counts == {"read": 4, "empty": 1, "duplicates": 1, "kept": 2}


# --- sampling ------------------------------------------------------------------------------------------

def test_sampling_is_seeded_keeps_order_and_leaves_global_state_alone():
    examples = labelled(100)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = sample_examples(examples, 10, seed=3)
    assert np.array_equal(np.random.get_state()[1], before)
    assert first == sample_examples(examples, 10, seed=3)
    assert first != sample_examples(examples, 10, seed=4)
    lines = [ex["_line"] for ex in first]
    assert len(lines) == 10 and lines == sorted(lines) and len(set(lines)) == 10


def test_sampling_without_a_limit_or_with_a_large_one_keeps_everything():
    examples = labelled(5)
    assert sample_examples(examples, None, 0) == examples
    assert sample_examples(examples, 50, 0) == examples
    assert sample_examples(examples, 0, 0) == []


# --- splitting -----------------------------------------------------------------------------------------

def test_stratified_split_keeps_class_proportions():
    examples = labelled(1000, share_a=0.7)
    parts = split_examples(examples, {"validation": 0.1, "test": 0.2}, seed=0, stratify_key="label")
    assert list(parts) == ["train", "validation", "test"]
    assert [len(parts[s]) for s in parts] == [700, 100, 200]
    for name, size in (("train", 700), ("validation", 100), ("test", 200)):
        share = Counter(ex["label"] for ex in parts[name])["a"] / size
        assert abs(share - 0.7) <= 2 / size, name
    lines = [ex["_line"] for part in parts.values() for ex in part]
    assert sorted(lines) == list(range(1, 1001))  # a partition
    assert all([ex["_line"] for ex in p] == sorted(ex["_line"] for ex in p) for p in parts.values())


def test_stratified_split_of_a_rare_class():
    examples = labelled(200, share_a=0.95)  # 10 examples of "b"
    for seed in range(5):
        val = split_examples(examples, {"validation": 0.1}, seed, "label")["validation"]
        assert Counter(ex["label"] for ex in val)["b"] == 1


def test_split_is_deterministic_for_a_seed():
    examples = labelled(300)
    for key in ("label", None):
        a = split_examples(examples, {"validation": 0.1, "test": 0.1}, 7, key)
        assert a == split_examples(examples, {"validation": 0.1, "test": 0.1}, 7, key)
        assert a != split_examples(examples, {"validation": 0.1, "test": 0.1}, 8, key)


def test_singleton_class_falls_back_to_a_plain_shuffle():
    examples = labelled(50, share_a=0.98)  # one "b"
    parts = split_examples(examples, {"validation": 0.2}, 0, "label")
    assert [len(parts["train"]), len(parts["validation"])] == [40, 10]


def test_small_data_gives_every_held_out_split_an_example_but_keeps_train():
    parts = split_examples(labelled(3), {"validation": 0.1, "test": 0.1}, 0, None)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [1, 1, 1]
    parts = split_examples(labelled(2), {"validation": 0.1, "test": 0.1}, 0, None)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [1, 1, 0]
    assert list(split_examples(labelled(10), {"validation": 0.2, "test": 0.0}, 0, None)) == ["train", "validation"]
    with pytest.raises(ValueError, match="leave some training data"):
        split_examples(labelled(10), {"validation": 0.5, "test": 0.5}, 0, None)


# --- load_task_data ------------------------------------------------------------------------------------

def sentiment_file(path: Path, n: int = 100) -> Path:
    lines = ["label\ttext"] + [f"{'a' if i % 3 else 'b'}\t  example   number {i} " for i in range(n)]
    lines += ["a\texample number 1", "b\t   "]  # a duplicate after cleaning, and an empty text
    return write(path, "\n".join(lines) + "\n")


def test_load_task_data_cleans_samples_and_carves_stratified_splits(tmp_path):
    sentiment_file(tmp_path / "train.tsv")
    data = TaskDataConfig(train=SplitConfig(path="train.tsv", max_examples=90))
    td = load_task_data("t", data, tmp_path, 0, *CLS, stratify_key="label")
    assert isinstance(td, TaskData) and list(td.splits) == ["train", "validation", "test"]
    assert td.report["train"] == {"read": 102, "empty": 1, "duplicates": 1, "kept": 100, "sampled": 90,
                                  "after_split": 72}
    assert td.report["validation"] == {"carved_from_train": 9} and td.report["test"] == {"carved_from_train": 9}
    assert sum(ex["label"] == "b" for ex in td.splits["validation"]) in (2, 3, 4)  # a third are "b"
    first = td.splits["train"][0]
    assert first["text"].startswith("example number") and first["_file"] == "train.tsv"
    assert load_task_data("t", data, tmp_path, 0, *CLS, stratify_key="label") == td
    assert load_task_data("t", data, tmp_path, 1, *CLS, stratify_key="label") != td


def test_load_task_data_uses_configured_splits_and_fractions(tmp_path):
    sentiment_file(tmp_path / "train.tsv")
    write(tmp_path / "test.tsv", "label\ttext\na\tx\nb\ty\n")
    data = TaskDataConfig(train=SplitConfig(path="train.tsv"), test=SplitConfig(path="test.tsv"),
                          split=SplitFractions(validation=0.2, test=0.3))
    td = load_task_data("t", data, tmp_path, 0, *CLS)
    assert [len(td.splits[s]) for s in ("train", "validation", "test")] == [80, 20, 2]  # test from its file
    assert td.report["test"]["sampled"] == 2
    write(tmp_path / "dev.tsv", "label\ttext\na\tx\n")
    data = TaskDataConfig(train=SplitConfig(path="train.tsv"), validation=SplitConfig(path="dev.tsv"))
    td = load_task_data("t", data, tmp_path, 0, *CLS)
    assert list(td.splits) == ["train", "validation"] and len(td.splits["train"]) == 100


def test_load_task_data_empty_split_after_cleaning(tmp_path):
    write(tmp_path / "e.tsv", "label\ttext\na\t \nb\t\n")
    with pytest.raises(DataError, match=r"^e.tsv: no examples left after cleaning \(read 2, empty 2, "
                                        r"duplicates 0\)$"):
        load_task_data("t", TaskDataConfig(train=SplitConfig(path="e.tsv")), tmp_path, 0, *CLS)


def test_load_task_data_errors_name_the_split(tmp_path):
    sentiment_file(tmp_path / "train.tsv")
    data = TaskDataConfig(train=SplitConfig(path="train.tsv"), validation=SplitConfig(path="dev.tsv"))
    with pytest.raises(ConfigError, match=r"^tasks.sst.data.validation.path: file not found"):
        load_task_data("sst", data, tmp_path, 0, *CLS)
    with pytest.raises(ConfigError, match=r"^tasks.sst.data.train: required"):
        load_task_data("sst", TaskDataConfig(), tmp_path, 0, *CLS)
    write(tmp_path / "one.tsv", "label\ttext\na\tx\n")
    with pytest.raises(DataError, match=r"^one.tsv: only 1 training example .*\(set tasks.sst.data.validation\)$"):
        load_task_data("sst", TaskDataConfig(train=SplitConfig(path="one.tsv")), tmp_path, 0, *CLS)
