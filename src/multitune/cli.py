"""The ``multitune`` command.

Every user-facing failure (bad config, bad data, bad run directory) is one line on stderr and exit
status 2; a traceback only ever means a bug in multitune.
"""

# Each ``cmd_*`` imports what its command needs when it runs: importing every command's modules here makes
# ``multitune --help`` take 4.5 s instead of 0.07 s (torch, transformers, accelerate), and ``serve`` needs the
# optional FastAPI.

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from multitune import __version__
from multitune.errors import MultituneError, printable, shorten_message, shown
from multitune.fileio import finite_json
from multitune.serving.settings import add_server_flags, port_number  # no FastAPI needed for the flags


class OneLineParser(argparse.ArgumentParser):
    """argparse with the CLI's error form: one line, ``multitune: error: ...`` with the command and the
    ``--help`` hint, exit status 2 (argparse's own form prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"multitune: error: {printable(shorten_message(message))} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (``--batch-size``, ``--steps``, ``--trials``, ...): an integer of at
    least 1; anything else is argparse's usage error, before any model is loaded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {shown(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1 or more), got {value}")
    return value


def _add_set(p: argparse.ArgumentParser, example: str = "training.max_steps=100") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config field, e.g. --set {example} (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="multitune", description="Multi-task fine-tuning of transformer models.")
    parser.add_argument("--version", action="version", version=f"multitune {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="run config (YAML)")
    _add_set(p)
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint "
                                                         "(with --set training.max_steps=N: extend it to N steps)")
    p.add_argument("--overwrite", action="store_true", help="replace output_dir when it holds an earlier "
                                                            "multitune run (never a folder multitune did not write)")
    p.add_argument("--accept-changed-data", action="store_true",
                   help="with --resume: continue although a data file changed since the checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar: a plain line of the task "
                                                              "losses every training.log_every steps")

    p = sub.add_parser("evaluate", help="evaluate a trained run on its validation or test data")
    p.add_argument("run_dir", help="a run directory (it holds config.yaml and model/)")
    p.add_argument("--split", default="validation", choices=["validation", "test"])
    _add_set(p, "tasks.sentiment.data.test.path=reviews-2026.csv")

    p = sub.add_parser("predict", help="predict with one task of a trained model (JSON lines)")
    p.add_argument("run_dir", help="a run directory, its model/ directory, an export or an ONNX export")
    p.add_argument("--task", required=True, help="the task to predict, e.g. sentiment (multitune predict checks "
                                                 "it against the model's tasks before loading)")
    p.add_argument("texts", nargs="*", help="texts to predict (quote each one)")
    p.add_argument("--input", help="file of inputs, one per line, in order: one text per line, or .jsonl objects "
                                   "with text (and text_pair; an id field is copied to the output); a blank line "
                                   "is an error")
    p.add_argument("--pairs", choices=["tsv"], help="tsv: each text and each line of a text --input is "
                                                    "TEXT<TAB>TEXT_PAIR (for tasks trained on pairs)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="inputs per forward pass (default: 64)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"],
                   help="inference precision: bf16 weights, or dynamic int8 quantisation (CPU)")

    p = sub.add_parser("embed", help="write sentence embeddings of texts (.npy or .jsonl)")
    p.add_argument("run_dir", help="a run directory, a model directory or 'default' (the packaged backbone)")
    p.add_argument("--input", required=True, help="one text per line (or .jsonl with a text field and an optional "
                                                  "id); row i of the output is line i; a blank line is an error")
    p.add_argument("--output", help="output file: .npy (one row per line) or .jsonl (id, text, embedding); default: "
                                    "INPUT.embeddings.npy")
    p.add_argument("--batch-size", type=positive_int, default=64)

    p = sub.add_parser("quickstart", help="train sentiment + NER + similarity on bundled data, offline")
    p.add_argument("--output-dir", default="runs/quickstart")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: the quickstart's own)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("vocab", help="vocabulary tools for domain adaptation")
    vsub = p.add_subparsers(dest="vocab_command", required=True, metavar="ACTION")
    v = vsub.add_parser("extend", help="add frequent domain words the tokenizer splits into pieces; new embedding "
                                       "rows start as the mean of the pieces' rows")
    v.add_argument("--corpus", required=True, help="domain text: one text per line, or .jsonl with a text field")
    v.add_argument("--backbone", default="default", help="model to extend: 'default', a directory or a hub id")
    v.add_argument("--output", required=True, help="directory for the extended model and tokenizer")
    v.add_argument("--min-freq", type=positive_int, default=5, help="keep words seen at least this often")
    v.add_argument("--max-new", type=positive_int, default=2000, help="add at most this many words")

    p = sub.add_parser("export", help="write one task of a trained model, from its own best step, as the "
                                      "transformers model its tools load (or a merged adapter, the adapter for PEFT, "
                                      "or an ONNX graph)")
    p.add_argument("run_dir")
    p.add_argument("--task", help="the task to export (required except with --format onnx, which exports every "
                                  "head task in one graph when it is left out)")
    p.add_argument("--format", dest="fmt", default="hf", choices=["hf", "onnx"],
                   help="hf: transformers / PEFT / sentence-transformers directory; onnx: an ONNX Runtime graph")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--from", dest="source", default="per-task-best", choices=["per-task-best", "final"],
                   help="per-task-best: the task's weights at its own best validation step (the run's snapshot; "
                        "the final model when there is none); final: the run's model directory")
    p.add_argument("--merge", action="store_true", help="fold the task's LoRA/DoRA/IA3 adapter into the backbone "
                                                        "weights (a plain transformers model directory)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    p = sub.add_parser("serve", help="serve every task of a trained model over HTTP (needs multitune[serve])")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                       "only; 0.0.0.0: every interface, set an API key)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default: 8000)")
    add_server_flags(p)  # --max-batch-size, ..., --api-key, timeouts and limits: one per ServerSettings field
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    p = sub.add_parser("search", help="search hyperparameters of a config with Optuna (needs multitune[search])")
    p.add_argument("config", help="run config (YAML) every trial starts from")
    p.add_argument("--space", required=True, help="search space (YAML): config field path -> values or range")
    p.add_argument("--strategy", default="tpe", choices=["tpe", "random", "grid"])
    p.add_argument("--trials", type=positive_int, default=None,
                   help="finished trials the study should hold (default: 20; grid: its size)")
    p.add_argument("--metric", default=None, help="objective on validation: mean or task/metric (default: the "
                                                  "config's early-stopping metric, else mean)")
    p.add_argument("--output-dir", default=None, help="default: the config's output_dir + '-search'")
    p.add_argument("--storage", default=None, help="Optuna storage URL shared by workers, e.g. "
                                                   "postgresql://user:pass@host/db (default: OUTPUT/study.db)")
    p.add_argument("--study-name", default=None, help="study name in the storage (default: the output dir name)")
    p.add_argument("--pruner", default="median", choices=["median", "none"])
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: the config's seed)")
    p.add_argument("--baseline", action="store_true", help="also train the unchanged config once, for comparison")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each trial's checkpoints/")
    _add_set(p)

    p = sub.add_parser("compare", help="train the multi-task run and each task alone with the same budget: per-task "
                                       "transfer, gradient affinity and suggested task groups")
    p.add_argument("config", help="run config (YAML) with at least two tasks")
    p.add_argument("--output", default=None, help="directory of the comparison (default: the config's output_dir + "
                                                  "'-compare'); runs go in OUTPUT/multitask and OUTPUT/single-TASK")
    _add_set(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no live progress bars (logs only)")
    p.add_argument("--merge", dest="merges", action="append", default=[], metavar="DIR",
                   help="a directory written by multitune merge: its merged adapter's metrics join the tables as "
                        "one more row per task (repeatable)")

    p = sub.add_parser("merge", help="merge the per-task LoRA adapters of a run into one adapter (linear, TIES, "
                                     "DARE) and score it against each task's own adapter")
    p.add_argument("run_dir", help="a run trained with adapters: {method: lora, arrangement: per_task}")
    p.add_argument("--tasks", required=True, type=_task_list, help="the tasks whose adapters are merged, "
                                                                   "comma-separated: at least two, e.g. a,b")
    p.add_argument("--method", required=True, choices=["linear", "ties", "dare", "dare_ties"],
                   help="linear: the weighted sum of the updates; ties: trim, elect signs, average; dare: random "
                        "drop and rescale, then sum; dare_ties: DARE's drop, then TIES")
    p.add_argument("--output", required=True, help="directory to write (model/, config.yaml, merge.json, merge.md)")
    p.add_argument("--weights", type=_number_list, default=None,
                   help="one weight per task, comma-separated, in the order of --tasks (default: 1 each)")
    p.add_argument("--density", type=float, default=0.5,
                   help="ties, dare, dare_ties: the share of each update's entries kept, in (0, 1] (default: 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drop (default: 0)")
    p.add_argument("--from", dest="source", default="per-task-best", choices=["per-task-best", "final"],
                   help="per-task-best: each task's adapter and head at its own best validation step (when the run "
                        "kept it); final: the run's model directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    p = sub.add_parser("report", help="write a self-contained HTML report of a finished run (RUN_DIR/report.html)")
    p.add_argument("run_dir")
    p.add_argument("--output", help="HTML file to write (default: RUN_DIR/report.html); the plots go to "
                                    "RUN_DIR/report/ as PNG files")

    sub.add_parser("tasks", help="list the registered task types, samplers, loss weightings and adapter methods")
    return parser


def _version() -> str:
    return __version__


def _task_list(text: str) -> list[str]:
    """argparse type of ``--tasks a,b``: non-empty names."""
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated task names, got {shown(text)}")
    return names


def _number_list(text: str) -> list[float]:
    """argparse type of ``--weights 1,0.5``: finite numbers."""
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {shown(text)}") from None
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {shown(text)}")
    return values


@dataclass
class Numbered:
    """One prediction input with where it came from (``inputs[0]``, ``FILE:LINE``) and the ``id`` a .jsonl line
    gave it (None when it gave none)."""

    where: str
    item: Any
    id: Any = None


def _read_numbered(path: str, pairs: bool = False) -> list[Numbered]:
    """Every line of an ``--input`` file as one input, in order, so that output line i belongs to input line i.

    Raises:
        MultituneError: naming FILE:LINE: a blank line, invalid JSON, a JSON line that is not an object, or (with
            ``pairs``) a text line without a TAB.
    """
    p = Path(path)
    if not p.is_file():
        raise MultituneError(f"--input: {'file not found' if not p.exists() else 'not a file'}: {printable(p)}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise MultituneError(f"{printable(p)}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    is_json = p.suffix in (".jsonl", ".json")
    items = []
    for n, line in enumerate(lines, 1):
        where = f"{printable(p)}:{n}"
        if not line.strip():
            hint = "" if is_json else " (or use .jsonl lines with an id field)"
            raise MultituneError(f"{where}: blank line; every line is one input and output line i belongs to input "
                                 f"line i, so remove blank lines{hint}")
        if not is_json:
            items.append(Numbered(where, _split_pair(line, where) if pairs else line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MultituneError(f"{where}: invalid JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise MultituneError(f"{where}: expected a JSON object with a 'text' field")
        items.append(Numbered(where, {k: v for k, v in obj.items() if k != "id"}, obj.get("id")))
    return items


def _split_pair(text: str, where: str) -> tuple[str, str]:
    if "\t" not in text:
        raise MultituneError(f"{where}: no TAB; with --pairs tsv every input is TEXT<TAB>TEXT_PAIR")
    first, second = text.split("\t", 1)
    return first, second


def _check_inputs(numbered: list[Numbered], task: str, pair_input: bool | None) -> None:
    """Every input is a non-empty text (or pair) of the form the task takes, as the server checks it.

    Raises:
        MultituneError: naming the first bad input (FILE:LINE or ``inputs[i]``) and how to give the right form.
    """
    from multitune.tasks.base import form_mismatch, input_parts  # tasks/base imports torch (slow for --help)

    for entry in numbered:
        if isinstance(entry.item, dict) and "text" not in entry.item:
            continue  # a ready example, e.g. {"tokens": [...]}: the task checks it
        _, pair = input_parts(entry.item, entry.where)
        if pair_input is None:
            continue
        problem = form_mismatch(task, pair_input, pair is not None)
        if problem:
            how = (" (give TEXT<TAB>TEXT_PAIR with --pairs tsv, or .jsonl lines with text and text_pair)"
                   if pair_input else " (leave out --pairs, or text_pair in .jsonl)")
            raise MultituneError(f"{entry.where}: {problem}{how}")


# JSON output stays terminal-safe where json.dumps(ensure_ascii=False) is not: it escapes C0 controls (ESC is
# \u001b) but writes DEL, the C1 controls (U+009B is a one-character escape sequence to many terminals) and lone
# surrogates (which cannot be printed as UTF-8) as they are. They only occur inside JSON strings, where the
# \uXXXX form is valid.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\ud800-\udfff]")


def json_text(value: Any, **kwargs: Any) -> str:
    """``value`` as JSON for the terminal or a file: non-ASCII text as it is, but no control character or
    lone surrogate unescaped, and no ``NaN`` (ValueError: callers check numbers first)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, **kwargs)
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def cmd_train(args) -> int:
    from multitune.config import load_config
    from multitune.training import train
    from multitune.training.progress import print_next_steps, stderr_console

    config = load_config(args.config, args.overrides)
    if args.accept_changed_data and not args.resume:
        raise MultituneError("--accept-changed-data: only applies with --resume")
    console = stderr_console()  # not wrapped at 80 columns when stderr is a log file
    train(config, resume=args.resume, overwrite=args.overwrite, console=console, progress=not args.no_progress,
          accept_changed_data=args.accept_changed_data, protect=(Path(args.config),))
    print_next_steps(console, config.output_dir, list(config.tasks))
    return 0


