"""The training loop on a fake run (no model, no Accelerate, no files), and callbacks on real runs."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from multitune.config import parse_config
from multitune.errors import MultituneError
from multitune.training import Callback, train
from multitune.training.callbacks import Callbacks, ModelSelection
from multitune.training.loop import train_loop
from multitune.training.state import TrainerState
from tests.conftest import toy_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python" / "custom_callback.py"


class FakeRun:
    """What :func:`train_loop` needs of a run: losses and gradient norms come from lists (one value per
    micro-step / per step), so a test decides which steps are non-finite."""

    def __init__(self, max_steps=10, eval_every=5, accumulation=1, losses=None, norms=None, scores=None,
                 callbacks=(), max_bad_steps=3):
        self.config = SimpleNamespace(training=SimpleNamespace(
            max_steps=max_steps, eval_every=eval_every, gradient_accumulation_steps=accumulation, max_grad_norm=1.0,
            max_bad_steps=max_bad_steps))
        self.state = TrainerState()
        self.callbacks = Callbacks(callbacks)
        self.should_stop = self.stopped_early = False
        self.console = Console(quiet=True)
        self.losses, self.norms, self.scores = list(losses or []), list(norms or []), list(scores or [])
        self.active, self.tasks = ["a"], {"a": SimpleNamespace(selection_score=lambda m: m["accuracy"])}
        self.records, self.backward_losses = [], []
        self.optimizer_steps = self.zero_grads = self.forwards = 0

    def log(self, record):
        self.records.append(record)

    def checkpoint_dir(self, name):
        return Path("/nonexistent") / name

    def begin_step(self):
        pass

    def parts(self):
        return [["a"]]

    def forward(self, part):
        self.forwards += 1
        value = self.losses.pop(0) if self.losses else 1.0
        return torch.tensor(value), {"a": value}

    def all_processes(self, flag):
        return flag

    def backward(self, loss, values):
        self.backward_losses.append(float(loss))

    def finish_gradients(self, max_norm):
        return self.norms.pop(0) if self.norms else 0.5

    def optimizer_step(self):  # optimizer and scheduler move together
        self.optimizer_steps += 1

    def zero_grad(self):
        self.zero_grads += 1

    def evaluate(self, split, predictions=None):
        return {"a": {"accuracy": self.scores.pop(0) if self.scores else 0.5}}


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_step_start(self, run):
        self.events.append(("start", run.state.step))

    def on_step_end(self, run):
        self.events.append(("end", run.state.step))

    def on_evaluate(self, run, results):
        self.events.append(("evaluate", run.state.step))


def test_callbacks_see_every_step_in_order_and_evaluations_at_their_steps():
    recorder = Recorder()
    run = FakeRun(max_steps=7, eval_every=3, callbacks=[recorder])
    train_loop(run)
    ends = [s for e, s in recorder.events if e == "end"]
    assert ends == list(range(1, 8)) and run.state.step == 7 and run.optimizer_steps == 7
    assert [s for e, s in recorder.events if e == "evaluate"] == [3, 6, 7]  # every eval_every, and the last step
    assert [e for e, _ in recorder.events][:4] == ["start", "end", "start", "end"]
    assert [s for e, s in recorder.events if e == "start"] == list(range(7))  # the step about to be made


def test_gradient_accumulation_divides_the_loss_and_draws_every_micro_batch():
    run = FakeRun(max_steps=2, eval_every=10, accumulation=4, losses=[2.0] * 8)
    train_loop(run)
    assert run.forwards == 8 and run.backward_losses == [0.5] * 8 and run.optimizer_steps == 2


def test_a_skipped_step_does_not_move_the_optimizer_or_the_scheduler():
    recorder = Recorder()
    # step 3's loss is NaN, then step 3 (again) has an infinite gradient norm: two skips, 5 real steps
    run = FakeRun(max_steps=5, eval_every=10, losses=[1.0, 1.0, math.nan], norms=[0.5, 0.5, math.inf],
                  callbacks=[recorder])
    train_loop(run)
    assert run.optimizer_steps == 5 and run.state.step == 5
    assert run.state.bad_steps == {"a": 2} and run.state.bad_in_a_row == 0
    bad = [r for r in run.records if r["kind"] == "bad_step"]
    assert [(r["step"], r["reason"]) for r in bad] == [(3, "non-finite loss (nan)"), (3, "non-finite gradient")]
    assert [s for e, s in recorder.events if e == "end"] == [1, 2, 3, 4, 5]  # no on_step_end for a skipped step
    assert run.zero_grads == 2


def test_too_many_bad_steps_in_a_row_stop_the_run_with_one_line():
    run = FakeRun(max_steps=5, losses=[1.0] + [math.nan] * 10, max_bad_steps=3)
    with pytest.raises(MultituneError, match=r"training.max_bad_steps: stopped at step 2 after 3 steps in a row"):
        train_loop(run)
    assert run.optimizer_steps == 1 and run.state.bad_steps == {"a": 3}


def test_early_stopping_ends_the_loop():
    es = SimpleNamespace(patience=2, min_delta=0.0)
    run = FakeRun(max_steps=100, eval_every=2, scores=[0.5, 0.7, 0.6, 0.65, 0.9], callbacks=[ModelSelection("mean", es)])
    train_loop(run)
    # best 0.7 at step 4; steps 6 and 8 do not improve: stop at step 8
    assert run.state.step == 8 and run.stopped_early and run.optimizer_steps == 8
    assert (run.state.best_value, run.state.best_step, run.state.bad_evals) == (0.7, 4, 2)


def test_a_callback_that_raises_ends_the_run_with_its_message():
    class Failing(Callback):
        def on_step_end(self, run):
            if run.state.step == 3:
                raise ValueError("my metric store is unreachable")

    run = FakeRun(max_steps=10, callbacks=[Failing()])
    with pytest.raises(ValueError, match="my metric store is unreachable"):
        train_loop(run)
    assert run.state.step == 3


def test_should_stop_from_a_callback_ends_the_loop_after_the_step():
    class StopAtFour(Callback):
        def on_step_end(self, run):
            run.should_stop = run.state.step == 4

    run = FakeRun(max_steps=10, eval_every=3, callbacks=[StopAtFour()])
    train_loop(run)
    assert run.state.step == 4


def test_callbacks_must_have_every_event():
    class Partial:
        def on_step_end(self, run):
            pass

    with pytest.raises(TypeError, match="callback Partial has no on_run_start"):
        Callbacks([Partial()])


class Events(Callback):
    """Records every event of real runs: (event, global step, stage's tasks)."""

    def __init__(self):
        self.seen = []

    def on_run_start(self, run):
        self.seen.append(("run_start", run.step_offset + run.state.step, tuple(run.active)))

    def on_evaluate(self, run, results):
        self.seen.append(("evaluate", run.step_offset + run.state.step, tuple(sorted(results))))

    def on_save(self, run, directory):
        self.seen.append(("save", run.state.step, directory.name))

    def on_run_end(self, run, results):
        results["my_metric"] = 42  # a callback may add to results.json
        self.seen.append(("run_end", run.state.step, tuple(run.active)))


def test_user_callbacks_on_a_real_run(tiny_backbone, toy_data, tmp_path):
    events = Events()
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=4, eval_every=2)
    results = train(parse_config(raw), progress=False, callbacks=[events])
    names = [e for e, *_ in events.seen]
    assert names[0] == "run_start" and names[-1] == "run_end"
    assert [s for e, s, _ in events.seen if e == "evaluate"] == [2, 4]
    saves = [(s, d) for e, s, d in events.seen if e == "save"]
    assert ("last", 2) in [(d, s) for s, d in saves] and ("last", 4) in [(d, s) for s, d in saves]
    assert results["my_metric"] == 42
    assert '"my_metric": 42' in (tmp_path / "run" / "results.json").read_text()


