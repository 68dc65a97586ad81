"""The data and the dev metrics of bench/llm.py, one definition for every system.

Three tasks, each written once as JSONL in the form multitune reads and turned into chat conversations for TRL
by :func:`conversation`, so that both systems train on the same token sequences:

- ``sentiment``: SST-2 as text, the answer ``positive`` or ``negative`` (text2text with the chat template);
- ``translate``: Multi30k German to English (text2text with the chat template);
- ``chat``: the shipped chat data (examples/data/chat: unit conversions and weekday arithmetic, one to three
  turns, some with a system prompt), a ``chat`` task: the loss on every assistant turn.

A text-to-text example ``{source, target}`` of a task with prefix ``P`` is the conversation
``[{user: P + source}, {assistant: target}]``: multitune renders its prompt with the same chat template.
The rows are cleaned as multitune cleans them (whitespace collapsed, empty rows and exact duplicates
dropped), so multitune's own cleaning keeps every row and both systems see the same examples.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CHAT_DIR = REPO / "examples" / "data" / "chat"

#: task -> what the benchmark sets for it (the same for every system)
TASKS: dict[str, dict[str, Any]] = {
    "sentiment": {"type": "text2text", "prefix": "Is the sentiment of this movie review positive or negative? ",
                  "max_new_tokens": 4, "labels": ["negative", "positive"], "metric": "accuracy"},
    "translate": {"type": "text2text", "prefix": "Translate from German to English: ", "max_new_tokens": 48,
                  "metric": "bleu"},
    "chat": {"type": "chat", "max_new_tokens": 12, "metric": "exact_match"},
}
SENTIMENT_WORDS = {0: "negative", 1: "positive"}


def squeeze(text: str) -> str:
    return " ".join(str(text).split())


def _dedupe(rows: list[dict]) -> list[dict]:
    kept, seen = [], set()
    for row in rows:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def _pairs(sources: Sequence[str], targets: Sequence[str]) -> list[dict]:
    rows = [{"source": squeeze(s), "target": squeeze(t)} for s, t in zip(sources, targets)]
    return _dedupe([r for r in rows if r["source"] and r["target"]])


def read_sst2(path: Path, text_column: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return _pairs([r[text_column] for r in rows], [SENTIMENT_WORDS[int(r["label"])] for r in rows])


def read_multi30k(split: str) -> list[dict]:
    de = (DATA / "multi30k" / f"{split}.de").read_text(encoding="utf-8").splitlines()
    en = (DATA / "multi30k" / f"{split}.en").read_text(encoding="utf-8").splitlines()
    return _pairs(de, en)


def read_chat(work: Path) -> tuple[list[dict], list[dict], str]:
    """The shipped chat data's train and validation conversations, and where they came from. When the files are
    not written yet, the repository's generator writes them into ``work`` (the same seed, the same rows)."""
    source = CHAT_DIR
    if not (CHAT_DIR / "train.jsonl").is_file():
        sys.path.insert(0, str(CHAT_DIR))
        try:
            from make_chat_data import write_chat_data
        finally:
            sys.path.remove(str(CHAT_DIR))
        source = work / "chat-source"
        write_chat_data(source)
    out = []
    for name in ("train.jsonl", "validation.jsonl"):
        rows = [json.loads(line) for line in (source / name).read_text(encoding="utf-8").splitlines() if line.strip()]
        out.append(_dedupe([{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
                            for r in rows]))
    return out[0], out[1], str(source.relative_to(REPO) if source.is_relative_to(REPO) else source)


def seeded_sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """``n`` rows drawn with a seeded generator, in their file order (all rows when ``n`` is None or too large)."""
    import numpy as np

    if n is None or n >= len(rows):
        return list(rows)
    return [rows[i] for i in np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))]


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare(dest: Path, train_sizes: dict[str, int | None], dev_examples: int, seed: int) -> dict:
    """Write each task's train and dev JSONL under ``dest``; returns ``{task: {train, validation, n_train,
    n_validation}}`` and where the chat data came from.

    Args:
        train_sizes: training rows per task (a seeded sample; None: all). With proportional sampling these
            sizes are the mixture's proportions.
        dev_examples: the first this many dev rows of each task.
    """
    chat_train, chat_dev, chat_source = read_chat(dest)
    splits = {
        "sentiment": (read_sst2(DATA / "sst2" / "train.tsv", "sentence"), read_sst2(DATA / "sst2" / "dev.tsv", "content")),
        "translate": (read_multi30k("train"), read_multi30k("val")),
        "chat": (chat_train, chat_dev),
    }
    out: dict[str, Any] = {"chat_source": chat_source}
    for task, (train, dev) in splits.items():
        train = seeded_sample(train, train_sizes.get(task), seed)
        dev = dev[:dev_examples]
        write_jsonl(dest / f"{task}-train.jsonl", train)
        write_jsonl(dest / f"{task}-dev.jsonl", dev)
        out[task] = {"train": str(dest / f"{task}-train.jsonl"), "validation": str(dest / f"{task}-dev.jsonl"),
                     "n_train": len(train), "n_validation": len(dev)}
    return out


def conversation(task: str, row: dict) -> list[dict]:
    """A task's row as a chat conversation (what TRL trains on and what the dev prompts are made of)."""
    if "messages" in row:
        return [dict(m) for m in row["messages"]]
    return [{"role": "user", "content": TASKS[task]["prefix"] + row["source"]},
            {"role": "assistant", "content": row["target"]}]


def prompt_and_answer(task: str, row: dict) -> tuple[list[dict], str]:
    """The conversation before its last assistant turn (the generation prompt) and that turn's content (the
    reference), as multitune evaluates text2text and chat tasks."""
    messages = conversation(task, row)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


# -- metrics: the definitions of multitune's text2text task, written out for outputs made elsewhere --------
def _norm(text: str) -> str:
    return squeeze(text).casefold()


def dev_metrics(task: str, hyps: Sequence[str], refs: Sequence[str], lowercase: bool = False) -> dict[str, float]:
    """``exact_match`` always (whitespace-normalised; casefolded only when ``lowercase``); with a label set
    ``accuracy`` and ``invalid`` (an output that is no label, casefolded, is wrong and invalid); free text
    ``bleu`` and ``chrf`` (sacrebleu, corpus level)."""
    import sacrebleu

    hyps = [squeeze(h) for h in hyps]
    refs = [squeeze(r) for r in refs]
    norm = _norm if lowercase else squeeze
    n = max(len(refs), 1)
    metrics = {"exact_match": sum(norm(h) == norm(r) for h, r in zip(hyps, refs)) / n}
    labels = TASKS[task].get("labels")
    if labels:
        index = {_norm(lab): i for i, lab in enumerate(labels)}
        gold = [index.get(_norm(r), -1) for r in refs]
        pred = [index.get(_norm(h), -1) for h in hyps]
        metrics["accuracy"] = sum(g == p for g, p in zip(gold, pred)) / n
        metrics["invalid"] = sum(p == -1 for p in pred) / n
    else:
        metrics["bleu"] = sacrebleu.corpus_bleu(hyps, [refs], lowercase=lowercase).score
        metrics["chrf"] = sacrebleu.corpus_chrf(hyps, [refs]).score
    return metrics
