"""HF Trainer, written the way its users write it (one Trainer per task), and HF pipelines for inference.

``hf-default``: AutoModelFor..., ``Dataset.map`` tokenisation without padding, the task's padding
collator and ``TrainingArguments`` with the suite's shared settings, defaults otherwise (fp32, random
sampling). ``hf-tuned`` adds length-grouped sampling (``train_sampling_strategy="group_by_length"``, the
transformers 5 spelling of ``group_by_length=True``) and ``bf16=True`` where the CPU computes bf16 natively.

Tokens are counted, not estimated: a wrapper around the collator records every batch's attention mask;
the first ``max_steps`` batches are the ones trained on (Accelerate's loader fetches one batch ahead).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

from perf.common import (
    SINGLE,
    accuracy,
    combine_runs,
    entity_f1,
    peak_rss_gb,
    pearson,
    read_jsonl,
)


class CountingCollator:
    """Wraps a data collator; remembers (rows, real tokens, padded tokens) of every batch it builds.

    Args:
        inner: the collator users pass to the Trainer.
        trimmed: count padded tokens as rows x longest row (for a model that cuts the padding of a batch padded
            to max_length before its forward pass, as tasknet does).
    """

    def __init__(self, inner: Callable, trimmed: bool = False):
        self.inner = inner
        self.trimmed = trimmed
        self.batches: list[tuple[int, int, int, int | None]] = []  # rows, real, padded, task (tasknet)

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch["attention_mask"]
        lengths = mask.sum(-1)
        padded = int(lengths.max()) * mask.shape[0] if self.trimmed else mask.numel()
        task = int(batch["task"].reshape(-1)[0]) if "task" in batch else None
        self.batches.append((int(mask.shape[0]), int(lengths.sum()), padded, task))
        return batch

    def totals(self, steps: int) -> dict[str, int]:
        used = self.batches[:steps]
        return {"examples": sum(b[0] for b in used), "real_tokens": sum(b[1] for b in used),
                "padded_tokens": sum(b[2] for b in used), "batches_counted": len(used)}


def train_timer():
    """A TrainerCallback timing the training loop only (from on_train_begin to on_train_end): model
    loading, tokenisation and evaluation are outside it, as in multitune's ``wall_s``."""
    from transformers import TrainerCallback

    class TrainTimer(TrainerCallback):
        start = end = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

        @property
        def seconds(self) -> float:
            return self.end - self.start

    return TrainTimer()


def training_arguments(spec: dict, steps: int, output_dir: str, tuned: bool, bf16: bool, **extra):
    """The suite's shared settings; everything else stays at the transformers default."""
    from transformers import TrainingArguments

    s = spec["settings"]
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir, per_device_train_batch_size=s["batch_size"], learning_rate=s["learning_rate"],
        max_steps=steps, warmup_steps=warmup_steps(spec, steps), weight_decay=s["weight_decay"], seed=s["seed"],
        report_to=[], save_strategy="no", eval_strategy="no", logging_steps=50, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    if tuned:
        kwargs["train_sampling_strategy"] = "group_by_length"
        kwargs["bf16"] = bf16
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def warmup_steps(spec: dict, steps: int) -> int:
    """Warmup as multitune computes it from warmup_ratio (int(ratio * steps)), given to every system as steps."""
    return int(spec["settings"]["warmup_ratio"] * steps)


def _encode(workload: str, tokenizer, max_length: int, labels: list[str] | None):
    """The ``Dataset.map`` function of the workload: tokenise, no padding (the collator pads each batch)."""
    if workload == "sst2":
        return lambda b: tokenizer(b["text"], truncation=True, max_length=max_length)
    if workload == "stsb":
        def encode_pairs(b):
            enc = tokenizer(b["text"], b["text_pair"], truncation=True, max_length=max_length)
            enc["labels"] = [float(x) for x in b["label"]]
            return enc
        return encode_pairs
    index = {t: i for i, t in enumerate(labels)}

    def encode_tags(b):  # the HF NER recipe: each word's label on its first sub-token, -100 elsewhere
        enc = tokenizer(b["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        all_labels = []
        for i, tags in enumerate(b["tags"]):
            previous, row = None, []
            for w in enc.word_ids(i):
                row.append(-100 if w is None or w == previous else index[tags[w]])
                previous = w
            all_labels.append(row)
        enc["labels"] = all_labels
        return enc
    return encode_tags


def _model_and_collator(workload: str, model_path: str, tokenizer, labels: list[str] | None):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
    )

    if workload == "sst2":
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=2, id2label={0: "negative", 1: "positive"},
            label2id={"negative": 0, "positive": 1})
        return model, DataCollatorWithPadding(tokenizer)
    if workload == "stsb":
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1,
                                                                   problem_type="regression")
        return model, DataCollatorWithPadding(tokenizer)
    model = AutoModelForTokenClassification.from_pretrained(
        model_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={t: i for i, t in enumerate(labels)})
    return model, DataCollatorForTokenClassification(tokenizer)


