"""Classification metrics GLUE users expect: Matthews correlation (``mcc``) and the F1 of the positive class
(``f1``), checked against hand-computed confusions; the selectable main metric (``metric``) and its checks;
``positive_label``; both kept through save and load and shown on the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from sklearn.metrics import matthews_corrcoef

from multitune.cards import ModelCard, render_card, task_cards
from multitune.config import parse_config
from multitune.config.parse import from_dict
from multitune.errors import ConfigError, MultituneError
from multitune.evaluation.evaluator import selection_value
from multitune.model import restore_tasks
from multitune.tasks.classification import ClassificationConfig, matthews_correlation
from tests.conftest import toy_config
from tests.test_tasks import make


def scored(task, gold: list[str], pred: list[str]) -> dict[str, float]:
    """The task's metrics for predicted labels ``pred`` against gold labels ``gold``."""
    return task.compute_metrics([{"label": p} for p in pred], [{"label": g} for g in gold])


def binary(**cfg):
    task = make("classification", **cfg)
    task.setup([{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}])
    return task


# -- values ----------------------------------------------------------------------------------------------------
def test_constant_predictor_has_high_accuracy_but_zero_mcc_and_positive_f1():
    gold = ["neg"] * 9 + ["pos"]
    m = scored(binary(), gold, ["neg"] * 10)
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["mcc"] == 0.0  # no correlation: the prediction never varies
    assert m["f1"] == 0.0  # the one positive is missed
    assert m["macro_f1"] == pytest.approx((18 / 19 + 0) / 2)  # f1(neg) = 2*9 / (2*9 + 1)


def test_binary_metrics_match_a_hand_computed_confusion():
    # pos is positive: TP 3, FN 1, FP 2, TN 4
    gold = ["pos"] * 4 + ["neg"] * 6
    pred = ["pos", "pos", "pos", "neg"] + ["pos", "pos", "neg", "neg", "neg", "neg"]
    m = scored(binary(), gold, pred)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # 2/3
    assert m["macro_f1"] == pytest.approx((2 / 3 + 8 / 11) / 2)  # f1(neg) = 2*4 / (2*4 + 1 + 2)
    assert m["f1"] != pytest.approx(m["macro_f1"])
    assert m["mcc"] == pytest.approx((3 * 4 - 2 * 1) / np.sqrt(5 * 4 * 6 * 5))  # 0.408
    flipped = scored(binary(positive_label="neg"), gold, pred)
    assert flipped["f1"] == pytest.approx(8 / 11) == flipped["f1/neg"]
    assert flipped["mcc"] == pytest.approx(m["mcc"])  # symmetric in the classes
    perfect = scored(binary(), gold, gold)
    assert perfect["mcc"] == perfect["f1"] == 1.0
    inverse = scored(binary(), gold, ["neg"] * 4 + ["pos"] * 6)
    assert inverse["mcc"] == pytest.approx(-1.0)


def test_multi_class_mcc_and_no_positive_f1():
    task = make("classification", labels=["a", "b", "c"])
    task.setup([])
    # every class predicted once right, once as the next class: correct 3 of 6, all totals 2
    m = scored(task, ["a", "a", "b", "b", "c", "c"], ["a", "b", "b", "c", "c", "a"])
    assert m["mcc"] == pytest.approx((3 * 6 - 3 * 2 * 2) / (6 * 6 - 3 * 2 * 2))  # 0.25
    assert "f1" not in m and {"accuracy", "macro_f1", "f1/a"} <= set(m)


def test_mcc_matches_scikit_learn_without_a_dense_matrix():
    rng = np.random.default_rng(0)
    for n, size in ((2, 50), (5, 200), (40, 300)):
        gold = rng.integers(0, n, size)
        pred = np.where(rng.random(size) < 0.6, gold, rng.integers(0, n, size))
        assert matthews_correlation(gold, pred, n) == pytest.approx(matthews_corrcoef(gold, pred))
    assert matthews_correlation([0, 0, 0], [0, 0, 0], 3) == 0.0  # one class only: undefined, 0 as sklearn
    assert matthews_correlation([7, 1], [7, 1], 10_000) == 1.0  # labels beyond those seen cost nothing


