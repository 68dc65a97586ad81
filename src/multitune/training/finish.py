"""The end of a run: the best checkpoint restored, threshold calibration on it, the final evaluation,
``results.json`` built from plain values, and the run's model, results and plots written."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from multitune.config.parse import to_dict
from multitune.config.schema import RunConfig
from multitune.errors import MultituneError
from multitune.evaluation.confusion import plot_confusion_matrix
from multitune.evaluation.plots import plot_learning_curves, plot_sampling_shares
from multitune.fileio import read_jsonl, replace_dir, write_json_atomic
from multitune.model import MultiTaskModel
from multitune.tasks import Task
from multitune.tasks.prepared import PreparedTask
from multitune.training.affinity import batches_drawn
from multitune.training.card import run_model_card
from multitune.training.checkpoint import disk_full, find_checkpoint, load_checkpoint
from multitune.training.distributed import full_state_dict
from multitune.training.hardware import peak_memory
from multitune.training.progress import print_results_table
from multitune.training.run_dir import CHECKPOINTS
from multitune.training.state import TrainerState


def finish_run(run: Any, setup: Any) -> dict:
    """Restore the best checkpoint, calibrate thresholds on validation, evaluate validation (and test) once more,
    build the results, let the callbacks add to them (``on_run_end``), and write model, results and plots.

    Returns:
        The content of ``results.json``.
    """
    run.accelerator.wait_for_everyone()
    predictions: dict[str, list] = {}
    reused = latest_is_best(run)
    if reused is not None:  # the model in memory is the best one, evaluated at this very step
        validation, fusion_attention = reused[1], {}
        predictions.update(reused[2])
    else:
        best = find_checkpoint(run.checkpoint_dir("best"))
        if best is not None:
            load_checkpoint(best, run.core)
        validation, fusion_attention = final_validation(run, predictions)
    # tasks that tune decision thresholds do it now, on the restored best model's validation predictions; only
    # when one changes its thresholds does validation run again, so that the results are the calibrated model's
    calibrated = calibrate(run.tasks, run.active, predictions, {n: p.data.splits["validation"] for n, p in
                                                                run.prepared.items() if "validation" in p.data.splits})
    if calibrated:
        run.log({"kind": "calibrate", "step": run.state.step, "tasks": calibrated})
        predictions = {}
        validation, fusion_attention = final_validation(run, predictions)
    test = run.evaluate("test") if any("test" in p.features for p in run.prepared.values()) else None
    train_info = train_summary(run.state, run.stopped_early, run.selection_metric, setup.tokenize_s, setup.precision,
                               getattr(run.core.backbone.config, "_attn_implementation", None),
                               str(run.accelerator.device), {n: batches_drawn(b) for n, b in run.batchers.items()},
                               run.config.training.packing)
    results = build_results(validation, test, calibrated, train_info, {n: p.data.report for n, p in
                                                                       run.prepared.items()},
                            run.tasks, setup.vocab_report, adapter_summary(run.core, run.config, fusion_attention))
    weights = full_state_dict(run.core)  # FSDP: every process takes part in gathering them (else None)
    if run.main_process:
        with run.timing_writes():
            save_model(run.core, run.out, run.config, results, run.state.step, weights)
    run.callbacks.fire("on_run_end", run, results)
    if run.main_process:
        write_json_atomic(run.out / "results.json", results)
        plot_safely(run.console, lambda: plot_run(run.out),
                    lambda: plot_confusions(run.out, run.prepared, predictions))
        print_results_table(run.console, results, run.tasks)
    run.log.close()
    return results


def latest_is_best(run: Any) -> tuple[int, dict, dict] | None:
    """The evaluation made at the run's last step, when that step is also its best one: the model in memory is
    then the best checkpoint's, and evaluating it again would repeat the same numbers (on an LLM, the same
    generation). None when the best step is earlier, when no evaluation was made in this process (a resumed
    run that made no step), with several processes, or with AdapterFusion (whose attention statistics are
    measured on the final pass)."""
    last, state = run.last_validation, run.state
    if last is None or last[0] != state.step or state.best_step != state.step:
        return None
    if run.accelerator.num_processes > 1 or (run.core.adapters is not None and run.core.adapters.fusion is not None):
        return None
    return last


def final_validation(run: Any, predictions: dict[str, list]) -> tuple[dict, dict]:
    """The final model's validation metrics (its predictions into ``predictions``) and, with AdapterFusion,
    the fusion attention measured on this pass alone."""
    adapters = run.core.adapters
    if adapters is not None:
        adapters.fusion_attention(reset=True)
    validation = run.evaluate("validation", predictions)
    return validation, adapters.fusion_attention() if adapters is not None else {}


def plot_run(out: Path) -> None:
    """``learning_curves.png`` and ``sampling_shares.png`` from the run's ``metrics.jsonl``."""
    try:
        plot_learning_curves(read_jsonl(out / "metrics.jsonl"), out / "learning_curves.png")
        plot_sampling_shares(read_jsonl(out / "metrics.jsonl"), out / "sampling_shares.png")
    except ImportError:  # matplotlib is a dependency, but a broken install must not lose a finished run
        pass


def plot_confusions(out: Path, prepared: Mapping[str, PreparedTask], predictions: Mapping[str, list]) -> None:
    """``confusion_<task>.png`` for every task that has a confusion matrix (classification), on validation."""
    for name, preds in predictions.items():
        p = prepared[name]
        matrix = p.task.confusion(preds, p.data.splits["validation"])
        if matrix is not None:
            labels, counts = matrix
            try:
                plot_confusion_matrix(labels, counts, out / f"confusion_{name}.png", f"{name}: validation")
            except ImportError:
                return


