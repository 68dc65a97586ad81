"""The bad-input corpus: each case drives the CLI with one mistake a user makes and expects one line on stderr
(no traceback) that names the file and line, or the config field, and what was expected; a non-zero exit;
and an output directory that was not created, or is left exactly as it was.

A case builds its inputs in a fresh workspace (tiny files, the tiny random-init BERT of ``conftest``) and
returns the ``multitune`` arguments; ``where`` is the file name with its line (``a.tsv:3``) or the dotted
config field path the message must contain, ``words`` what it must say besides.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from multitune.cli import main
from tests.conftest import write

CLS_BODY = "".join(f"{'pos' if i % 2 else 'neg'}\tsentence number {i}\n" for i in range(12))
CLS_ROWS = "label\tsentence\n" + CLS_BODY
NER_ROWS = "\n".join(f"Anna\tB-PER\nSmith\tI-PER\nsaw\tO\nthing{i}\tO\n" for i in range(6))
NER_JSONL = "".join(f'{{"tokens": ["Anna", "saw", "it{i}"], "tags": ["B-PER", "O", "O"]}}\n' for i in range(6))
REG_ROWS = "".join(f"text {i},pair {i},{i % 5}.0\n" for i in range(12))


class Workspace:
    """Files, configs and argv for one case, in its own directory."""

    def __init__(self, root: Path, backbone: str, trained: Path):
        self.root = root
        self.backbone = backbone
        self.trained = trained  # a finished run directory (shared by the predict/resume cases; never changed)
        self.out = root / "out"

    def file(self, name: str, text: str | bytes) -> str:
        path = self.root / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            write(path, text)
        return str(path)

    def config(self, tasks: dict | None = None, text: str | None = None, **top) -> str:
        """Write a run config (one classification task unless ``tasks`` is given) and return its path."""
        path = self.root / "run.yaml"
        if text is None:
            raw = {"backbone": self.backbone, "output_dir": str(self.out), "seed": 1,
                   "tasks": tasks or {"sentiment": self.cls_task()},
                   "training": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "max_length": 32}}
            text = yaml.safe_dump({**raw, **top}, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return str(path)

    def cls_task(self, train: str = CLS_ROWS, name: str = "train.tsv", **extra) -> dict:
        split = {"path": self.file(name, train), "text": "sentence"}
        split.update(extra.pop("split", {}))
        return {"type": "classification", "data": {"train": split, **extra.pop("data", {})}, **extra}

    def train(self, *sets: str, **config) -> list[str]:
        """``multitune train`` on :meth:`config` with ``--set`` overrides."""
        argv = ["train", self.config(**config), "--no-progress"]
        for s in sets:
            argv += ["--set", s]
        return argv

    def task(self, **task) -> list[str]:
        return self.train(tasks={"t": task})

    def dir(self, name: str) -> str:
        (self.root / name).mkdir()
        return str(self.root / name)

    def backbone_dir(self, files: dict[str, str | bytes]) -> str:
        d = self.root / "model"
        d.mkdir()
        for name, content in files.items():
            self.file(f"model/{name}", content)
        return str(d)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Workspace], list[str]]
    where: str
    words: tuple[str, ...] = ()
    keep_out: bool = False  # the case puts something into the output directory first: it must stay as it was
    marks: tuple = ()  # pytest marks: a known gap (strict xfail: the test fails once it is fixed), a skip


def _data(ws: Workspace, name: str, text: str | bytes, **split) -> dict:
    return {"train": {"path": ws.file(name, text), **split}}


def _reg(ws: Workspace, rows: str, label_range: tuple[float, float] = (0, 5)) -> list[str]:
    return ws.task(type="regression", label_range=list(label_range),
                   data=_data(ws, "s.csv", rows, header=False, columns=["text", "text_pair", "label"]))


def _ner(ws: Workspace, rows: str, name: str = "n.conll", **extra) -> list[str]:
    """A token classification task whose file starts with ``rows`` (then good sentences, enough to split)."""
    good = NER_JSONL if name.endswith(".jsonl") else "\n" + NER_ROWS
    return ws.task(type="token_classification", data=_data(ws, name, rows + good), **extra)


def _out_busy(ws: Workspace) -> None:
    ws.out.mkdir()
    (ws.out / "precious.txt").write_text("keep me")


def _out_of_an_earlier_run(ws: Workspace) -> None:
    """A non-empty directory that multitune wrote, so --overwrite may replace it (once the run passed its checks)."""
    from multitune.rundir import write_marker

    _out_busy(ws)
    write_marker(ws.out, "run")


def _overwrite_late_error(ws: Workspace) -> list[str]:
    _out_of_an_earlier_run(ws)
    task = ws.cls_task(labels=["neg", "pos"], data={"validation": {
        "path": ws.file("val.tsv", "label\tsentence\npos\tfine\nneutral\tmeh\n"), "text": "sentence"}})
    return [*ws.train(tasks={"sentiment": task}), "--overwrite"]


def _stages_late_error(ws: Workspace) -> list[str]:
    """A sequential run whose first stage meets a bad validation label: the busy directory stays as it was."""
    _out_of_an_earlier_run(ws)
    task = ws.cls_task(labels=["neg", "pos"], data={"validation": {
        "path": ws.file("val.tsv", "label\tsentence\npos\tfine\nneutral\tmeh\n"), "text": "sentence"}})
    return [*ws.train(tasks={"sentiment": task}, stages=[{"tasks": ["sentiment"]}]), "--overwrite"]


def _copy_trained(ws: Workspace) -> dict:
    """The finished run copied to ``ws.out`` (its saved config pointing there); returns that config."""
    shutil.copytree(ws.trained, ws.out)
    saved = yaml.safe_load((ws.out / "config.yaml").read_text())
    saved["output_dir"] = str(ws.out)
    (ws.out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return saved


def _resume_other_config(ws: Workspace) -> list[str]:
    saved = _copy_trained(ws)
    saved["training"]["learning_rate"] = 0.5
    return ["train", ws.config(text=yaml.safe_dump(saved)), "--resume", "--no-progress"]


def _resume_pickled_optimizer(ws: Workspace) -> list[str]:
    """A checkpoint whose optimizer.pt holds a pickled object of any class: weights_only refuses it."""
    _copy_trained(ws)
    torch.save({"optimizer": Workspace, "scheduler": {}, "rng": {}}, ws.out / "checkpoints/last/optimizer.pt")
    return ["train", str(ws.out / "config.yaml"), "--resume", "--no-progress"]


def _without(ws: Workspace, model: Path, *names: str) -> str:
    """A copy of a model directory without some of its files."""
    copy = ws.root / "model-copy"
    shutil.copytree(model, copy)
    for name in names:
        (copy / name).unlink(missing_ok=True)
    return str(copy)


def _torn(ws: Workspace, name: str) -> str:
    """A copy of the trained model whose file ``name`` was cut short."""
    copy = Path(_without(ws, ws.trained / "model"))
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2])
    return str(copy)


def _pickle_only_model(ws: Workspace) -> list[str]:
    copy = _without(ws, ws.trained / "model", "backbone/model.safetensors")
    torch.save({"w": torch.zeros(1)}, Path(copy) / "backbone" / "pytorch_model.bin")
    return ["predict", copy, "--task", "sentiment", "x"]


def _unreadable(path: str) -> str:
    os.chmod(path, 0)
    return path


def _ner_labels(ws: Workspace) -> list[str]:
    return _ner(ws, "Anna\tB-PER\nin\tO\nOslo\tB-LOC\n", labels=["O", "B-PER", "I-PER"])


def _alias_bomb(ws: Workspace) -> list[str]:
    """A "billion laughs" in a list value: nine levels of nine aliases, 9**9 strings from about 500 bytes. The
    values themselves are shared, but an error message that shows the whole value would expand them all."""
    levels = ["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    text = ws.config()
    text = Path(text).read_text().replace("training:\n", "training:\n  report_to:\n  - [" + ",\n     ".join(levels)
                                          + "]\n", 1)
    return ["train", ws.file("run.yaml", text), "--no-progress"]


def _huge_config(ws: Workspace) -> list[str]:
    """A 50 MB config (data pasted into it): refused from its size, before it is read."""
    path = ws.root / "run.yaml"
    with path.open("w", encoding="utf-8") as f:
        f.write(Path(ws.config()).read_text())
        line = "# " + "x" * 1022 + "\n"
        f.write(line * (50 * 1024))
    return ["train", str(path), "--no-progress"]


def _tiny_model(ws: Workspace, edit: Callable[[Path], object]) -> str:
    """A copy of the tiny backbone with ``edit`` applied to its directory."""
    copy = ws.root / "tiny-copy"
    shutil.copytree(ws.backbone, copy)
    edit(copy)
    return str(copy)


def _trained_model(ws: Workspace, edit: Callable[[Path], object]) -> list[str]:
    """``predict`` on a copy of the trained model with ``edit`` applied to its directory."""
    copy = Path(_without(ws, ws.trained / "model"))
    edit(copy)
    return ["predict", str(copy), "--task", "sentiment", "x"]


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _meta(edit: Callable[[dict], object]) -> Callable[[Workspace], list[str]]:
    """``predict`` on the trained model whose multitune.json was edited (a hand-edited or truncated file)."""
    return lambda ws: _trained_model(ws, lambda d: _edit_json(d / "multitune.json", edit))


def _custom_model_type(d: Path) -> None:
    """config.json of a model type that only code in the directory defines (auto_map), which is not there."""
    _edit_json(d / "config.json", lambda c: c.update(model_type="wonderbert", auto_map={
        "AutoConfig": "configuration_wonder.WonderConfig", "AutoModel": "modeling_wonder.WonderModel"}))


def _pickle_as_safetensors(d: Path) -> None:
    torch.save({"w": torch.zeros(1)}, d / "model.safetensors")


def _resume_saved_config(ws: Workspace, text: str) -> list[str]:
    """``--resume`` with a good config on a run whose saved config.yaml is ``text``."""
    saved = _copy_trained(ws)
    (ws.out / "config.yaml").write_text(text)
    return ["train", ws.config(text=yaml.safe_dump(saved)), "--resume", "--no-progress"]


def _evaluate_saved_config(ws: Workspace, text: str) -> list[str]:
    _copy_trained(ws)
    (ws.out / "config.yaml").write_text(text)
    return ["evaluate", str(ws.out)]


CASES = [
    # -- the config file ------------------------------------------------------------------------------
    Case("config_missing", lambda ws: ["train", str(ws.root / "nope.yaml")], "nope.yaml", ("not found",)),
    Case("config_is_a_directory", lambda ws: ["train", ws.dir("conf.yaml")], "conf.yaml", ("cannot read the config",)),
    Case("config_not_utf8", lambda ws: ["train", ws.file("bad.yaml", b"tasks: {\xff\xfe}\n")], "bad.yaml",
         ("cannot read the config", "utf-8")),
    Case("yaml_invalid", lambda ws: ws.train(text="tasks:\n  a: {type: classification\n  b: 1\n"), "run.yaml:3",
         ("invalid YAML",)),
    Case("yaml_not_a_mapping", lambda ws: ws.train(text="- tasks\n- training\n"), "run.yaml",
         ("expected a YAML mapping", "list")),
    Case("task_name_used_twice", lambda ws: ws.train(text=(
        "tasks:\n  sentiment: {type: classification}\n  ner: {type: token_classification}\n"
        "  sentiment: {type: regression}\n")), "run.yaml:4", ("'sentiment'", "twice", "line 2")),
    Case("yaml_alias_bomb", _alias_bomb, "run.yaml:", ("aliases stand for more than 100,000 values", "alias *")),
    Case("yaml_recursive_alias", lambda ws: ws.train(text="training: &t {max_steps: 3, again: *t}\n"),
         "run.yaml:1", ("recursive alias",)),
    Case("yaml_nested_1000_deep", lambda ws: ws.train(text="tasks: " + "[" * 1000 + "]" * 1000 + "\n"),
         "run.yaml:1", ("nested more than 100 levels",)),
    Case("yaml_nested_1000_deep_in_blocks", lambda ws: ws.train(text="tasks:\n" + "".join(
        "  " * (i + 1) + f"k{i}:\n" for i in range(1000))), "run.yaml:100", ("nested more than 100 levels",)),
    Case("config_file_of_50_mb", _huge_config, "run.yaml", ("50.0 MB", "at most 1 MB")),
    Case("set_alias_bomb", lambda ws: ws.train("training.report_to=[&a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcde", "bcdef")) + "]"), "--set",
        ("training.report_to", "aliases stand for more than 100,000 values")),
    # -- fields: unknown keys, types, ranges ------------------------------------------------------------
    Case("unknown_top_level_key", lambda ws: ws.train("trainig.max_steps=3"), "trainig",
         ("unknown key", "did you mean 'training'")),
    Case("unknown_training_key", lambda ws: ws.train("training.max_step=3"), "training.max_step",
         ("did you mean 'max_steps'", "valid keys")),
    Case("unknown_task_key", lambda ws: ws.train("tasks.sentiment.lables=[a]"), "tasks.sentiment.lables",
         ("did you mean 'labels'",)),
    Case("wrong_type_integer", lambda ws: ws.train("training.max_steps=ten"), "training.max_steps",
         ("expected an integer", "'ten'")),
    Case("wrong_type_fraction_for_integer", lambda ws: ws.train("training.batch_size=2.5"), "training.batch_size",
         ("expected an integer",)),
    Case("wrong_type_bool", lambda ws: ws.train("normalize_embeddings=maybe"), "normalize_embeddings",
         ("expected true or false",)),
    Case("wrong_type_list", lambda ws: ws.train("tasks.sentiment.labels=pos"), "tasks.sentiment.labels",
         ("expected a list",)),
    Case("learning_rate_negative", lambda ws: ws.train("training.learning_rate=-1e-5"), "training.learning_rate",
         ("must be greater than 0",)),
    Case("learning_rate_zero", lambda ws: ws.train("training.learning_rate=0"), "training.learning_rate",
         ("must be greater than 0", "got 0")),
    Case("learning_rate_nan", lambda ws: ws.train("training.learning_rate=.nan"), "training.learning_rate",
         ("finite number",)),
    Case("max_steps_zero", lambda ws: ws.train("training.max_steps=0"), "training.max_steps",
         ("must be at least 1",)),
    Case("max_bad_steps_zero", lambda ws: ws.train("training.max_bad_steps=0"), "training.max_bad_steps",
         ("must be at least 1",)),
    Case("max_grad_norm_negative", lambda ws: ws.train("training.max_grad_norm=-1"), "training.max_grad_norm",
         ("greater than 0",)),
    Case("unknown_scheduler", lambda ws: ws.train("training.scheduler=cosin"), "training.scheduler",
         ("did you mean 'cosine'", "linear, cosine, constant")),
    Case("unknown_task_type", lambda ws: ws.train("tasks.sentiment.type=clasification"), "tasks.sentiment.type",
         ("did you mean 'classification'", "valid:", "token_classification")),
    Case("unknown_sampler", lambda ws: ws.train("sampling.strategy=temprature"), "sampling.strategy",
         ("did you mean 'temperature'", "round_robin")),
    Case("unknown_loss_weighting", lambda ws: ws.train("loss_weighting.strategy=uncertain"),
         "loss_weighting.strategy", ("did you mean 'uncertainty'", "static")),
    Case("unknown_adapter_method", lambda ws: ws.train("adapters.method=lorra"), "adapters.method",
         ("did you mean 'lora'", "bottleneck")),
    Case("unknown_freeze_shorthand", lambda ws: ws.train("freeze=everything"), "freeze",
         ("expected one of", "backbone")),
    Case("no_tasks", lambda ws: ws.train("tasks={}"), "tasks", ("at least one task",)),
    Case("task_without_data", lambda ws: ws.train("tasks.sentiment.data=null"), "tasks.sentiment.data",
         ("required",)),
    Case("set_without_value", lambda ws: ws.train("training.max_steps"), "--set", ("expected dotted.key=value",)),
    Case("set_into_a_number", lambda ws: ws.train("seed.x=1"), "seed", ("is not a mapping",)),
    Case("early_stopping_unknown_task", lambda ws: ws.train("training.early_stopping.metric=ner/f1"),
         "training.early_stopping.metric", ("task/metric", "sentiment")),
    Case("stage_unknown_task", lambda ws: ws.train("stages=[{tasks: [ner]}]"), "stages[0].tasks",
         ("no task 'ner'",)),
    Case("split_fractions_too_large", lambda ws: ws.train("tasks.sentiment.data.split={validation: 0.5, test: 0.5}"),
         "tasks.sentiment.data.split", ("leave some training data",)),
    Case("max_examples_zero", lambda ws: ws.train("tasks.sentiment.data.train.max_examples=0"),
         "tasks.sentiment.data.train.max_examples", ("greater than 0",)),
    Case("label_range_inverted", lambda ws: _reg(ws, REG_ROWS, label_range=[5, 0]), "tasks.t.label_range",
         ("low < high",)),
    Case("class_weights_wrong_length", lambda ws: ws.train("tasks.sentiment.class_weights=[1, 2, 3]"),
         "tasks.sentiment.class_weights", ("expected 2 weights", "neg, pos")),
    Case("tune_threshold_needs_binary", lambda ws: ws.train(tasks={"sentiment": ws.cls_task(
        CLS_ROWS + "meh\tsentence number 99\nmeh\tsentence number 98\n", tune_threshold=True)}),
        "tasks.sentiment.tune_threshold", ("binary or multi-label", "3 labels")),
    Case("device_cuda_without_cuda", lambda ws: ws.train("training.device=cuda"), "training.device",
         ("no CUDA device",)),
    Case("seed_negative", lambda ws: ws.train(seed=-5), "seed", ("must be at least 0", "-5")),
    Case("seed_too_large", lambda ws: ws.train("seed=1.0e+23"), "seed", ("must be at most 4294967295",)),
    Case("huge_value_in_a_message", lambda ws: ws.train("training.max_steps=[" + ", ".join(["999999"] * 5000) + "]"),
         "training.max_steps", ("expected an integer", "<list of 5000 items>")),
    # -- data files ----------------------------------------------------------------------------------------
    Case("data_file_missing", lambda ws: ws.train(f"tasks.sentiment.data.train.path={ws.root}/gone.tsv"),
         "tasks.sentiment.data.train.path", ("file not found", "gone.tsv")),
    Case("data_path_is_a_directory", lambda ws: ws.train(f"tasks.sentiment.data.train.path={ws.root}"),
         "tasks.sentiment.data.train.path", ("not a file",)),
    Case("unknown_format", lambda ws: ws.train("tasks.sentiment.data.train.format=xlsx"),
         "tasks.sentiment.data.train.format", ("got 'xlsx'", "jsonl")),
    Case("format_not_inferable", lambda ws: ws.task(type="classification", data=_data(ws, "a.dat", "x\n")),
         "tasks.t.data.train.format", ("cannot infer the format", "a.dat")),
    Case("data_file_unreadable", lambda ws: _unreadable(ws.file("a.tsv", CLS_ROWS)) and ws.task(
        type="classification", data={"train": {"path": str(ws.root / "a.tsv"), "text": "sentence"}}),
        "tasks.t.data.train.path", ("not readable", "permission denied"),
        marks=(pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file"),)),
    Case("unknown_encoding", lambda ws: ws.train("tasks.sentiment.data.train.encoding=klingon"),
         "tasks.sentiment.data.train.encoding", ("unknown text encoding",)),
    Case("not_utf8_text", lambda ws: ws.train(tasks={"sentiment": {"type": "classification", "data": _data(
        ws, "a.tsv", "label\ttext\npos\tok\nneg\tna\xefve\n".encode("latin-1"))}}), "a.tsv:3",
        ("not valid utf-8", "encoding")),
    Case("csv_wrong_field_count", lambda ws: ws.task(type="classification", data=_data(
        ws, "a.csv", "text,label\nfine,pos\ntoo,many,fields\n")), "a.csv:3", ("expected 2 fields, found 3",)),
    Case("csv_malformed_row", lambda ws: ws.task(type="classification", data=_data(
        ws, "a.csv", 'text,label\nfine,pos\n"unclosed,neg\nmore,pos\n')), "a.csv:3", ("malformed CSV row",)),
    Case("csv_no_header_no_columns", lambda ws: ws.task(type="regression", data=_data(ws, "s.csv", REG_ROWS,
                                                                                       header=False)),
         "tasks.t.data.train.columns", ("required when header: false",)),
    Case("missing_column", lambda ws: ws.task(type="classification", data=_data(
        ws, "a.tsv", "lbl\ttext\npos\tfine\n")), "a.tsv:2", ("missing column 'label'", "lbl, text")),
    Case("mapped_column_absent", lambda ws: ws.train("tasks.sentiment.data.train.text=review"), "train.tsv:2",
         ("no column 'review'", "label, sentence")),
    Case("jsonl_malformed_line", lambda ws: ws.task(type="classification", data=_data(
        ws, "a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", label: y}\n')),
        "a.jsonl:3", ("invalid JSON", "one JSON object per line")),
    Case("jsonl_not_an_object", lambda ws: ws.task(type="classification", data=_data(
        ws, "a.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n')), "a.jsonl:2", ("expected a JSON object",)),
    Case("jsonl_text_not_a_string", lambda ws: ws.task(type="classification", data=_data(
        ws, "a.jsonl", '{"text": "a", "label": "x"}\n{"text": 42, "label": "y"}\n{"text": "c", "label": "y"}\n')),
        "a.jsonl:2",
        ("text", "expected a string", "42")),
    Case("jsonl_tokens_not_a_list", lambda ws: ws.task(type="token_classification", data=_data(
        ws, "a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": "a b", "tags": ["O", "O", "O"]}\n')),
        "a.jsonl:2", ("tokens", "expected a list of strings")),
    Case("label_not_in_label_set", lambda ws: ws.train("tasks.sentiment.labels=[neg, positive]"), "train.tsv:",
         ("label 'pos' is not in the label set", "neg, positive")),
    Case("label_not_in_label_set_in_validation_file", lambda ws: ws.train(tasks={"sentiment": ws.cls_task(
        data={"validation": {"path": ws.file("val.tsv", "label\tsentence\npos\tfine\nneutral\tmeh\n"),
                             "text": "sentence"}})}), "val.tsv:3", ("label 'neutral' is not in the label set",)),
    Case("empty_label", lambda ws: ws.train(tasks={"sentiment": ws.cls_task(
        "label\tsentence\npos\ta\n\tb\nneg\tc\n\td\n" + CLS_BODY)}), "train.tsv:3",
         ("empty label", "2 rows have no label: lines 3, 5")),
    Case("tsv_read_as_csv", lambda ws: ws.train(tasks={"sentiment": ws.cls_task(
        "label\tsentence\npos\tgood, fun\n" + CLS_BODY, name="train.csv")}), "train.csv:2",
         ("expected 1 fields, found 2", "set format: tsv")),
    Case("empty_texts_leave_no_examples", lambda ws: ws.train(tasks={"sentiment": ws.cls_task(
        "label\tsentence\npos\t \nneg\t\n")}), "train.tsv", ("no examples left after cleaning", "empty 2")),
    Case("empty_validation_split_after_cleaning", lambda ws: ws.train(tasks={"sentiment": ws.cls_task(
        data={"validation": {"path": ws.file("val.tsv", "label\tsentence\npos\t\n"), "text": "sentence"}})}),
        "val.tsv", ("no examples left after cleaning",)),
    Case("target_map_missing_value", lambda ws: ws.train("tasks.sentiment.data.train.target_map={neg: bad}"),
         "train.tsv:", ("not in target_map", "'neg'")),
    # -- regression scores ---------------------------------------------------------------------------------
    Case("score_not_numeric", lambda ws: _reg(ws, "a,b,1.0\nc,d,high\n"), "s.csv:2",
         ("must be a number", "'high'")),
    Case("score_nan", lambda ws: _reg(ws, "a,b,1.0\nc,d,nan\n"), "s.csv:2", ("must be a finite number",)),
    Case("score_infinite", lambda ws: _reg(ws, "a,b,1.0\nc,d,-inf\n"), "s.csv:2", ("must be a finite number",)),
    Case("score_outside_label_range", lambda ws: _reg(ws, "a,b,1.0\nc,d,7.5\n"), "s.csv:2",
         ("outside label_range [0.0, 5.0]",)),
    # -- token classification --------------------------------------------------------------------------------
    Case("conll_line_without_tag", lambda ws: _ner(ws, "Anna\tB-PER\nsaw\n"), "n.conll:2",
         ("expected a token and a tag",)),
    Case("bio_tag_order", lambda ws: _ner(ws, "Anna\tO\nSmith\tI-PER\n"), "n.conll:2",
         ("follows 'O'", "B-PER", "strict_bio")),
    Case("tag_not_bio", lambda ws: _ner(ws, "Anna\tPER\n"), "n.conll:1", ("not BIO",)),
    Case("tag_not_in_declared_labels", _ner_labels, "n.conll:3", ("'B-LOC' is not in the label set",)),
    Case("tokens_and_tags_differ_in_length", lambda ws: _ner(ws, '{"tokens": ["a", "b"], "tags": ["O"]}\n',
                                                           name="n.jsonl"), "n.jsonl:1", ("2 tokens but 1 tags",)),
    # -- parallel text -------------------------------------------------------------------------------------------
    Case("parallel_lengths_differ", lambda ws: ws.task(type="text2text", data={"train": {
        "format": "parallel", "source_path": ws.file("src.txt", "a\nb\nc\n"),
        "target_path": ws.file("tgt.txt", "x\ny\n")}}), "src.txt", ("has 3 lines", "tgt.txt", "has 2")),
    Case("parallel_without_target_path", lambda ws: ws.task(type="text2text", data={"train": {
        "format": "parallel", "source_path": ws.file("src.txt", "a\n")}}), "tasks.t.data.train.target_path",
        ("required for format: parallel",)),
    # -- the backbone -------------------------------------------------------------------------------------------
    Case("backbone_empty_directory", lambda ws: ws.train(backbone=ws.backbone_dir({})), "backbone.name",
         ("not a model directory", "config.json")),
    Case("backbone_is_a_file", lambda ws: ws.train(backbone=ws.file("weights.bin", "x")), "backbone.name",
         ("not a model directory",)),
    Case("backbone_pickled_weights_only", lambda ws: ws.train(backbone=ws.backbone_dir(
        {"config.json": '{"model_type": "bert"}', "pytorch_model.bin": b"\x80\x04N."})), "backbone.name",
        ("no .safetensors weights", "pickled")),
    Case("backbone_config_not_json", lambda ws: ws.train(backbone=ws.backbone_dir(
        {"config.json": "{not json", "model.safetensors": b"x"})), "backbone.name",
        ("cannot read the model config",)),
    Case("backbone_without_tokenizer", lambda ws: ws.train(backbone=_without(ws, Path(ws.backbone), "tokenizer.json",
                                                                           "vocab.txt", "tokenizer_config.json")),
         "backbone.name", ("tokenizer",)),
    Case("backbone_unknown_hub_id", lambda ws: ws.train(backbone="no-such-org/no-such-model"), "backbone.name",
         ("no-such-org/no-such-model", "HF_HUB_OFFLINE=1", "local model directory")),
    Case("backbone_tokenizer_json_garbage", lambda ws: ws.train(backbone=_tiny_model(
        ws, lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": 42}'))), "backbone.name",
        ("tokenizer.json", "not a tokenizer file")),
    Case("backbone_pickle_named_safetensors", lambda ws: ws.train(backbone=_tiny_model(ws, _pickle_as_safetensors)),
         "backbone.name", ("model.safetensors", "pickled data")),
    Case("backbone_auto_map_unknown_model_type", lambda ws: ws.train(backbone=_tiny_model(ws, _custom_model_type)),
         "backbone.name", ("config.json", "'wonderbert'", "auto_map", "trust_remote_code")),
    Case("max_length_over_the_position_embeddings", lambda ws: ws.train("training.max_length=512"),
         "training.max_length", ("must be at most 128", "max_position_embeddings", "got 512")),
    Case("text2text_on_an_encoder", lambda ws: ws.task(type="text2text", data=_data(
        ws, "t.tsv", "source\ttarget\na\tb\nc\td\n")), "tasks.t.type", ("text2text needs a generative backbone",)),
    # -- the run directory -------------------------------------------------------------------------------------
    Case("output_dir_not_empty", lambda ws: _out_busy(ws) or ws.train(), "output_dir", ("is not empty",),
         keep_out=True),
    Case("output_dir_is_a_file", lambda ws: ws.file("out", "x") and ws.train(), "output_dir",
         ("not a directory",), keep_out=True),
    Case("overwrite_then_late_data_error", _overwrite_late_error, "val.tsv:3", ("'neutral'",), keep_out=True),
    Case("stages_overwrite_then_late_data_error", _stages_late_error, "val.tsv:3", ("'neutral'",), keep_out=True),
    Case("resume_with_another_config", _resume_other_config, "training.learning_rate",
         ("--resume with a different config",), keep_out=True),
    Case("resume_from_a_pickled_optimizer", _resume_pickled_optimizer, "optimizer.pt",
         ("cannot load checkpoint", "weights_only"), keep_out=True),
    Case("resume_with_a_corrupt_saved_config", lambda ws: _resume_saved_config(ws, "tasks: [unclosed\n"),
         "config.yaml", ("cannot read",), keep_out=True),
    Case("resume_with_a_saved_config_nested_1000_deep", lambda ws: _resume_saved_config(
        ws, "tasks: " + "[" * 1000 + "]" * 1000 + "\n"), "config.yaml", ("nested more than 100 levels",),
        keep_out=True),
    Case("evaluate_with_a_corrupt_saved_config", lambda ws: _evaluate_saved_config(ws, "tasks: [unclosed\n"),
         "config.yaml:2", ("invalid YAML",), keep_out=True),
    # -- predict, evaluate --------------------------------------------------------------------------------------
    Case("predict_task_the_model_lacks", lambda ws: ["predict", str(ws.trained), "--task", "ner", "x"], "--task",
         ("no task 'ner'", "sentiment")),
    Case("predict_not_a_model_directory", lambda ws: ["predict", ws.dir("empty"), "--task", "sentiment", "x"],
         "empty", ("not a multitune model directory", "multitune.json")),
    Case("predict_pickle_only_model", _pickle_only_model, "model.safetensors", ("not a multitune model directory",)),
    Case("predict_model_without_tokenizer", lambda ws: ["predict", _without(ws, ws.trained / "model",
                                                                            "backbone/tokenizer.json",
                                                                            "backbone/vocab.txt",
                                                                            "backbone/tokenizer_config.json"),
                                                        "--task", "sentiment", "x"], "model", ("tokenizer",)),
    Case("predict_torn_heads_file", lambda ws: ["predict", _torn(ws, "heads.safetensors"), "--task", "sentiment", "x"],
         "heads.safetensors", ("cannot load",)),
    Case("predict_metadata_not_json", lambda ws: _trained_model(
        ws, lambda d: (d / "multitune.json").write_text('{"tasks": {\n')), "multitune.json:2", ("invalid JSON",)),
    Case("predict_metadata_labels_not_a_list", _meta(lambda m: m["tasks"]["sentiment"]["state"].update(labels="neg")),
         "multitune.json: tasks.sentiment.state.labels", ("expected a list of strings", "'neg'")),
    Case("predict_metadata_without_labels", _meta(lambda m: m["tasks"]["sentiment"]["state"].pop("labels")),
         "multitune.json: tasks.sentiment.state.labels", ("required by a classification task",)),
    Case("predict_metadata_without_pooling", _meta(lambda m: m.pop("pooling")), "multitune.json: pooling",
         ("expected one of mean, cls, max, last", "missing")),
    Case("predict_metadata_task_type_not_a_string", _meta(lambda m: m["tasks"]["sentiment"]["config"].update(
        type=["classification"])), "multitune.json: tasks.sentiment.config.type", ("expected a task type",)),
    Case("predict_metadata_max_length_not_an_integer", _meta(lambda m: m.update(max_length="32")),
         "multitune.json: max_length", ("expected a positive integer", "'32'")),
    Case("predict_metadata_max_length_over_the_position_embeddings", _meta(lambda m: m.update(max_length=4096)),
         "multitune.json: max_length", ("must be at most 128", "max_position_embeddings", "got 4096")),
    Case("predict_tokenizer_json_garbage", lambda ws: _trained_model(
        ws, lambda d: (d / "backbone/tokenizer.json").write_text("garbage{{")), "backbone/tokenizer.json",
        ("not a tokenizer file",)),
    Case("predict_pickle_named_safetensors", lambda ws: _trained_model(
        ws, lambda d: _pickle_as_safetensors(d / "backbone")), "backbone/model.safetensors", ("pickled data",)),
    Case("predict_auto_map_unknown_model_type", lambda ws: _trained_model(
        ws, lambda d: _custom_model_type(d / "backbone")), "backbone/config.json",
        ("'wonderbert'", "auto_map", "never runs")),
    Case("predict_input_missing", lambda ws: ["predict", str(ws.trained), "--task", "sentiment", "--input",
                                              str(ws.root / "in.jsonl")], "--input", ("file not found",)),
    Case("predict_input_bad_json_line", lambda ws: ["predict", str(ws.trained), "--task", "sentiment", "--input",
                                                    ws.file("in.jsonl", '{"text": "a"}\n{"text": b}\n')],
         "in.jsonl:2", ("invalid JSON",)),
    Case("predict_without_inputs", lambda ws: ["predict", str(ws.trained), "--task", "sentiment"], "predict",
         ("give texts",)),
    Case("evaluate_test_split_without_test_data", lambda ws: [
        "evaluate", str(ws.trained), "--split", "test", "--set", "tasks.sentiment.data.split.test=0"],
         "no task has test data", ("tasks.<name>.data.test", "tasks.<name>.data.split.test")),
    Case("evaluate_not_a_run_directory", lambda ws: ["evaluate", ws.dir("not-a-run")], "not-a-run",
         ("not a run directory", "config.yaml")),
]


@pytest.fixture(scope="module")
def trained(tiny_backbone, tmp_path_factory) -> Path:
    """A finished two-step run of one classification task (read only by the cases). Its eval_every above
    max_steps is no mistake: it is lowered to max_steps."""
    ws = Workspace(tmp_path_factory.mktemp("trained"), tiny_backbone, Path())
    assert main(ws.train("training.max_steps=2", "training.eval_every=10")) == 0
    return ws.out


def test_eval_every_above_max_steps_is_lowered_not_refused(trained):
    saved = yaml.safe_load((trained / "config.yaml").read_text(encoding="utf-8"))
    assert saved["training"]["max_steps"] == saved["training"]["eval_every"] == 2


def _tree(path: Path) -> dict[str, bytes] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in path.rglob("*")}


def test_corpus_has_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 45


@pytest.mark.parametrize("case", [pytest.param(c, marks=c.marks, id=c.id) for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case: Case, tiny_backbone, trained, tmp_path, capsys):
    ws = Workspace(tmp_path, tiny_backbone, trained)
    argv = case.build(ws)
    before = _tree(ws.out)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    message = lines[0]
    assert message.startswith("multitune: error: "), message
    assert case.where in message, message
    for word in case.words:
        assert word in message, f"{word!r} not in {message!r}"
    assert _tree(ws.out) == before, "the failed run changed its output directory"
    if not case.keep_out:
        assert before is None

