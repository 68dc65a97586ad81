"""Free generation against label scoring (``decode: score_labels``) for sentiment as text with SmolLM2-135M-Instruct
on SST-2 dev: accuracy, share of invalid answers and seconds. Writes bench/results/label-scoring-<date>.json and .md
(``-trained-<steps>`` before the suffix after fine-tuning).

    python bench/label_scoring.py [--train-steps 0] [--examples 872] [--train-rows 2000] [--batch-size 16]

The model is the packaged SmolLM2 (``backbone: {type: decoder_only, name: smollm2}``, the ``llm`` extra), one
text2text task with the prompt prefix below and the label set ``negative, positive``, its prompt in the chat
template. ``--train-steps 0`` (the default) scores the model zero-shot; ``--train-steps N`` first fine-tunes it
for N steps on ``--train-rows`` SST-2 training sentences (``multitune.train``, full fine-tuning, the loss on
the label tokens). Both decodings then answer the same dev sentences (run from the repository root with
../shared/data beside it) with the same model:

- ``generate``: greedy generation of at most 4 tokens; an answer that is not a label word is invalid (wrong);
- ``score_labels``: the label whose tokens (its text and the end token) are most likely after the prompt, with
  the sum (and, as a third row, the mean) of the token log-probabilities.

Each decoding first answers one batch untimed (warm-up); then the times cover all the dev sentences.

``--no-write`` prints the report without writing the result files (a quick check on a handful of examples).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PREFIX = "Is the sentiment of this movie review positive or negative? Answer with one word. Review: "
LABELS = ["negative", "positive"]
MODES = (("generate", "sum"), ("score_labels", "sum"), ("score_labels", "mean"))

from perf.common import machine_info, machine_line, write_results  # noqa: E402  (bench/perf/, next to this script)


def read_sst2(path: Path, limit: int | None) -> list[dict]:
    """SST-2 rows as text2text examples (``source``, ``target``: the label word)."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    text = "sentence" if "sentence" in rows[0] else "content"
    examples = [{"source": " ".join(r[text].split()), "target": LABELS[int(r["label"])]} for r in rows]
    return examples[:limit] if limit else examples


def write_tsv(path: Path, examples: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("source\ttarget\n")
        for ex in examples:
            fh.write(f"{ex['source']}\t{ex['target']}\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-steps", type=int, default=0, help="fine-tuning steps first (0: zero-shot)")
    ap.add_argument("--train-rows", type=int, default=2000, help="SST-2 training sentences for fine-tuning")
    ap.add_argument("--examples", type=int, default=None, help="SST-2 dev sentences scored (default: all 872)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-write", action="store_true", help="print the report only")
    args = ap.parse_args()

    import torch

    import multitune
    from multitune.evaluation.evaluator import evaluate_task

    dev = read_sst2(DATA / "sst2" / "dev.tsv", args.examples)
    train_rows = read_sst2(DATA / "sst2" / "train.tsv", None)
    rng = torch.Generator().manual_seed(args.seed)
    train_rows = [train_rows[i] for i in torch.randperm(len(train_rows), generator=rng)[:args.train_rows].tolist()]
    info = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "model": "SmolLM2-135M-Instruct",
            "prefix": PREFIX, "labels": LABELS, "examples": len(dev), "train_steps": args.train_steps,
            "train_rows": args.train_rows if args.train_steps else 0, "batch_size": args.batch_size,
            "torch_threads": torch.get_num_threads(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        raw = {"backbone": {"type": "decoder_only", "name": "smollm2"}, "output_dir": f"{tmp}/run",
               "seed": args.seed,
               "tasks": {"sst2": {"type": "text2text", "prefix": PREFIX, "labels": LABELS,
                                  "generation": {"max_new_tokens": 4},
                                  "data": {"train": {"path": str(write_tsv(Path(tmp) / "train.tsv", train_rows))},
                                           "validation": {"path": str(write_tsv(Path(tmp) / "dev.tsv", dev))}}}},
               "training": {"max_steps": max(args.train_steps, 1), "batch_size": args.batch_size,
                            "learning_rate": 3e-5, "max_length": 96, "eval_every": max(args.train_steps, 1)}}
        start = time.perf_counter()
        if args.train_steps:
            multitune.train(multitune.parse_config(raw), progress=False)
            model = multitune.load(f"{tmp}/run")
        else:  # the packaged model as it is: a model with the task and no training
            from multitune.backbones import load_backbone
            from multitune.model import MultiTaskModel
            from multitune.tasks.prepared import build_tasks

            config = multitune.parse_config(raw)
            backbone, tokenizer = load_backbone(config.backbone)
            tasks = build_tasks(config)
            tasks["sst2"].setup(train_rows)
            model = MultiTaskModel(backbone, tasks, tokenizer, max_length=96)
        info["setup_s"] = round(time.perf_counter() - start, 1)
        task = model.tasks["sst2"]
        features = task.encode(dev, model.tokenizer, model.max_length)
        pad = model.tokenizer.pad_token_id or 0
        for decode, normalization in MODES:  # warm-up: one batch of each, untimed
            task.config.decode, task.config.score_normalization = decode, normalization
            evaluate_task(model, task, features[:args.batch_size], dev[:args.batch_size], args.batch_size, pad)
        for decode, normalization in MODES:
            task.config.decode, task.config.score_normalization = decode, normalization
            start = time.perf_counter()
            metrics, preds = evaluate_task(model, task, features, dev, args.batch_size, pad)
            seconds = time.perf_counter() - start
            row = {"decode": decode, "score_normalization": normalization if decode == "score_labels" else None,
                   "accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
                   "invalid": round(metrics["invalid"], 4), "seconds": round(seconds, 2),
                   "ms_per_example": round(1000 * seconds / len(dev), 1),
                   "answers": {str(k): v for k, v in _counts([p["text"] for p in preds]).items()}}
            info["rows"].append(row)
            print(json.dumps(row), flush=True)
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = report(info)
    if args.no_write:
        print(text)
    else:
        suffix = f"-trained-{info['train_steps']}" if info["train_steps"] else ""
        write_results(f"label-scoring-{info['date']}{suffix}", info, text)


def _counts(texts: list[str], top: int = 5) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def report(info: dict) -> str:
    m = info["machine"]
    how = (f"fine-tuned for {info['train_steps']} steps on {info['train_rows']} SST-2 training sentences"
           if info["train_steps"] else "zero-shot (no fine-tuning)")
    lines = [f"# Label scoring vs generation - {info['date']}", "",
             f"{info['model']}, {how}; SST-2 dev, {info['examples']} sentences, batches of {info['batch_size']}, "
             f"{info['torch_threads']} torch threads. Prompt prefix: `{info['prefix']}` (in the chat template); "
             f"labels: {', '.join(info['labels'])}. Setup (load{' and training' if info['train_steps'] else ''}): "
             f"{info['setup_s']} s.", "", machine_line(m, m.get("load_average"), info.get("load_average_end")), "",
             "| decode | accuracy | macro F1 | invalid | seconds | ms / example | most frequent answers |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in info["rows"]:
        name = r["decode"] + (f" ({r['score_normalization']})" if r["score_normalization"] else "")
        answers = ", ".join(f"{k!r} {v}" for k, v in r["answers"].items())
        lines.append(f"| {name} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['invalid']:.1%} | {r['seconds']} | "
                     f"{r['ms_per_example']} | {answers} |")
    lines += ["", "An invalid answer (not a label word) counts as wrong; label scoring always answers a label."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
