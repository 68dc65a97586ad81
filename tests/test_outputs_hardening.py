"""What a run and the CLI put out stays usable whatever the data: a task with thousands of labels gets bounded
plots and tables, a plot that fails is one warning line, a NaN score is an error naming its input (never
``NaN`` in JSON), labels with terminal escape sequences reach no terminal raw, and counts on the command line
are checked by argparse."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from multitune.cli import json_text, main, positive_int
from multitune.evaluation.confusion import MAX_SHOWN_LABELS, OTHER, bounded_confusion, plot_confusion_matrix
from multitune.evaluation.plots import plot_label, plot_learning_curves
from multitune.fileio import finite_json, write_json_atomic
from multitune.inference import NonFiniteError, check_finite, non_finite_fields
from multitune.reporting import write_report
from tests.conftest import write

N_LABELS = 2000
ESC_LABEL = "red\x1b[31mlabel"
MATH_LABEL = "cost $x^$ unbalanced"


def _label(i: int) -> str:
    return {0: ESC_LABEL, 1: MATH_LABEL}.get(i, f"class{i:04d}")


@pytest.fixture(scope="module")
def many_labels_run(tmp_path_factory, tiny_backbone) -> tuple[Path, str]:
    """A real run of a classification task with 2,000 labels on tiny data (one training text per label; the
    validation labels skewed, so a few are frequent), trained through the CLI. Returns the run directory and
    everything the command printed."""
    base = tmp_path_factory.mktemp("many-labels")
    train_rows = ["label\tsentence"] + [f"{_label(i)}\tword{i} item{i % 7}" for i in range(N_LABELS)]
    val_rows = ["label\tsentence"] + [f"{_label(int(40 * (k / 300) ** 3))}\tword{k} item{k % 5}"
                                      for k in range(300)]
    config = {
        "backbone": tiny_backbone, "output_dir": str(base / "run"), "seed": 1,
        "tasks": {"topic": {"type": "classification", "data": {
            "train": {"path": str(write(base / "train.tsv", "\n".join(train_rows) + "\n")), "text": "sentence"},
            "validation": {"path": str(write(base / "val.tsv", "\n".join(val_rows) + "\n")), "text": "sentence"}}}},
        "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "max_length": 16}}
    cfg = base / "run.yaml"
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        status = main(["train", str(cfg), "--no-progress"])
    assert status == 0, printed.getvalue()[-3000:]
    return base / "run", printed.getvalue()


# -- many labels ---------------------------------------------------------------------------------------------

def test_bounded_confusion_keeps_every_count():
    labels = [f"l{i}" for i in range(100)]
    matrix = [[1 if i != j else i for j in range(100)] for i in range(100)]  # row i: i + 99 gold examples
    shown, counts = bounded_confusion(labels, matrix, limit=5)
    assert shown == ["l99", "l98", "l97", "l96", "l95", OTHER]  # the most gold examples first
    assert len(counts) == 6 and all(len(row) == 6 for row in counts)
    assert sum(map(sum, counts)) == sum(map(sum, matrix))
    assert counts[0][0] == matrix[99][99] and counts[0][1] == matrix[99][98]
    assert counts[5][5] == sum(matrix[i][j] for i in range(95) for j in range(95))
    small = bounded_confusion(labels[:3], [row[:3] for row in matrix[:3]], limit=5)
    assert small == (labels[:3], [row[:3] for row in matrix[:3]])


def test_a_task_with_many_labels_counts_its_confusions_sparsely():
    """Above DENSE_CONFUSION_LABELS labels the rows store only their non-zero cells (10,000 labels would be
    100 million cells); the bounded plot reads them the same as dense rows."""
    from multitune.config.parse import from_dict
    from multitune.tasks import TASKS
    from multitune.tasks.base import DENSE_CONFUSION_LABELS, CountRow

    impl = TASKS.get("classification")
    n = DENSE_CONFUSION_LABELS + 500
    task = impl("t", from_dict(impl.config_class, {"type": "classification",
                                                     "labels": [f"c{i}" for i in range(n)]}))
    task.setup([])
    gold = [{"label": f"c{i % 7}"} for i in range(50)]
    preds = [{"label": f"c{(i * 3) % 11}"} for i in range(50)]
    labels, rows = task.confusion(preds, gold)
    assert len(labels) == n and all(isinstance(r, CountRow) for r in rows)
    assert sum(len(r.cells) for r in rows) <= 50 and sum(r.total() for r in rows) == 50
    assert rows[0][0] == sum(1 for i in range(50) if i % 7 == 0 and (i * 3) % 11 == 0) and rows[n - 1][5] == 0
    with pytest.raises(IndexError):
        rows[0][n]
    dense = [list(r) for r in rows[:12]]  # reads as a sequence of n counts
    assert all(len(r) == n for r in dense) and sum(map(sum, dense)) == 50
    shown, counts = bounded_confusion(labels, rows)
    assert len(shown) == MAX_SHOWN_LABELS + 1 and sum(map(sum, counts)) == 50


def test_many_labels_plots_and_report_are_bounded(many_labels_run):
    from PIL import Image

    run, printed = many_labels_run
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    per_label = [m for m in results["validation"]["topic"] if m.startswith("f1/")]
    assert len(per_label) == N_LABELS  # results.json keeps every label
    png = run / "confusion_topic.png"
    with Image.open(png) as image:  # 30 labels plus "other", not 2,000 x 2,000 cells
        width, height = image.size
    assert width <= 120 * (1.6 + 0.5 * (MAX_SHOWN_LABELS + 1)) + 1
    assert height <= 120 * (1.4 + 0.45 * (MAX_SHOWN_LABELS + 1)) + 1
    assert (run / "learning_curves.png").is_file()
    assert "warning" not in printed

    report = write_report(run)
    page = report.path.read_text(encoding="utf-8")
    assert "confusion" in report.sections
    shown = re.findall(r"<td>f1/([^<]*)</td>", page)
    assert len(shown) == 30
    assert f"topic: {N_LABELS:,} labels; the 30 with the lowest validation F1 are shown" in page


def test_a_failing_plot_is_one_warning(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    def broken(*args, **kwargs):
        raise OSError("No space left on device\nsecond line \x1b[31m")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    assert plot_confusion_matrix(["a", "b"], [[1, 0], [0, 1]], tmp_path / "c.png", "t") is None
    records = [{"kind": "eval", "step": 2, "metrics": {"t": {"accuracy": 0.5}}},
               {"kind": "train", "step": 2, "loss": {"t": 0.7}}]
    assert plot_learning_curves(records, tmp_path / "l.png") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("multitune: warning: ") for line in err)
    assert "confusion matrix not written to" in err[0] and "OSError: No space left on device\\nsecond" in err[0]
    assert "\x1b" not in "".join(err)
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_plot_labels_are_drawn_as_text(tmp_path, capsys):
    """A label matplotlib would parse as math (and fail on), a control character and a huge label."""
    labels = [MATH_LABEL, ESC_LABEL, "x" * 5000]
    assert plot_confusion_matrix(labels, [[1, 2, 0], [0, 3, 0], [1, 0, 4]], tmp_path / "c.png", "t") is not None
    assert capsys.readouterr().err == ""
    assert plot_label(ESC_LABEL) == "red\\x1b[31mlabel"
    assert plot_label("$a$") == r"\$a\$" and len(plot_label("y" * 500)) == 40


# -- non-finite numbers --------------------------------------------------------------------------------------

def _tiny_model(tiny_backbone, kind: str, **cfg):
    from multitune.backbones import load_backbone
    from multitune.config.parse import from_dict
    from multitune.model import MultiTaskModel
    from multitune.tasks import TASKS

    backbone, tok = load_backbone(tiny_backbone)
    impl = TASKS.get(kind)
    task = impl("t", from_dict(impl.config_class, {"type": kind, **cfg}))
    task.setup([])
    torch.manual_seed(0)
    return MultiTaskModel(backbone, {"t": task}, tok, max_length=32).eval()


def _exit_and_err(capsys, argv) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_nan_score_is_an_error_naming_the_input(tiny_backbone, tmp_path, capsys, monkeypatch):
    import multitune.model

    model = _tiny_model(tiny_backbone, "classification", labels=["neg", "pos"])
    monkeypatch.setattr(multitune.model, "load", lambda *a, **k: model)
    status, out, _ = _exit_and_err(capsys, ["predict", "RUN", "--task", "t", "a fine film", "a dull film"])
    assert status == 0 and all(json.loads(line)["label"] in ("neg", "pos") for line in out.splitlines())

    with torch.no_grad():  # the head computes NaN for every input
        model.heads["t"].classifier.weight.fill_(math.nan)
    status, out, err = _exit_and_err(capsys, ["predict", "RUN", "--task", "t", "a fine film", "a dull film"])
    assert status == 2 and out == ""  # nothing printed: no half of the lines, no NaN
    assert err.startswith("multitune: error: inputs[0] (task t): the prediction's score is nan") and \
        len(err.strip().splitlines()) == 1, err
    inputs = write(tmp_path / "in.jsonl", '{"text": "first"}\n{"text": "second"}\n')
    status, _, err = _exit_and_err(capsys, ["predict", "RUN", "--task", "t", "--input", str(inputs)])
    assert status == 2 and f"multitune: error: {inputs}:1 (task t): " in err


def test_nan_embedding_is_an_error(tiny_backbone, tmp_path, capsys, monkeypatch):
    import multitune.model

    model = _tiny_model(tiny_backbone, "classification", labels=["neg", "pos"])
    with torch.no_grad():
        model.backbone.get_input_embeddings().weight.fill_(math.nan)
    monkeypatch.setattr(multitune.model, "load", lambda *a, **k: model)
    texts = write(tmp_path / "t.txt", "one text\nanother\n")
    status, _, err = _exit_and_err(capsys, ["embed", "RUN", "--input", str(texts), "--output",
                                            str(tmp_path / "e.jsonl")])
    assert status == 2 and err.startswith(f"multitune: error: {texts}:1: the embedding holds NaN")
    assert not (tmp_path / "e.jsonl").exists()


def test_evaluate_and_results_files_write_null_for_nan(capsys, monkeypatch, tmp_path):
    import multitune.evaluation.run

    results = {"validation": {"similarity": {"pearson": math.nan, "mse": 0.25, "spearman": -math.inf}}}
    monkeypatch.setattr(multitune.evaluation.run, "evaluate_run", lambda *a, **k: results)
    status, out, err = _exit_and_err(capsys, ["evaluate", "RUN"])
    assert status == 0
    assert json.loads(out) == {"validation": {"similarity": {"pearson": None, "mse": 0.25, "spearman": None}}}
    assert err.strip() == ("multitune: warning: not a finite number, written as null: "
                           "validation.similarity.pearson, validation.similarity.spearman")
    write_json_atomic(tmp_path / "results.json", results)  # what a run writes
    text = (tmp_path / "results.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["validation"]["similarity"]["pearson"] is None
    assert finite_json([1.0, math.nan, (math.inf, 2)]) == [1.0, None, [None, 2]]


def test_non_finite_fields_name_the_path():
    pred = {"label": "a", "scores": {"a": 0.5, "b": math.nan}, "entities": [{"score": 1.0}, {"score": math.inf}]}
    assert non_finite_fields(pred) == [("scores.b", pred["scores"]["b"]), ("entities[1].score", math.inf)]
    with pytest.raises(NonFiniteError, match=r"^inputs\[4\]: the prediction's scores.b is nan"):
        check_finite(pred, "inputs[4]")
    check_finite({"label": "a", "score": 1, "tags": ["O"]}, "x")  # integers and text are fine


# -- control characters --------------------------------------------------------------------------------------

def test_json_output_escapes_every_control_character():
    text = json_text({"label\x1b[31m": "C1 \x9b31m, DEL \x7f, lone \ud800, é ü 東京"})
    assert "\x1b" not in text and "\x9b" not in text and "\x7f" not in text and "\ud800" not in text
    assert "é ü 東京" in text  # ensure_ascii=False: the rest stays readable
    assert json.loads(text) == {"label\x1b[31m": "C1 \x9b31m, DEL \x7f, lone \ud800, é ü 東京"}
    text.encode("utf-8")  # printable on a UTF-8 terminal (a raw lone surrogate is not)
    with pytest.raises(ValueError):
        json_text({"score": math.nan})


def test_escape_sequences_in_labels_reach_no_terminal(many_labels_run, capsys):
    run, printed = many_labels_run
    assert "\x1b" not in printed  # the training log (rich console and warnings)
    for argv in (["predict", str(run), "--task", "topic", "word0 item0"], ["evaluate", str(run)],
                 ["report", str(run)]):
        status, out, err = _exit_and_err(capsys, argv)
        assert status == 0, err
        assert "\x1b" not in out + err, argv
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    assert f"f1/{ESC_LABEL}" in results["validation"]["topic"]  # the data itself is kept as it is
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "\x1b" not in page


# -- command-line numbers ------------------------------------------------------------------------------------

def test_positive_int():
    assert positive_int("3") == 3
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(Exception, match="expected a positive integer"):
            positive_int(bad)


@pytest.mark.parametrize("argv", [
    ["predict", "RUN", "--task", "t", "--batch-size", "0", "x"],
    ["predict", "RUN", "--task", "t", "--batch-size", "-1", "x"],
    ["embed", "RUN", "--input", "in.txt", "--batch-size", "0"],
    ["quickstart", "--steps", "0"],
    ["vocab", "extend", "--corpus", "c.txt", "--output", "o", "--min-freq", "0"],
    ["vocab", "extend", "--corpus", "c.txt", "--output", "o", "--max-new", "-5"],
    ["search", "cfg.yaml", "--space", "s.yaml", "--trials", "zero"],
])
def test_counts_on_the_command_line_must_be_positive(argv, capsys):
    status, out, err = _exit_and_err(capsys, argv)
    assert status == 2 and out == ""
    assert "Traceback" not in err and "expected a positive integer" in err
    assert err.strip().splitlines()[-1].count("error") == 1
