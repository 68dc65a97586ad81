"""FSDP2 training: 2 CPU processes (gloo) started by `accelerate launch --use_fsdp --fsdp_version 2` hold the
model sharded, and end with the weights and validation metrics of one process trained on the same global batches
(batch_size 2 x B); the checkpoints and `model/` they write hold the full, unsharded weights.

Run as a script, this file is the worker `accelerate launch` starts: it trains CONFIG and records, at every
evaluation, whether this process's model is sharded and its share of the word embeddings' rows.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from multitune.config import load_config
from multitune.errors import ConfigError, MultituneError
from multitune.model import MultiTaskModel
from multitune.training import train
from multitune.training.distributed import check_fsdp_run, sharded
from multitune.weighting import WEIGHTINGS
from tests.conftest import REPO, toy_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert a[key].shape == b[key].shape, f"{what}: {key}"
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), \
            f"{what}: {key} differs by {(a[key] - b[key]).abs().max().item():.2e}"


def test_fsdp_refuses_what_a_sharded_run_cannot_do():
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    for strategy in ("pcgrad", "gradnorm"):  # gradient-level: they average and combine gradients themselves
        with pytest.raises(ConfigError, match="loss_weighting.strategy"):
            check_fsdp_run(fsdp, strategy, WEIGHTINGS.get(strategy), False, 0, False)
    with pytest.raises(ConfigError, match="training.gradual_unfreezing"):
        check_fsdp_run(fsdp, "sum", WEIGHTINGS.get("sum"), True, 0, False)
    with pytest.raises(MultituneError, match="--resume"):
        check_fsdp_run(fsdp, "uncertainty", WEIGHTINGS.get("uncertainty"), False, 0, True)
    check_fsdp_run(fsdp, "uncertainty", WEIGHTINGS.get("uncertainty"), False, 0, False)
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    check_fsdp_run(ddp, "pcgrad", WEIGHTINGS.get("pcgrad"), True, 5, True)  # DDP runs all of them


def test_fsdp_on_two_processes_equals_one_process_at_the_same_global_batch(tiny_backbone, toy_data, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")

    # without dropout: a process draws the masks of its own rows, so masks would differ from one process's
    backbone = shutil.copytree(tiny_backbone, tmp_path / "backbone")
    settings = json.loads((backbone / "config.json").read_text())
    settings.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (backbone / "config.json").write_text(json.dumps(settings))

    def config(name: str, batch_size: int) -> Path:
        raw = toy_config(toy_data, str(backbone), tmp_path / name, max_steps=6, eval_every=3,
                         batch_size=batch_size, device="cpu", precision="fp32",
                         head_learning_rate=1e-3)  # the backbone's: the default 1e-2 amplifies float rounding
        # sentence-level tasks: a token-level loss is a mean over each process's own tokens, which the mean over
        # processes does not turn into the mean over the global batch's tokens
        raw["tasks"] = {n: {**raw["tasks"][n], "dropout": 0.0} for n in ("sentiment", "similarity")}
        raw["loss_weighting"] = {"strategy": "uncertainty"}  # learned weights outside the sharded model
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    sharded_config, records = config("fsdp", 2), tmp_path / "records"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    # no --multi_gpu: with --use_fsdp, Accelerate's torchrun launcher starts the processes; the transformer
    # layers (BertLayer) become FSDP units of their own, the rest of the model the root unit
    proc = subprocess.run([accelerate, "launch", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
                           "TRANSFORMER_BASED_WRAP", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(_free_port()), __file__, str(sharded_config), str(records)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train(load_config(config("one", 4)), progress=False)  # one process, the same global batches

    ranks = [[json.loads(line) for line in (records / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    vocab = MultiTaskModel.load(tmp_path / "one" / "model").backbone.get_input_embeddings().weight.shape[0]
    for rank in ranks:
        assert [e["step"] for e in rank] == [3, 6]
        assert all(e["sharded"] and e["rows"] < vocab for e in rank), rank  # each holds a shard, not a replica
    assert sum(e["rows"] for e in (ranks[0][0], ranks[1][0])) == vocab

    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    for name in ("last", "best"):  # written from the gathered full weights, loadable without FSDP
        for file in ("model.safetensors", "weighting.safetensors"):
            _assert_close(load_file(fsdp / "checkpoints" / name / file), load_file(one / "checkpoints" / name / file),
                          f"checkpoints/{name}/{file}")
    # the main process holds only its shard of the optimizer state: none is written (such a run is not resumed)
    assert not (fsdp / "checkpoints" / "last" / "optimizer.pt").exists()
    loaded = {name: MultiTaskModel.load(tmp_path / name / "model") for name in ("fsdp", "one")}
    _assert_close(loaded["fsdp"].state_dict(), loaded["one"].state_dict(), "model/")

    def evaluations(run: Path) -> list[tuple[int, dict]]:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["metrics"]) for m in lines if m["kind"] == "eval"]

    assert evaluations(fsdp) == evaluations(one)
    assert [(e["step"], e["results"]) for e in ranks[1]] == evaluations(one)  # every process evaluates alike
    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("fsdp", "one")}
    assert results["fsdp"]["validation"] == results["one"]["validation"]
    assert results["fsdp"]["train"]["examples"] == results["one"]["train"]["examples"] == 6 * 4


def _record_shards(config: str, records: str) -> None:
    """The worker: train ``config`` and append, at every evaluation, a JSON line to ``records/rank<R>.jsonl``."""
    rank = int(os.environ.get("RANK", "0"))
    Path(records).mkdir(parents=True, exist_ok=True)

    def record(step, results, tasks, model):
        weight = model.backbone.get_input_embeddings().weight
        rows = weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]
        with open(Path(records) / f"rank{rank}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "sharded": sharded(model), "rows": rows, "results": results}) + "\n")

    train(load_config(config), progress=False, on_evaluate=record)


if __name__ == "__main__":
    _record_shards(*sys.argv[1:3])
