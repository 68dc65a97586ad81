"""Adaptive task scheduling: temperature annealing, metric-driven re-weighting, their logs, plot and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from multitune.config import parse_config
from multitune.config.parse import from_dict
from multitune.errors import ConfigError
from multitune.sampling import SAMPLERS
from multitune.sampling.adaptive import bounded_shares
from multitune.training import train
from tests.conftest import crash_after_batches, toy_config

SIZES = {"big": 9000, "mid": 900, "small": 100}


def make(name: str, sizes=SIZES, seed: int = 3, **extra):
    cls = SAMPLERS.get(name)
    return cls(sizes, from_dict(cls.config_class, {"strategy": name, **extra}, "sampling"), seed=seed)


def temperature_shares(t: float, sizes=SIZES) -> dict[str, float]:
    w = {n: s ** (1 / t) for n, s in sizes.items()}
    return {n: v / sum(w.values()) for n, v in w.items()}


class FakeTask:
    """What the sampler uses of a task: its main metric and the higher-is-better score."""

    def __init__(self, main_metric="accuracy", greater_is_better=True):
        self.main_metric, self.greater_is_better = main_metric, greater_is_better

    def selection_score(self, metrics):
        value = metrics[self.main_metric]
        return value if self.greater_is_better else -value


TASKS = {"big": FakeTask(), "mid": FakeTask(), "small": FakeTask("mse", greater_is_better=False)}


def results(big=0.9, mid=0.8, small=1.0):
    return {"big": {"accuracy": big}, "mid": {"accuracy": mid}, "small": {"mse": small, "pearson": 0.5}}


# -- annealing -------------------------------------------------------------------------------------------


def test_annealing_endpoints_and_midpoint():
    s = make("annealed", start_temperature=1.0, end_temperature=5.0)
    assert s.needs_progress and not s.needs_evaluations
    assert s.probabilities() == pytest.approx(temperature_shares(1.0))  # before any progress: the start
    s.set_progress(0, 100)
    assert s.probabilities() == pytest.approx(make("proportional").probabilities())
    s.set_progress(50, 100)
    assert s.temperature() == pytest.approx(3.0)
    assert s.probabilities() == pytest.approx(temperature_shares(3.0))
    s.set_progress(100, 100)
    assert s.probabilities() == pytest.approx(temperature_shares(5.0))
    s.set_progress(250, 100)  # past the schedule: stays at the end
    assert s.temperature() == pytest.approx(5.0)


def test_annealing_over_explicit_steps_and_cosine():
    s = make("annealed", start_temperature=1.0, end_temperature=5.0, steps=10)
    s.set_progress(5, 1000)  # 10 steps given: training.max_steps does not matter
    assert s.temperature() == pytest.approx(3.0)
    s.set_progress(10, 1000)
    assert s.probabilities() == pytest.approx(temperature_shares(5.0))
    c = make("annealed", start_temperature=1.0, end_temperature=5.0, schedule="cosine")
    c.set_progress(25, 100)
    assert c.temperature() == pytest.approx(1.0 + 4.0 * (1 - np.cos(np.pi / 4)) / 2)
    c.set_progress(50, 100)
    assert c.temperature() == pytest.approx(3.0)
    # the small task gains share as T grows
    shares = []
    for step in range(0, 101, 20):
        c.set_progress(step, 100)
        shares.append(c.probabilities()["small"])
    assert shares == sorted(shares) and shares[0] < shares[-1]


def test_annealed_state_round_trip():
    a = make("annealed")
    a.set_progress(40, 100)
    [a.next_task() for _ in range(30)]
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints keep it as JSON
    b = make("annealed")
    b.load_state_dict(state)
    assert b.temperature() == a.temperature()
    assert [a.next_task() for _ in range(50)] == [b.next_task() for _ in range(50)]


# -- adaptive --------------------------------------------------------------------------------------------


def test_bounded_shares_keep_bounds_and_proportions():
    shares = bounded_shares([100.0, 10.0, 1.0], 0.1, 0.7)
    assert sum(shares) == pytest.approx(1.0)
    assert shares[0] == pytest.approx(0.7) and shares[2] == pytest.approx(0.1)
    assert shares[1] == pytest.approx(0.2)
    assert bounded_shares([1.0, 3.0], 0.0, 1.0) == pytest.approx([0.25, 0.75])
    assert bounded_shares([5.0], 0.1, 0.5) == pytest.approx([1.0])  # one task: bounds that cannot hold give way


def test_adaptive_raises_a_lagging_task_and_lowers_it_once_it_catches_up():
    # big and small meet their references: only mid moves
    s = make("adaptive", temperature=2.0, reference={"big": 0.5, "mid": 0.85, "small": 2.0}, factor=2.0,
             patience=10, min_share=0.05, max_share=0.75)
    base = s.probabilities()
    assert base == pytest.approx(temperature_shares(2.0))
    # mid lags its reference: raised at every evaluation, the others go down
    change = s.observe(100, results(mid=0.80), TASKS)
    assert change["reasons"] == {"mid": "lags reference 0.8 < 0.85 (6% behind)"}
    first = change["shares"]
    assert first["mid"] > base["mid"] and first["big"] < base["big"] and sum(first.values()) == pytest.approx(1.0)
    assert s.probabilities() == first
    second = s.observe(200, results(mid=0.82), TASKS)["shares"]
    assert second["mid"] > first["mid"]
    # bounded by max_share: it stops being raised there
    for step in range(300, 1000, 100):
        s.observe(step, results(mid=0.83), TASKS)
    assert s.probabilities()["mid"] == pytest.approx(0.75)
    assert s.observe(1000, results(mid=0.83), TASKS) is None  # at the bound: nothing changes
    # caught up: lowered step by step, back to the base share, then left alone
    change = s.observe(1100, results(mid=0.86), TASKS)
    assert change["reasons"] == {"mid": "caught up with reference 0.86 >= 0.85"}
    lowered = [change["shares"]["mid"]]
    while (change := s.observe(1200, results(mid=0.86), TASKS)) is not None:
        lowered.append(change["shares"]["mid"])
    assert lowered == sorted(lowered, reverse=True) and lowered[0] < 0.75
    assert s.probabilities() == pytest.approx(base)


def test_adaptive_when_every_task_lags_moves_batches_to_the_furthest_behind():
    s = make("adaptive", temperature=1e6, factor=2.0,  # uniform base shares
             reference={"big": 1.0, "mid": 1.0, "small": 0.5})
    change = s.observe(1, results(big=0.9, mid=0.5, small=0.75), TASKS)  # gaps 0.1, 0.5, 0.5 (mse above 0.5)
    assert set(change["reasons"]) == {"big", "mid", "small"}
    shares = change["shares"]
    assert shares["mid"] == pytest.approx(shares["small"], rel=1e-4) and shares["mid"] > 1 / 3 > shares["big"]
    # exponents: 1 for the furthest behind, 0.2 for big, less the lowest: 0.8, 0.8, 0
    assert s.state_dict()["exponents"] == pytest.approx({"big": 0.0, "mid": 0.8, "small": 0.8})
    assert shares["mid"] / shares["big"] == pytest.approx(2 ** 0.8, rel=1e-4)
    # every task equally far behind: nothing changes
    same = make("adaptive", temperature=1e6, reference={"big": 1.0, "mid": 1.0, "small": 0.5})
    assert same.observe(1, results(big=0.5, mid=0.5, small=0.75), TASKS) is None


def test_adaptive_raises_are_capped_so_the_way_back_stays_short():
    s = make("adaptive", reference={"big": 2.0, "mid": 2.0, "small": 0.1}, min_share=0.05)
    base = s.probabilities()
    for i in range(200):  # big and mid always lag (by as much), small meets its reference
        s.observe(i, results(big=0.5, mid=0.5, small=0.05), TASKS)
    assert s.probabilities()["small"] == pytest.approx(0.05)
    highest = max(s.state_dict()["exponents"].values())
    assert highest < 5 < s.cap  # raises that no longer moved the shares were taken back
    for i in range(int(highest) + 1):  # caught up: one step back per evaluation
        s.observe(1000 + i, results(big=2.5, mid=2.5, small=0.05), TASKS)
    assert s.probabilities() == pytest.approx(base)


def test_adaptive_raises_a_task_that_stopped_improving():
    # big and mid meet their references; small has none: it is raised when it stops improving
    s = make("adaptive", temperature=1.0, patience=2, min_delta=0.01, reference={"big": 0.5, "mid": 0.5})
    base = s.probabilities()
    assert s.observe(1, results(small=1.0), TASKS) is None
    assert s.observe(2, results(small=0.5), TASKS) is None  # mse went down: an improvement
    assert s.observe(3, results(small=0.495), TASKS) is None  # by less than min_delta: 1 evaluation stale
    change = s.observe(4, results(small=0.6), TASKS)  # 2 evaluations without improvement: raised
    assert change["reasons"] == {"small": "no improvement for 2 evaluations (mse 0.6)"}
    assert change["shares"]["small"] > base["small"]
    assert s.probabilities()["small"] >= 0.02  # min_share
    change = s.observe(5, results(small=0.3), TASKS)  # improving again: lowered back
    assert change["reasons"] == {"small": "improving again (mse 0.3)"}
    assert s.probabilities() == pytest.approx(base)


def test_adaptive_reference_on_a_lower_is_better_metric():
    s = make("adaptive", reference={"small": 0.4}, patience=100)
    change = s.observe(1, results(small=0.5), TASKS)  # mse 0.5 above the reference 0.4: lags
    assert change["reasons"] == {"small": "lags reference 0.5 > 0.4 (25% behind)"}
    assert s.observe(2, results(small=0.3), TASKS)["reasons"] == {"small": "caught up with reference 0.3 <= 0.4"}


def test_adaptive_is_deterministic_and_its_state_round_trips():
    def fed(seed=3):
        s = make("adaptive", seed=seed, reference={"small": 0.2, "mid": 0.9})
        for i in range(4):
            s.observe(i, results(mid=0.8 + i * 0.01, small=0.5), TASKS)
            [s.next_task() for _ in range(20)]
        return s

    a, b = fed(), fed()
    assert a.probabilities() == b.probabilities()
    state = json.loads(json.dumps(a.state_dict()))
    c = make("adaptive", reference={"small": 0.2, "mid": 0.9})
    c.load_state_dict(state)
    assert c.probabilities() == a.probabilities()
    assert [a.next_task() for _ in range(100)] == [c.next_task() for _ in range(100)]
    # and the next evaluation changes both alike
    assert a.observe(9, results(mid=0.95, small=0.1), TASKS) == c.observe(9, results(mid=0.95, small=0.1), TASKS)
    assert a.state_dict() == c.state_dict()


# -- config errors ---------------------------------------------------------------------------------------


def cfg(toy_data, backbone, out, sampling, loss_weighting=None, tasks=("sentiment", "similarity"), **training):
    raw = toy_config(toy_data, backbone, out, **{"max_steps": 8, "eval_every": 4, "log_every": 2, **training})
    raw["tasks"] = {t: raw["tasks"][t] for t in tasks}
    raw["sampling"] = sampling
    if loss_weighting is not None:
        raw["loss_weighting"] = loss_weighting
    return raw


@pytest.mark.parametrize("sampling, path, words", [
    ({"strategy": "adaptive", "min_share": 0.5, "max_share": 0.4}, "sampling.min_share", "at most max_share"),
    ({"strategy": "adaptive", "factor": 1.0}, "sampling.factor", "greater than 1"),
    ({"strategy": "adaptive", "reference": {"sentiment": "high"}}, "sampling.reference.sentiment", "a number"),
    ({"strategy": "adaptive", "patience": 0}, "sampling.patience", "at least 1"),
    ({"strategy": "adaptive", "max_share": 1.5}, "sampling.max_share", "at most 1"),
    ({"strategy": "adaptive", "refrence": {}}, "sampling.refrence", "did you mean 'reference'"),
    ({"strategy": "annealed", "end_temperature": 0}, "sampling.end_temperature", "greater than 0"),
    ({"strategy": "annealed", "schedule": "cosin"}, "sampling.schedule", "did you mean 'cosine'"),
    ({"strategy": "annealed", "steps": 0}, "sampling.steps", "greater than 0"),
])
def test_config_errors_name_the_field(toy_data, tmp_path, sampling, path, words):
    with pytest.raises(ConfigError) as err:
        parse_config(cfg(toy_data, "backbone", tmp_path / "run", sampling))
    assert err.value.path == path and words in str(err.value)


@pytest.mark.parametrize("sampling, loss_weighting, message", [
    ({"strategy": "adaptive", "reference": {"foo": 0.9}}, None,
     "sampling.reference.foo: unknown task; tasks: sentiment, similarity"),
    ({"strategy": "adaptive", "min_share": 0.6}, None, "sampling.min_share: 2 tasks cannot each get 0.6"),
    ({"strategy": "adaptive", "max_share": 0.4}, None, "sampling.max_share: 2 tasks cannot share"),
    ({"strategy": "annealed"}, {"strategy": "pcgrad"}, "sampling.strategy: annealed changes the task shares"),
    ({"strategy": "adaptive"}, {"strategy": "famo"}, "sampling.strategy: adaptive changes the task shares"),
])
def test_config_errors_known_in_the_trainer_write_nothing(toy_data, tmp_path, sampling, loss_weighting, message):
    out = tmp_path / "run"
    config = parse_config(cfg(toy_data, "no-such-backbone", out, sampling, loss_weighting))  # checked first
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train(config, progress=False)
    assert not out.exists()


# -- training runs ---------------------------------------------------------------------------------------


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_annealed_run_logs_changing_shares_and_plots_them(tiny_backbone, toy_data, tmp_path):
    out = tmp_path / "annealed"
    # tasks of different sizes (the toy sentiment and similarity sets are equally large)
    train(parse_config(cfg(toy_data, tiny_backbone, out, {"strategy": "annealed", "start_temperature": 1.0,
                                                          "end_temperature": 20.0}, tasks=("sentiment", "mlm"))),
          progress=False)
    trains = [r for r in records(out) if r["kind"] == "train"]
    assert [r["step"] for r in trains] == [2, 4, 6, 8]
    big = max(trains[0]["sampling"], key=trains[0]["sampling"].get)  # the larger task loses share over time
    assert [r["sampling"][big] for r in trains] == sorted((r["sampling"][big] for r in trains), reverse=True)
    assert trains[0]["sampling"][big] > trains[-1]["sampling"][big]
    assert (out / "sampling_shares.png").stat().st_size > 1000
    assert (out / "learning_curves.png").is_file()


def test_static_sampler_train_lines_stay_as_they_were(tiny_backbone, toy_data, tmp_path):
    out = tmp_path / "static"
    train(parse_config(cfg(toy_data, tiny_backbone, out, {"strategy": "temperature"}, max_steps=4)), progress=False)
    assert all("sampling" not in r for r in records(out) if r["kind"] == "train")
    assert (out / "sampling_shares.png").is_file()  # from the eval lines: two tasks


def adaptive_cfg(toy_data, backbone, out, **training):
    # sentiment cannot reach accuracy 1.01: raised at every evaluation
    return parse_config(cfg(toy_data, backbone, out, {"strategy": "adaptive", "temperature": 1.0,
                                                      "reference": {"sentiment": 1.01}, "factor": 2.0,
                                                      "max_share": 0.9},
                            loss_weighting={"strategy": "uncertainty"}, **training))


def test_adaptive_run_logs_changes_and_plots_shares(tiny_backbone, toy_data, tmp_path):
    out = tmp_path / "adaptive"
    train(adaptive_cfg(toy_data, tiny_backbone, out), progress=False)
    logged = records(out)
    changes = [r for r in logged if r["kind"] == "sampling"]
    assert [r["step"] for r in changes] == [4, 8]
    assert changes[0]["reasons"]["sentiment"].startswith("lags reference ")
    assert changes[0]["shares"]["sentiment"] < changes[1]["shares"]["sentiment"] <= 0.9 + 1e-9
    evals = [r for r in logged if r["kind"] == "eval"]
    assert [e["sampling"] for e in evals] == [c["shares"] for c in changes]  # the shares from that step on
    trains = [r for r in logged if r["kind"] == "train"]
    assert trains[0]["sampling"]["sentiment"] < trains[-1]["sampling"]["sentiment"]
    assert (out / "sampling_shares.png").stat().st_size > 1000


def test_adaptive_run_resumes_exactly(tiny_backbone, toy_data, tmp_path):
    train(adaptive_cfg(toy_data, tiny_backbone, tmp_path / "full", max_steps=12), progress=False)
    with crash_after_batches(6), pytest.raises(KeyboardInterrupt):
        train(adaptive_cfg(toy_data, tiny_backbone, tmp_path / "cut", max_steps=12), progress=False)
    state = json.loads((tmp_path / "cut/checkpoints/last/trainer_state.json").read_text())
    assert state["step"] == 4 and state["sampler"]["exponents"]["sentiment"] == 1  # after the step-4 evaluation
    train(adaptive_cfg(toy_data, tiny_backbone, tmp_path / "cut", max_steps=12), resume=True, progress=False)
    wa = load_file(str(tmp_path / "full/checkpoints/last/model.safetensors"))
    wb = load_file(str(tmp_path / "cut/checkpoints/last/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(records(tmp_path / "full")) == strip(records(tmp_path / "cut"))
