"""Evaluate a finished run directory again (e.g. on its test split or on new data through --set)."""

from __future__ import annotations

from pathlib import Path

from multitune.config.loader import apply_overrides, parse_config, read_yaml
from multitune.errors import MultituneError
from multitune.evaluation.evaluator import evaluate_task
from multitune.model import load
from multitune.tasks.prepared import read_task_data


def evaluate_run(run_dir: str | Path, split: str = "validation", overrides: list[str] | None = None) -> dict:
    """Load ``RUN_DIR/model`` and score every task that has ``split`` data in ``RUN_DIR/config.yaml``.

    The split is rebuilt exactly as in training (same seeds), so a carved-out validation split is the
    same examples. Returns ``{split: {task: {metric: value}}}``.

    Raises:
        MultituneError: the run directory has no config or model, or no task has data for ``split``.
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise MultituneError(f"{run}: not a run directory (no config.yaml)")
    config = parse_config(apply_overrides(read_yaml(run / "config.yaml"), list(overrides or [])))
    model = load(run)
    missing = [n for n in config.tasks if n not in model.tasks]
    if missing:
        raise MultituneError(f"{run}: the model has no task {missing[0]!r}; its tasks: {', '.join(model.tasks)}")
    prepared = read_task_data(config, {n: model.tasks[n] for n in config.tasks})
    results = {}
    for name, p in prepared.items():
        if split not in p.data.splits:
            continue
        feats = p.task.encode(p.data.splits[split], model.tokenizer, model.max_length)
        pad = model.tokenizer.pad_token_id or 0
        # the batches the run evaluated with, so that fp32 metrics repeat to the last digit
        tcfg = config.training
        results[name] = evaluate_task(model, p.task, feats, p.data.splits[split],
                                      tcfg.eval_batch_size or 2 * tcfg.batch_size, pad, tcfg.eval_batch_tokens)[0]
    if not results:
        raise MultituneError(f"{run}: no task has {split} data ({_how_to_get(split)})")
    return {split: results}


def _how_to_get(split: str) -> str:
    """The two ways a task gets a held-out split: a file of its own, or a fraction carved out of train."""
    if split not in ("validation", "test"):
        return f"configure tasks.<name>.data.{split}"
    only = ", which applies when the task has no validation file" if split == "test" else ""
    # carved when training: carving it now would take examples the model was trained on
    return (f"give a task a {split} file, tasks.<name>.data.{split}, or carve a fraction out of train when "
            f"training, tasks.<name>.data.split.{split}{only}")