def run_single(workload: str, spec: dict, tuned: bool, save_dir: str | None = None, steps: int | None = None
               ) -> dict:
    """Train one task with one HF Trainer; dev metric computed by :func:`evaluate` after training."""
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, Trainer, set_seed

    s = spec["settings"]
    steps = steps or spec["steps"][workload]
    data = spec["data"][workload]
    model_path = spec["model_path"]
    labels = data.get("labels")
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    raw = load_dataset("json", data_files={"train": data["train"]}, cache_dir=spec["hf_cache"])["train"]
    keep = {"label"} if workload == "sst2" else set()  # DataCollatorWithPadding renames label to labels
    train_set = raw.map(_encode(workload, tokenizer, s["max_length"], labels), batched=True,
                        remove_columns=[c for c in raw.column_names if c not in keep])
    set_seed(s["seed"])  # before the model, as HF's example scripts do: the new head's initialisation is seeded
    model, collator = _model_and_collator(workload, model_path, tokenizer, labels)
    counting = CountingCollator(collator)
    timer = train_timer()
    bf16 = bool(tuned and spec["machine"].get("bf16_native"))
    with tempfile.TemporaryDirectory(prefix="perf-hf-") as tmp:
        trainer = Trainer(model=model, args=training_arguments(spec, steps, tmp, tuned, bf16),
                          train_dataset=train_set, data_collator=counting, processing_class=tokenizer,
                          callbacks=[timer])
        setup_s = time.perf_counter() - t0
        trainer.train()
        if save_dir:
            trainer.save_model(save_dir)
    model.eval()
    t1 = time.perf_counter()
    dev = evaluate(lambda batch: model(**batch).logits, tokenizer, workload, read_jsonl(data["validation"]),
                   s["max_length"], labels)
    result = {"steps": steps, "train_s": timer.seconds, **counting.totals(steps),
              "precision": "bf16" if bf16 else "fp32", "dev": {workload: dev}, "setup_s": setup_s,
              "eval_s": time.perf_counter() - t1, "threads": torch.get_num_threads()}
    if tuned and not bf16:
        result["note"] = "bf16 off: this CPU has no native bf16"
    return result


def run_mixture(spec: dict, tuned: bool) -> dict:
    """The three tasks as users train them with HF: one Trainer per task, one after the other, each with a
    third of the mixture's steps."""
    runs = {w: run_single(w, spec, tuned, steps=spec["steps"]["mixture"] // len(SINGLE)) for w in SINGLE}
    result = combine_runs(runs)
    result["peak_rss_gb"] = peak_rss_gb()
    return result


# -- evaluation, the same for every HF-style model (HF Trainer and tasknet) ------------------------
def evaluate(logits_of: Callable, tokenizer, workload: str, rows: list[dict], max_length: int,
             labels: list[str] | None = None, batch_size: int = 64, keep_token_types: bool = True) -> float:
    """The workload's main dev metric for a model given as ``logits_of(batch) -> logits``.

    SST-2: accuracy of the argmax. WNUT-17: seqeval entity F1 of the first sub-token's tag of each word
    (words cut off by truncation count as ``O``), as multitune scores token classification. STS-B: Pearson
    correlation of the raw score.
    """
    import torch

    if workload == "sst2":
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
    elif workload == "stsb":
        enc = tokenizer([r["text"] for r in rows], [r["text_pair"] for r in rows], truncation=True,
                        max_length=max_length)
    else:
        enc = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, truncation=True,
                        max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc and
            (keep_token_types or k != "token_type_ids")]
    order = sorted(range(len(rows)), key=lambda i: len(enc["input_ids"][i]))
    outputs: list[Any] = [None] * len(rows)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad([{k: enc[k][i] for k in keys} for i in idx], return_tensors="pt")
            logits = logits_of(dict(batch)).float()
            for row, i in enumerate(idx):
                outputs[i] = logits[row]
    if workload == "sst2":
        return accuracy([int(o.argmax()) for o in outputs], [int(r["label"]) for r in rows])
    if workload == "stsb":
        return pearson([float(o.reshape(-1)[0]) for o in outputs], [float(r["label"]) for r in rows])
    pred_tags = []
    for i, r in enumerate(rows):
        tags, previous = ["O"] * len(r["tokens"]), None
        best = outputs[i].argmax(-1).tolist()
        for pos, w in enumerate(enc.word_ids(i)):
            if w is not None and w != previous:
                tags[w] = labels[best[pos]]
            previous = w
        pred_tags.append(tags)
    return entity_f1(pred_tags, [r["tags"] for r in rows])


# -- inference: three separate HF pipelines -------------------------------------------------------
def run_pipelines(spec: dict, model_dirs: dict[str, str]) -> dict:
    """Time the three HF pipelines (batch 32) over the suite's inference items, and the sentiment one alone.

    Args:
        model_dirs: workload -> a model directory saved by ``trainer.save_model`` (the hf-default runs).
    """
    from transformers import pipeline

    items = read_jsonl(spec["data"]["inference"]["path"])
    texts = [r["text"] for r in items]
    pairs = [{"text": r["pair"][0], "text_pair": r["pair"][1]} for r in items]
    bs = spec["settings"]["inference_batch_size"]
    t0 = time.perf_counter()
    pipes = {"sst2": pipeline("text-classification", model=model_dirs["sst2"], device="cpu", batch_size=bs),
             "wnut17": pipeline("token-classification", model=model_dirs["wnut17"], device="cpu", batch_size=bs,
                                aggregation_strategy="simple"),
             "stsb": pipeline("text-classification", model=model_dirs["stsb"], device="cpu", batch_size=bs,
                              function_to_apply="none")}
    load_s = time.perf_counter() - t0
    inputs = {"sst2": texts, "wnut17": texts, "stsb": pairs}
    for w, pipe in pipes.items():  # warm-up: the first batches of a process are slow
        pipe(inputs[w][:bs])
    seconds = {}
    for w, pipe in pipes.items():
        t = time.perf_counter()
        out = pipe(inputs[w])
        seconds[w] = time.perf_counter() - t
        assert len(out) == len(items)
    total = sum(seconds.values())
    return {"items": len(items), "load_s": load_s, "seconds": seconds, "all_tasks_s": total,
            "all_tasks_items_per_s": len(items) / total, "single_s": seconds["sst2"],
            "single_texts_per_s": len(items) / seconds["sst2"], "peak_rss_gb": peak_rss_gb(),
            "precision": "fp32"}
