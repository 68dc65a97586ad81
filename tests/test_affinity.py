"""Transfer analysis during training: gradient cosine similarity and look-ahead task affinity (TAG) against
hand-computed cases; a run with the analysis on trains bitwise like the same run with it off (fp32, bf16, LoRA,
a gradient-level loss weighting, after --resume, with two processes); the log records, results.json's
``transfer`` and affinity.png; the config checks."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from multitune.config import parse_config
from multitune.errors import ConfigError
from multitune.training import train
from multitune.training.affinity import (
    batches_drawn,
    cosine_matrix,
    lookahead_ratio,
    mean_matrix,
    task_affinity,
    transfer_summary,
)
from multitune.training.batching import TaskBatcher
from tests.conftest import REPO, crash_after_batches, toy_config

# --- the measures on hand-computed cases -------------------------------------------------------------------------

def test_cosine_matrix_hand_computed():
    grads = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor([0.0, -2.0]),
             "zero": torch.zeros(2)}
    m = cosine_matrix(grads)
    s = 1 / math.sqrt(2)
    assert m["a"]["b"] == pytest.approx(s) and m["b"]["a"] == pytest.approx(s)
    assert m["a"]["c"] == pytest.approx(0.0)
    assert m["b"]["c"] == pytest.approx(-2 / (math.sqrt(2) * 2)) == m["c"]["b"]
    assert m["a"]["a"] == m["b"]["b"] == m["c"]["c"] == 1.0
    assert m["zero"]["zero"] is None and m["a"]["zero"] is None and m["zero"]["c"] is None  # undefined, not 0


def test_lookahead_ratio_is_undefined_for_a_zero_or_non_finite_loss():
    assert lookahead_ratio(4.0, 1.0) == 0.75 and lookahead_ratio(2.0, 3.0) == -0.5
    assert lookahead_ratio(0.0, 1.0) is None and lookahead_ratio(float("nan"), 1.0) is None
    assert lookahead_ratio(1.0, float("inf")) is None


class TwoTaskLinear(nn.Module):
    """``L_t = (x_t · w + bias_t - y_t)²`` with ``w`` shared and a per-task bias (the "head", never moved)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 0.0]))
        self.bias = nn.ParameterDict({"a": nn.Parameter(torch.tensor(0.0)), "b": nn.Parameter(torch.tensor(0.0))})
        self.data = {"a": (torch.tensor([1.0, 2.0]), 3.0), "b": (torch.tensor([0.0, 1.0]), 1.0)}

    def loss(self, task: str) -> torch.Tensor:
        x, y = self.data[task]
        return (x @ self.w + self.bias[task] - y) ** 2


def test_tag_on_a_linear_model_hand_computed():
    """w = (1, 0); task a: x = (1, 2), y = 3 -> L_a = 4, g_a = (-4, -8); task b: x = (0, 1), y = 1 -> L_b = 1,
    g_b = (0, -2). With lr 0.1: a step on a gives w = (1.4, 0.8): L_a = 0, L_b = 0.04; a step on b gives
    w = (1, 0.2): L_a = 2.56, L_b = 0.64."""
    model = TwoTaskLinear()
    cosine, tag = task_affinity(model.loss, ["a", "b"], [model.w], 0.1)
    assert tag["a"]["a"] == pytest.approx(1.0) and tag["a"]["b"] == pytest.approx(1 - 0.04 / 1)
    assert tag["b"]["a"] == pytest.approx(1 - 2.56 / 4) and tag["b"]["b"] == pytest.approx(1 - 0.64 / 1)
    assert cosine["a"]["b"] == pytest.approx(16 / (math.sqrt(80) * 2)) == cosine["b"]["a"]
    # exactly restored, nothing accumulated in .grad, the heads never moved
    assert torch.equal(model.w.detach(), torch.tensor([1.0, 0.0]))
    assert all(p.grad is None for p in model.parameters())
    assert float(model.bias["a"].detach()) == 0.0 == float(model.bias["b"].detach())


def test_tag_uses_each_parameters_own_rate():
    """Two shared parameters at rates 0.1 and 0: only the first moves in the look-ahead."""
    w1, w2 = nn.Parameter(torch.tensor([1.0])), nn.Parameter(torch.tensor([1.0]))
    data = {"a": 2.0, "b": -1.0}

    def loss(task):  # L = (w1 + w2 - y)^2: gradient 2 (w1 + w2 - y) for both
        return (w1 + w2 - data[task]).sum() ** 2

    _, tag = task_affinity(loss, ["a", "b"], [w1, w2], [0.1, 0.0])
    # step on a: g = 0 (w1 + w2 = 2 = y_a): nothing moves
    assert tag["a"] == {"a": None, "b": pytest.approx(0.0)}  # L_a = 0: its ratio is undefined
    # step on b: g = 2 * 3 = 6, w1 = 1 - 0.6 = 0.4: L_b = (1.4 + 1)^2 = 5.76 (was 9); L_a = (1.4 - 2)^2 = 0.36
    assert tag["b"]["b"] == pytest.approx(1 - 5.76 / 9) and tag["b"]["a"] is None
    assert float(w1.detach()) == 1.0 == float(w2.detach())


