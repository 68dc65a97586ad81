"""tasknet (``pip install tasknet``, a multi-task layer over HF Trainer) on the mixture, as its README writes it:
one ``tn.Model`` over the three tasks, one ``tn.Trainer`` with the suite's shared settings.

What differs from the other systems, by tasknet's own defaults: tasks are drawn in proportion to their
number of batches (its ``p=1``), so the mixture's steps do not split evenly; inputs are padded to
``max_length`` when tokenised and the model cuts each batch back to its longest row (``batch_truncation``),
so padded tokens here count rows x longest row; token type ids are not kept, also for STS-B pairs.

``import tasknet`` loads seqeval and BLEU scripts from the Hub with ``evaluate.load`` at import time, which
cannot work offline; the suite computes every dev metric itself, so those loads get a stand-in.
"""

from __future__ import annotations

import tempfile
import time

from perf.common import SINGLE, peak_rss_gb, read_jsonl
from perf.hf import CountingCollator, evaluate, train_timer, warmup_steps


class _NoHubMetric:
    """Stands in for an ``evaluate`` metric script that would be downloaded (never called by the suite)."""

    def __init__(self, name: str):
        self.name = name

    def compute(self, *args, **kwargs):
        raise RuntimeError(f"evaluate metric {self.name!r} is not available offline")


def _import_tasknet():
    import evaluate

    real_load = evaluate.load

    def offline_load(path, *args, **kwargs):
        try:
            return real_load(path, *args, **kwargs)
        except (FileNotFoundError, ConnectionError, OSError):
            return _NoHubMetric(str(path))

    evaluate.load = offline_load
    try:
        import tasknet
    finally:
        evaluate.load = real_load
    return tasknet


def _datasets(spec: dict) -> dict:
    """The suite's JSONL data as DatasetDicts in tasknet's column names (validation doubles as test: the
    tasknet Trainer requires a test split)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    labels = spec["data"]["wnut17"]["labels"]
    shapes = {
        "sst2": (Features({"sentence1": Value("string"), "labels": ClassLabel(names=["negative", "positive"])}),
                 lambda r: {"sentence1": r["text"], "labels": int(r["label"])}),
        "wnut17": (Features({"tokens": Sequence(Value("string")), "labels": Sequence(ClassLabel(names=labels))}),
                   lambda r: {"tokens": r["tokens"], "labels": [labels.index(t) for t in r["tags"]]}),
        "stsb": (Features({"sentence1": Value("string"), "sentence2": Value("string"), "labels": Value("float32")}),
                 lambda r: {"sentence1": r["text"], "sentence2": r["text_pair"], "labels": float(r["label"])}),
    }
    out = {}
    for w, (features, row) in shapes.items():
        splits = {split: Dataset.from_list([row(r) for r in read_jsonl(spec["data"][w][key])], features=features)
                  for split, key in (("train", "train"), ("validation", "validation"))}
        out[w] = DatasetDict(train=splits["train"], validation=splits["validation"], test=splits["validation"])
    return out


def run_mixture(spec: dict) -> dict:
    import torch
    from transformers import set_seed

    t0 = time.perf_counter()
    tn = _import_tasknet()
    s = spec["settings"]
    steps = spec["steps"]["mixture"]
    data = _datasets(spec)
    tasks = [tn.Classification(data["sst2"], name="sst2", s1="sentence1", s2="sentence2"),
             tn.TokenClassification(data["wnut17"], name="wnut17", tokens="tokens"),
             tn.Classification(data["stsb"], name="stsb", s1="sentence1", s2="sentence2")]
    with tempfile.TemporaryDirectory(prefix="perf-tasknet-") as tmp:
        hparams = dict(model_name=spec["model_path"], output_dir=tmp, per_device_train_batch_size=s["batch_size"],
                       learning_rate=s["learning_rate"], max_steps=steps, warmup_steps=warmup_steps(spec, steps),
                       weight_decay=s["weight_decay"], seed=s["seed"], max_length=s["max_length"], report_to=[],
                       save_strategy="no", eval_strategy="no", logging_strategy="steps", logging_steps=50,
                       use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        set_seed(s["seed"])
        model, trainer = tn.Model_Trainer(tasks, hparams)
        counting = CountingCollator(trainer.data_collator, trimmed=True)
        trainer.data_collator = counting
        timer = train_timer()
        trainer.add_callback(timer)
        setup_s = time.perf_counter() - t0
        trainer.train()
    model.eval()
    t1 = time.perf_counter()
    dev = {}
    for i, w in enumerate(SINGLE):
        task_model = model.task_models_list[i]
        dev[w] = evaluate(lambda batch, m=task_model: m(**batch).logits, trainer.tokenizer, w,
                          read_jsonl(spec["data"][w]["validation"]), s["max_length"], spec["data"]["wnut17"]["labels"],
                          keep_token_types=False)
    split = {w: sum(1 for b in counting.batches[:steps] if b[3] == i) for i, w in enumerate(SINGLE)}
    return {"steps": steps, "train_s": timer.seconds, **counting.totals(steps), "precision": "fp32", "dev": dev,
            "setup_s": setup_s, "eval_s": time.perf_counter() - t1, "threads": torch.get_num_threads(),
            "peak_rss_gb": peak_rss_gb(),
            "steps_per_task": split,
            "note": "tasknet defaults: proportional task sampling (p=1), no token type ids"}
