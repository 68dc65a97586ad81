"""Where a training step's time goes, kernel by kernel: multitune's step on the seed mixture's three tasks
(SST-2 + WNUT-17 + STS-B, examples/configs/seed-mixture.yaml: batch 32, max length 128, temperature sampling;
summed losses and ``precision: auto``) under ``torch.profiler``, with the operators grouped by what they do. Writes
bench/results/profile-<date>.json and .md.

    python bench/profile_step.py [--warmup 20] [--steps 30] [--set training.unpadded=true ...]

The step is timed by the trainer (``run.step_seconds``: forward, backward, clipping, optimizer); the profiler
reports each operator's self time on the training thread, so "outside operators" (step time minus the sum of
the operators' self times) is Python, the autograd engine's bookkeeping and the dispatcher. Matmul GFLOP/s is
the profiler's FLOP count of mm/addmm/bmm over their self time, to set against the machine's measured peak.
Run from the repository root with ../shared/data beside it, on quiet cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

#: operator-name fragments -> category, first match wins (names are aten::<op>, backward ops included)
CATEGORIES = (
    ("matmul", ("addmm", "aten::mm", "bmm", "aten::matmul", "baddbmm", "linear")),
    ("attention softmax", ("softmax", "scaled_dot_product", "_efficient_attention", "_flash_attention")),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("dropout", ("dropout", "bernoulli")),
    ("optimizer (fused AdamW)", ("adamw", "_foreach_", "lerp", "addcdiv", "addcmul")),
    ("gradient norm and clipping", ("norm", "clamp")),
    ("embedding lookup and its gradient", ("embedding", "index_select", "index_add", "index_put", "scatter")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax", "mse_loss", "binary_cross")),
    ("casts and copies (bf16 autocast)", ("copy_", "_to_copy", "aten::to", "clone", "contiguous", "cat")),
    ("elementwise and reductions", ("add", "mul", "div", "sub", "sum", "mean", "where", "masked_fill", "tanh",
                                    "sigmoid", "pow", "sqrt", "rsub", "fill_", "zero_", "ne", "eq", "gt", "lt",
                                    "neg", "exp", "abs", "max", "min", "argmax", "threshold")),
)


def category(name: str) -> str:
    low = name.lower()
    for label, parts in CATEGORIES:
        if any(p in low for p in parts):
            return label
    return "other operators"


def config_data(overrides: list[str], out: str, steps: int) -> tuple[str, list[str]]:
    """The seed-mixture config with the suite's settings for a profiled run of ``steps`` steps."""
    sets = ["training.precision=auto", f"training.max_steps={steps}", f"training.eval_every={steps + 1}",
            "training.early_stopping=null", "training.per_task_best=false", "loss_weighting.strategy=sum",
            f"output_dir={out}"]
    return str(REPO / "examples" / "configs" / "seed-mixture.yaml"), sets + overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=20, help="steps before profiling starts")
    parser.add_argument("--steps", type=int, default=30, help="profiled steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--label", default="", help="suffix of the result files")
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from torch.profiler import ProfilerActivity, profile

    from multitune.config import load_config
    from multitune.training import Callback
    from multitune.training.trainer import train_run

    total = args.warmup + args.steps
    step_seconds: list[float] = []
    holder: dict = {}

    class Profiled(Callback):
        def on_step_start(self, run):
            if run.state.step == args.warmup:
                holder["prof"] = profile(activities=[ProfilerActivity.CPU], with_flops=True)
                holder["prof"].__enter__()

        def on_step_end(self, run):
            if run.state.step > args.warmup:
                step_seconds.append(run.step_seconds)
            if run.state.step == total:
                holder["prof"].__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as tmp:
        path, sets = config_data(args.overrides, str(Path(tmp) / "run"), total)
        config = load_config(path, overrides=sets, base_dir=REPO)
        os.chdir(REPO)
        started = time.perf_counter()
        train_run(config, overwrite=True, console=Console(file=sys.stderr, width=120), progress=False,
                  callbacks=[Profiled()])
        wall = time.perf_counter() - started

    events = holder["prof"].key_averages()
    by_category: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    top = []
    for e in events:
        if e.key.startswith("ProfilerStep") or e.key.startswith("autograd::engine"):
            continue
        self_s = e.self_cpu_time_total / 1e6
        by_category[category(e.key)] += self_s
        flops[category(e.key)] += float(getattr(e, "flops", 0) or 0)
        top.append((self_s, e.key, e.count))
    step_total = sum(step_seconds)
    in_ops = sum(by_category.values())
    rows = [{"category": c, "ms_per_step": 1000 * s / args.steps, "share": s / step_total,
             "gflops": (flops[c] / s / 1e9) if flops[c] and s else None}
            for c, s in sorted(by_category.items(), key=lambda kv: -kv[1])]
    rows.append({"category": "outside operators (Python, autograd engine, dispatcher)",
                 "ms_per_step": 1000 * max(step_total - in_ops, 0.0) / args.steps,
                 "share": max(step_total - in_ops, 0.0) / step_total, "gflops": None})
    top.sort(reverse=True)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or 'cpu'}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}", "threads": torch.get_num_threads(),
              "overrides": args.overrides, "warmup_steps": args.warmup, "profiled_steps": args.steps,
              "step_ms_median": 1000 * statistics.median(step_seconds), "step_ms_mean": 1000 * step_total / args.steps,
              "categories": rows, "top_operators": [{"op": k, "ms_per_step": 1000 * s / args.steps, "calls": c}
                                                    for s, k, c in top[:25]], "process_s": wall}
    stem = f"profile-{result['date']}{('-' + args.label) if args.label else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Where a training step goes, {result['date']}", "",
             f"{result['machine']}, {result['threads']} threads. Seed mixture (SST-2 + WNUT-17 + STS-B), batch 32, "
             f"temperature sampling, summed losses, precision auto; overrides: {args.overrides or 'none'}. "
             f"{args.steps} steps profiled after {args.warmup}: median step {result['step_ms_median']:.1f} ms "
             f"(mean {result['step_ms_mean']:.1f} ms, profiler overhead included).", "",
             "| part of the step | ms per step | share | matmul GFLOP/s |", "|---|---|---|---|"]
    for r in rows:
        g = f"{r['gflops']:.0f}" if r["gflops"] else ""
        lines.append(f"| {r['category']} | {r['ms_per_step']:.1f} | {100 * r['share']:.1f}% | {g} |")
    lines += ["", "Top operators by self time:", "", "| operator | ms per step | calls |", "|---|---|---|"]
    lines += [f"| {t['op']} | {t['ms_per_step']:.2f} | {t['calls']} |" for t in result["top_operators"]]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