def calibrate(tasks: Mapping[str, Task], active: Sequence[str], predictions: Mapping[str, list],
              gold: Mapping[str, list[dict]]) -> dict[str, dict]:
    """Let each active task tune its decision thresholds on validation ``predictions`` of the restored best
    model; returns what changed, per task."""
    changed = {}
    for name, preds in predictions.items():
        if name in active:
            change = tasks[name].calibrate(preds, gold[name])
            if change:
                changed[name] = change
    return changed


def train_summary(state: TrainerState, stopped_early: bool, metric_name: str, tokenize_s: float, precision: str,
                  attention: str | None, device: str, batches: dict, packing: bool = False) -> dict:
    """``results.json["train"]``: the run's counters and throughput (:class:`~multitune.training.callbacks.StepTimer`
    adds ``compile_s`` with torch.compile); with ``training.packing``, ``packing_efficiency``: real tokens per
    token slot of the training batches (head tasks' unpacked batches included); the process's peak memory
    up to the end of training (:func:`~multitune.training.hardware.peak_memory`)."""
    seconds = max(state.train_seconds, 1e-9)
    summary = {
        "steps": state.step, "best_step": state.best_step, "stopped_early": stopped_early,
        "selection_metric": metric_name, "best_value": state.best_value, "per_task_best": state.per_task_best,
        "skipped_steps": dict(state.bad_steps), "examples": state.examples, "wall_s": round(seconds, 2),
        "examples_per_s": round(state.examples / seconds, 2),
        "real_tokens_per_s": round(state.real_tokens / seconds, 1),
        "padded_tokens_per_s": round(state.padded_tokens / seconds, 1),
        "real_tokens": state.real_tokens, "padded_tokens": state.padded_tokens,
        "tokenize_s": round(tokenize_s, 2), "precision": precision, "attention": attention, "device": device,
        "batches": batches}
    if packing:
        summary["packing_efficiency"] = round(state.real_tokens / max(state.padded_tokens, 1), 4)
    summary.update(peak_memory(device))
    return summary


def build_results(validation: dict, test: dict | None, calibrated: dict, train: dict, data: dict,
                  tasks: Mapping[str, Task], vocabulary: dict | None, adapters: dict | None) -> dict:
    """The content of ``results.json`` (the transfer analysis adds ``transfer`` when it measured anything).

    Args:
        validation, test: metrics per task (``test`` None when no task has test data).
        calibrated: what threshold calibration changed, per task.
        train: :func:`train_summary`.
        data: each task's data report.
        tasks: the run's tasks (their class weights are reported).
        vocabulary: the vocabulary extension's report, if any.
        adapters: method, arrangement, sizes (and fusion attention) of the adapters, if any.
    """
    results: dict[str, Any] = {"validation": validation}
    if calibrated:
        results["calibration"] = calibrated
    if test is not None:
        results["test"] = test
    results["train"] = train
    results["data"] = data
    weights = {n: dict(zip(t.state()["labels"], t.state()["class_weights"]))
               for n, t in tasks.items() if t.state().get("class_weights")}
    if weights:
        results["class_weights"] = weights
    if vocabulary is not None:
        results["vocabulary"] = vocabulary
    if adapters is not None:
        results["adapters"] = adapters
    return results


def adapter_summary(model: MultiTaskModel, config: RunConfig, fusion_attention: dict) -> dict | None:
    """``results.json["adapters"]`` (None for a run without adapters)."""
    if model.adapters is None:
        return None
    summary = {"method": config.adapters.method, "arrangement": config.adapters.arrangement,
               "trainable": sum(p.numel() for p in model.adapters.parameters() if p.requires_grad),
               "bytes_per_task": model.adapters.bytes_per_task()}
    if fusion_attention:
        summary["fusion_attention"] = fusion_attention
    return summary


def save_model(core: MultiTaskModel, out: Path, config: RunConfig, results: dict, step: int,
               weights: dict | None = None) -> None:
    """Write ``out/model`` through a temporary directory; a full disk is one line that names the file and the
    last good checkpoint, and leaves no temporary directory behind. ``weights``: the model's full weights when
    they are not ``core``'s own (FSDP, see :func:`multitune.training.distributed.full_state_dict`)."""
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        core.save(tmp, extra={"backbone_source": to_dict(config.backbone), "trained_steps": step}, weights=weights)
        run_model_card(tmp, out / "model", {**core.metadata(), "backbone_source": to_dict(config.backbone)},
                       results, to_dict(config))
        replace_dir(tmp, out / "model")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):
            last = find_checkpoint(out / CHECKPOINTS / "last")
            raise MultituneError(f"{getattr(exc, 'filename', None) or tmp}: the disk is full (or a quota or "
                                 f"file-size limit was reached) while writing the final model; "
                                 + (f"the last good checkpoint is {last} (free space, then resume with --resume)"
                                    if last is not None else "no checkpoint was written")) from None
        raise


def plot_safely(console: Console, *plots: Any) -> None:
    """Run each plotting call; the model and results are saved already, so a plot that fails is one warning
    line, never the end of the run."""
    try:
        for plot in plots:
            plot()
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; the run's outputs are complete
        console.print(f"[yellow]warning[/]: plots were not written ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:200]})")
