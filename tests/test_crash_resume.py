"""Crash safety: a run killed with SIGKILL at any moment (mid-training, mid-checkpoint, between the renames of a
checkpoint) and resumed with ``--resume`` ends bitwise equal to an uninterrupted run with the same seed; the
directory replacement behind every checkpoint survives a crash at each of its steps."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune import fileio
from multitune.config import load_config
from multitune.config.loader import save_config
from multitune.fileio import recover_dir, replace_dir
from multitune.training import train
from multitune.training.checkpoint import find_checkpoint
from tests.conftest import REPO, write

DRIVER = REPO / "tests" / "crash_driver.py"
WORDS = "good bad fine awful great poor nice dull bright dark".split()


def run_config(tmp_path: Path, backbone: str, out: Path) -> Path:
    """Two tasks, learned loss weights, temperature sampling, a checkpoint every 4 of 40 steps."""
    rows = [f"{'pos' if i % 2 else 'neg'}\tthe thing {i} was {WORDS[i % 10]} and {WORDS[i * 7 % 10]}" for i in range(120)]
    cls = write(tmp_path / "cls.tsv", "label\tsentence\n" + "\n".join(rows) + "\n")
    reg = write(tmp_path / "reg.csv", "".join(f"text {WORDS[i % 10]} {i},pair {WORDS[i * 3 % 10]} {i},{i % 11 / 2}\n"
                                              for i in range(80)))
    raw = {"backbone": backbone, "output_dir": str(out), "seed": 5, "freeze": "embeddings",
           "tasks": {"sentiment": {"type": "classification", "data": {"train": {"path": str(cls), "text": "sentence"}}},
                     "similarity": {"type": "regression", "label_range": [0, 5], "data": {"train": {
                         "path": str(reg), "header": False, "columns": ["text", "text_pair", "label"]}}}},
           "sampling": {"strategy": "temperature", "temperature": 2.0}, "loss_weighting": {"strategy": "uncertainty"},
           "training": {"max_steps": 40, "batch_size": 8, "eval_every": 4, "max_length": 24, "learning_rate": 1e-3,
                        "log_every": 2}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def run_driver(mode: str, n: int, config: Path, tmp_path: Path, extra_delay: float = 0.0) -> str:
    """Start ``multitune train CONFIG --resume`` under the driver; SIGKILL it once its hook fires.

    Returns:
        ``killed`` or ``finished`` (the hook never fired: the run ended first).
    """
    marker = tmp_path / "marker"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(DRIVER), mode, str(n), str(marker), "train", str(config),
                                 "--resume", "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if marker.exists():
                time.sleep(extra_delay)
                proc.kill()  # SIGKILL: no cleanup of any kind runs
                proc.wait()
                return "killed"
            time.sleep(0.005)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            pytest.fail("the training process hung")
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    return "finished"


def checkpoint_step(run: Path) -> int | None:
    found = find_checkpoint(run / "checkpoints" / "last")
    return None if found is None else json.loads((found / "trainer_state.json").read_text())["step"]


def metric_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in lines]


def same_tensors(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(tiny_backbone, tmp_path):
    reference = tmp_path / "reference"
    ref_cfg = run_config(tmp_path, tiny_backbone, reference)
    expected = train(load_config(ref_cfg), progress=False)
    work = tmp_path / "killed"
    work.mkdir()
    config = run_config(work, tiny_backbone, work / "run")
    run = work / "run"
    rng = random.Random(20240607)
    # one run killed four times: at a random batch, inside a checkpoint write (model file written, optimizer
    # state not), between the two renames that replace checkpoints/last, at a random batch again
    trials = [("batch", rng.randint(3, 20)), ("in-save", 1), ("rename", 1), ("batch", rng.randint(3, 20))]
    outcomes = []
    for mode, n in trials:
        outcome = run_driver(mode, n, config, work, extra_delay=rng.uniform(0, 0.2) if mode == "batch" else 0)
        old = (run / "checkpoints" / "last.old").exists() and not (run / "checkpoints" / "last").exists()
        outcomes.append({"kill": f"{mode} {n}", "outcome": outcome, "resumes_from_step": checkpoint_step(run),
                         "only_last_old": old})
        if outcome == "finished":
            break
    if outcomes[-1]["outcome"] == "killed":
        outcomes.append({"kill": "none", "outcome": run_driver("batch", 10**9, config, work)})
    print("kill-and-resume trials:", json.dumps(outcomes))
    assert sum(o["outcome"] == "killed" for o in outcomes) >= 3, outcomes
    assert any(o.get("only_last_old") for o in outcomes), outcomes  # the rename kill left only last.old

    results = json.loads((run / "results.json").read_text())
    assert results["validation"] == expected["validation"] and results["test"] == expected["test"]
    assert results["train"]["steps"] == 40 and results["train"]["best_step"] == expected["train"]["best_step"]
    assert metric_lines(run) == metric_lines(reference)
    for name in ("model/backbone/model.safetensors", "model/heads.safetensors", "checkpoints/last/model.safetensors",
                 "checkpoints/best/model.safetensors", "checkpoints/last/weighting.safetensors"):
        assert same_tensors(run / name, reference / name), name
    def snapshot_files(root: Path) -> dict[str, bytes]:  # each task's best-step snapshot, byte for byte
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    snapshots = snapshot_files(run / "checkpoints" / "best-per-task")
    assert snapshots and snapshots == snapshot_files(reference / "checkpoints" / "best-per-task")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name not in ("best", "last", "best-per-task")]
    leftovers += [p.name for p in (run / "checkpoints" / "best-per-task").iterdir()
                  if p.name not in results["train"]["per_task_best"]]
    assert not leftovers, leftovers


def test_resume_without_a_checkpoint_starts_from_the_beginning(tiny_backbone, tmp_path):
    def config(out: Path):
        return load_config(run_config(tmp_path, tiny_backbone, out), ["training.max_steps=8"])

    reference = tmp_path / "reference"
    train(config(reference), progress=False)
    run = tmp_path / "killed-early"
    (run / "checkpoints" / ".last.tmp-999").mkdir(parents=True)  # killed while writing its first checkpoint
    save_config(config(run), run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 2, "loss": {}}\n{"kind": "tr')
    train(config(run), resume=True, progress=False)
    assert metric_lines(run) == metric_lines(reference)
    assert same_tensors(run / "model/backbone/model.safetensors", reference / "model/backbone/model.safetensors")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "best-per-task", "last"]
    train(config(tmp_path / "new"), resume=True, progress=False)  # --resume where nothing exists yet: a fresh run
    assert same_tensors(tmp_path / "new/model/backbone/model.safetensors", reference / "model/backbone/model.safetensors")


def test_resume_discards_a_stale_checkpoint_copy(tiny_backbone, tmp_path):
    """A run killed after replace_dir put the new checkpoint in place but before it deleted the old copy: the
    resumed run (with nothing left to train, so it never writes that checkpoint again) removes the copy."""
    config = load_config(run_config(tmp_path, tiny_backbone, tmp_path / "run"), ["training.max_steps=4",
                                                                               "training.eval_every=4"])
    train(config, progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    for name in ("last", "best"):
        shutil.copytree(checkpoints / name, checkpoints / f"{name}.old")
    train(config, resume=True, progress=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "best-per-task", "last"]


# -- replace_dir / recover_dir: a crash at every step ---------------------------------------------------------

class Crash(Exception):
    pass


def version(path: Path, v: str) -> Path:
    path.mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        (path / name).write_text(v)
    return path


def content(path: Path | None) -> str | None:
    """The version a directory holds, or 'torn' when its files disagree or some are missing."""
    if path is None:
        return None
    found = {(path / n).read_text() if (path / n).exists() else None for n in ("a.bin", "b.bin", "c.bin")}
    return found.pop() if len(found) == 1 and None not in found else "torn"


def crashing(monkeypatch, at: int | None) -> None:
    """Make the ``at``-th rename or tree removal of fileio crash: a rename before it happens, a removal after
    deleting one file (a removal cut short)."""
    count = {"n": 0}
    replace, rmtree = os.replace, shutil.rmtree

    def tick() -> bool:
        count["n"] += 1
        return count["n"] == at

    def os_replace(src, dst):
        if tick():
            raise Crash
        replace(src, dst)

    def sh_rmtree(path, *args, **kwargs):
        if tick():
            next(Path(path).iterdir()).unlink()
            raise Crash
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "replace", os_replace)
    monkeypatch.setattr(fileio.shutil, "rmtree", sh_rmtree)


@pytest.mark.parametrize("first", range(1, 6))
@pytest.mark.parametrize("second", range(1, 7))
def test_replace_dir_keeps_a_complete_directory_through_two_crashes(tmp_path, monkeypatch, first, second):
    final = version(tmp_path / "last", "v1")
    latest = "v1"  # the newest version known to be in place
    for at, v in ((first, "v2"), (second, "v3")):
        tmp = version(tmp_path / f".last.tmp-{v}", v)
        crashing(monkeypatch, at)
        try:
            replace_dir(tmp, final)
        except Crash:
            pass
        monkeypatch.undo()
        found = content(recover_dir(final))
        assert found in (latest, v), found  # the old or the new version, complete: never torn, never missing
        latest = found
        shutil.rmtree(tmp, ignore_errors=True)
    replace_dir(version(tmp_path / ".last.tmp-v4", "v4"), final)
    assert content(final) == "v4" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]