def test_callbacks_and_on_evaluate_run_in_every_stage_with_steps_counted_over_stages(tiny_backbone, toy_data,
                                                                                    tmp_path):
    events, hooked = Events(), []
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "staged", max_steps=4, eval_every=2)
    raw["tasks"] = {k: raw["tasks"][k] for k in ("ner", "sentiment")}
    raw["stages"] = [{"name": "ner", "tasks": ["ner"]}, {"name": "sentiment", "tasks": ["sentiment"]}]
    train(parse_config(raw), progress=False, callbacks=[events],
          on_evaluate=lambda step, results, tasks, model: hooked.append((step, sorted(results))))
    starts = [(s, tasks) for e, s, tasks in events.seen if e == "run_start"]
    assert starts == [(0, ("ner",)), (4, ("sentiment",))]
    assert hooked == [(2, ["ner"]), (4, ["ner"]), (6, ["ner", "sentiment"]), (8, ["ner", "sentiment"])]


def test_the_callback_example_runs(tiny_backbone, tmp_path):
    spec = importlib.util.spec_from_file_location("custom_callback", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(tmp_path / "out", backbone=tiny_backbone, steps=6, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "evaluations.csv", encoding="utf-8")))
    assert {r["task"] for r in rows} == {"sentiment", "ner", "similarity"}
    assert sorted({int(r["step"]) for r in rows}) == [1, 2, 3, 4, 5, 6]
    assert results["stopped_by_callback"] is False  # a random tiny model never reaches 0.9 in 6 steps
