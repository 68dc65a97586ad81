"""Seed mixture (SST-2 + WNUT-17 + STS-B, 1,200 steps) against the same three tasks trained one at a time
(400 steps each) with the same code. Writes bench/results/seed-mixture-<date>.json and .md.

    python bench/seed_mixture.py [--steps 1200] [--single-steps 400]

Run from the repository root with ../shared/data beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def run(config_overrides: list[str], out: str, tasks: list[str] | None = None) -> dict:
    from multitune.config import load_config
    from multitune.training import train

    cfg = load_config(REPO / "examples/configs/seed-mixture.yaml", [f"output_dir={out}", *config_overrides],
                      base_dir=REPO)
    if tasks:
        cfg.tasks = {k: v for k, v in cfg.tasks.items() if k in tasks}
    return train(cfg, overwrite=True, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--single-steps", type=int, default=400)
    ap.add_argument("--out", default="runs/bench-seed-mixture")
    args = ap.parse_args()
    rows = {}
    rows["mixture"] = run([f"training.max_steps={args.steps}"], f"{args.out}/mixture")
    for task in ("sentiment", "ner", "similarity"):
        rows[task] = run([f"training.max_steps={args.single_steps}", "training.eval_every=100",
                          "loss_weighting.strategy=sum"], f"{args.out}/{task}", [task])
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    date = datetime.date.today().isoformat()
    result = {"date": date, "peak_rss_gb_process": round(peak_gb, 2), "runs": rows}
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"seed-mixture-{date}.json").write_text(json.dumps(result, indent=2))
    lines = ["| run | steps | wall s | examples/s | real tok/s | sentiment acc | ner F1 | similarity Pearson |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        v, t = r["validation"], r["train"]
        def get(task, metric, v=v):
            return f"{v[task][metric]:.4f}" if task in v else "-"
        lines.append(f"| {name} | {t['steps']} | {t['wall_s']:.0f} | {t['examples_per_s']:.1f} | "
                     f"{t['real_tokens_per_s']:.0f} | {get('sentiment', 'accuracy')} | {get('ner', 'f1')} | "
                     f"{get('similarity', 'pearson')} |")
    (dest / f"seed-mixture-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