def cmd_evaluate(args) -> int:
    from multitune.evaluation.run import evaluate_run
    from multitune.inference import non_finite_fields

    results = evaluate_run(args.run_dir, args.split, args.overrides)
    bad = [path for path, _ in non_finite_fields(results)]
    if bad:  # e.g. a Pearson correlation of constant predictions: no number, said once, null in the JSON
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        print(printable(f"multitune: warning: not a finite number, written as null: {', '.join(bad[:3])}{more}"),
              file=sys.stderr)
    print(json_text(finite_json(results), indent=2))
    return 0


def cmd_predict(args) -> int:
    from multitune.inference import check_finite
    from multitune.model import load

    numbered = [Numbered(f"inputs[{i}]", _split_pair(t, f"inputs[{i}]") if args.pairs else t)
                for i, t in enumerate(args.texts)]
    numbered += _read_numbered(args.input, pairs=bool(args.pairs)) if args.input else []
    if not numbered:
        raise MultituneError("predict: give texts as arguments or a file with --input")
    saved = _saved_tasks(args.run_dir)
    _check_task(args.run_dir, args.task, None if saved is None else list(saved))  # before the model loads
    _check_inputs(numbered, args.task, _saved_pair_input(saved, args.task))
    model = load(args.run_dir, precision=args.precision)
    _check_task(args.run_dir, args.task, list(model.tasks))
    _check_inputs(numbered, args.task, bool(model.tasks[args.task].pair_input))
    preds = model.predict(args.task, [e.item for e in numbered], batch_size=args.batch_size)
    for entry, pred in zip(numbered, preds):  # every line is checked before the first is printed
        check_finite(pred, f"{entry.where} (task {args.task})")
    for entry, pred in zip(numbered, preds):
        print(json_text({**({} if entry.id is None else {"id": entry.id}), "input": _shown_input(entry.item),
                         **pred}))
    return 0