def test_mean_matrix_and_summary_skip_undefined_cells():
    a = {"x": {"x": 1.0, "y": 0.5}, "y": {"x": 0.5, "y": None}}
    b = {"x": {"x": 1.0, "y": -0.5}, "y": {"x": None, "y": None}}
    assert mean_matrix([a, b]) == {"x": {"x": 1.0, "y": 0.0}, "y": {"x": 0.5, "y": None}}
    records = [{"kind": "train", "step": 1}, {"kind": "affinity", "step": 2, "cosine": a, "tag": b, "seconds": 0.5},
               {"kind": "affinity", "step": 4, "cosine": b, "tag": a, "seconds": 0.25}]
    summary = transfer_summary(records)
    assert summary["samples"] == 2 and summary["steps"] == [2, 4] and summary["tasks"] == ["x", "y"]
    assert summary["seconds"] == 0.75 and summary["tag"] == mean_matrix([b, a])
    assert transfer_summary([{"kind": "train"}]) is None


class StubTask:
    def balance_groups(self, features):
        return None

    def collate(self, features, pad_token_id, generator):
        return {"input_ids": torch.tensor([f["input_ids"] for f in features])}


def test_batches_drawn_counts_next_batch_calls():
    features = [{"input_ids": [i, i]} for i in range(10)]
    batcher = TaskBatcher(StubTask(), features, 4, 0, seed=3)  # epochs of 3 batches: 4 + 4 + 2
    for n in range(1, 9):
        batcher.next_batch()
        assert batches_drawn(batcher) == n
        resumed = TaskBatcher(StubTask(), features, 4, 0, seed=3)
        resumed.load_state_dict(batcher.state_dict())
        assert batches_drawn(resumed) == n


# --- in the training loop ----------------------------------------------------------------------------------------

def run_config(toy_data, backbone, out, every=0, precision="fp32", adapters=None, weighting="sum", tasks=2,
               **training):
    training = {"max_steps": 6, "eval_every": 3, "batch_size": 4, "max_length": 16, "log_every": 1, **training}
    raw = toy_config(toy_data, backbone, out, precision=precision, **training)
    raw["tasks"] = {t: raw["tasks"][t] for t in ("sentiment", "ner", "similarity")[:tasks]}
    raw["loss_weighting"] = {"strategy": weighting}
    raw["analysis"] = {"affinity_every": every}
    if adapters is not None:
        raw["adapters"] = {"method": "lora", "arrangement": adapters, "r": 2}
    return raw


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return {f"{f.name}/{k}": v for f in sorted((run / "model").glob("*.safetensors")) for k, v in load_file(f).items()}


def check_affinity_records(run: Path, steps: list[int], tasks: list[str]) -> list[dict]:
    lines = records(run, "affinity")
    assert [r["step"] for r in lines] == steps
    for r in lines:
        assert set(r) == {"kind", "step", "cosine", "tag", "seconds"} and r["seconds"] >= 0
        assert list(r["cosine"]) == tasks and list(r["tag"]) == tasks
        for i in tasks:
            assert r["cosine"][i][i] == 1.0
            for j in tasks:
                assert r["cosine"][i][j] == r["cosine"][j][i] and -1.0 <= r["cosine"][i][j] <= 1.0
                assert r["tag"][i][j] is not None and math.isfinite(r["tag"][i][j])
    return lines


SETUPS = {"fp32": {}, "bf16-lora-shared": {"precision": "bf16", "adapters": "shared"},
          "pcgrad-3-tasks": {"weighting": "pcgrad", "tasks": 3}}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_analysis_on_trains_bitwise_like_analysis_off(tiny_backbone, toy_data, tmp_path, setup):
    """Dropout is on in the tiny BERT, so a measurement that consumed random numbers would show."""
    kw = SETUPS[setup]
    off = train(parse_config(run_config(toy_data, tiny_backbone, tmp_path / "off", **kw)), progress=False)
    on = train(parse_config(run_config(toy_data, tiny_backbone, tmp_path / "on", every=2, **kw)), progress=False)
    a, b = weights(tmp_path / "off"), weights(tmp_path / "on")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the analysis changed the weights"
    assert [r["loss"] for r in records(tmp_path / "off", "train")] == [r["loss"] for r in records(tmp_path / "on",
                                                                                                   "train")]
    assert off["validation"] == on["validation"] and off["train"]["batches"] == on["train"]["batches"]
    tasks = list(on["validation"])
    lines = check_affinity_records(tmp_path / "on", [2, 4, 6], tasks)
    assert not records(tmp_path / "off", "affinity") and "transfer" not in off
    transfer = json.loads((tmp_path / "on" / "results.json").read_text())["transfer"]
    assert transfer == on["transfer"] and transfer["samples"] == 3 and transfer["tasks"] == tasks
    assert transfer["cosine"] == mean_matrix([r["cosine"] for r in lines])
    assert transfer["tag"] == mean_matrix([r["tag"] for r in lines])
    assert (tmp_path / "on" / "affinity.png").stat().st_size > 0 and not (tmp_path / "off" / "affinity.png").exists()
    assert on["train"]["batches"] == ({t: 6 for t in tasks} if kw.get("weighting") == "pcgrad"
                                      else {t: 3 for t in tasks})  # round robin: every other step