def test_multi_label_keeps_its_metrics():
    task = make("classification", multi_label=True)
    exs = [{"label": "x"}, {"label": "x,y"}]
    task.setup(exs)
    m = task.compute_metrics([{"labels": ["x"]}, {"labels": ["x", "y"]}], exs)
    assert {"accuracy", "macro_f1", "micro_f1"} <= set(m) and "mcc" not in m and "f1" not in m


# -- the main metric -----------------------------------------------------------------------------------------
def test_metric_selects_the_main_metric_and_what_mean_averages():
    gold = ["pos"] * 4 + ["neg"] * 6
    pred = ["pos", "pos", "pos", "neg"] + ["pos", "pos", "neg", "neg", "neg", "neg"]
    default = binary()
    assert default.main_metric == "accuracy"
    tasks = {"acc": default, "mcc": binary(metric="mcc"), "f1": binary(metric="f1", positive_label="neg")}
    results = {name: scored(task, gold, pred) for name, task in tasks.items()}
    assert [t.main_metric for t in tasks.values()] == ["accuracy", "mcc", "f1"]
    assert tasks["mcc"].selection_score(results["mcc"]) == pytest.approx(results["mcc"]["mcc"])
    assert tasks["f1"].selection_score(results["f1"]) == pytest.approx(8 / 11)
    expected = (0.7 + results["mcc"]["mcc"] + 8 / 11) / 3
    assert selection_value("mean", results, tasks) == pytest.approx(expected)
    assert selection_value("mean", {"acc": results["acc"]}, {"acc": default}) == pytest.approx(0.7)


def test_f1_needs_a_binary_task():
    three = [{"label": lab} for lab in ("a", "b", "c")]
    with pytest.raises(ConfigError, match=r"^tasks.t.metric: f1 \(F1 of the positive class\) needs a binary task; "
                                          r"this one has 3 labels \(a, b, c\); use macro_f1 or mcc$"):
        make("classification", metric="f1").setup(three)  # labels inferred: caught in setup
    with pytest.raises(ConfigError, match=r"^tasks.t.metric: f1 .* 3 labels"):  # labels given: caught on reading
        from_dict(ClassificationConfig, {"type": "classification", "labels": ["a", "b", "c"], "metric": "f1"},
                  "tasks.t")
    with pytest.raises(ConfigError, match=r"^tasks.t.metric: mcc is not reported by a multi-label task; "
                                          r"expected one of: accuracy, macro_f1, micro_f1$"):
        from_dict(ClassificationConfig, {"type": "classification", "multi_label": True, "metric": "mcc"},
                  "tasks.t")
    with pytest.raises(ConfigError, match=r"^tasks.t.metric: micro_f1 is not reported by a single-label task"):
        from_dict(ClassificationConfig, {"type": "classification", "metric": "micro_f1"}, "tasks.t")
    with pytest.raises(ConfigError, match=r"^tasks.t.metric: got 'auc'; expected one of: accuracy, macro_f1, mcc"):
        from_dict(ClassificationConfig, {"type": "classification", "metric": "auc"}, "tasks.t")
    make("classification", metric="mcc").setup(three)  # mcc is multi-class