def _shown_input(item: Any) -> Any:
    """The input as the output line carries it: the text, ``[text, text_pair]``, or the .jsonl object."""
    if isinstance(item, dict) and "text" in item:
        return item["text"] if item.get("text_pair") is None else [item["text"], item["text_pair"]]
    return list(item) if isinstance(item, tuple) else item


def _saved_tasks(run_dir: str) -> dict[str, Any] | None:
    """The ``tasks`` of a model's ``multitune.json`` (of ``run_dir`` or its ``model/``), read without loading
    the model; None when there is no readable one (the loader then says what is wrong)."""
    for meta in (Path(run_dir) / "model" / "multitune.json", Path(run_dir) / "multitune.json"):
        try:
            tasks = json.loads(meta.read_text(encoding="utf-8")).get("tasks")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(tasks, dict):
            return {str(k): v for k, v in tasks.items()}
    return None


def _check_task(run_dir: str, task: str, names: list[str] | None) -> None:
    """Raises: MultituneError: the model has no task ``task`` (with the closest name, if one is close)."""
    if names is None or task in names:
        return
    close = difflib.get_close_matches(task, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise MultituneError(f"--task: the model in {run_dir} has no task {task!r}{hint}; its tasks: {', '.join(names)}")


def _saved_pair_input(saved: dict[str, Any] | None, task: str) -> bool | None:
    """Whether the saved task takes pairs, when its saved state says so (else None: checked after loading)."""
    try:
        value = saved[task]["state"]["pair_input"]  # type: ignore[index]
    except (TypeError, KeyError):
        return None
    return value if isinstance(value, bool) else None


def cmd_embed(args) -> int:
    import numpy as np

    from multitune.model import load

    numbered = _read_numbered(args.input)
    texts = []
    for entry in numbered:
        item = entry.item
        if isinstance(item, dict) and item.get("text_pair") is not None:
            raise MultituneError(f"{entry.where}: embed takes single texts; this line has a text_pair")
        if isinstance(item, dict) and not isinstance(item.get("text"), str):
            raise MultituneError(f"{entry.where}: expected a JSON object with a 'text' field")
        text = item["text"] if isinstance(item, dict) else item
        if not text.strip():
            raise MultituneError(f"{entry.where}: the text is empty")
        texts.append(text)
    if args.run_dir == "default":
        from multitune.backbones import load_backbone
        from multitune.model import MultiTaskModel

        backbone, tokenizer = load_backbone("default")
        model = MultiTaskModel(backbone, {}, tokenizer)
    else:
        model = load(args.run_dir)
    emb = model.embed_texts(texts, batch_size=args.batch_size).numpy()
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad):
        raise MultituneError(f"{numbered[bad[0]].where}: the embedding holds NaN or infinity (the model computes no "
                             f"number for this text; are its weights finite?); nothing was written")
    out = Path(args.output or f"{args.input}.embeddings.npy")
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    if out.suffix == ".jsonl":
        with open(tmp, "w", encoding="utf-8") as fh:
            for entry, t, v in zip(numbered, texts, emb):
                record = {**({} if entry.id is None else {"id": entry.id}), "text": t,
                          "embedding": [round(float(x), 6) for x in v]}
                fh.write(json_text(record) + "\n")
    else:
        np.save(tmp, emb)
    os.replace(tmp, out)
    print(f"wrote {emb.shape[0]} embeddings of dimension {emb.shape[1]} to {printable(out)} (row i: line i of "
          f"{printable(args.input)})", file=sys.stderr)
    return 0


