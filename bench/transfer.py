"""Transfer-learning controls on real data, each from its shipped example config:

- SST-2 at an equal budget: feature extraction (frozen backbone) vs full fine-tuning vs layer-wise LR
  decay with gradual unfreezing;
- sequential NER (WNUT-17) then sentiment (SST-2): the forgetting matrix without and with replay.

Writes bench/results/transfer-<date>.json and .md (results merge across invocations of the same day).

    python bench/transfer.py [--only fe,ft,llrd,seq,replay] [--steps 400] [--stage-steps 300]

Run from the repository root with ../shared/data beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

SST2_RUNS = {"fe": ("feature extraction (freeze: backbone)", "feature-extraction.yaml"),
             "ft": ("full fine-tuning", "sentiment-only.yaml"),
             "llrd": ("LLRD 0.9 + gradual unfreezing every 25 steps", "llrd-gradual-unfreezing.yaml")}
SEQ_RUNS = {"seq": ("NER then sentiment, no replay", 0.0), "replay": ("NER then sentiment, replay 0.2", 0.2)}


def _train(config: str, overrides: list[str]) -> dict:
    from multitune.config import load_config
    from multitune.training import train

    cfg = load_config(REPO / "examples/configs" / config, overrides, base_dir=REPO)
    return train(cfg, overwrite=True, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="fe,ft,llrd,seq,replay")
    ap.add_argument("--steps", type=int, default=400, help="SST-2 steps of each transfer mode")
    ap.add_argument("--stage-steps", type=int, default=300, help="steps of each sequential stage")
    ap.add_argument("--out", default="runs/bench-transfer")
    args = ap.parse_args()
    date = datetime.date.today().isoformat()
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"transfer-{date}.json"
    result = json.loads(path.read_text()) if path.exists() else {"date": date, "sst2": {}, "sequential": {}}
    for key in args.only.split(","):
        if key in SST2_RUNS:
            label, config = SST2_RUNS[key]
            r = _train(config, [f"output_dir={args.out}/{key}", f"training.max_steps={args.steps}"])
            table = json.loads((Path(args.out) / key / "parameters.json").read_text())
            result["sst2"][key] = {"label": label, "config": config, "steps": r["train"]["steps"],
                                   "accuracy": r["validation"]["sentiment"]["accuracy"],
                                   "best_step": r["train"]["best_step"], "wall_s": r["train"]["wall_s"],
                                   "examples_per_s": r["train"]["examples_per_s"],
                                   "trainable": sum(row["trainable"] for row in table)}
        elif key in SEQ_RUNS:
            label, replay = SEQ_RUNS[key]
            r = _train("sequential-ner-sentiment.yaml", [
                f"output_dir={args.out}/{key}", f"training.max_steps={args.stage_steps}",
                f"stages.1.replay={replay}"])
            result["sequential"][key] = {"label": label, "replay": replay, "forgetting": r["forgetting"],
                                         "wall_s": sum(s["train"]["wall_s"] for s in r["stages"])}
        else:
            raise SystemExit(f"unknown run {key!r}; valid: {', '.join([*SST2_RUNS, *SEQ_RUNS])}")
        # merge with what other invocations wrote meanwhile (the runs may go in parallel processes)
        latest = json.loads(path.read_text()) if path.exists() else {"date": date, "sst2": {}, "sequential": {}}
        for section in ("sst2", "sequential"):
            latest[section].update(result[section])
        result = latest
        path.write_text(json.dumps(result, indent=2))
    lines = [f"# Transfer-learning controls ({date}, 2 CPU cores, fp32)", "",
             "| SST-2, equal budget | steps | dev accuracy | best step | trainable params | wall s | examples/s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["sst2"].values():
        lines.append(f"| {r['label']} | {r['steps']} | {r['accuracy']:.4f} | {r['best_step']} | "
                     f"{r['trainable']:,} | {r['wall_s']:.0f} | {r['examples_per_s']:.1f} |")
    for r in result["sequential"].values():
        f = r["forgetting"]
        lines += ["", f"**{r['label']}** (main metric of each task after each stage; forgetting = best earlier "
                  f"value minus final value)", "",
                  "| task | " + " | ".join(f"after {s}" for s in f["stages"]) + " | forgetting |",
                  "|---|" + "---|" * (len(f["stages"]) + 1)]
        for task, by_stage in f["matrix"].items():
            cells = [f"{by_stage[s]:.4f}" if s in by_stage else "-" for s in f["stages"]]
            forget = f["forgetting"].get(task)
            lines.append(f"| {task} ({f['metric'][task]}) | " + " | ".join(cells)
                         + f" | {'-' if forget is None else f'{forget:+.4f}'} |")
    (dest / f"transfer-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
