"""Per-task model selection: each task's own best validation step is recorded and snapshotted during training,
and ``multitune export RUN --task T`` takes T from that step, so that the exported model scores exactly what
the run recorded for T; resume keeps the records and snapshots exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitune.cli import main
from multitune.config import parse_config
from multitune.model import MultiTaskModel
from multitune.training import Callback, train
from multitune.training.per_task import IN_BEST, META_FILE, PER_TASK_DIR, WEIGHTS_FILE
from tests.conftest import crash_after_batches, write

POS = "good fine great nice bright lovely superb".split()
NEG = "bad awful poor dull dark boring grim".split()
THINGS = "film meal book show hotel song game trip".split()
TASKS = ("sentiment", "similarity")


def _polar(i: int) -> str:
    return (POS if i % 2 else NEG)[i * 5 % 7]


def write_data(directory: Path) -> dict[str, Path]:
    """A sentiment task and a pair-similarity regression, 160 rows each (a quarter carved out for validation)."""
    rows = [f"{'pos' if i % 2 else 'neg'}\tthe {THINGS[i % 8]} {i % 13} was {_polar(i)}" for i in range(160)]
    pairs = [f"the {THINGS[i % 8]} was {_polar(i)},a {THINGS[i * 3 % 8]} is {_polar(i * 7 + 3)},"
             f"{(4.0 if i % 2 == (i * 7 + 3) % 2 else 1.0) + (0.8 if i % 8 == i * 3 % 8 else 0.0)}" for i in range(160)]
    return {"cls": write(directory / "cls.tsv", "label\tsentence\n" + "\n".join(rows) + "\n"),
            "reg": write(directory / "reg.csv", "\n".join(pairs) + "\n")}


def run_config(data: dict[str, Path], backbone: str, out: Path, adapters: dict | None = None, **training) -> dict:
    """Two tasks evaluated every 2 of 40 steps at a high learning rate: their best steps differ. The evaluation
    batch is `multitune evaluate`'s (64), so that scores of the same weights agree to the last bit."""
    split = {"validation": 0.25}
    raw = {"backbone": backbone, "output_dir": str(out), "seed": 1, "freeze": "embeddings",
           "tasks": {"sentiment": {"type": "classification", "head": "pooled",
                                   "data": {"train": {"path": str(data["cls"]), "text": "sentence"}, "split": split}},
                     "similarity": {"type": "regression", "label_range": [0, 5], "head": "pooled",
                                    "data": {"train": {"path": str(data["reg"]), "header": False,
                                                       "columns": ["text", "text_pair", "label"]}, "split": split}}},
           "sampling": {"strategy": "round_robin"},
           "training": {"max_steps": 40, "batch_size": 8, "eval_every": 2, "max_length": 24, "learning_rate": 1e-2,
                        "eval_batch_size": 64, **training}}
    if adapters is not None:
        raw["adapters"] = adapters
        raw.pop("freeze")
    return raw


def train_capturing(raw: dict) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """Train and keep a copy of the model's weights at every validation evaluation."""
    states: dict[int, dict[str, torch.Tensor]] = {}

    def capture(step, model, **_):
        states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    return train(parse_config(raw), progress=False, on_evaluate=capture), states


@pytest.fixture(scope="module")
def full_run(tiny_backbone, tmp_path_factory):
    """A full fine-tuning run (embeddings frozen) with the weights of every evaluation."""
    tmp = tmp_path_factory.mktemp("per-task")
    data = write_data(tmp)
    results, states = train_capturing(run_config(data, tiny_backbone, tmp / "run"))
    return {"dir": tmp / "run", "data": data, "results": results, "states": states, "tmp": tmp}


def _eval_records(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "eval"]


def _evaluate(directory: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(directory)]) == 0
    return json.loads(capsys.readouterr().out)["validation"]


