"""``--resume`` with a larger ``training.max_steps`` extends a finished run: the learning-rate schedule continues
as one schedule over the new total (warmup kept), early stopping lets a run it stopped train on, a finished run
with nothing left to train says so, and every other change of the config is refused with what may change."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from multitune.config import parse_config
from multitune.config.loader import save_config
from multitune.errors import MultituneError
from multitune.rundir import write_marker
from multitune.training import Callback, train
from multitune.training.run_dir import check_run_dir
from tests.conftest import toy_config

BASE_LR = 1e-3


def config(toy_data, backbone, out: Path, **training):
    """Two tasks, a linear schedule with 2 warmup steps out of 8 (warmup_ratio 0.25), a train line every step."""
    raw = toy_config(toy_data, backbone, out, **{"scheduler": "linear", "warmup_ratio": 0.25, "log_every": 1,
                                                  "learning_rate": BASE_LR, **training})
    raw["tasks"] = {n: raw["tasks"][n] for n in ("sentiment", "ner")}
    return parse_config(raw)


def train_lines(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "train"]


def console() -> tuple[Console, io.StringIO]:
    text = io.StringIO()
    return Console(file=text, width=200), text


class LearningRateAtStart(Callback):
    def __init__(self):
        self.lr = None

    def on_run_start(self, run):
        self.lr = run.optimizer.param_groups[0]["lr"]


def linear(step: int, warmup: int, total: int) -> float:
    """The scheduler's factor after ``step`` optimizer steps (the rate of step ``step + 1``)."""
    return (step + 1) / warmup if step < warmup else 1.0 - (step - warmup) / (total - warmup)


def test_a_finished_run_extends_on_one_longer_schedule(tiny_backbone, toy_data, tmp_path):
    out = tmp_path / "run"
    first = train(config(toy_data, tiny_backbone, out), progress=False)
    assert first["train"]["steps"] == 8 and train_lines(out)[-1]["lr"] == 0.0  # decayed to 0 at the end

    start = LearningRateAtStart()
    shown, text = console()
    results = train(config(toy_data, tiny_backbone, out, max_steps=16), resume=True, progress=False,
                    console=shown, callbacks=[start])
    assert results["train"]["steps"] == 16
    # warmup keeps its 2 steps (warmup_ratio is not applied to the new 16 steps: that would be 4), and the
    # linear decay runs from step 2 to 16: at the resume step the rate is that schedule's value at step 8
    assert start.lr == pytest.approx(BASE_LR * linear(8, 2, 16))
    lines = train_lines(out)
    assert [r["step"] for r in lines] == list(range(1, 17))  # one line per step, none twice
    by_step = {r["step"]: r["lr"] for r in lines}
    assert by_step[9] == pytest.approx(BASE_LR * 0.5) and by_step[16] == 0.0  # 1 - (9 - 2) / (16 - 2); the end
    assert all(by_step[s] > by_step[s + 1] for s in range(9, 16))
    state = json.loads((out / "checkpoints/last/trainer_state.json").read_text())
    assert (state["step"], state["max_steps"], state["warmup_steps"]) == (16, 16, 2)
    assert "resumed from step 8; training.max_steps 8 -> 16" in text.getvalue()
    assert "its 2 warmup steps kept" in text.getvalue()

    # a second extension keeps the warmup of the first start, recorded in the checkpoint
    again = LearningRateAtStart()
    train(config(toy_data, tiny_backbone, out, max_steps=20), resume=True, progress=False, console=console()[0],
          callbacks=[again])
    assert again.lr == pytest.approx(BASE_LR * linear(16, 2, 20))


