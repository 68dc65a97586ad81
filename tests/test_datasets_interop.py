"""Hugging Face ``datasets`` as task data: save_to_disk directories, parquet, in-memory Dataset/DatasetDict;
ClassLabel columns read as their names; one-line errors that name the config field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

from multitune.config import load_config, parse_config, save_config
from multitune.data.loading import load_task_data
from multitune.errors import ConfigError, DataError, MultituneError

SENTIMENT = ["positive", "negative"]  # deliberately not alphabetical: the dataset's order must win
NER_TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
CLS_FIELDS = (("text", "text_pair", "label"), ("text", "label"))
NER_FIELDS = (("tokens", "tags"), ("tokens", "tags"))


def sentiment_ds(n: int = 32, offset: int = 0) -> Dataset:
    """``sentence`` + integer ClassLabel ``label`` (0 = positive, 1 = negative)."""
    good, bad = ["great", "lovely", "superb", "brilliant"], ["awful", "boring", "dreadful", "dull"]
    things = ["film", "meal", "book", "show", "song", "trip", "game", "hotel"]
    rows = {"sentence": [], "label": []}
    for i in range(offset, offset + n):
        positive = i % 2 == 0
        word = (good if positive else bad)[(i // 2) % 4]
        rows["sentence"].append(f"the {things[(i // 8) % 8]} was {word}")
        rows["label"].append(0 if positive else 1)
    return Dataset.from_dict(rows, features=Features({"sentence": Value("string"),
                                                      "label": ClassLabel(names=SENTIMENT)}))


def ner_ds(n: int = 24) -> Dataset:
    """conll2003-style ``tokens`` + ``ner_tags`` as a Sequence of ClassLabel integers."""
    names, places = ["Anna", "Boris", "Carla", "Dmitri"], ["Paris", "Oslo", "Lima"]
    tokens, tags = [], []
    for i in range(n):
        tokens.append([names[i % 4], "Smith", "visited", places[i % 3], f"day{i}"])
        tags.append([1, 2, 0, 3, 0])
    feats = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=NER_TAGS))})
    return Dataset.from_dict({"tokens": tokens, "ner_tags": tags}, features=feats)


def task(kind: str, data: dict, **extra) -> dict:
    return {"tasks": {"t": {"type": kind, "data": data, **extra}}}


def load(config, fields=CLS_FIELDS):
    return load_task_data("t", config.tasks["t"].data, Path("/"), 1, *fields)


# --- sources: save_to_disk, parquet, in memory ------------------------------------------------------------

def test_save_to_disk_dataset_reads_tag_names_and_their_order(tmp_path):
    ner_ds().save_to_disk(str(tmp_path / "ner"))
    cfg = parse_config(task("token_classification", {"train": {"path": "ner", "format": "hf",
                                                                "tags": "ner_tags"}}), tmp_path)
    data = load(cfg, NER_FIELDS)
    first = min((ex for rows in data.splits.values() for ex in rows), key=lambda ex: ex["_line"])
    assert first == {"tokens": ["Anna", "Smith", "visited", "Paris", "day0"],
                     "tags": ["B-PER", "I-PER", "O", "B-LOC", "O"], "_file": str(tmp_path / "ner"), "_line": 1}
    assert data.label_names == {"tags": NER_TAGS}
    with pytest.raises(ConfigError, match=r"^tasks\.t\.data\.train\.path: not a file: .*ner \(a save_to_disk "
                                          r"directory or a parquet folder is read with format: hf\)$"):
        parse_config(task("token_classification", {"train": {"path": "ner", "tags": "ner_tags"}}), tmp_path)
    one = parse_config(task("token_classification", {"train": {"path": "ner", "format": "hf", "tags": "ner_tags",
                                                               "split": "train"}}), tmp_path)
    with pytest.raises(ConfigError, match=r"^tasks\.t\.data\.train\.split: .*ner holds one Dataset, not a "
                                          r"DatasetDict, so there is no split to choose; leave split out$"):
        load(one, NER_FIELDS)


def test_dataset_dict_on_disk_gives_the_configured_split(tmp_path):
    DatasetDict({"train": sentiment_ds(), "test": sentiment_ds(8, offset=100)}).save_to_disk(str(tmp_path / "dd"))
    split = {"path": "dd", "format": "hf", "text": "sentence"}
    cfg = parse_config(task("classification", {"train": split, "validation": {**split, "split": "test"}}),
                       tmp_path)
    data = load(cfg)
    assert len(data.splits["train"]) == 32 and len(data.splits["validation"]) == 8
    assert {ex["label"] for ex in data.splits["validation"]} == {"positive", "negative"}
    assert data.label_names == {"label": SENTIMENT}
    with pytest.raises(ConfigError, match=r"^tasks\.t\.data\.train\.subset: only for a Hub dataset; .*dd is "
                                          r"local data$"):
        load(parse_config(task("classification", {"train": {**split, "subset": "default"}}), tmp_path))
    missing = parse_config(task("classification", {"train": split, "validation": split}), tmp_path)
    with pytest.raises(ConfigError, match=r"^tasks\.t\.data\.validation\.path: the DatasetDict in .*dd has no "
                                          r"split 'validation'; its splits: train, test \(set split: to one"):
        load(missing)


def test_parquet_file_keeps_class_names_with_either_format(tmp_path):
    sentiment_ds().to_parquet(str(tmp_path / "s.parquet"))
    for fmt in ("hf", None):  # format: hf, or parquet inferred from the extension
        cfg = parse_config(task("classification", {"train": {"path": "s.parquet", "format": fmt,
                                                             "text": "sentence"}}), tmp_path)
        data = load(cfg)
        rows = sorted(data.splits["train"] + data.splits["validation"] + data.splits["test"],
                      key=lambda ex: ex["_line"])
        assert rows[0] == {"text": "the film was great", "label": "positive", "_file": str(tmp_path / "s.parquet"),
                           "_line": 1}
        assert rows[1]["label"] == "negative" and data.label_names == {"label": SENTIMENT}


def test_parquet_folder_is_split_by_file_names(tmp_path):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    sentiment_ds(16).to_parquet(str(tmp_path / "hub/data/train-00000-of-00001.parquet"))
    sentiment_ds(6, offset=50).to_parquet(str(tmp_path / "hub/data/validation-00000-of-00001.parquet"))
    split = {"path": "hub", "format": "hf", "text": "sentence"}
    data = load(parse_config(task("classification", {"train": split, "validation": split}), tmp_path))
    assert len(data.splits["train"]) == 16 and len(data.splits["validation"]) == 6
    with pytest.raises(ConfigError, match=r"^tasks\.t\.data\.test\.path: the parquet folder .*hub has no split "
                                          r"'test'; its splits: train, validation"):
        load(parse_config(task("classification", {"train": split, "test": split}), tmp_path))
    # a folder whose file names name no split is one split, read in file-name order
    (tmp_path / "plain").mkdir()
    sentiment_ds(4).to_parquet(str(tmp_path / "plain/part-0.parquet"))
    sentiment_ds(4, offset=4).to_parquet(str(tmp_path / "plain/part-1.parquet"))
    plain = {"path": "plain", "format": "hf", "text": "sentence"}
    data = load(parse_config(task("classification", {"train": plain, "validation": plain}), tmp_path))
    assert [ex["_line"] for ex in data.splits["validation"]] == list(range(1, 9))


def test_in_memory_dataset_and_dataset_dict_through_the_python_api():
    train, val = sentiment_ds(), sentiment_ds(8, offset=100)
    cfg = parse_config(task("classification", {"train": train, "validation": {"dataset": val, "text": "sentence"}}))
    with pytest.raises(ConfigError, match=r"^tasks\.t\.data\.train\.text: this task needs a 'text' column and "
                                          r"<Dataset train> has none; map one with text: COLUMN \(columns: "
                                          r"sentence, label\)$"):
        load(cfg)
    renamed = DatasetDict({"train": train.rename_column("sentence", "text"),
                           "validation": val.rename_column("sentence", "text")})
    data = load(parse_config(task("classification", renamed)))
    assert len(data.splits["train"]) == 32 and len(data.splits["validation"]) == 8
    assert data.splits["validation"][0] == {"text": val[0]["sentence"], "label": "positive",
                                            "_file": "<Dataset validation>", "_line": 1}
    alone = load(parse_config(task("classification", renamed["train"])))  # a Dataset alone is the train split
    assert set(alone.splits) == {"train", "validation", "test"} and alone.label_names == {"label": SENTIMENT}


def test_label_order_follows_target_map(tmp_path):
    cfg = parse_config(task("classification", {"train": {"dataset": sentiment_ds(), "text": "sentence",
                                                         "target_map": {"positive": "pos", "negative": "neg"}}}))
    data = load(cfg)
    assert data.label_names == {"label": ["pos", "neg"]}
    assert {ex["label"] for ex in data.splits["train"]} == {"pos", "neg"}


# --- bad input ------------------------------------------------------------------------------------------

def test_a_mapped_column_that_is_not_there_names_the_field(tmp_path):
    ner_ds().save_to_disk(str(tmp_path / "ner"))
    cfg = parse_config(task("token_classification", {"train": {"path": "ner", "format": "hf", "tags": "labels"}}),
                       tmp_path)
    with pytest.raises(ConfigError, match=r"^tasks\.t\.data\.train\.tags: no column 'labels' in .*ner "
                                          r"\(columns: tokens, ner_tags\)$"):
        load(cfg, NER_FIELDS)


def test_integer_tags_without_class_names_name_the_field():
    plain = ner_ds().cast_column("ner_tags", Sequence(Value("int64")))
    cfg = parse_config(task("token_classification", {"train": {"dataset": plain, "tags": "ner_tags"}}))
    with pytest.raises(ConfigError, match=r"^tasks\.t\.data\.train\.tags: column 'ner_tags' of <Dataset train> "
                                          r"holds integer tags without names .*Sequence\(ClassLabel"):
        load(cfg, NER_FIELDS)


def test_missing_label_marker_names_the_row():
    rows = sentiment_ds(6).to_dict()
    rows["label"][2] = -1  # what unlabelled test splits (GLUE) hold
    ds = Dataset.from_dict(rows, features=sentiment_ds(1).features)
    cfg = parse_config(task("classification", {"train": {"dataset": ds, "text": "sentence"}}))
    with pytest.raises(DataError, match=r"^<Dataset train>:3: label: -1 is how a ClassLabel marks a missing label"):
        load(cfg)


def test_bad_python_api_forms_are_one_line_errors(tmp_path):
    dd = DatasetDict({"train": sentiment_ds(4), "unsupervised": sentiment_ds(4)})
    cases = [
        ({"data": dd}, r"^tasks\.t\.data: a DatasetDict given as data needs a train split .* this one has train, "
                       r"unsupervised"),
        ({"data": {"train": dd}}, r"^tasks\.t\.data\.train: expected one split \(a datasets\.Dataset\), got a "
                                  r"DatasetDict with splits train, unsupervised; pick one"),
        ({"data": {"train": sentiment_ds(4).to_iterable_dataset()}},
         r"^tasks\.t\.data\.train: expected a datasets\.Dataset, got an IterableDataset"),
        ({"data": {"train": {"dataset": sentiment_ds(4), "path": "x.csv"}}},
         r"^tasks\.t\.data\.train\.path: not with dataset"),
        ({"data": {"train": {"dataset": [1, 2]}}}, r"^tasks\.t\.data\.train\.dataset: expected a datasets\.Dataset, "
                                                    r"got list$"),
        ({"data": {"train": {"path": "./gone", "format": "hf"}}}, r"^tasks\.t\.data\.train\.path: not found: .*gone "
                                                                  r"\(expected a datasets name"),
    ]
    for section, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_config({"tasks": {"t": {"type": "classification", **section}}}, tmp_path)


def test_saved_config_records_the_dataset_and_cannot_be_trained_from_the_file(tmp_path):
    ds = sentiment_ds()
    cfg = parse_config(task("classification", {"train": {"dataset": ds, "text": "sentence"}}))
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["tasks"]["t"]["data"]["train"]["dataset"]
    assert saved == {"type": "datasets.Dataset", "fingerprint": ds._fingerprint, "rows": 32,
                     "columns": ["sentence", "label"]}
    with pytest.raises(ConfigError, match=r"^tasks\.t\.data\.train\.dataset: the run read an in-memory "
                                          r"datasets\.Dataset here \(32 rows, fingerprint \w+\)"):
        load_config(tmp_path / "config.yaml")


# --- training on ClassLabel integers --------------------------------------------------------------------

def test_training_on_class_label_integers_predicts_names(tiny_backbone, tmp_path):
    import multitune
    from multitune.training import train

    ner_ds().save_to_disk(str(tmp_path / "ner"))
    DatasetDict({"train": ner_ds(8)}).save_to_disk(str(tmp_path / "ner_dd"))
    sentiment = DatasetDict({"train": sentiment_ds(48).rename_column("sentence", "text"),
                             "validation": sentiment_ds(8, offset=200).rename_column("sentence", "text")})

    def config(data):
        return parse_config({
            "backbone": tiny_backbone, "output_dir": str(tmp_path / "run"), "seed": 1,
            "tasks": {"sentiment": {"type": "classification", "data": data},
                      "ner": {"type": "token_classification",
                              "data": {"train": {"path": "ner", "format": "hf", "tags": "ner_tags"},
                                       "test": {"path": "ner_dd", "format": "hf", "tags": "ner_tags",
                                                "split": "train"}}}},
            "sampling": {"strategy": "round_robin"},
            "training": {"max_steps": 6, "batch_size": 8, "eval_every": 6, "learning_rate": 1e-3, "max_length": 32},
        }, tmp_path)

    results = train(config(sentiment), progress=False)
    assert "f1" in results["test"]["ner"] and "accuracy" in results["validation"]["sentiment"]
    model = multitune.load(tmp_path / "run")
    assert sorted(model.tasks["sentiment"].labels) == sorted(SENTIMENT)
    labels = [p["label"] for p in model.predict("sentiment", ["the film was great", "the meal was dull"])]
    assert all(label in SENTIMENT for label in labels)
    assert set(model.tasks["ner"].labels) <= set(NER_TAGS) and "B-PER" in model.tasks["ner"].labels
    tags = model.predict("ner", [{"tokens": ["Anna", "Smith", "visited", "Oslo"]}])[0]["tags"]
    assert len(tags) == 4 and set(tags) <= set(NER_TAGS)

    # resuming with other in-memory data is refused; the run's config.yaml names what it trained on
    other = DatasetDict({"train": sentiment_ds(40).rename_column("sentence", "text"),
                         "validation": sentiment["validation"]})
    with pytest.raises(MultituneError, match=r"--resume with a different config \(differs in: "
                                             r"tasks\.sentiment\.data\.train\.dataset\.fingerprint, "
                                             r"tasks\.sentiment\.data\.train\.dataset\.rows\)"):
        train(config(other), resume=True, progress=False)


def test_docs_examples_run(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    section = text.split("## Hugging Face datasets", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(python|yaml)\n(.*?)```", section, re.S)
    assert [kind for kind, _ in blocks] == ["python", "yaml", "python"]
    monkeypatch.chdir(tmp_path)
    exec(blocks[0][1], {})  # writes data/ner and data/reviews.parquet
    config = parse_config(yaml.safe_load(blocks[1][1]), tmp_path)
    ner = load_task_data("ner", config.tasks["ner"].data, tmp_path, 1, *NER_FIELDS)
    assert ner.splits["test"][0]["tags"] == ["B-PER", "O", "O", "B-LOC"]
    sentiment = load_task_data("sentiment", config.tasks["sentiment"].data, tmp_path, 1, *CLS_FIELDS)
    assert sentiment.label_names == {"label": ["negative", "positive"]}
    scope: dict = {}
    exec(blocks[2][1], scope)
    data = load_task_data("sentiment", scope["config"].tasks["sentiment"].data, tmp_path, 1, *CLS_FIELDS)
    assert [ex["label"] for ex in data.splits["validation"]] == ["positive", "negative"]
