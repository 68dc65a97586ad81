"""Numerical guards: a step with a non-finite loss or gradient is skipped, counted, logged and survives resume;
too many in a row stop the run with one line and keep the last good checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.cli import main
from multitune.config import parse_config
from multitune.model import MultiTaskModel
from multitune.training import train
from tests.conftest import crash_after_batches, write

POISON = "zebra"  # the one training sentence holding this word gets a NaN loss (or gradient) every epoch


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(monkeypatch, tokenizer, kind: str = "loss", watch: list | None = None) -> None:
    """Make training forward passes of batches holding POISON non-finite; ``watch`` collects, for each poisoned
    batch, the head weights before it and at the next forward pass."""
    poison_id = tokenizer.convert_tokens_to_ids(POISON)
    original = MultiTaskModel.forward
    pending: list = []

    def forward(self, task, batch):
        head = {k: v.detach().clone() for k, v in self.heads.state_dict().items()}
        if pending and watch is not None:
            watch.append((pending.pop(), head))
        out = original(self, task, batch)
        if (batch["input_ids"] == poison_id).any():
            out.loss = out.loss * float("nan") if kind == "loss" else NanGradient.apply(out.loss)
            pending.append(head)
        return out

    monkeypatch.setattr(MultiTaskModel, "forward", forward)


def config(tiny_backbone, tmp_path: Path, out: str = "run", **training) -> dict:
    rows = ["label\tsentence"] + [f"{'pos' if i % 2 else 'neg'}\tthe film number {i} was fine" for i in range(11)]
    rows.append(f"pos\tthe {POISON} was fine")
    data = write(tmp_path / "cls.tsv", "\n".join(rows) + "\n")
    return {"backbone": tiny_backbone, "output_dir": str(tmp_path / out), "seed": 3,
            "tasks": {"sentiment": {"type": "classification", "data": {
                "train": {"path": str(data), "text": "sentence"}, "validation": {"path": str(data),
                                                                                   "text": "sentence"}}}},
            "training": {"max_steps": 9, "batch_size": 4, "eval_every": 3, "max_length": 16, "learning_rate": 1e-3,
                         **training}}


def bad_lines(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "bad_step"]


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_bad_steps_are_skipped_counted_and_logged(kind, tiny_backbone, tokenizer, tmp_path, monkeypatch, capsys):
    watch: list = []
    poison(monkeypatch, tokenizer, kind, watch)
    # clipping off for the gradient case: the norm is still computed and checked
    raw = config(tiny_backbone, tmp_path, max_grad_norm=None if kind == "gradient" else 1.0)
    results = train(parse_config(raw), progress=False)
    lines = bad_lines(tmp_path / "run")
    # 12 examples in batches of 4: the poisoned sentence is in one of every three batches
    assert len(lines) >= 3 and results["train"]["skipped_steps"] == {"sentiment": len(lines)}
    reason = "non-finite loss (nan)" if kind == "loss" else "non-finite gradient"
    assert all(r["task"] == "sentiment" and r["reason"] == reason for r in lines)
    assert results["train"]["steps"] == 9  # skipped steps do not count: the run still makes all its steps
    assert watch and all(all(torch.equal(before[k], after[k]) for k in before) for before, after in watch)
    assert f"skipped: {reason} in task sentiment" in capsys.readouterr().err
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "run/model/backbone/model.safetensors")).values())


def test_too_many_bad_steps_stop_the_run_and_keep_the_checkpoint(tiny_backbone, tokenizer, tmp_path, monkeypatch,
                                                                   capsys):
    raw = config(tiny_backbone, tmp_path, max_bad_steps=2)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
    calls = {"n": 0}
    original = MultiTaskModel.forward

    def nan_after_step_3(self, task, batch):
        out = original(self, task, batch)
        calls["n"] += 1
        if calls["n"] > 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MultiTaskModel, "forward", nan_after_step_3)
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("multitune: error: training.max_bad_steps: stopped at step 4 after 2 steps in a row")
    run = tmp_path / "run"
    assert f"the last good checkpoint stays in {run / 'checkpoints' / 'last'}" in err[-1]
    assert json.loads((run / "checkpoints/last/trainer_state.json").read_text())["step"] == 3
    assert not (run / "model").exists() and not (run / "results.json").exists()
    assert [(r["step"], r["task"]) for r in bad_lines(run)] == [(4, "sentiment"), (4, "sentiment")]
    state = json.loads((run / "checkpoints/last/trainer_state.json").read_text())
    assert state["bad_in_a_row"] == 0 and state["bad_steps"] == {}


def test_bad_step_counts_resume_exactly(tiny_backbone, tokenizer, tmp_path, monkeypatch):
    poison(monkeypatch, tokenizer)
    full = train(parse_config(config(tiny_backbone, tmp_path, "full")), progress=False)

    with crash_after_batches(9), pytest.raises(KeyboardInterrupt):
        train(parse_config(config(tiny_backbone, tmp_path, "cut")), progress=False)
    cut_state = json.loads((tmp_path / "cut/checkpoints/last/trainer_state.json").read_text())
    # the skips up to the checkpoint are counted in it; at least one more comes after it
    before = [r for r in bad_lines(tmp_path / "full") if r["step"] <= cut_state["step"]]
    assert 0 < len(before) < len(bad_lines(tmp_path / "full"))
    assert cut_state["bad_steps"] == {"sentiment": len(before)}
    resumed = train(parse_config(config(tiny_backbone, tmp_path, "cut")), resume=True, progress=False)
    assert resumed["train"]["skipped_steps"] == full["train"]["skipped_steps"]
    assert bad_lines(tmp_path / "cut") == bad_lines(tmp_path / "full")
    wa = load_file(str(tmp_path / "full/model/backbone/model.safetensors"))
    wb = load_file(str(tmp_path / "cut/model/backbone/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

