"""Sentence-head layouts on the seed mixture (SST-2 + WNUT-17 + STS-B): ``head: pooled`` (the pooled sentence
embedding -> linear) against ``head: pooler`` (first token -> the backbone's pooler -> tanh -> linear, the
layout the stock ``AutoModelForSequenceClassification`` computes), for the sentiment classifier and the
similarity cross-encoder, at the same budget and seed. Writes bench/results/heads-<date>.json and .md.

    python bench/heads.py [--steps 1200] [--seeds 42]

Run from the repository root with ../shared/data beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
METRICS = (("sentiment", "accuracy"), ("ner", "f1"), ("similarity", "pearson"))


def run(head: str, steps: int, seed: int, out: str) -> dict:
    from multitune.config import load_config
    from multitune.training import train

    overrides = [f"output_dir={out}", f"seed={seed}", f"training.max_steps={steps}", "training.eval_every=200",
                 "training.precision=auto", "training.group_by_length=true", "training.per_task_best=false",
                 "training.early_stopping=null", f"tasks.sentiment.head={head}", f"tasks.similarity.head={head}"]
    cfg = load_config(REPO / "examples/configs/seed-mixture.yaml", overrides, base_dir=REPO)
    return train(cfg, overwrite=True, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--out", default="runs/bench-heads")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        for head in ("pooled", "pooler"):
            result = run(head, args.steps, seed, f"{args.out}/{head}-{seed}")
            v = result["validation"]
            rows.append({"head": head, "seed": seed, "steps": result["train"]["steps"],
                         "wall_s": round(result["train"]["wall_s"], 1),
                         **{f"{t}/{m}": round(v[t][m], 4) for t, m in METRICS}})
            print(json.dumps(rows[-1]), flush=True)
    date = datetime.date.today().isoformat()
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    previous = dest / f"heads-{date}.json"
    if previous.is_file():  # runs of other seeds on the same day stay in the table
        done = {(r["head"], r["seed"]) for r in rows}
        rows = [r for r in json.loads(previous.read_text())["rows"] if (r["head"], r["seed"]) not in done] + rows
        rows.sort(key=lambda r: (r["seed"], r["head"]))
    info = {"date": date, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": args.steps,
            "settings": "seed-mixture.yaml, precision auto, group_by_length, dev sets", "rows": rows}
    (dest / f"heads-{date}.json").write_text(json.dumps(info, indent=2))
    lines = ["| head | seed | steps | wall s | sentiment acc | ner F1 | similarity Pearson |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['head']} | {r['seed']} | {r['steps']} | {r['wall_s']} | {r['sentiment/accuracy']:.4f} | "
              f"{r['ner/f1']:.4f} | {r['similarity/pearson']:.4f} |" for r in rows]
    for head in ("pooled", "pooler"):
        mine = [r for r in rows if r["head"] == head]
        if len(mine) > 1:
            mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("sentiment/accuracy", "ner/f1",
                                                                     "similarity/pearson")}
            lines.append(f"| {head} | mean of {len(mine)} | {args.steps} | - | {mean['sentiment/accuracy']:.4f} | "
                         f"{mean['ner/f1']:.4f} | {mean['similarity/pearson']:.4f} |")
    (dest / f"heads-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