def test_measurements_are_the_same_after_resume(tiny_backbone, toy_data, tmp_path):
    """The measurement batches depend on the step alone, so a resumed run logs the same affinities."""
    raw = run_config(toy_data, tiny_backbone, tmp_path / "full", every=1)
    train(parse_config(raw), progress=False)
    raw["output_dir"] = str(tmp_path / "resumed")
    config = parse_config(raw)
    with crash_after_batches(4), pytest.raises(KeyboardInterrupt):  # after step 4 (checkpoint at step 3)
        train(config, progress=False)
    results = train(config, resume=True, progress=False)
    full, resumed = records(tmp_path / "full", "affinity"), records(tmp_path / "resumed", "affinity")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed]
    assert results["transfer"]["samples"] == 6


def test_single_task_and_gradual_unfreezing(tiny_backbone, toy_data, tmp_path):
    """One task: nothing to relate, nothing measured. Gradual unfreezing: no shared parameter trains before the
    first release (at the start of step 4, after 3 steps), so the measurements start there."""
    raw = run_config(toy_data, tiny_backbone, tmp_path / "one", every=2)
    raw["tasks"].pop("ner")
    results = train(parse_config(raw), progress=False)
    assert "transfer" not in results and not records(tmp_path / "one", "affinity")
    raw = run_config(toy_data, tiny_backbone, tmp_path / "gradual", every=1, gradual_unfreezing={"every": 3})
    train(parse_config(raw), progress=False)
    assert [r["step"] for r in records(tmp_path / "gradual", "affinity")] == [4, 5, 6]


def test_nothing_shared_or_never_measured_is_refused_before_writing(tiny_backbone, toy_data, tmp_path):
    raw = run_config(toy_data, tiny_backbone, tmp_path / "per-task", every=2, adapters="per_task")
    with pytest.raises(ConfigError, match="analysis.affinity_every: gradient affinity is measured on the parameters "
                                          "that the tasks share, and this run trains none"):
        train(parse_config(raw), progress=False)
    assert not (tmp_path / "per-task").exists()
    raw = run_config(toy_data, tiny_backbone, tmp_path / "late", every=7)
    with pytest.raises(ConfigError, match=r"analysis.affinity_every: \(7\) must not exceed training.max_steps"):
        train(parse_config(raw), progress=False)
    assert not (tmp_path / "late").exists()


@pytest.mark.parametrize("analysis, message", [
    ({"affinity_every": -1}, "analysis.affinity_every: must be at least 0"),
    ({"affinity_every": "often"}, "analysis.affinity_every: expected an integer"),
    ({"affinity_every": 2, "batch_size": 0}, "analysis.batch_size: must be at least 1"),
    ({"lookahead_lr": 0}, "analysis.lookahead_lr: must be greater than 0"),
    ({"every": 2}, "analysis.every: unknown key"),
    ("yes", "analysis: expected a mapping"),
])
def test_config_errors(toy_data, tmp_path, analysis, message):
    raw = run_config(toy_data, "default", tmp_path / "run")
    raw["analysis"] = analysis
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_lookahead_lr_and_batch_size_settings(tiny_backbone, toy_data, tmp_path):
    """A fixed look-ahead rate scales the affinities (to first order, linearly); batch_size sets the draw."""
    small = run_config(toy_data, tiny_backbone, tmp_path / "small", every=3)
    small["analysis"].update(lookahead_lr=1e-4, batch_size=2)
    large = run_config(toy_data, tiny_backbone, tmp_path / "large", every=3)
    large["analysis"].update(lookahead_lr=1e-3, batch_size=2)
    a = train(parse_config(small), progress=False)["transfer"]["tag"]
    b = train(parse_config(large), progress=False)["transfer"]["tag"]
    for i in a:
        for j in a[i]:
            assert abs(b[i][j]) > abs(a[i][j])


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch without gloo")
def test_two_processes_measure_without_changing_training(tiny_backbone, toy_data, tmp_path):
    from tests.test_distributed import _free_port

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    digests = {}
    for every in (0, 3):
        raw = run_config(toy_data, tiny_backbone, tmp_path / f"run{every}", every=every, batch_size=2, device="cpu")
        raw["loss_weighting"] = {"strategy": "pcgrad"}  # several forward passes per step: gradients synced by hand
        config = tmp_path / f"run{every}.yaml"
        config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                               str(_free_port()), str(REPO / "tests" / "distributed_worker.py"), str(config),
                               str(tmp_path / f"digests{every}")], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        digests[every] = [[json.loads(line)["digest"] for line in
                           (tmp_path / f"digests{every}" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert digests[3][0] == digests[3][1] == digests[0][0]  # in sync, and as without the analysis
    tasks = list(json.loads((tmp_path / "run3" / "results.json").read_text())["validation"])  # YAML sorted them
    check_affinity_records(tmp_path / "run3", [3, 6], tasks)  # logged once, by the main process
