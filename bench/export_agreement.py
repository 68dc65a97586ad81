"""Agreement of exported seed-mixture tasks with multitune, client by client, on real dev data.

Exports each task of a trained seed-mixture run (SST-2 sentiment, WNUT-17 NER, STS-B similarity) and compares
what each stock client predicts with ``multitune predict`` / ``embed`` on the first N dev examples:

- transformers ``pipeline`` (text-classification, token-classification with aggregation_strategy="first" and,
  for comparison, "simple"), sentence-transformers ``CrossEncoder`` and ``SentenceTransformer``;
- onnxruntime on the ONNX export of the whole model, when the onnx extra is installed.

    python bench/export_agreement.py RUN [--n 200]

Writes bench/results/export-agreement-<run name>-<date>.json and .md. Run from the repository root with ../shared/data
beside it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import math
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def dev_inputs(n: int) -> dict[str, list]:
    """The first ``n`` dev inputs of each seed task."""
    with open(DATA / "sst2" / "dev.tsv", encoding="utf-8") as fh:
        sst = [row["content"] for row in csv.DictReader(fh, delimiter="\t")][:n]
    sentences, words = [], []
    for line in (DATA / "wnut17" / "dev.conll").read_text(encoding="utf-8").splitlines():
        if line.strip():
            words.append(line.split()[0])
        elif words:
            sentences.append(" ".join(words))
            words = []
    with open(DATA / "stsb" / "dev.csv", encoding="utf-8") as fh:
        pairs = [(row[0], row[1]) for row in csv.reader(fh)][:n]
    return {"sentiment": sst, "ner": sentences[:n], "similarity": pairs}


def _word_spans(entities: list[dict], words: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of pipeline entities over pre-split words (joined by single spaces)."""
    starts = []
    pos = 0
    for word in words:
        starts.append(pos)
        pos += len(word) + 1
    spans = []
    for e in entities:
        first = starts.index(e["start"]) if e["start"] in starts else -1
        last = max(i for i, st in enumerate(starts) if st < e["end"])
        spans.append((e["entity_group"], first, last + 1))
    return spans


