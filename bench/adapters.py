"""Full fine-tuning against parameter-efficient adapters on the seed mixture, at an equal step budget.

Every system trains SST-2 sentiment + WNUT-17 NER + STS-B similarity exactly as
examples/configs/seed-mixture.yaml does (MiniLM, batch 32, max length 128, warmup ratio 0.1, linear
schedule, temperature sampling T=2, uncertainty loss weighting, seed 42, head learning rate 1e-3), for the
same number of steps. Only the ``adapters:`` section and its learning rate change, through ``--set`` style
overrides. Early stopping is switched off (``training.early_stopping=null``) so that every system gets the
whole budget; the trainer still reports the validation metrics of its best evaluation (mean of the three
main metrics), as it does for every run.

Systems and their learning rates (the backbone LR of full fine-tuning is the seed mixture's 5e-5):

- ``full``: no adapters; the whole backbone trains at 5e-5.
- ``lora``: one LoRA per task, r 8, alpha 16, query/value, lr 1e-3 (as examples/configs/lora-per-task.yaml;
  Hu et al. 2021 used 2e-4 to 5e-4 for RoBERTa over far more steps, so 1e-3 suits a short budget).
- ``bottleneck``: one Pfeiffer bottleneck adapter per task, reduction factor 16, lr 1e-3 (Pfeiffer et al.
  2021 and Houlsby et al. 2019 use 1e-4 to 1e-3).
- ``prefix``: one prefix per task, 20 virtual tokens, lr 3e-3 (Li & Liang 2021 report 5e-5 to 8e-5 with a
  reparametrising MLP over many epochs; without the MLP, as here, PEFT-style setups use 1e-3 to 1e-2).
- ``prompt``: one soft prompt per task, 20 virtual tokens, lr 3e-2 (Lester et al. 2021 used 0.3 with
  Adafactor; with AdamW a rate about ten times smaller is the common choice).

Each system runs in its own child process (the script re-invokes itself with ``--one SYSTEM``), so the peak
resident memory reported is that system's alone. Writes bench/results/adapters-<date>.json, .md and .png
(``--quick`` writes them under ``--out`` instead; results of a same-day run with the same settings are
merged, so one system can be re-run alone).

    python bench/adapters.py [--steps 300] [--eval-every 100] [--systems full,lora,bottleneck,prefix,prompt]
                             [--quick] [--out runs/bench-adapters]

Run from the repository root with ../shared/data beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples/configs/seed-mixture.yaml"
TASK_METRICS = {"sentiment": "accuracy", "ner": "f1", "similarity": "pearson"}

# system -> (label, overrides of the seed-mixture config)
SYSTEMS: dict[str, tuple[str, list[str]]] = {
    "full": ("full fine-tuning (lr 5e-5)", []),
    "lora": ("LoRA r8 q/v (lr 1e-3)", [
        "adapters.method=lora", "adapters.arrangement=per_task", "adapters.r=8", "adapters.alpha=16",
        "adapters.target_modules=[query, value]", "adapters.learning_rate=1e-3"]),
    "bottleneck": ("bottleneck pfeiffer rf16 (lr 1e-3)", [
        "adapters.method=bottleneck", "adapters.arrangement=per_task", "adapters.placement=pfeiffer",
        "adapters.reduction_factor=16", "adapters.learning_rate=1e-3"]),
    "prefix": ("prefix 20 tokens (lr 3e-3)", [
        "adapters.method=prefix", "adapters.arrangement=per_task", "adapters.num_virtual_tokens=20",
        "adapters.learning_rate=3e-3"]),
    "prompt": ("prompt 20 tokens (lr 3e-2)", [
        "adapters.method=prompt", "adapters.arrangement=per_task", "adapters.num_virtual_tokens=20",
        "adapters.learning_rate=3e-2"]),
}
# --quick: a smoke check on small samples of every split
QUICK_OVERRIDES = [f"tasks.{t}.data.{s}.max_examples={n}" for t in TASK_METRICS
                   for s, n in (("train", 640), ("validation", 160))]
FP32_BYTES = 4


def run_one(system: str, out: Path, steps: int, eval_every: int, quick: bool) -> None:
    """Child process: train one system into ``out/run`` and write ``out/child.json``."""
    from multitune.config import load_config
    from multitune.fileio import write_json_atomic
    from multitune.training import train

    overrides = [f"output_dir={out / 'run'}", f"training.max_steps={steps}", f"training.eval_every={eval_every}",
                 "training.early_stopping=null", *SYSTEMS[system][1], *(QUICK_OVERRIDES if quick else [])]
    cfg = load_config(CONFIG, overrides, base_dir=REPO)
    results = train(cfg, overwrite=True, progress=False)
    table = json.loads((out / "run" / "parameters.json").read_text())
    curve = [{"step": r["step"], **{t: r["metrics"][t][m] for t, m in TASK_METRICS.items()}}
             for r in _read_jsonl(out / "run" / "metrics.jsonl") if r.get("kind") == "eval"]
    # ru_maxrss is in KiB on Linux
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    write_json_atomic(out / "child.json", {"system": system, "overrides": overrides, "results": results,
                                           "parameters": table, "curve": curve, "peak_rss_bytes": peak_rss})


def _read_jsonl(path: Path) -> list[dict]:
    from multitune.fileio import read_jsonl

    return read_jsonl(path)


def summarise(system: str, child: dict) -> dict:
    """One table row from a child's output: parameters, storage, speed, memory and dev metrics.

    Storage per task counts what deploying that task alone needs beyond the shared pretrained backbone,
    in float32: for adapters the task's adapter plus its head; for full fine-tuning the whole fine-tuned
    backbone plus the task's head, since each task's model differs in every weight.
    """
    r, table = child["results"], child["parameters"]
    rows = {row["group"]: row for row in table}
    total = sum(row["trainable"] + row["frozen"] for row in table)
    trainable = sum(row["trainable"] for row in table)
    backbone = sum(row["trainable"] + row["frozen"] for g, row in rows.items() if g.startswith("backbone/"))
    head = {t: rows[f"heads/{t}"]["trainable"] + rows[f"heads/{t}"]["frozen"] for t in TASK_METRICS}
    if "adapters" in r:
        stored = {t: r["adapters"]["bytes_per_task"][t] + head[t] * FP32_BYTES for t in TASK_METRICS}
    else:
        stored = {t: (backbone + head[t]) * FP32_BYTES for t in TASK_METRICS}
    val, tr = r["validation"], r["train"]
    metrics = {t: val[t][m] for t, m in TASK_METRICS.items()}
    return {"system": system, "label": SYSTEMS[system][0], "total_parameters": total, "trainable": trainable,
            "trainable_pct": 100 * trainable / total,
            "adapter_parameters": r["adapters"]["trainable"] if "adapters" in r else None,
            "adapter_bytes_per_task": r["adapters"]["bytes_per_task"] if "adapters" in r else None,
            "stored_bytes_per_task": stored, "stored_bytes_mean": sum(stored.values()) / len(stored),
            "steps": tr["steps"], "best_step": tr["best_step"], "wall_s": tr["wall_s"],
            "examples_per_s": tr["examples_per_s"], "peak_rss_bytes": child["peak_rss_bytes"],
            "metrics": metrics, "mean_metric": sum(metrics.values()) / len(metrics), "curve": child["curve"],
            "overrides": child["overrides"]}


def _size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(result: dict) -> str:
    rows = [result["systems"][s] for s in SYSTEMS if s in result["systems"]]
    full = result["systems"].get("full")
    lines = [f"# Seed mixture: full fine-tuning vs adapters ({result['date']}, {result['steps']} steps of batch 32, "
             f"2 shared CPU cores, fp32)", "",
             "| system | trainable params | trainable % | stored per task | vs full FT | examples/s | peak RSS | "
             "sentiment acc | NER F1 | similarity Pearson | mean | best step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"1/{full['stored_bytes_mean'] / row['stored_bytes_mean']:.0f}" if full and row is not full else "1"
        m = row["metrics"]
        lines.append(f"| {row['label']} | {row['trainable']:,} | {row['trainable_pct']:.2f}% | "
                     f"{_size(row['stored_bytes_mean'])} | {ratio} | {row['examples_per_s']:.1f} | "
                     f"{row['peak_rss_bytes'] / 2**30:.2f} GiB | {m['sentiment']:.4f} | {m['ner']:.4f} | "
                     f"{m['similarity']:.4f} | {row['mean_metric']:.4f} | {row['best_step']} |")
    for name, err in result.get("failed", {}).items():
        lines.append(f"| {SYSTEMS[name][0]} | failed: {err['error']} |" + " |" * 10)
    lines += ["", "Trainable parameters include the task heads and the 3 uncertainty weights. Stored per task: "
              "mean over the three tasks of the float32 bytes one task needs beside the shared pretrained "
              "backbone (adapter + head; full fine-tuning: the whole backbone + head). Metrics: the best "
              "of the evaluations every "
              f"{result['eval_every']} steps (mean of the three), on "
              + ("samples of 160 dev examples per task (--quick)." if result["quick"] else "the full dev sets.")]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [result["systems"][s] for s in SYSTEMS if s in result["systems"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(TASK_METRICS))]
        ax1.bar(xs, [row["metrics"][t] for t in TASK_METRICS], width, label=row["system"])
    ax1.set_xticks(range(len(TASK_METRICS)), [f"{t}\n({m})" for t, m in TASK_METRICS.items()])
    ax1.set_ylim(min(0.0, *(v for row in rows for v in row["metrics"].values())), 1)
    ax1.set_ylabel("dev metric")
    ax1.set_title(f"per-task dev metric, {result['steps']} steps")
    ax1.legend(fontsize=8)
    for row in rows:
        ax2.scatter(row["trainable_pct"], row["mean_metric"], s=40)
        ax2.annotate(row["system"], (row["trainable_pct"], row["mean_metric"]), textcoords="offset points",
                     xytext=(5, 4), fontsize=9)
    ax2.set_xscale("log")
    ax2.margins(x=0.25, y=0.15)
    ax2.set_xlabel("trainable parameters (% of total, log scale)")
    ax2.set_ylabel("mean of the three dev metrics")
    ax2.set_title("trainable share vs mean metric")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="steps per system (default 300; --quick: 20)")
    ap.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default 100; --quick: 10)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    ap.add_argument("--quick", action="store_true", help="smoke check: 20 steps on small samples of each split")
    ap.add_argument("--out", default=None, help="run directories (default runs/bench-adapters[-quick])")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: train one system
    args = ap.parse_args()
    steps = args.steps or (20 if args.quick else 300)
    eval_every = args.eval_every or (10 if args.quick else 100)
    out = Path(args.out or ("runs/bench-adapters-quick" if args.quick else "runs/bench-adapters")).resolve()
    if args.one:
        return run_one(args.one, out, steps, eval_every, args.quick)

    from multitune.fileio import write_json_atomic, write_text_atomic

    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system {unknown[0]!r}; valid: {', '.join(SYSTEMS)}")
    date = datetime.date.today().isoformat()
    dest = out if args.quick else REPO / "bench" / "results"
    stem = dest / f"adapters-{date}"
    settings = {"steps": steps, "eval_every": eval_every, "quick": args.quick}
    result = {"date": date, **settings, "config": str(CONFIG.relative_to(REPO)), "systems": {}, "failed": {}}
    old = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else None
    if old and all(old.get(k) == v for k, v in settings.items()):  # same settings: re-running a system replaces it
        result["systems"], result["failed"] = old["systems"], old.get("failed", {})
    started = time.perf_counter()
    for i, system in enumerate(systems, 1):
        sys_dir = out / system
        sys_dir.mkdir(parents=True, exist_ok=True)
        (sys_dir / "child.json").unlink(missing_ok=True)
        t0 = time.perf_counter()
        print(f"[{i}/{len(systems)}] {system}: start ({SYSTEMS[system][0]}), log {sys_dir / 'log.txt'}", flush=True)
        cmd = [sys.executable, __file__, "--one", system, "--out", str(sys_dir), "--steps", str(steps),
               "--eval-every", str(eval_every), *(["--quick"] if args.quick else [])]
        with open(sys_dir / "log.txt", "w") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        elapsed = time.perf_counter() - t0
        if code != 0 or not (sys_dir / "child.json").exists():
            tail = (sys_dir / "log.txt").read_text(errors="replace").splitlines()[-30:]
            result["systems"].pop(system, None)
            result["failed"][system] = {"exit_code": code, "error": tail[-1] if tail else "no output",
                                        "log_tail": tail}
            print(f"[{i}/{len(systems)}] {system}: FAILED (exit {code}) after {elapsed:.0f}s:\n  "
                  + "\n  ".join(tail[-15:]), flush=True)
        else:
            row = summarise(system, json.loads((sys_dir / "child.json").read_text()))
            row["process_s"] = round(elapsed, 1)
            result["systems"][system] = row
            result["failed"].pop(system, None)
            m = row["metrics"]
            print(f"[{i}/{len(systems)}] {system}: done in {elapsed:.0f}s; sentiment {m['sentiment']:.4f}, "
                  f"ner {m['ner']:.4f}, similarity {m['similarity']:.4f}; {row['examples_per_s']:.1f} ex/s; "
                  f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        # written after every system, so a long run that dies keeps what it measured
        write_json_atomic(stem.with_suffix(".json"), result)
        write_text_atomic(stem.with_suffix(".md"), markdown(result))
        if result["systems"]:
            plot(result, stem.with_suffix(".png"))
        for suffix in (".json", ".md"):  # the atomic writer's temporary file is private (0600)
            stem.with_suffix(suffix).chmod(0o644)
    print(f"all systems in {time.perf_counter() - started:.0f}s; wrote {stem}.json/.md/.png\n")
    print(markdown(result))
    return None


if __name__ == "__main__":
    sys.exit(main())
