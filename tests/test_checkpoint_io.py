"""What a run writes: ``checkpoints/best`` holds weights only, ``last`` links the files it shares with a
``best`` of the same step, a task whose best step is the run's writes no snapshot of its own (and gets one, the
same bytes, before the best checkpoint moves on), a staged run links its final model; a linked file never
changes when another checkpoint is rewritten; ``results.json`` reports the bytes on disk."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from multitune import fileio
from multitune.cli import main
from multitune.config import parse_config
from multitune.fileio import files_on_disk, link_or_copy
from multitune.training import train
from multitune.training.checkpoint import load_checkpoint, save_checkpoint
from multitune.training.per_task import (
    FORMAT,
    IN_BEST,
    META_FILE,
    PER_TASK_DIR,
    WEIGHTS_FILE,
    PerTaskBest,
    load_snapshot,
    task_parameters,
)
from tests.conftest import toy_config

# -- link_or_copy ----------------------------------------------------------------------------------------------


def test_link_or_copy_links_and_falls_back_to_a_copy(tmp_path, monkeypatch):
    src = tmp_path / "a.bin"
    src.write_bytes(b"weights")
    assert link_or_copy(src, tmp_path / "linked") is True
    assert (tmp_path / "linked").stat().st_ino == src.stat().st_ino and src.stat().st_nlink == 2

    def no_links(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(fileio.os, "link", no_links)
    assert link_or_copy(src, tmp_path / "copied") is False
    copied = tmp_path / "copied"
    assert copied.read_bytes() == b"weights" and copied.stat().st_ino != src.stat().st_ino

    def missing(a, b):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(fileio.os, "link", missing)  # any other error is a real one
    with pytest.raises(FileNotFoundError):
        link_or_copy(src, tmp_path / "other")


def test_files_on_disk_counts_a_linked_file_once(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 100)
    os.link(tmp_path / "d" / "a", tmp_path / "b")
    (tmp_path / "c").write_bytes(b"y" * 10)
    os.symlink(tmp_path / "c", tmp_path / "s")
    assert sorted(files_on_disk(tmp_path).values()) == [10, 100]


# -- checkpoints -----------------------------------------------------------------------------------------------


class Weighting(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(2))


def parts():
    torch.manual_seed(0)
    model, weighting = nn.Linear(4, 3), Weighting()
    optimizer = torch.optim.SGD([*model.parameters(), *weighting.parameters()], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, weighting, optimizer, scheduler


def step(model, weighting, optimizer, scheduler):
    loss = model(torch.ones(2, 4)).sum() + weighting.log_vars.sum()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_best_holds_weights_only_and_last_links_them_at_the_same_step(tmp_path):
    model, weighting, optimizer, scheduler = parts()
    step(model, weighting, optimizer, scheduler)
    best, last = tmp_path / "best", tmp_path / "last"
    save_checkpoint(best, model, weighting, None, None, {"step": 1})
    save_checkpoint(last, model, weighting, optimizer, scheduler, {"step": 1}, same_as=best)
    assert sorted(os.listdir(best)) == ["model.safetensors", "trainer_state.json", "weighting.safetensors"]
    assert sorted(os.listdir(last)) == ["model.safetensors", "optimizer.pt", "trainer_state.json",
                                        "weighting.safetensors"]
    for name in os.listdir(best):  # one file on disk, two names
        assert (best / name).stat().st_ino == (last / name).stat().st_ino and (best / name).stat().st_nlink == 2
    # a best of another moment is not linked, even when passed
    save_checkpoint(tmp_path / "other", model, weighting, None, None, {"step": 2}, same_as=best)
    assert (tmp_path / "other" / "model.safetensors").stat().st_nlink == 1


def test_a_linked_file_survives_the_other_checkpoint_being_rewritten(tmp_path):
    model, weighting, optimizer, scheduler = parts()
    step(model, weighting, optimizer, scheduler)
    at_1 = {k: v.clone() for k, v in model.state_dict().items()}
    best, last = tmp_path / "best", tmp_path / "last"
    save_checkpoint(best, model, weighting, None, None, {"step": 1})
    save_checkpoint(last, model, weighting, optimizer, scheduler, {"step": 1}, same_as=best)
    kept = files(best)
    step(model, weighting, optimizer, scheduler)  # step 2 does not improve: only last is written again
    save_checkpoint(last, model, weighting, optimizer, scheduler, {"step": 2})
    assert files(best) == kept and (best / "model.safetensors").stat().st_nlink == 1
    restored, _, _, _ = parts()
    assert load_checkpoint(best, restored) == {"step": 1}
    assert all(torch.equal(v, at_1[k]) for k, v in restored.state_dict().items())
    assert not all(torch.equal(v, at_1[k]) for k, v in model.state_dict().items())
    # and the other way round: a new best leaves the last checkpoint that links the old one as it was
    save_checkpoint(best, model, weighting, None, None, {"step": 2})
    save_checkpoint(last, model, weighting, optimizer, scheduler, {"step": 2}, same_as=best)
    kept = files(last)
    step(model, weighting, optimizer, scheduler)
    save_checkpoint(best, model, weighting, None, None, {"step": 3})
    assert files(last) == kept
    again = parts()
    assert load_checkpoint(last, again[0], again[1], again[2], again[3], restore_rng=True)["step"] == 2
    assert not list(tmp_path.glob(".*")) and sorted(os.listdir(tmp_path)) == ["best", "last"]


# -- per-task snapshots ----------------------------------------------------------------------------------------


class Scored:
    """A task whose main score is ``metrics["score"]``."""

    def __init__(self):
        self.loaded = None

    def selection_score(self, metrics):
        return metrics["score"]

    def state(self):
        return {"threshold": 0.5}

    def load_state(self, state):
        self.loaded = state


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.backbone = nn.Linear(4, 4)
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
        self.tasks = {"a": Scored(), "b": Scored()}


def test_a_snapshot_at_the_runs_best_step_is_written_only_when_the_best_checkpoint_moves(tmp_path):
    model, weighting = TwoHeads(), Weighting()
    checkpoints = tmp_path / "checkpoints"
    per_task = PerTaskBest(checkpoints / PER_TASK_DIR, model, list(model.parameters()), model.tasks, ["a", "b"],
                           snapshots=True, main_process=True, log=lambda record: None)
    records: dict[str, dict] = {}
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def evaluation(step: int, scores: dict[str, float], improved: bool) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * step)
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        per_task.update(records, step, {t: {"score": s} for t, s in scores.items()}, best_moves=improved)
        if improved:  # what the Checkpointer does next
            save_checkpoint(checkpoints / "best", model, weighting, None, None, {"step": step})

    def meta(task: str) -> dict:
        return json.loads((checkpoints / PER_TASK_DIR / task / META_FILE).read_text())

    evaluation(1, {"a": 0.5, "b": 0.5}, improved=True)
    assert meta("a")["weights"] == meta("b")["weights"] == IN_BEST
    assert not list((checkpoints / PER_TASK_DIR).glob(f"*/{WEIGHTS_FILE}"))
    expected = tmp_path / "expected.safetensors"  # what b's snapshot at step 1 would have held
    save_file({k: weights[1][k] for k in task_parameters(model, "b", {id(p) for p in model.parameters()})},
              str(expected), metadata={"format": FORMAT})

    evaluation(2, {"a": 0.6, "b": 0.4}, improved=True)  # the run's best moves on; b's stays at step 1
    assert (meta("a")["weights"], meta("a")["step"]) == (IN_BEST, 2)
    assert (meta("b")["weights"], meta("b")["step"]) == (WEIGHTS_FILE, 1)
    assert (checkpoints / PER_TASK_DIR / "b" / WEIGHTS_FILE).read_bytes() == expected.read_bytes()
    assert not any(k.startswith("heads.a.") for k in load_file(str(checkpoints / PER_TASK_DIR / "b" / WEIGHTS_FILE)))

    evaluation(3, {"a": 0.55, "b": 0.7}, improved=False)  # b improves, the run does not: b's own weights
    assert (meta("a")["weights"], meta("a")["step"]) == (IN_BEST, 2)
    assert (meta("b")["weights"], meta("b")["step"]) == (WEIGHTS_FILE, 3)

    for task, at in (("a", 2), ("b", 3)):  # export's view: each task over the final model gets its step's weights
        final = TwoHeads()
        assert load_snapshot(checkpoints / PER_TASK_DIR / task, final, task)["step"] == at
        own = final.state_dict()
        assert all(torch.equal(own[k], weights[at][k]) for k in own if not k.startswith("heads.")
                   or k.startswith(f"heads.{task}."))
        assert final.tasks[task].loaded == {"threshold": 0.5}
    per_task.start(records, resuming=True)  # a resume keeps what the records name
    assert sorted(os.listdir(checkpoints / PER_TASK_DIR)) == ["a", "b"]


# -- a run -----------------------------------------------------------------------------------------------------


def test_a_run_writes_each_file_once_and_reports_it(tiny_backbone, toy_data, tmp_path, capsys):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=4, eval_every=4)
    raw["tasks"] = {"sentiment": raw["tasks"]["sentiment"]}
    run = tmp_path / "run"
    text = io.StringIO()
    results = train(parse_config(raw), progress=False, console=Console(file=text, width=300))
    train_info = results["train"]
    assert train_info["best_step"] == 4 and train_info["per_task_best"]["sentiment"]["step"] == 4
    best, last = run / "checkpoints" / "best", run / "checkpoints" / "last"
    assert not (best / "optimizer.pt").exists() and (last / "optimizer.pt").is_file()
    assert (best / "model.safetensors").stat().st_ino == (last / "model.safetensors").stat().st_ino
    snapshot = run / "checkpoints" / PER_TASK_DIR / "sentiment"  # the run's best step: no copy of its own
    assert sorted(os.listdir(snapshot)) == [META_FILE]
    assert json.loads((snapshot / META_FILE).read_text())["weights"] == IN_BEST

    # measured on disk: every file once (results.json and plots are written after the measure)
    measured = {k: v for k, v in files_on_disk(run).items()}
    later = {(s.st_dev, s.st_ino, s.st_mtime_ns) for p in run.iterdir()
             if p.name == "results.json" or p.suffix == ".png" for s in [p.stat()]}
    assert train_info["disk_bytes"] == sum(v for k, v in measured.items() if k not in later)
    names = sum(p.stat().st_size for p in run.rglob("*") if p.is_file() and p.parent != run)
    assert train_info["disk_bytes"] < names  # du --count-links would count the linked weights twice
    assert train_info["bytes_written"] == train_info["disk_bytes"]  # one evaluation: nothing was replaced
    assert train_info["write_s"] > 0 and train_info["process_s"] >= train_info["wall_s"]
    assert f"wrote {train_info['bytes_written'] / 1e6:,.0f} MB in" in text.getvalue()
    assert "MB on disk" in text.getvalue() and "; process " in text.getvalue()

    # export takes the task from the best checkpoint and scores what the run recorded
    capsys.readouterr()
    assert main(["export", str(run), "--task", "sentiment", "--output", str(tmp_path / "export")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["source"], report["step"]) == ("per-task-best", 4) and "note" not in report
    assert main(["evaluate", str(tmp_path / "export")]) == 0
    assert json.loads(capsys.readouterr().out)["validation"] == {
        "sentiment": train_info["per_task_best"]["sentiment"]["metrics"]}

    # --overwrite removes the run's names only: a link the user made elsewhere keeps its content
    kept = tmp_path / "kept.safetensors"
    os.link(best / "model.safetensors", kept)
    content = kept.read_bytes()
    raw["training"]["max_steps"] = 2
    raw["training"]["eval_every"] = 1
    again = train(parse_config(raw), overwrite=True, progress=False, console=Console(file=io.StringIO()))
    assert kept.read_bytes() == content and kept.stat().st_nlink == 1
    assert again["train"]["bytes_written"] > again["train"]["disk_bytes"]  # step 1's checkpoints were replaced


@pytest.mark.parametrize("tune", [False, True])
def test_the_end_of_a_run_validates_once_more_only_when_calibration_changes_the_model(tiny_backbone, toy_data,
                                                                                      tmp_path, monkeypatch, tune):
    """One validation pass in the loop (step 4, the last and best step, whose results the end of the run
    reuses); a second one only after thresholds were tuned, and its results are the calibrated model's."""
    from multitune.training.run import Run

    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=4, eval_every=4)
    raw["tasks"] = {"sentiment": {**raw["tasks"]["sentiment"], "tune_threshold": tune}}
    calls: list[str] = []
    evaluate = Run.evaluate

    def counting(self, split, predictions=None):
        calls.append(split)
        return evaluate(self, split, predictions)

    monkeypatch.setattr(Run, "evaluate", counting)
    results = train(parse_config(raw), progress=False, console=Console(file=io.StringIO()))
    assert calls.count("validation") == (2 if tune else 1)
    assert ("calibration" in results) is tune


def test_a_staged_run_links_its_model_to_the_last_stages(tiny_backbone, toy_data, tmp_path):
    raw = toy_config(toy_data, tiny_backbone, tmp_path / "run", max_steps=2, eval_every=2)
    raw["tasks"] = {k: raw["tasks"][k] for k in ("ner", "sentiment")}
    raw["stages"] = [{"name": "ner", "tasks": ["ner"]}, {"name": "sentiment", "tasks": ["sentiment"]}]
    train(parse_config(raw), progress=False, console=Console(file=io.StringIO()))
    model, last_stage = tmp_path / "run" / "model", tmp_path / "run" / "stages" / "02-sentiment" / "model"
    stage_files = sorted(p.relative_to(last_stage) for p in last_stage.rglob("*") if p.is_file())
    assert stage_files == sorted(p.relative_to(model) for p in model.rglob("*") if p.is_file())
    assert all((model / f).stat().st_ino == (last_stage / f).stat().st_ino for f in stage_files)
