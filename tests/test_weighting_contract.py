"""Every loss weighting / gradient method through the training loop: 2 and 3 tasks, fp32 and bf16, without
adapters and with shared or per-task LoRA; exact resume of the methods' state; the step's mechanics
(per-task gradients of the shared parameters, what is shared) and two processes.

The matrix covers every value of each dimension and every pair of (tasks, precision) per method, in four
runs, rather than the full product: a contract run costs a whole ``train()`` call.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.backbones import load_backbone
from multitune.config import parse_config
from multitune.config.parse import from_dict
from multitune.errors import ConfigError
from multitune.training import train
from multitune.training.batching import TaskBatcher
from multitune.training.multistep import WeightedStep, shared_parameters
from multitune.weighting import WEIGHTINGS
from tests.conftest import REPO, toy_config
from tests.test_distributed import _free_port

TASKS = {2: ("sentiment", "ner"), 3: ("sentiment", "ner", "similarity")}
FAST = {"dwa": {"period": 1}}  # so that DWA's weights move within a few steps
# (tasks, precision, adapters): every value of every dimension, and every (tasks, precision) pair
SETUPS = {"2-fp32": (2, "fp32", None), "3-bf16": (3, "bf16", None), "2-bf16-lora-shared": (2, "bf16", "shared"),
          "3-fp32-lora-per_task": (3, "fp32", "per_task")}


def needs_shared(name: str) -> bool:
    cls = WEIGHTINGS.get(name)
    return cls.needs_per_task_gradients or cls.needs_shared_layer


def contract_config(toy_data, backbone, out, name, n_tasks, precision="fp32", arrangement=None, **training):
    raw = toy_config(toy_data, backbone, out, max_length=16, batch_size=4, log_every=1, precision=precision,
                     **training)
    raw["tasks"] = {t: raw["tasks"][t] for t in TASKS[n_tasks]}
    raw["loss_weighting"] = {"strategy": name, **FAST.get(name, {})}
    if arrangement is not None:
        raw["adapters"] = {"method": "lora", "arrangement": arrangement, "r": 2}
    return parse_config(raw)


def train_lines(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_method_trains(tiny_backbone, toy_data, tmp_path, name, setup):
    n_tasks, precision, arrangement = SETUPS[setup]
    config = contract_config(toy_data, tiny_backbone, tmp_path / "run", name, n_tasks, precision, arrangement,
                             max_steps=2, eval_every=2)
    if arrangement == "per_task" and needs_shared(name):  # nothing is shared: refused before anything runs
        with pytest.raises(ConfigError, match=f"loss_weighting.strategy: {name} works on the parameters that the "
                                              "tasks share, and this run trains none"):
            train(config, progress=False)
        assert not (tmp_path / "run").exists()
        return
    results = train(config, progress=False)
    assert results["train"]["steps"] == 2 and results["train"]["precision"] == precision
    lines = train_lines(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2]
    tasks = set(TASKS[n_tasks])
    for r in lines:
        assert all(map(torch.isfinite, map(torch.tensor, r["loss"].values())))
        assert set(r["loss_weights"]) == tasks
        if WEIGHTINGS.get(name).needs_all_tasks:  # every step holds every task
            assert set(r["loss"]) == tasks
        if WEIGHTINGS.get(name).needs_per_task_gradients:
            assert len(r["grad_stats"]["cosine"]) == n_tasks * (n_tasks - 1) // 2
    # the trained parameters moved: the backbone, or the adapters on a frozen backbone
    model = tmp_path / "run" / "model"
    if arrangement is None:
        start, trained = (load_file(str(Path(d) / "model.safetensors")) for d in (tiny_backbone, model / "backbone"))
        assert any(not torch.equal(v, trained[k]) for k, v in start.items())
    else:
        assert any(k.endswith("lora_B") and v.abs().sum() > 0
                   for k, v in load_file(str(model / "adapters.safetensors")).items())


STATEFUL = [n for n in WEIGHTINGS.names() if WEIGHTINGS.get(n)(["a", "b"], WEIGHTINGS.get(n).config_class())
            .state_dict()]


@pytest.mark.parametrize("name", STATEFUL)
def test_stateful_methods_resume_exactly(tiny_backbone, toy_data, tmp_path, monkeypatch, name):
    def config(out):
        return contract_config(toy_data, tiny_backbone, out, name, 2, max_steps=4, eval_every=2)

    train(config(tmp_path / "full"), progress=False)
    per_step = 2 if WEIGHTINGS.get(name).needs_all_tasks else 1
    calls = {"n": 0}
    original = TaskBatcher.next_batch

    def crash_in_step_4(self):
        calls["n"] += 1
        if calls["n"] > 3 * per_step:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    monkeypatch.setattr(TaskBatcher, "next_batch", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "cut"), progress=False)
    monkeypatch.setattr(TaskBatcher, "next_batch", original)
    train(config(tmp_path / "cut"), resume=True, progress=False)
    for file in ("model.safetensors", "weighting.safetensors"):
        a, b = (load_file(str(tmp_path / run / "checkpoints/last" / file)) for run in ("full", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    assert train_lines(tmp_path / "full") == train_lines(tmp_path / "cut")


# -- the step's mechanics ---------------------------------------------------------------------------------
def tiny_model(backbone_dir: str, arrangement: str | None):
    from multitune.config.adapters import AdapterConfig
    from multitune.model import MultiTaskModel
    from multitune.tasks import TASKS as TASK_TYPES

    backbone, tok = load_backbone(backbone_dir)
    tasks = {}
    for name in ("sentiment", "topic"):
        impl = TASK_TYPES.get("classification")
        tasks[name] = impl(name, from_dict(impl.config_class, {"type": "classification", "labels": ["x", "y"]}))
        tasks[name].setup([])
    adapters = None if arrangement is None else from_dict(AdapterConfig, {"method": "lora",
                                                                          "arrangement": arrangement}, "adapters")
    torch.manual_seed(0)
    model = MultiTaskModel(backbone, tasks, tok, adapters=adapters)
    if adapters is not None:
        model.backbone.requires_grad_(False)
    return model, tok


def test_shared_parameters_are_what_several_tasks_reach(tiny_backbone):
    model, _ = tiny_model(tiny_backbone, None)
    shared = shared_parameters(model, [p for p in model.parameters() if p.requires_grad])
    assert {id(p) for p in shared} == {id(p) for p in model.backbone.parameters()}
    model, _ = tiny_model(tiny_backbone, "shared")
    shared = shared_parameters(model, [p for p in model.parameters() if p.requires_grad])
    assert {id(p) for p in shared} == {id(p) for p in model.adapters.parameters()}
    model, _ = tiny_model(tiny_backbone, "per_task")
    assert shared_parameters(model, [p for p in model.parameters() if p.requires_grad]) == []


class OneProcess:
    """What :class:`WeightedStep` uses of an Accelerator, for one process."""

    num_processes = 1
    device = torch.device("cpu")

    @staticmethod
    def backward(loss):
        loss.backward()


def test_per_task_gradients_add_up_to_the_joint_backward(tiny_backbone):
    """With a combine that adds the per-task gradients up, the per-task path gives the gradient of the
    summed losses on every parameter, shared (set aside and written back) or task-specific (accumulated)."""
    model, tok = tiny_model(tiny_backbone, None)
    batches = {t: model.tasks[t].collate(model.tasks[t].encode([{"text": "a fine film", "label": "x"},
                                                                 {"text": "a dull day", "label": "y"}], tok, 16),
                                         tok.pad_token_id) for t in ("sentiment", "topic")}
    model.eval()  # no dropout: both passes see the same function
    sum(model(t, b).loss for t, b in batches.items()).backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    summing = SimpleNamespace(needs_all_tasks=True, needs_per_task_gradients=True, needs_shared_layer=False,
                              needs_losses_after_step=False, config=None,
                              combine=lambda grads: torch.stack(list(grads.values())).sum(0))
    sampler = SimpleNamespace(probabilities=lambda: {"sentiment": 0.5, "topic": 0.5})
    step = WeightedStep(summing, sampler, model, model, list(model.parameters()), OneProcess())
    assert step.parts() == [["sentiment"], ["topic"]] and step.module is model
    for (task,) in step.parts():
        loss = model(task, batches[task]).loss
        step.backward(loss, {task: float(loss.detach())})
    assert all(p.grad is None for p in model.backbone.parameters())  # set aside until combined
    assert all(g.shape == (sum(p.numel() for p in model.backbone.parameters()),) for g in step.grads.values())
    step.combine()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n not in joint), n  # a parameter no task reaches keeps no gradient
        if p.grad is not None:
            assert torch.allclose(p.grad, joint[n], atol=1e-6), n


# -- several processes ------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch without gloo")
@pytest.mark.parametrize("name", ["pcgrad", "famo"])
def test_two_processes_stay_identical(tiny_backbone, toy_data, tmp_path, name):
    """Per-task gradients (PCGrad) and several forward passes in one step with a state updated from losses
    (FAMO) under 2 CPU processes: every process holds the same weights at every evaluation."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=4, eval_every=2, batch_size=2,
                     max_length=16, device="cpu")
    raw["tasks"] = {t: raw["tasks"][t] for t in TASKS[2]}
    raw["loss_weighting"] = {"strategy": name}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(_free_port()), str(REPO / "tests" / "distributed_worker.py"),
                           str(tmp_path / "run.yaml"), str(tmp_path / "digests")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [[json.loads(line) for line in (tmp_path / "digests" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert [e["step"] for e in ranks[0]] == [2, 4] == [e["step"] for e in ranks[1]]
    assert [e["digest"] for e in ranks[0]] == [e["digest"] for e in ranks[1]]
    assert ranks[0][0]["digest"] != ranks[0][1]["digest"]
    lines = train_lines(tmp_path / "run")
    assert all(set(r["loss"]) == set(TASKS[2]) for r in lines)  # logged once, every task in every step


def test_gradnorm_balances_on_the_encoder_when_a_task_skips_the_decoder(tiny_t5, toy_data, tmp_path, monkeypatch):
    """A head task reaches only the encoder of an encoder-decoder: GradNorm's layer is the last encoder
    weight both tasks reach, not a decoder weight."""
    from tests.conftest import text2text_config

    raw = text2text_config(toy_data, tiny_t5, tmp_path / "run", tasks=("sentiment", "translate"), max_steps=2,
                           eval_every=2, max_length=16, batch_size=4, log_every=1)
    raw["loss_weighting"] = {"strategy": "gradnorm"}
    layers = []
    original = WeightedStep.weigh

    def spy(self, losses):
        out = original(self, losses)
        layers.append(next(n for n, p in self.core.named_parameters() if p is self.layer))
        return out

    monkeypatch.setattr(WeightedStep, "weigh", spy)
    train(parse_config(raw), progress=False)
    assert layers and all(n.startswith("backbone.encoder.") for n in layers), layers
    lines = train_lines(tmp_path / "run")
    assert all(set(r["grad_stats"]["grad_norm"]) == {"sentiment", "translate"} for r in lines)
