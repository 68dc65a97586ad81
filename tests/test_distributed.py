"""Data-parallel training: 2 CPU processes (gloo) through `accelerate launch` hold identical weights at every
evaluation, see global batches of 2 x batch_size examples, and write the run directory once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from multitune.training.distributed import shard_batch
from tests.conftest import REPO, toy_config


def test_shard_batch_splits_every_row_tensor():
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5), "scalar": torch.tensor(3.0)}
    shares = [shard_batch(batch, r, 2) for r in range(2)]
    assert [s["labels"].tolist() for s in shares] == [[0, 1], [2, 3, 4]]
    assert torch.equal(torch.cat([s["input_ids"] for s in shares]), batch["input_ids"])
    assert all(s["scalar"] is batch["scalar"] for s in shares)
    assert shard_batch(batch, 0, 1) is batch
    tiny = {"input_ids": torch.ones(1, 3, dtype=torch.long)}  # fewer rows than processes: nobody is idle
    assert [len(shard_batch(tiny, r, 2)["input_ids"]) for r in range(2)] == [1, 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch without gloo")
def test_two_processes_keep_identical_weights_and_write_once(tiny_backbone, toy_data, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=6, eval_every=3, batch_size=2,
                     device="cpu")
    raw["tasks"].pop("mlm")
    raw["loss_weighting"] = {"strategy": "uncertainty"}  # learned weights outside DDP must stay in sync too
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    digests = tmp_path / "digests"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    # --multi_gpu is Accelerate's torchrun launcher; without GPUs (and with training.device cpu) the processes
    # use gloo on CPU. `--cpu` alone would start one process (Accelerate's multi-CPU launch goes through MPI).
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(_free_port()), str(REPO / "tests" / "distributed_worker.py"), str(config),
                           str(digests)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [[json.loads(line) for line in (digests / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [e["step"] for e in ranks[0]] == [3, 6] == [e["step"] for e in ranks[1]]
    for a, b in zip(*ranks):
        assert a["digest"] == b["digest"], f"the processes' weights differ at step {a['step']}"
        assert a["results"] == b["results"]  # every process evaluates alike, so early stopping agrees
    assert ranks[0][0]["digest"] != ranks[0][1]["digest"]  # and they did train
    results = [json.loads((digests / f"results-rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["examples"] == 6 * 2 * 2  # every step: one global batch of 2 processes x batch_size 2
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [3, 6]  # logged once, not once per process
    assert (run / "results.json").is_file() and (run / "model" / "heads.safetensors").is_file()
    assert json.loads((run / "results.json").read_text())["train"]["steps"] == 6
    assert not list(run.glob(".*tmp*"))  # no half-written leftovers