def _export(run: Path, task: str, out: Path, capsys, *extra: str) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["export", str(run), "--task", task, "--output", str(out), *extra]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_each_task_keeps_its_own_best_step_and_weights(full_run):
    run, results, states = full_run["dir"], full_run["results"], full_run["states"]
    best = results["train"]["per_task_best"]
    assert set(best) == set(TASKS)
    steps = {t: best[t]["step"] for t in TASKS}
    assert steps["sentiment"] != steps["similarity"], steps  # the point of per-task selection
    assert any(s != results["train"]["best_step"] for s in steps.values()), steps
    # each record is the first evaluation with the task's highest main score
    evals = _eval_records(run)
    model = MultiTaskModel.load(run)
    for t in TASKS:
        scores = [(model.tasks[t].selection_score(r["metrics"][t]), r["step"], r["metrics"][t]) for r in evals]
        top = max(s for s, _, _ in scores)
        first = next((step, m) for s, step, m in scores if s == top)
        assert (best[t]["step"], best[t]["score"], best[t]["metrics"]) == (first[0], top, first[1])
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last_best = {r["task"]: r for r in logged if r["kind"] == "task_best"}
    assert {t: (r["step"], r["score"]) for t, r in last_best.items()} == {t: (best[t]["step"], best[t]["score"])
                                                                           for t in TASKS}
    # the snapshot: the task's head and the trained backbone at its best step; no frozen embeddings, no other
    # head. A task whose best step is the run's best step writes none: checkpoints/best holds those weights
    for t in TASKS:
        snap = run / "checkpoints" / PER_TASK_DIR / t
        meta = json.loads((snap / META_FILE).read_text())
        assert (meta["step"], meta["score"], meta["metrics"]) == (best[t]["step"], best[t]["score"], best[t]["metrics"])
        at_best = states[best[t]["step"]]
        if best[t]["step"] == results["train"]["best_step"]:
            assert meta["weights"] == IN_BEST and not (snap / WEIGHTS_FILE).exists()
            tensors = load_file(str(run / "checkpoints" / "best" / "model.safetensors"))
            assert tensors.keys() == at_best.keys() and all(torch.equal(v, at_best[k]) for k, v in tensors.items())
            continue
        assert meta["weights"] == WEIGHTS_FILE
        tensors = load_file(str(snap / WEIGHTS_FILE))
        other = next(o for o in TASKS if o != t)
        assert any(k.startswith(f"heads.{t}.") for k in tensors)
        assert not any(k.startswith(f"heads.{other}.") or "embeddings" in k for k in tensors)
        assert any(k.startswith("backbone.encoder.") for k in tensors)
        assert all(torch.equal(v, at_best[k]) for k, v in tensors.items())
    assert sorted(p.name for p in (run / "checkpoints" / PER_TASK_DIR).iterdir()) == sorted(TASKS)


def test_exported_task_reproduces_its_recorded_best_metrics(full_run, capsys):
    """The key property: the one-task model exported from a task's best step scores, on the validation split,
    exactly the metrics the run recorded for that task at that step."""
    run, results = full_run["dir"], full_run["results"]
    best = results["train"]["per_task_best"]
    final = MultiTaskModel.load(run)
    for t in TASKS:
        out = full_run["tmp"] / f"export-{t}"
        report, err = _export(run, t, out, capsys)
        assert (report["source"], report["step"], report["score"]) == ("per-task-best", best[t]["step"],
                                                                       best[t]["score"])
        assert "note" not in report and not err
        assert _evaluate(out, capsys) == {t: best[t]["metrics"]}
        exported = MultiTaskModel.load(out)
        assert list(exported.tasks) == [t] and exported.adapters is None
        if best[t]["step"] != results["train"]["best_step"]:  # not the run's model: other weights (the scores
            # may tie: a task's best is its first evaluation with its top score)
            theirs = final.state_dict()
            assert any(not torch.equal(v, theirs[k]) for k, v in exported.state_dict().items())
        text = ["--pairs", "tsv", "the film was great\tthe meal was good"] if exported.tasks[t].pair_input \
            else ["the film was great"]
        assert main(["predict", str(out), "--task", t, *text]) == 0


def test_export_from_final_matches_the_final_model(full_run, capsys):
    run, results = full_run["dir"], full_run["results"]
    out = full_run["tmp"] / "export-final"
    report, _ = _export(run, "sentiment", out, capsys, "--from", "final")
    assert (report["source"], report["step"]) == ("final", results["train"]["best_step"])
    assert _evaluate(out, capsys) == {"sentiment": results["validation"]["sentiment"]}
    exported, final = MultiTaskModel.load(out), MultiTaskModel.load(run)
    ours = exported.state_dict()
    theirs = {k: v for k, v in final.state_dict().items() if not k.startswith("heads.similarity.")}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    texts = ["the film was great", "the trip was dull"]
    assert exported.predict("sentiment", texts) == final.predict("sentiment", texts)


def test_lora_export_takes_adapter_and_head_from_the_tasks_best_step(tiny_backbone, tmp_path, capsys):
    data = write_data(tmp_path)
    raw = run_config(data, tiny_backbone, tmp_path / "run", adapters={"method": "lora", "r": 4, "learning_rate": 3e-2},
                     learning_rate=3e-2)
    results, states = train_capturing(raw)
    run, best = tmp_path / "run", results["train"]["per_task_best"]
    for t in TASKS:  # the snapshot holds the task's adapter and head only: the backbone is frozen
        if best[t]["step"] == results["train"]["best_step"]:
            continue  # (its weights are those of checkpoints/best)
        tensors = load_file(str(run / "checkpoints" / PER_TASK_DIR / t / WEIGHTS_FILE))
        assert {k.split(".")[0] for k in tensors} == {"heads", "adapters"}
        assert all(k.startswith((f"heads.{t}.", f"adapters.adapters.{t}.")) for k in tensors)
    t = next(t for t in TASKS if best[t]["step"] != results["train"]["best_step"])
    at_best = states[best[t]["step"]]
    # unmerged: no stock class pools as the default head does (exact adapter exports: tests/test_peft_export.py)
    assert main(["export", str(run), "--task", t, "--output", str(tmp_path / "adapter")]) == 2
    assert "no exact PEFT export" in capsys.readouterr().err
    final = load_file(str(run / "model" / "adapters.safetensors"))
    assert not all(torch.equal(at_best[k], final[k.removeprefix("adapters.")])
                   for k in at_best if k.startswith(f"adapters.adapters.{t}."))
    # merged: a one-task model that scores the recorded best metrics (to rounding: merging adds W + BA once)
    report, _ = _export(run, t, tmp_path / "merged", capsys, "--merge")
    assert report["merged"] and report["step"] == best[t]["step"]
    scored = _evaluate(tmp_path / "merged", capsys)[t]
    assert scored.keys() == best[t]["metrics"].keys()
    assert all(abs(scored[k] - v) < 1e-4 for k, v in best[t]["metrics"].items()), (scored, best[t]["metrics"])