def cmd_quickstart(args) -> int:
    from multitune.quickstart.run import run_quickstart

    run_quickstart(Path(args.output_dir), steps=args.steps, progress=not args.no_progress)
    return 0


def cmd_export(args) -> int:
    from multitune.export.task import export_task

    report = export_task(args.run_dir, args.task, args.output, merge=args.merge, overwrite=args.overwrite,
                         source=args.source, fmt=args.fmt)
    if report.get("note"):
        print(f"multitune: note: {report['note']}", file=sys.stderr)
    print(json.dumps(report))
    return 0


def cmd_serve(args) -> int:
    from multitune.serving.settings import settings_from_flags

    settings = settings_from_flags(args)  # a bad combination or API key fails before the model loads
    try:
        from multitune.serving.app import serve
    except ImportError as exc:
        raise MultituneError(f"serve needs the optional extra: pip install 'multitune[serve]' ({exc})") from None
    serve(args.run_dir, args.host, args.port, settings, args.log_level)
    return 0


def cmd_search(args) -> int:
    from multitune.config import load_config
    from multitune.search import run_search

    output = args.output_dir or f"{load_config(args.config, args.overrides).output_dir}-search"
    result = run_search(args.config, args.space, output, strategy=args.strategy, trials=args.trials,
                        metric=args.metric, storage=args.storage, study_name=args.study_name,
                        overrides=args.overrides, seed=args.seed, pruner=args.pruner, baseline=args.baseline,
                        keep_checkpoints=args.keep_checkpoints)
    print(json.dumps(finite_json({"best_value": result.best_value, "best_trial": result.best_trial,
                                  "best_params": result.best_params, "finished_trials": result.finished,
                                  "baseline_value": result.baseline_value,
                                  "best_config": str(Path(output) / "best.yaml")})))
    return 0