def test_a_finished_run_with_nothing_left_to_train_says_so(tiny_backbone, toy_data, tmp_path):
    out = tmp_path / "run"
    first = train(config(toy_data, tiny_backbone, out), progress=False)
    model_written = (out / "model" / "multitune.json").stat().st_mtime_ns
    shown, text = console()
    again = train(config(toy_data, tiny_backbone, out), resume=True, progress=False, console=shown)
    assert again == json.loads((out / "results.json").read_text()) and again["validation"] == first["validation"]
    assert (out / "model" / "multitune.json").stat().st_mtime_ns == model_written  # nothing was redone
    assert "the run is already finished at step 8; to train it further, resume it with a larger " \
           "training.max_steps, e.g. --resume --set training.max_steps=16" in " ".join(text.getvalue().split())

    with pytest.raises(MultituneError, match=r"^training.max_steps: 4 is below the 8 steps the run in .* has made; "
                                             r"on --resume max_steps may grow to extend the run, not shrink"):
        train(config(toy_data, tiny_backbone, out, max_steps=4, eval_every=4), resume=True, progress=False)
    with pytest.raises(MultituneError, match=r"--resume with a different config \(differs in: "
                                             r"training.learning_rate\); on --resume only training.max_steps may "
                                             r"change \(to extend the run\)$"):
        train(config(toy_data, tiny_backbone, out, max_steps=16, learning_rate=5e-4), resume=True, progress=False)


def test_early_stopping_lets_an_extended_run_train_on(tiny_backbone, toy_data, tmp_path):
    out = tmp_path / "es"
    es = {"metric": "sentiment/accuracy", "patience": 1, "min_delta": 0.5}  # no evaluation can improve by 0.5
    kwargs = {"max_steps": 40, "eval_every": 2, "learning_rate": 0.5, "early_stopping": es}
    stopped = train(config(toy_data, tiny_backbone, out, **kwargs), progress=False)
    assert stopped["train"]["stopped_early"] and stopped["train"]["steps"] == 4

    shown, text = console()  # the same config: finished (early stopping stopped it)
    assert train(config(toy_data, tiny_backbone, out, **kwargs), resume=True, progress=False,
                 console=shown)["train"]["steps"] == 4
    assert "already finished at step 4 (early stopping stopped it)" in text.getvalue()

    # killed after early stopping stopped it, before it finished: resuming finishes it without training
    (out / "results.json").unlink()
    again = train(config(toy_data, tiny_backbone, out, **kwargs), resume=True, progress=False, console=console()[0])
    assert again["train"]["steps"] == 4 and again["train"]["stopped_early"]

    shown, text = console()  # another max_steps: it trains on, patience counter reset, best value kept
    more = train(config(toy_data, tiny_backbone, out, **{**kwargs, "max_steps": 60}), resume=True, progress=False,
                 console=shown)
    assert more["train"]["steps"] == 6 and more["train"]["stopped_early"]  # one more evaluation, then it stops
    assert more["train"]["best_step"] == stopped["train"]["best_step"]
    assert "early stopping had stopped the run at step 4; with training.max_steps 40 -> 60 it trains on, its " \
           "patience counter reset" in text.getvalue()



@pytest.mark.parametrize("staged", [False, True])
def test_only_max_steps_may_change_and_not_in_a_run_in_stages(toy_data, tiny_backbone, tmp_path, staged):
    """The comparison itself, on a saved config without a checkpoint (nothing is trained)."""
    out = tmp_path / "run"

    def cfg(seed: int = 1, **training):
        raw = toy_config(toy_data, tiny_backbone, out, **training)
        raw["seed"] = seed
        if staged:
            rest = [t for t in raw["tasks"] if t != "ner"]
            raw["stages"] = [{"name": "ner", "tasks": ["ner"]}, {"name": "rest", "tasks": rest}]
        return parse_config(raw)

    out.mkdir()
    write_marker(out, "run")
    save_config(cfg(), out / "config.yaml")
    if staged:
        with pytest.raises(MultituneError, match=r"\(differs in: training.max_steps\); a run in stages resumes with "
                                                 r"the config it was saved with$"):
            check_run_dir(cfg(max_steps=16), out, resume=True, overwrite=False)
    else:
        assert check_run_dir(cfg(max_steps=16), out, resume=True, overwrite=False) is False  # no checkpoint yet
        # the refused fields are listed; max_steps, which may change, is not among them
        with pytest.raises(MultituneError, match=r"\(differs in: seed, training.batch_size\); on --resume only "
                                                 r"training.max_steps may change"):
            check_run_dir(cfg(seed=2, max_steps=16, batch_size=4), out, resume=True, overwrite=False)