def _snapshot_files(run: Path) -> dict[str, bytes]:
    root = run / "checkpoints" / PER_TASK_DIR
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_keeps_per_task_best_state_and_snapshots(full_run, tiny_backbone):
    """Killed mid-run, then killed after an evaluation wrote a snapshot but before its checkpoint: the resumed
    run ends with the records and snapshot files of the uninterrupted run, bit for bit."""
    reference, run = full_run["dir"], full_run["tmp"] / "resumed"
    raw = run_config(full_run["data"], tiny_backbone, run)
    with crash_after_batches(11), pytest.raises(KeyboardInterrupt):  # the last checkpoint is step 10's
        train(parse_config(raw), progress=False)
    logged = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    target = min(r["step"] for r in logged if r["kind"] == "task_best" and r["step"] > 12)

    class KilledWhileCheckpointing(Callback):
        def on_save(self, run, directory):  # before the step's first checkpoint is written
            if run.state.step == target:
                raise KeyboardInterrupt("killed while checkpointing")

    with pytest.raises(KeyboardInterrupt):
        train(parse_config(raw), resume=True, progress=False, callbacks=[KilledWhileCheckpointing()])
    ahead = [json.loads(p.read_text())["step"] for p in (run / "checkpoints" / PER_TASK_DIR).glob(f"*/{META_FILE}")]
    assert target in ahead  # a snapshot newer than the checkpoint the run resumes from
    (run / "checkpoints" / PER_TASK_DIR / ".sentiment.tmp-999").mkdir()  # a snapshot half-written when killed
    results = train(parse_config(raw), resume=True, progress=False)
    assert results["train"]["per_task_best"] == full_run["results"]["train"]["per_task_best"]
    assert _snapshot_files(run) == _snapshot_files(reference)
    assert sorted(p.name for p in (run / "checkpoints" / PER_TASK_DIR).iterdir()) == sorted(TASKS)
    strip = lambda run: [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}  # noqa: E731
                         for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(run) == strip(reference)


def test_errors_and_fallbacks(full_run, tiny_backbone, tmp_path, capsys):
    run = full_run["dir"]
    # an unknown task names the run and the valid tasks
    assert main(["export", str(run), "--task", "nope", "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err and "sentiment, similarity" in err
    # --merge needs adapters
    assert main(["export", str(run), "--task", "sentiment", "--merge", "--output", str(tmp_path / "e")]) == 2
    assert "no adapters" in capsys.readouterr().err
    # a snapshot that does not fit the model: one line naming the file
    best = full_run["results"]["train"]
    task = next(t for t in TASKS if best["per_task_best"][t]["step"] != best["best_step"])  # it has its own weights
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    weights = broken / "checkpoints" / PER_TASK_DIR / task / WEIGHTS_FILE
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.startswith(f"heads.{task}."))
    save_file({**tensors, key: torch.zeros(3, 3)}, str(weights))
    assert main(["export", str(broken), "--task", task, "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(weights) in err and key in err
    save_file({**tensors, "backbone.no.such.weight": torch.zeros(2)}, str(weights))
    assert main(["export", str(broken), "--task", task, "--output", str(tmp_path / "e")]) == 2
    assert "backbone.no.such.weight" in capsys.readouterr().err
    weights.write_bytes(b"not safetensors")
    assert main(["export", str(broken), "--task", task, "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(weights) in err
    # a snapshot that refers to the run's best checkpoint, which holds another step: one line, no export
    weights.unlink()
    meta_file = weights.parent / META_FILE
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "weights": IN_BEST}))
    assert main(["export", str(broken), "--task", task, "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(meta_file) in err and f"holds step {best['best_step']}" in err
    assert not (tmp_path / "e").exists()
    # without snapshots (training.per_task_best: false) the records stay; export falls back to the final model
    raw = run_config(full_run["data"], tiny_backbone, tmp_path / "plain", per_task_best=False, max_steps=6)
    results = train(parse_config(raw), progress=False)
    assert set(results["train"]["per_task_best"]) == set(TASKS)
    assert not (tmp_path / "plain" / "checkpoints" / PER_TASK_DIR).exists()
    report, err = _export(tmp_path / "plain", "similarity", tmp_path / "fallback", capsys)
    assert (report["source"], report["step"]) == ("final", results["train"]["best_step"])
    assert "no per-task snapshot" in report["note"] and "note:" in err
    assert _evaluate(tmp_path / "fallback", capsys) == {"similarity": results["validation"]["similarity"]}