def cmd_compare(args) -> int:
    from multitune.analysis.compare import run_compare

    report = run_compare(args.config, args.output, args.overrides, overwrite=args.overwrite,
                         progress=not args.no_progress, merges=args.merges)
    summary = {t: {k: r[k] for k in ("metric", "multitask", "single", "delta", "transfer")}
               for t, r in report["validation"].items()}
    print(json.dumps(finite_json({"validation": summary, "compare": str(Path(report["output"]) / "compare.json")})))
    return 0


def cmd_merge(args) -> int:
    from multitune.analysis.merge import merge_run

    report = merge_run(args.run_dir, args.tasks, args.method, args.output, weights=args.weights,
                       density=args.density, seed=args.seed, source=args.source, overwrite=args.overwrite)
    summary = {t: {s: {"metric": r["metric"], "own": r["per_task"][r["metric"]], "merged": r["merged"][r["metric"]],
                       "delta": r["delta"]} for s, r in splits.items()} for t, splits in report["results"].items()}
    print(json.dumps(finite_json({"merge": str(Path(args.output) / "merge.json"), "method": args.method,
                                  "results": summary})))
    return 0


def cmd_report(args) -> int:
    from multitune.reporting import write_report

    report = write_report(args.run_dir, args.output)
    print(json.dumps({"report": str(report.path), "sections": report.sections, "omitted": report.omitted,
                      "figures": [str(p) for p in report.figures]}))
    return 0


