"""Loss weighting, gradient-level methods and adaptive scheduling on the seed mixture, at an equal budget.

Every run sees the same number of batches of every task (``--batches`` per task, batch 32): methods that
take one task per step (sum, uncertainty, DWA, the adaptive scheduler) run 3 x batches steps in round robin
(adaptive: its own shares), methods that need every task in each step (GradNorm, PCGrad, CAGrad, FAMO) run
``batches`` steps of one batch per task, and each task alone runs ``batches`` steps. Same backbone, seed,
learning rates, precision and evaluation schedule everywhere; the reported model is the best checkpoint by
the mean of the tasks' main metrics, as ``multitune train`` selects it.

Each run is its own process, so its peak RSS is its own. The accuracy part is load-independent; time per
batch is only comparable between runs made on a quiet machine, so ``--timing`` measures it separately with
short runs, one after the other (the suite merges both into one table).

    python bench/weighting.py [--batches 100] [--only sum,pcgrad,...] [--timing 30]

Writes bench/results/weighting-<date>.json, .md and .png. Run from the repository root with ../shared/data
beside it.
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
CONFIG = REPO / "examples/configs/pcgrad-seed-mixture.yaml"
TASKS = ("sentiment", "ner", "similarity")
METRIC = {"sentiment": "accuracy", "ner": "f1", "similarity": "pearson"}
# name -> (loss_weighting, sampling or None when the method takes every task each step, label)
METHODS = {
    "sum": ({"strategy": "sum"}, {"strategy": "round_robin"}, "sum (round robin)"),
    "uncertainty": ({"strategy": "uncertainty"}, {"strategy": "round_robin"}, "uncertainty (Kendall et al. 2018)"),
    "dwa": ({"strategy": "dwa"}, {"strategy": "round_robin"}, "DWA (Liu et al. 2019)"),
    "adaptive": ({"strategy": "sum"}, {"strategy": "adaptive"}, "sum + adaptive scheduler"),
    "gradnorm": ({"strategy": "gradnorm"}, None, "GradNorm (Chen et al. 2018)"),
    "pcgrad": ({"strategy": "pcgrad"}, None, "PCGrad (Yu et al. 2020)"),
    "cagrad": ({"strategy": "cagrad"}, None, "CAGrad (Liu et al. 2021)"),
    "famo": ({"strategy": "famo"}, None, "FAMO (Liu et al. 2023)"),
    # clipping the combined gradient at 1.0 lets the task with the largest gradient set every task's step
    "pcgrad-noclip": ({"strategy": "pcgrad"}, None, "PCGrad, gradient clipping off"),
}
#: overrides of single runs beyond their weighting and sampling
EXTRA = {"pcgrad-noclip": ["training.max_grad_norm=null"]}
SINGLES = {f"single-{t}": t for t in TASKS}
#: the adaptive scheduler's references when the bench has no single-task runs of its own yet: each task alone,
#: 400 steps (docs/benchmarks.md)
REFERENCE = {"sentiment": 0.865, "ner": 0.549, "similarity": 0.843}
ADAPTIVE_EVALS = 6
#: the run that measures gradient cosine and look-ahead task affinity along the way (measuring does not change
#: training; its time is left out of the run's training time)
AFFINITY_RUN = "adaptive"


def overrides(name: str, batches: int, out: Path, evals: int, affinity_every: int,
              learning_rate: float, reference: dict | None = None) -> tuple[list[str], list[str]]:
    """The config overrides of one run and the tasks it keeps."""
    if name in SINGLES:
        steps, tasks = batches, [SINGLES[name]]
        sets = ["loss_weighting={strategy: sum}"]
    else:
        weighting, sampling, _ = METHODS[name]
        steps, tasks = (batches if sampling is None else len(TASKS) * batches), list(TASKS)
        sets = [f"loss_weighting={json.dumps(weighting)}"]
        if sampling is not None:
            sets.append(f"sampling={json.dumps(sampling)}")
        if affinity_every and name == AFFINITY_RUN:
            sets.append(f"analysis={{affinity_every: {affinity_every}}}")
        if name == "adaptive":  # it needs feedback: more evaluations, and single-task references (see main)
            sets.append(f"sampling={{strategy: adaptive, reference: {json.dumps(reference)}, patience: 2}}")
            evals = max(evals, ADAPTIVE_EVALS)
    sets += EXTRA.get(name, [])
    sets += [f"output_dir={out / name}", f"training.max_steps={steps}", "training.early_stopping=null",
             f"training.eval_every={max(1, steps // evals)}", "training.precision=auto",
             f"training.learning_rate={learning_rate}"]
    return sets, tasks


def run_one(name: str, args) -> dict:
    """Train one run in this process and return its record."""
    from multitune.config import load_config
    from multitune.training import train

    sets, tasks = overrides(name, args.batches, Path(args.out), args.evals, args.affinity_every, args.learning_rate,
                            json.loads(args.reference))
    if args.dev_cap:  # timing runs: the dev sets only need to exist
        sets += [f"tasks.{t}.data.validation.max_examples={args.dev_cap}" for t in tasks]
    cfg = load_config(CONFIG, sets, base_dir=REPO)
    cfg.tasks = {k: v for k, v in cfg.tasks.items() if k in tasks}
    t0 = time.perf_counter()
    results = train(cfg, overwrite=True, progress=False)
    t = results["train"]
    record = {"steps": t["steps"], "best_step": t["best_step"], "examples": t["examples"], "train_s": t["wall_s"],
              "call_s": time.perf_counter() - t0, "examples_per_s": t["examples_per_s"],
              "precision": t["precision"], "batches_per_task": args.batches,
              "dev": {task: results["validation"][task][METRIC[task]] for task in tasks},
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024}
    if "transfer" in results:
        record["transfer"] = results["transfer"]
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    if metrics.exists():  # the last weights / shares the method used, for the table's notes
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        train_lines = [x for x in lines if x.get("kind") == "train"]
        evals = [x for x in lines if x.get("kind") == "eval"]
        if train_lines:
            record["final_loss_weights"] = train_lines[-1].get("loss_weights")
        if evals:
            record["final_shares"] = evals[-1].get("sampling")
        affinity = [x for x in lines if x.get("kind") == "affinity"]
        if affinity:
            record["affinity_seconds"] = sum(x.get("seconds", 0.0) for x in affinity)
    return record


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(result: dict) -> str:
    runs, timing = result["runs"], result.get("timing", {})
    single = {t: runs.get(f"single-{t}", {}).get("dev", {}).get(t) for t in TASKS}
    lines = [f"Seed mixture, {result['batches']} batches of 32 per task for every run, backbone lr "
             f"{result.get('learning_rate')} (heads 1e-3), precision "
             f"{result.get('precision', '?')}, best checkpoint by mean of main metrics "
             f"({result['evals']} evaluations). Δ is against the task trained alone with the same batches.", "",
             "| run | steps | sentiment acc (Δ) | ner F1 (Δ) | similarity Pearson (Δ) | mean | train s | ms per batch "
             "| peak RSS GB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('error', '')} | | | | | | | |")
            continue
        cells = []
        for t in TASKS:
            v = r["dev"].get(t)
            if v is None:
                cells.append("-")
            elif name.startswith("single-") or single[t] is None:
                cells.append(_fmt(v))
            else:
                cells.append(f"{v:.3f} ({v - single[t]:+.3f})")
        mean = sum(r["dev"].values()) / len(r["dev"])
        # time per batch of 32 (the optimizer steps only; a step of an all-task method holds 3 batches), from the
        # timing run when there is one, else from the run itself
        tm = timing.get(name) if timing.get(name, {}).get("status") == "ok" else r
        ms = f"{1000 * tm['train_s'] / (tm['examples'] / 32):.0f}"
        train_s = f"{r['train_s']:.0f}"
        label = METHODS[name][2] if name in METHODS else f"{SINGLES[name]} alone"
        lines.append(f"| {label} | {r['steps']} | {' | '.join(cells)} | {mean:.3f} | {train_s} | {ms} | "
                     f"{r['peak_rss_gb']:.2f} |")
    transfer = next((r["transfer"] for r in runs.values() if r.get("transfer")), None)
    if transfer:
        lines += ["", f"Task affinity on the shared backbone (run `{AFFINITY_RUN}`), mean over the samples "
                      "(row: the task whose look-ahead step is taken; column: the task whose loss is measured):", ""]
        for key in ("cosine", "tag"):
            matrix = transfer.get(key)
            if isinstance(matrix, dict):
                lines += [f"{key}:", "", "| from \\ to | " + " | ".join(TASKS) + " |",
                          "|---|" + "---|" * len(TASKS)]
                for i in TASKS:
                    row = matrix.get(i, {})
                    fmt = _fmt if key == "cosine" else (lambda v: "-" if v is None else f"{v:.2e}")
                    lines.append(f"| {i} | " + " | ".join(fmt(row.get(j)) for j in TASKS) + " |")
                lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {n: r for n, r in result["runs"].items() if r.get("status") == "ok" and n in METHODS}
    single = {t: result["runs"].get(f"single-{t}", {}).get("dev", {}).get(t) for t in TASKS}
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.8))
    for ax, t in zip(axes, TASKS):
        names = list(runs)
        ax.bar(range(len(names)), [runs[n]["dev"][t] for n in names], color="#4c72b0")
        if single[t] is not None:
            ax.axhline(single[t], color="#c44e52", linestyle="--", label="alone")
            ax.legend(loc="lower right")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(f"{t} ({METRIC[t]})")
    fig.suptitle(f"Seed mixture, {result['batches']} batches per task")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _child(name: str, args, dest: Path, timing: bool, reference: dict) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--batches", str(args.timing if timing else args.batches),
           "--out", args.out + ("-timing" if timing else ""), "--evals", str(1 if timing else args.evals),
           "--affinity-every", "0" if timing else str(args.affinity_every), "--record", str(dest),
           "--learning-rate", str(args.learning_rate), "--dev-cap", "64" if timing else "0",
           "--reference", json.dumps(reference)]
    log = Path(args.out + ("-timing" if timing else "")) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code == 0 and dest.exists():
        return {**json.loads(dest.read_text()), "status": "ok"}
    tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
    return {"status": "failed", "error": f"exit {code}: {tail[0][:200]} (log: {log})"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=100, help="batches of each task in every run")
    ap.add_argument("--evals", type=int, default=2, help="validation evaluations per run")
    ap.add_argument("--learning-rate", type=float, default=1e-4, help="backbone learning rate (heads: 1e-3)")
    ap.add_argument("--affinity-every", type=int, default=30,
                    help=f"affinity sampling in the `{AFFINITY_RUN}` run (0: off)")
    ap.add_argument("--timing", type=int, default=0,
                    help="also time each run with this many batches per task (quiet machine; 0: no timing)")
    ap.add_argument("--timing-only", action="store_true", help="only the timing runs; merge into the day's result")
    ap.add_argument("--only", default=",".join([*METHODS, *SINGLES]))
    ap.add_argument("--out", default="runs/bench-weighting")
    ap.add_argument("--dev-cap", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--reference", default=json.dumps(REFERENCE), help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the day's .md and .png from its .json")
    ap.add_argument("--date", help="the day of the result files (default: today)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        record = run_one(args.one, args)
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(record, indent=2))
        return
    date = args.date or datetime.date.today().isoformat()
    if args.report_only:
        dest = REPO / "bench" / "results"
        result = json.loads((dest / f"weighting-{date}.json").read_text())
        (dest / f"weighting-{date}.md").write_text(markdown(result))
        plot(result, dest / f"weighting-{date}.png")
        return print(markdown(result))
    names = args.only.split(",")
    for n in names:
        if n not in METHODS and n not in SINGLES:
            raise SystemExit(f"--only: unknown run {n!r}; valid: {', '.join([*METHODS, *SINGLES])}")
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"weighting-{date}.json"
    result = json.loads(path.read_text()) if path.exists() else {"date": date, "runs": {}, "timing": {}}
    if not args.timing_only:
        result.update(batches=args.batches, evals=args.evals, learning_rate=args.learning_rate)
    started = time.perf_counter()
    jobs = ([] if args.timing_only else [(n, False) for n in names]) + \
        ([(n, True) for n in names] if args.timing else [])
    for i, (name, timing) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {name}{' (timing)' if timing else ''} at "
              f"{(time.perf_counter() - started) / 60:.1f} min", flush=True)
        # the adaptive scheduler aims at what each task reaches alone at this budget, when the bench has it
        singles = {t: result["runs"].get(f"single-{t}", {}).get("dev", {}).get(t) for t in TASKS}
        reference = singles if all(v is not None for v in singles.values()) else REFERENCE
        record = _child(name, args, Path(args.out) / "records" / f"{name}{'-timing' if timing else ''}.json", timing,
                        reference)
        if name == "adaptive" and not timing:
            record["reference"] = reference
        result["timing" if timing else "runs"][name] = record
        if record.get("precision"):
            result.setdefault("precision", record["precision"])
        print(f"    {record.get('status')}: " + (json.dumps(record.get("dev")) if record.get("status") == "ok"
                                                 else record.get("error", "")), flush=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)
    if result["runs"]:
        md = markdown(result)
        (dest / f"weighting-{date}.md").write_text(md)
        plot(result, dest / f"weighting-{date}.png")
        print(md)


if __name__ == "__main__":
    sys.exit(main())
