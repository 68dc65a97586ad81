"""Length grouping against label mix: dev metrics and padding with batches drawn in random order (``none``),
grouped by length alone (``length``, the grouping multitune had before batches kept their label mix) and
grouped by length within label strata (``strata``, what ``group_by_length: true`` does now; ``strata-w10``: the
same with sorted windows of 10 batches instead of 50), on every task
type, a sentence-pair classification task included. Writes bench/results/grouping-<date>.json and .md.

    python bench/grouping.py [--seeds 42 43] [--workloads sst2 paraphrase wnut17 stsb text2text]

Workloads (one task each, default backbone, fp32, dev sets; run from the repository root with ../shared/data
beside it):

- ``sst2``: SST-2 sentiment, 200 steps of 32;
- ``paraphrase``: STS-B pairs as paraphrase classification (score >= 3: ``same``, else ``different``), 200
  steps of 32: a pair task where length goes with the label;
- ``wnut17``: WNUT-17 NER, 200 steps of 32;
- ``stsb``: STS-B similarity regression (cross-encoder), 200 steps of 32;
- ``text2text``: SST-2 sentiment as text on the MiniLM encoder-decoder, the budget of the integration test
  (100 round-robin steps of 16 with German-English translation beside it).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
VARIANTS = ("none", "length", "strata", "strata-w10")
MAIN = {"sst2": ("sentiment", "accuracy"), "paraphrase": ("paraphrase", "accuracy"), "wnut17": ("ner", "f1"),
        "stsb": ("similarity", "pearson"), "text2text": ("sentiment", "accuracy")}


def paraphrase_files(folder: Path) -> dict[str, Path]:
    """STS-B pairs as a binary paraphrase task (score >= 3 -> same), written as TSV."""
    out = {}
    for split, name in (("train", "train.csv"), ("validation", "dev.csv")):
        path = folder / f"paraphrase-{split}.tsv"
        with open(DATA / "stsb" / name, encoding="utf-8", newline="") as src, \
                open(path, "w", encoding="utf-8", newline="") as dst:
            writer = csv.writer(dst, delimiter="\t", lineterminator="\n")
            writer.writerow(["text", "text_pair", "label"])
            for a, b, score in csv.reader(src):
                writer.writerow([a.replace("\t", " "), b.replace("\t", " "), "same" if float(score) >= 3 else
                                 "different"])
        out[split] = path
    return out


def config(workload: str, seed: int, out: str, folder: Path) -> dict:
    training = {"max_steps": 200, "batch_size": 32, "max_length": 128, "eval_every": 200, "precision": "fp32",
                "per_task_best": False, "learning_rate": 5e-5, "head_learning_rate": 1e-3, "warmup_ratio": 0.1}
    sst2 = {"train": {"path": str(DATA / "sst2/train.tsv"), "format": "tsv", "text": "sentence", "label": "label",
                      "max_examples": 12800},
            "validation": {"path": str(DATA / "sst2/dev.tsv"), "format": "tsv", "text": "content", "label": "label"}}
    stsb = {s: {"path": str(DATA / "stsb" / f), "format": "csv", "header": False,
                "columns": ["text", "text_pair", "label"]} for s, f in (("train", "train.csv"),
                                                                        ("validation", "dev.csv"))}
    if workload == "sst2":
        tasks = {"sentiment": {"type": "classification", "data": sst2}}
    elif workload == "paraphrase":
        files = paraphrase_files(folder)
        tasks = {"paraphrase": {"type": "classification", "data": {
            s: {"path": str(p), "format": "tsv"} for s, p in files.items()}}}
    elif workload == "wnut17":
        tasks = {"ner": {"type": "token_classification", "data": {
            "train": {"path": str(DATA / "wnut17/train.conll")},
            "validation": {"path": str(DATA / "wnut17/dev.conll")}}}}
    elif workload == "stsb":
        tasks = {"similarity": {"type": "regression", "label_range": [0, 5], "data": stsb}}
    else:  # the integration test's budget on the offline encoder-decoder config
        import yaml

        raw = yaml.safe_load((REPO / "examples/configs/offline-sentiment-translation.yaml").read_text())
        raw["tasks"]["sentiment"]["data"]["train"].update(path=str(DATA / "sst2/train.tsv"), max_examples=1600)
        raw["tasks"]["sentiment"]["data"]["validation"].update(path=str(DATA / "sst2/dev.tsv"), max_examples=200)
        tr = raw["tasks"]["translate"]
        tr["data"]["train"].update(source_path=str(DATA / "multi30k/train.de"),
                                   target_path=str(DATA / "multi30k/train.en"), max_examples=1600)
        tr["data"]["validation"].update(source_path=str(DATA / "multi30k/val.de"),
                                        target_path=str(DATA / "multi30k/val.en"), max_examples=20)
        tr["generation"] = {"num_beams": 1, "max_new_tokens": 24}
        raw.update(output_dir=out, seed=seed, sampling={"strategy": "round_robin"})
        raw["training"].update(max_steps=100, eval_every=100, learning_rate=2e-4, precision="fp32",
                               per_task_best=False)
        return raw
    return {"backbone": "default", "output_dir": out, "seed": seed, "tasks": tasks, "training": training}


def run(workload: str, variant: str, seed: int, out: str, folder: Path) -> dict:
    from multitune.config.loader import parse_config
    from multitune.training import batching, train

    raw = config(workload, seed, out, folder)
    raw["training"]["group_by_length"] = variant != "none"
    original = batching.TaskBatcher.__init__

    def length_only(self, *args, **kwargs):  # the grouping before strata: sort each window by length alone
        original(self, *args, **kwargs)
        self.strata = None
        if self.lengths is not None:
            self._order = self._permutation(self.epoch)

    window = batching.TaskBatcher.GROUP_WINDOW
    if variant == "length":
        batching.TaskBatcher.__init__ = length_only
    if variant == "strata-w10":  # smaller sorted windows: more randomness in which rows meet, more padding
        batching.TaskBatcher.GROUP_WINDOW = 10
    try:
        return train(parse_config(raw), overwrite=True, progress=False)
    finally:
        batching.TaskBatcher.__init__ = original
        batching.TaskBatcher.GROUP_WINDOW = window


def markdown(info: dict) -> str:
    lines = [f"# Length grouping and label mix ({info['date']}, {info['machine']})", "",
             "Dev metric of each workload's task (mean over seeds, min-max in brackets) and the share of padded "
             "tokens in training batches.", "",
             "| workload | metric | " + " | ".join(VARIANTS) + " | padding " + " / ".join(VARIANTS) + " |",
             "|---|---|" + "---|" * (len(VARIANTS) + 1)]
    for workload in dict.fromkeys(r["workload"] for r in info["rows"]):
        rows = [r for r in info["rows"] if r["workload"] == workload]
        cells, pads = [], []
        for variant in VARIANTS:
            vals = [r["metric"] for r in rows if r["variant"] == variant]
            pad = [r["padding"] for r in rows if r["variant"] == variant]
            cells.append(f"{sum(vals) / len(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]" if vals else "-")
            pads.append(f"{sum(pad) / len(pad):.0%}" if pad else "-")
        lines.append(f"| {workload} | {'/'.join(MAIN[workload])} | {' | '.join(cells)} | {' / '.join(pads)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    ap.add_argument("--workloads", nargs="+", default=list(MAIN), choices=list(MAIN))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="runs/bench-grouping")
    args = ap.parse_args()
    date = datetime.date.today().isoformat()
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    result_file = dest / f"grouping-{date}.json"
    rows = json.loads(result_file.read_text())["rows"] if result_file.is_file() else []
    info = {"date": date, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            for seed in args.seeds:
                for variant in args.variants:
                    task, metric = MAIN[workload]
                    result = run(workload, variant, seed, f"{args.out}/{workload}-{variant}-{seed}", Path(tmp))
                    t = result["train"]
                    row = {"workload": workload, "variant": variant, "seed": seed,
                           "metric": round(result["validation"][task][metric], 4),
                           "padding": round(1 - t["real_tokens"] / max(t["padded_tokens"], 1), 4),
                           "wall_s": round(t["wall_s"], 1)}
                    rows[:] = [r for r in rows if (r["workload"], r["variant"], r["seed"]) !=
                               (workload, variant, seed)] + [row]
                    print(json.dumps(row), flush=True)
                    result_file.write_text(json.dumps(info, indent=2) + "\n")  # after every run: partial is kept
                    (dest / f"grouping-{date}.md").write_text(markdown(info))


if __name__ == "__main__":
    main()
