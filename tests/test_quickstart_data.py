"""The quickstart data generator: formats, sizes, balance, determinism and the held-out vocabulary."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest

from multitune.quickstart import data as qd

TASK_FILES = {"sentiment": "tsv", "ner": "conll", "similarity": "csv"}
BANDS = ((0.0, 0.8), (1.0, 2.4), (2.5, 3.8), (4.2, 5.0))


def read_sentiment(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == ["label", "sentence"]
    assert all(len(row) == 2 for row in rows[1:])
    return [(label, sentence) for label, sentence in rows[1:]]


def read_conll(path: Path) -> list[list[tuple[str, str]]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n\n")
    sentences = []
    for block in text.strip("\n").split("\n\n"):
        pairs = [tuple(line.split("\t")) for line in block.split("\n")]
        assert all(len(p) == 2 and p[0] and p[1] for p in pairs), block
        sentences.append(pairs)
    return sentences


def read_similarity(path: Path) -> list[tuple[str, str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert all(len(row) == 3 for row in rows)
    return [tuple(row) for row in rows]


def sentences_of(task: str, path: Path) -> list[str]:
    if task == "sentiment":
        return [s for _, s in read_sentiment(path)]
    if task == "ner":
        return [" ".join(t for t, _ in pairs) for pairs in read_conll(path)]
    return [s for row in read_similarity(path) for s in row[:2]]


def contains(text: str, phrase: str, flags: int = 0) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text, flags) is not None


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    return qd.write_quickstart_data(tmp_path_factory.mktemp("quickstart"), seed=0)


@pytest.fixture(scope="module")
def corpus(files) -> dict[str, str]:
    """All sentences of each split, across the three tasks, one per line."""
    return {split: "\n".join(s for task in TASK_FILES for s in sentences_of(task, files[task][split]))
            for split in ("train", "validation")}


def test_paths_and_no_leftover_temp_files(files, tmp_path):
    root = files["sentiment"]["train"].parents[1]
    assert set(files) == set(TASK_FILES)
    for task, ext in TASK_FILES.items():
        assert files[task] == {s: root / task / f"{s}.{ext}" for s in ("train", "validation")}
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted(
        f"{s}.{ext}" for ext in TASK_FILES.values() for s in ("train", "validation"))


def test_sentiment_format_counts_and_balance(files):
    for split, (low, high) in {"train": (1400, 1800), "validation": (250, 350)}.items():
        rows = read_sentiment(files["sentiment"][split])
        assert low <= len(rows) <= high
        labels = Counter(label for label, _ in rows)
        assert set(labels) == {"negative", "positive"}
        assert 0.4 <= labels["positive"] / len(rows) <= 0.6
        assert all(5 <= len(s.split()) <= 25 and s[0].isupper() for _, s in rows)
        assert len({s for _, s in rows}) == len(rows)


def test_sentiment_covers_negation_and_contrast(files):
    rows = read_sentiment(files["sentiment"]["train"])
    negated_positive = [s for label, s in rows if label == "positive" and " not " in s]
    contrast = [s for _, s in rows if " but " in s or s.startswith("Although")]
    assert len(negated_positive) > 50 and len(contrast) > 50
    assert any("not worth" in s.lower() for label, s in rows if label == "negative")


def test_ner_format_counts_and_bio(files):
    allowed = {"O"} | {f"{p}-{t}" for p in "BI" for t in ("PER", "LOC", "ORG")}
    for split, (low, high) in {"train": (900, 1100), "validation": (200, 300)}.items():
        sentences = read_conll(files["ner"][split])
        assert low <= len(sentences) <= high
        types, inside, empty = set(), 0, 0
        for pairs in sentences:
            assert 6 <= len(pairs) <= 20
            previous = "O"
            for token, tag in pairs:
                assert tag in allowed
                if tag.startswith("I-"):
                    assert previous[2:] == tag[2:], pairs  # I-X only after B-X or I-X
                    inside += 1
                if tag != "O":
                    types.add(tag[2:])
                    assert re.fullmatch(r"[A-Za-z]+", token), token
                elif token[-1] in ".,?!" and len(token) > 1:
                    assert token in qd.TITLES  # punctuation is its own token
                previous = tag
            empty += all(tag == "O" for _, tag in pairs)
        assert types == {"PER", "LOC", "ORG"}
        assert inside > 0.1 * len(sentences)
        assert 0.05 * len(sentences) <= empty <= 0.3 * len(sentences)


def test_similarity_format_counts_and_bands(files):
    for split, (low, high) in {"train": (900, 1100), "validation": (200, 300)}.items():
        rows = read_similarity(files["similarity"][split])
        assert low <= len(rows) <= high
        assert any("," in s1 or "," in s2 for s1, s2, _ in rows)  # quoted fields round-trip
        band_counts = Counter()
        for s1, s2, score in rows:
            assert s1 and s2 and s1 != s2
            assert re.fullmatch(r"\d\.\d", score)
            value = float(score)
            assert 0.0 <= value <= 5.0
            band = [i for i, (lo, hi) in enumerate(BANDS) if lo <= value <= hi]
            assert band, score
            band_counts[band[0]] += 1
        assert all(0.2 <= band_counts[i] / len(rows) <= 0.3 for i in range(len(BANDS)))


def test_deterministic_for_a_seed(files, tmp_path):
    again = qd.write_quickstart_data(tmp_path / "again", seed=0)
    other = qd.write_quickstart_data(tmp_path / "other", seed=1)
    for task in TASK_FILES:
        for split in ("train", "validation"):
            assert again[task][split].read_bytes() == files[task][split].read_bytes()
            assert other[task][split].read_bytes() != files[task][split].read_bytes()


def test_rewriting_replaces_files(tmp_path):
    first = qd.write_quickstart_data(tmp_path, seed=1)
    before = first["ner"]["train"].read_bytes()
    second = qd.write_quickstart_data(tmp_path, seed=0)
    assert second == first
    assert second["ner"]["train"].read_bytes() != before


def test_no_validation_sentence_in_train(files):
    for task in TASK_FILES:
        train = set(sentences_of(task, files[task]["train"]))
        assert not train & set(sentences_of(task, files[task]["validation"])), task


def test_split_vocabulary_holds_out_every_fourth_entry():
    kept, held = qd.split_vocabulary(list("abcdefgh"))
    assert kept == tuple("abcefg") and held == ("d", "h")


@pytest.mark.parametrize("name", ["FIRST_NAMES", "SURNAMES", "PLACES", "ORGANISATIONS"])
def test_held_out_entities_appear_only_in_validation(corpus, name):
    _, held = qd.split_vocabulary(getattr(qd, name))
    seen = [entry for entry in held if contains(corpus["validation"], entry)]
    assert len(seen) >= len(held) // 2, f"too few held-out {name} in validation: {seen}"
    assert [entry for entry in held if contains(corpus["train"], entry)] == []


def test_held_out_sentiment_words_and_topics_appear_only_in_validation(files):
    train = "\n".join(sentences_of("sentiment", files["sentiment"]["train"]))
    validation = "\n".join(sentences_of("sentiment", files["sentiment"]["validation"]))
    lists = {"POSITIVE_WORDS": qd.POSITIVE_WORDS, "NEGATIVE_WORDS": qd.NEGATIVE_WORDS,
             "POSITIVE_PHRASES": qd.POSITIVE_PHRASES, "NEGATIVE_PHRASES": qd.NEGATIVE_PHRASES,
             "REVIEW_TOPICS": [topic for topic, _ in qd.REVIEW_TOPICS]}
    for name, entries in lists.items():
        _, held = qd.split_vocabulary(entries)
        assert any(contains(validation, e, re.IGNORECASE) for e in held), name
        assert [e for e in held if contains(train, e, re.IGNORECASE)] == [], name


def test_held_out_similarity_topics_appear_only_in_validation(files):
    def pattern(template: str) -> re.Pattern:
        return re.compile(re.escape(template).replace(r"\{p\}", ".+").replace(r"\{l\}", ".+").replace(r"\{d\}", ".+"))

    _, held = qd.split_vocabulary(qd.SIMILARITY_TOPICS)
    patterns = [pattern(t) for topic in held for event in topic for t in event]
    for split, expect in (("train", False), ("validation", True)):
        sentences = sentences_of("similarity", files["similarity"][split])
        assert any(p.fullmatch(s) for p in patterns for s in sentences) is expect, split


def test_word_lists_are_rich_and_disjoint():
    minimum = {"FIRST_NAMES": 80, "SURNAMES": 60, "PLACES": 60, "ORGANISATIONS": 40, "POSITIVE_WORDS": 40,
               "NEGATIVE_WORDS": 40, "REVIEW_TOPICS": 30, "SIMILARITY_TOPICS": 30}
    for name, size in minimum.items():
        entries = getattr(qd, name)
        assert len(entries) >= size and len(set(entries)) == len(entries), name
    entity_tokens = [set(" ".join(getattr(qd, n)).split()) for n in ("FIRST_NAMES", "SURNAMES", "PLACES")]
    assert not (entity_tokens[0] & entity_tokens[1] or entity_tokens[0] & entity_tokens[2]
                or entity_tokens[1] & entity_tokens[2])
    assert not set(qd.POSITIVE_WORDS) & set(qd.NEGATIVE_WORDS)
    assert all(len(event) >= 2 for topic in qd.SIMILARITY_TOPICS for event in topic)  # paraphrases exist