def cmd_tasks(args) -> int:
    from multitune.adapters import METHODS
    from multitune.sampling import SAMPLERS
    from multitune.tasks import TASKS
    from multitune.weighting import WEIGHTINGS

    for title, reg in (("task types", TASKS), ("sampling strategies", SAMPLERS),
                       ("loss weighting strategies", WEIGHTINGS), ("adapter methods", METHODS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


def cmd_vocab(args) -> int:
    from multitune.backbones.vocab import extend_backbone_dir

    if args.min_freq < 1 or args.max_new < 1:
        raise MultituneError("vocab extend: --min-freq and --max-new must be at least 1")
    report = extend_backbone_dir(args.backbone, args.corpus, args.output, args.min_freq, args.max_new)
    print(json_text(report))
    return 0


COMMANDS = {"train": cmd_train, "vocab": cmd_vocab, "evaluate": cmd_evaluate, "predict": cmd_predict, "embed": cmd_embed,
            "quickstart": cmd_quickstart, "tasks": cmd_tasks, "export": cmd_export, "serve": cmd_serve,
            "search": cmd_search, "compare": cmd_compare, "merge": cmd_merge,
            "report": cmd_report}


def _quiet_transformers() -> None:
    """No transformers progress bars (loading and writing weights): the command reports on its own console,
    and a command that fails leaves exactly one line on stderr."""
    from transformers.utils import logging as hf_logging  # imported only when used: 0.5 s

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot give `predict RUN --task T TEXT...` its texts after an option: collect them here
    if args.command == "predict" and extra and not any(e.startswith("-") for e in extra):
        args.texts = list(args.texts) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command != "tasks":
            _quiet_transformers()
        return COMMANDS[args.command](args)
    except MultituneError as exc:
        print(f"multitune: error: {printable(shorten_message(str(exc)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multitune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