def test_positive_label_must_be_one_of_two_labels():
    with pytest.raises(ConfigError, match=r"^tasks.t.positive_label: got 'yes'; expected one of the task's "
                                          r"labels: neg, pos$"):
        binary(positive_label="yes")
    with pytest.raises(ConfigError, match=r"^tasks.t.positive_label: got 'yes'; .* labels: no, yes_"):
        from_dict(ClassificationConfig, {"type": "classification", "labels": ["no", "yes_"],
                                         "positive_label": "yes"}, "tasks.t")
    with pytest.raises(ConfigError, match=r"^tasks.t.positive_label: only for a binary task; this one has 3 "
                                          r"labels \(a, b, c\)$"):
        make("classification", positive_label="a").setup([{"label": lab} for lab in ("a", "b", "c")])
    with pytest.raises(ConfigError, match=r"^tasks.t.positive_label: only for binary single-label"):
        from_dict(ClassificationConfig, {"type": "classification", "multi_label": True, "positive_label": "x"},
                  "tasks.t")
    numeric = make("classification", positive_label=0)  # YAML reads 0 as a number; labels are text
    numeric.setup([{"label": 0}, {"label": 1}])
    assert numeric.labels == ["0", "1"] and numeric.positive == 0
    assert binary().positive == 1  # default: the second label


# -- kept with the model ---------------------------------------------------------------------------------------
def test_state_round_trip_keeps_main_metric_and_positive_label():
    task = binary(metric="f1", positive_label="neg")
    state = json.loads(json.dumps(task.state()))
    assert state["main_metric"] == "f1" and state["positive_label"] == "neg"
    restored = make("classification")  # a config without the fields: the state decides
    restored.load_state(state)
    assert restored.main_metric == "f1" and restored.positive == 0
    old = make("classification")  # a model saved before the fields existed
    old.load_state({"labels": ["neg", "pos"]})
    assert old.main_metric == "accuracy" and old.positive == 1
    meta = {"tasks": {"t": {"config": {"type": "classification"},
                            "state": {"labels": ["a", "b", "c"], "main_metric": "f1"}}}}
    with pytest.raises(MultituneError, match=r"m.json: tasks.t.state: cannot restore the task: tasks.t.metric: "
                                             r"f1 .* 3 labels"):
        restore_tasks(meta, "m.json")


def test_trained_model_reports_and_reloads_its_main_metric(tiny_backbone, toy_data, tmp_path):
    from multitune.model import load
    from multitune.training import train

    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=2, eval_every=2)
    raw["tasks"] = {"sentiment": {**raw["tasks"]["sentiment"], "metric": "f1", "positive_label": "negative"}}
    results = train(parse_config(raw), progress=False)
    val = results["validation"]["sentiment"]
    assert {"accuracy", "macro_f1", "mcc", "f1"} <= set(val) and val["f1"] == val["f1/negative"]
    model = load(tmp_path / "run")
    task = model.tasks["sentiment"]
    assert task.main_metric == "f1" and task.labels[task.positive] == "negative"
    assert task.selection_score(val) == val["f1"]
    card = (tmp_path / "run" / "model" / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---")[1])
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert metrics[0] == {"type": "f1", "value": val["f1"], "name": "F1"}  # the main metric first
    assert {"type": "matthews_correlation", "value": val["mcc"], "name": "Matthews correlation"} in metrics


def test_card_puts_the_chosen_main_metric_first():
    meta = {"tasks": {"cola": {"config": {"type": "classification", "metric": "mcc"},
                               "state": {"labels": ["unacceptable", "acceptable"], "main_metric": "mcc"}}}}
    results = {"validation": {"cola": {"accuracy": 0.8, "macro_f1": 0.7, "mcc": 0.45, "f1": 0.86,
                                       "f1/acceptable": 0.86}}}
    (cola,) = task_cards(meta, results)
    assert list(cola.metrics) == ["mcc", "accuracy", "macro_f1", "f1"]
    text = render_card(ModelCard(title="t", summary="", library_name="multitune", tasks=[cola]))
    assert "| cola | text classification, 2 labels (`classification`) | unacceptable, acceptable " \
           "| Matthews correlation 0.4500 (validation) |" in text
    front = yaml.safe_load(text.split("---")[1])
    assert front["model-index"][0]["results"][0]["metrics"][0] == {
        "type": "matthews_correlation", "value": 0.45, "name": "Matthews correlation"}