def _same(ours: dict, theirs: dict, key: str | None) -> bool:
    """Equal predictions: the label, the entity spans (type, start, end), or the score within 1e-4."""
    if key == "entities":
        return [(e["type"], e["start"], e["end"]) for e in ours[key]] == \
            [(e["type"], e["start"], e["end"]) for e in theirs[key]]
    if key:
        return ours[key] == theirs[key]
    return abs(ours["score"] - theirs["score"]) <= 1e-4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", default="runs/bench-export-agreement")
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from transformers import pipeline

    import multitune
    from multitune.export.task import export_task
    from multitune.tasks.token_classification import WORD_PATTERN as WORD

    run, out = Path(args.run), Path(args.out)
    model = multitune.load(run)
    inputs = dev_inputs(args.n)
    rows = []

    def row(client, task, agree, total, detail):
        rows.append({"client": client, "task": task, "agree": agree, "total": total, "detail": detail})
        print(json.dumps(rows[-1]), flush=True)

    reports = {t: export_task(run, t, out / t, overwrite=True, source="final") for t in inputs}
    remote = {t: reports[t]["trust_remote_code"] for t in inputs}
    texts = inputs["sentiment"]
    ours = model.predict("sentiment", texts)
    clf = pipeline("text-classification", model=str(out / "sentiment"), trust_remote_code=remote["sentiment"])
    theirs = clf(texts, truncation=True, top_k=None)
    diff = max(abs({d["label"]: d["score"] for d in t}[lab] - p) for o, t in zip(ours, theirs)
               for lab, p in o["scores"].items())
    row("pipeline text-classification", "sentiment",
        sum(max(t, key=lambda d: d["score"])["label"] == o["label"] for o, t in zip(ours, theirs)), len(texts),
        f"{reports['sentiment']['model_class']}, max |p diff| {diff:.1e}")
    sentences = inputs["ner"]
    ours = model.predict("ner", sentences)
    for strategy in ("first", "simple"):
        tagger = pipeline("token-classification", model=str(out / "ner"), aggregation_strategy=strategy,
                          trust_remote_code=remote["ner"])
        agree = sum([(e["type"], e["start"], e["end"]) for e in o["entities"]]
                    == [(e["entity_group"], e["start"], e["end"]) for e in t]
                    for o, t in zip(ours, tagger(sentences)))
        row(f"pipeline token-classification ({strategy})", "ner", agree, len(sentences),
            reports["ner"]["model_class"])
    tagger = pipeline("token-classification", model=str(out / "ner"), aggregation_strategy="first",
                      trust_remote_code=remote["ner"])
    words = [[m.group() for m in WORD.finditer(s)] for s in sentences]
    theirs = tagger(words, is_split_into_words=True)
    agree = sum([(e["type"], e["start_token"], e["end_token"]) for e in o["entities"]]
                == _word_spans(t, w) for o, t, w in zip(ours, theirs, words))
    row("pipeline token-classification (first, words given)", "ner", agree, len(sentences),
        "is_split_into_words=True with multitune's words")
    pairs = inputs["similarity"]
    ours = [p["score"] for p in model.predict("similarity", pairs)]
    low, high = model.tasks["similarity"].config.label_range
    reg = pipeline("text-classification", model=str(out / "similarity"), trust_remote_code=remote["similarity"])
    raw = [r["score"] for r in reg([{"text": a, "text_pair": b} for a, b in pairs], truncation=True)]
    mapped = [low + (high - low) / (1 + math.exp(-r)) for r in raw]
    row("pipeline text-classification (regression)", "similarity",
        sum(abs(m - o) <= 1e-4 for m, o in zip(mapped, ours)), len(pairs),
        f"{reports['similarity']['model_class']}, max |diff| {max(abs(m - o) for m, o in zip(mapped, ours)):.1e}")
    cross = CrossEncoder(str(out / "similarity"), trust_remote_code=remote["similarity"])
    scores = [low + (high - low) * float(s) for s in cross.predict(pairs)]
    row("sentence-transformers CrossEncoder", "similarity", sum(abs(s - o) <= 1e-4 for s, o in zip(scores, ours)),
        len(pairs), f"max |diff| {max(abs(s - o) for s, o in zip(scores, ours)):.1e}")
    embed_texts = texts + [a for a, _ in pairs]
    ours = model.embed_texts(embed_texts)
    for name, directory in (("RUN/model", run / "model"), ("sentiment export", out / "sentiment")):
        st = SentenceTransformer(str(directory), trust_remote_code=name != "RUN/model" and remote["sentiment"])
        cos = torch.nn.functional.cosine_similarity(ours, torch.tensor(st.encode(embed_texts)))
        row(f"SentenceTransformer ({name})", "embeddings", int((cos >= 0.99999).sum()), len(embed_texts),
            f"min cosine {float(cos.min()):.6f}")
    try:
        onnx_dir = out / "onnx"
        export_task(run, None, onnx_dir, overwrite=True, source="final", fmt="onnx")
        onnx_model = multitune.load(onnx_dir)
        for task, items in inputs.items():
            a, b = model.predict(task, items), onnx_model.predict(task, items)
            key = {"sentiment": "label", "ner": "entities"}.get(task)
            agree = sum(_same(x, y, key) for x, y in zip(a, b))
            row("onnxruntime", task, agree, len(items), "one graph of the whole model")
    except Exception as exc:  # the onnx extra is optional
        print(f"onnx skipped: {exc}")
    date = datetime.date.today().isoformat()
    dest = REPO / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    info = {"date": date, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "run": str(run),
            "heads": {t: model.tasks[t].config.head for t in ("sentiment", "similarity")}, "rows": rows}
    name = f"export-agreement-{run.name}-{date}"
    (dest / f"{name}.json").write_text(json.dumps(info, indent=2))
    lines = ["| client | task | agree | detail |", "|---|---|---|---|"]
    lines += [f"| {r['client']} | {r['task']} | {r['agree']}/{r['total']} | {r['detail']} |" for r in rows]
    (dest / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
