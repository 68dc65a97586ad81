"""One backbone pass per step against a forward pass per task, for the loss weightings that take every task in
every step with one backward pass (GradNorm, FAMO; see :mod:`multitune.training.multistep`). Writes
bench/results/shared-pass-<date>.json and .md.

    python bench/shared_pass.py [--precisions bf16 fp32] [--threads 2 1] [--repeats 7] [--batch-sets 3]

The seed mixture (examples/configs/seed-mixture.yaml: SST-2, WNUT-17, STS-B cross-encoder; default MiniLM
backbone, batch 32, max_length 128; run from the repository root with ../shared/data beside it), built as
``multitune train`` builds it. A step is what the training loop does: draw one batch of every task, forward,
backward, finish the gradients (clip), optimizer step (and FAMO's losses after the update). Every step of both
variants runs on the same few fixed sets of batches, the variants interleaved; a time is the minimum over the
repetitions (the cores may be shared with other jobs: minima are the least disturbed), averaged over the batch
sets, in wall and in CPU seconds. Each precision and thread count runs in a process of its own (Accelerate
fixes the precision once per process); on cores shared with other jobs, the CPU seconds of one thread are the
least disturbed measure (several threads wait for each other whenever one of them is descheduled).

Also measured: the same steps on the batches cut to equal widths (no padding added by the concatenation: what
one pass gains apart from padding), the tokens of the concatenated batch (real, padded per task, padded to the
longest task), and why gradient-level strategies keep a pass per task: one shared forward pass followed by a
backward pass per task against a forward and backward pass per task.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
STRATEGIES = ("gradnorm", "famo")
VARIANTS = ("per_task", "shared")
TOKEN_SAMPLE = 200  # step batch sets drawn for the token counts

from perf.common import machine_info, machine_line, write_results  # noqa: E402  (bench/perf/, next to this script)

from multitune.training.multistep import MAX_EXTRA_PADDING  # noqa: E402


def seed_config(strategy: str, precision: str, out: str):
    import yaml

    from multitune.config import parse_config

    text = (REPO / "examples/configs/seed-mixture.yaml").read_text().replace("../shared/data", str(DATA))
    raw = yaml.safe_load(text)
    raw["output_dir"] = out
    raw["loss_weighting"] = {"strategy": strategy}
    raw["training"].update(precision=precision, per_task_best=False)
    return parse_config(raw)


def encoder_tokens(run, batches: dict) -> dict[str, int]:
    """Real tokens, tokens of the per-task batches, and of the concatenated batch padded to its longest call."""
    calls = [c for n, b in batches.items() for c in run.core.tasks[n].encoder_inputs(b)]
    return {"real": sum(int(mask.sum()) for _, mask, _ in calls),
            "padded_per_task": sum(mask.numel() for _, mask, _ in calls),
            "padded_concatenated": sum(len(ids) for ids, _, _ in calls) * max(ids.shape[1] for ids, _, _ in calls)}


def one_step(run) -> tuple[float, float]:
    """One optimizer step as :func:`multitune.training.loop.train_loop` makes it; returns its wall and CPU
    seconds (the CPU time of this process's threads is less disturbed by other jobs on the cores)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run.begin_step()
    for part in run.parts():
        combined, values = run.forward(part)
        run.backward(combined, values)
    run.finish_gradients(run.config.training.max_grad_norm)
    run.optimizer_step()
    return time.perf_counter() - wall, time.process_time() - cpu


def set_variant(run, variant: str) -> None:
    if variant == "per_task":
        run.multi.sharing = lambda batches: {}  # no task shares a pass: a forward pass per task
    else:  # one pass, whatever padding it adds (training shares only within MAX_EXTRA_PADDING)
        run.multi.__dict__.pop("sharing", None)
        run.multi.max_extra_padding = math.inf


def equal_widths(batches: dict) -> dict:
    """The batches cut to the narrowest task's width (every column of that width), so that concatenating them
    adds no padding: what a shared pass gains on this machine apart from the padding it adds."""
    width = min(b["input_ids"].shape[1] for b in batches.values())
    return {n: {k: v[:, :width].contiguous() if v.dim() == 2 and v.shape[1] == b["input_ids"].shape[1] else v
                for k, v in b.items()} for n, b in batches.items()}


def summary(times: dict[str, list[list[tuple[float, float]]]]) -> dict:
    """Per variant: the minimum over the repetitions of each batch set, averaged over the sets (wall and CPU
    seconds), and the median wall seconds of all steps."""
    out = {}
    for v, per_set in times.items():
        walls = sorted(w for t in per_set for w, _ in t)
        out[v] = {"wall_s": round(sum(min(w for w, _ in t) for t in per_set) / len(per_set), 4),
                  "cpu_s": round(sum(min(c for _, c in t) for t in per_set) / len(per_set), 4),
                  "median_wall_s": round(walls[len(walls) // 2], 4)}
    return out


def time_steps(run, sets: list[dict], repeats: int) -> dict:
    """Steps of both variants on the batch sets, interleaved (the order alternates), after a warm-up step each
    (allocator, GradNorm's layer, FAMO's first Adam step)."""
    position = {"k": 0}
    for n in sets[0]:  # every step draws batch set k (the same for both variants)
        run.batchers[n].next_batch = lambda n=n, position=position: sets[position["k"]][n]
    times: dict[str, list[list[tuple[float, float]]]] = {v: [[] for _ in sets] for v in VARIANTS}
    for variant in VARIANTS:
        set_variant(run, variant)
        for k in range(len(sets)):
            position["k"] = k
            one_step(run)
    for r in range(repeats):
        for k in range(len(sets)):
            position["k"] = k
            for variant in (VARIANTS if (r + k) % 2 == 0 else VARIANTS[::-1]):
                set_variant(run, variant)
                times[variant][k].append(one_step(run))
    set_variant(run, "shared")
    step = summary(times)
    return {**step, "speedup_wall": round(step["per_task"]["wall_s"] / step["shared"]["wall_s"], 3),
            "speedup_cpu": round(step["per_task"]["cpu_s"] / step["shared"]["cpu_s"], 3),
            "tokens": [encoder_tokens(run, b) for b in sets]}


def per_task_gradients(run, sets: list[dict], repeats: int) -> dict:
    """Seconds of a forward and backward pass per task against one shared forward pass and a backward pass per
    task (what a gradient-level strategy would need after a shared pass), on the model, without the optimizer."""
    core = run.core
    names = list(sets[0])

    def separate(batches):
        for n in names:
            core(n, batches[n]).loss.backward()

    def shared(batches):
        calls = [c for n in names for c in core.tasks[n].encoder_inputs(batches[n])]
        with core.shared_encoding(calls, names):
            losses = [core(n, batches[n]).loss for n in names]
        for i, loss in enumerate(losses):
            loss.backward(retain_graph=i < len(losses) - 1)

    times: dict = {"per_task": [[] for _ in sets], "shared_forward": [[] for _ in sets]}
    for _ in range(repeats):
        for k, batches in enumerate(sets):
            for label, fn in (("per_task", separate), ("shared_forward", shared)):
                core.zero_grad(set_to_none=True)
                wall, cpu = time.perf_counter(), time.process_time()
                with run.autocast():
                    fn(batches)
                times[label][k].append((time.perf_counter() - wall, time.process_time() - cpu))
    core.zero_grad(set_to_none=True)
    return summary(times)


def child(precision: str, threads: int, repeats: int, n_sets: int, out_file: Path) -> None:
    import torch
    from rich.console import Console

    from multitune.training.trainer import build_run

    torch.set_num_threads(threads)
    result: dict = {"precision": precision, "torch_threads": torch.get_num_threads(), "strategies": {}}
    for strategy in STRATEGIES:
        with tempfile.TemporaryDirectory() as tmp:
            run, _ = build_run(seed_config(strategy, precision, str(Path(tmp) / "run")), resume=False,
                               overwrite=False, console=Console(quiet=True), progress=False, plan=None,
                               accept_changed_data=False, protect=())
        run.core.train()
        tasks = run.multi.every_task
        drawn = [{n: run.batchers[n].next_batch() for n in tasks} for _ in range(TOKEN_SAMPLE)]
        counts = [encoder_tokens(run, b) for b in drawn]
        tokens = {k: round(sum(c[k] for c in counts) / len(counts), 1) for k in counts[0]}
        tokens["rows_per_step"] = sum(len(drawn[0][n]["input_ids"]) for n in tasks)
        tokens["mean_width"] = {n: round(sum(b[n]["input_ids"].shape[1] for b in drawn) / len(drawn), 1)
                                for n in tasks}
        # the share of steps that training (within MAX_EXTRA_PADDING) runs with one pass
        tokens["shared_by_default"] = sum(bool(run.multi.sharing(b)) for b in drawn) / len(drawn)
        sets = drawn[:n_sets]
        entry = {"tokens_mean": tokens, "mixture": time_steps(run, sets, repeats),
                 "equal_widths": time_steps(run, [equal_widths(b) for b in sets], repeats)}
        if strategy == STRATEGIES[0]:
            result["per_task_gradients"] = per_task_gradients(run, sets, repeats)
        result["strategies"][strategy] = entry
        print(json.dumps({strategy: {k: {v: entry[k][v] for v in VARIANTS} for k in ("mixture", "equal_widths")}}),
              flush=True)
        del run
    out_file.write_text(json.dumps(result, indent=1))


def report(suite: dict) -> str:
    m = suite["machine"]
    lines = [f"# One backbone pass per step (GradNorm, FAMO) - {suite['date']}", "",
             "Seed mixture (SST-2 + WNUT-17 + STS-B cross-encoder), default MiniLM backbone, batch 32 per task, "
             "max_length 128. A step: forward, backward, clipping, optimizer step (FAMO: and its losses after "
             "the update). Seconds: the minimum over the repetitions of each batch set, averaged over the batch "
             "sets, wall and CPU (this process's threads). The 2 CPU cores were shared with other jobs (load "
             "averages below): wall times are the least disturbed runs, not a quiet machine's; the CPU seconds "
             "of one thread are the least sensitive to that. `equal widths`: the same batches cut to the narrowest task's width, so "
             "that the concatenation adds no padding (what one pass gains apart from the padding it adds).",
             "", machine_line(m, m.get("load_average"), suite.get("load_average_end"))
             + f" Repeats {suite['repeats']}, batch sets {suite['batch_sets']}.", "",
             "| precision | threads | strategy | batches | pass per task: wall / CPU s | shared pass: wall / CPU s "
             "| speed-up wall / CPU | median wall s (per task / shared) |", "|---|---:|---|---|---:|---:|---:|---|"]
    for res in suite["runs"]:
        for name, entry in res["strategies"].items():
            for kind in ("mixture", "equal_widths"):
                s = entry[kind]
                p, sh = s["per_task"], s["shared"]
                lines.append(f"| {res['precision']} | {res['torch_threads']} | {name} | {kind.replace('_', ' ')} | "
                             f"{p['wall_s']:.3f} / "
                             f"{p['cpu_s']:.3f} | {sh['wall_s']:.3f} / {sh['cpu_s']:.3f} | {s['speedup_wall']:.2f}x / "
                             f"{s['speedup_cpu']:.2f}x | {p['median_wall_s']:.3f} / {sh['median_wall_s']:.3f} |")
    tok = suite["runs"][0]["strategies"][STRATEGIES[0]]["tokens_mean"]
    lines += ["", f"Tokens of one step's encoder inputs ({tok['rows_per_step']} rows; mean of {TOKEN_SAMPLE} drawn "
              f"steps): real {tok['real']:.0f}, padded per task {tok['padded_per_task']:.0f}, padded to the longest "
              f"task (the shared pass) {tok['padded_concatenated']:.0f}; mean batch width per task: "
              + ", ".join(f"{n} {w}" for n, w in tok["mean_width"].items()) + f". Training shares a pass only when "
              f"it adds at most {MAX_EXTRA_PADDING:.0%} padded tokens: {tok['shared_by_default']:.0%} of these "
              f"steps (the timings above force it).", "",
              "Why gradient-level strategies (PCGrad, CAGrad) keep a pass per task: a forward and backward pass "
              "per task against one shared forward pass and a backward pass per task, same batches, no optimizer:",
              "", "| precision | threads | pass per task: wall / CPU s | shared forward + backward per task: wall "
              "/ CPU s |", "|---|---:|---:|---:|"]
    for res in suite["runs"]:
        g = res["per_task_gradients"]
        lines.append(f"| {res['precision']} | {res['torch_threads']} | {g['per_task']['wall_s']:.3f} / {g['per_task']['cpu_s']:.3f} | "
                     f"{g['shared_forward']['wall_s']:.3f} / {g['shared_forward']['cpu_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    ap.add_argument("--threads", nargs="+", type=int, default=[2], help="torch threads (one run each)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-sets", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.child_threads, args.repeats, args.batch_sets, Path(args.out))
        return
    date = datetime.date.today().isoformat()
    suite = {"date": date, "machine": machine_info(), "repeats": args.repeats, "batch_sets": args.batch_sets,
             "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            for threads in args.threads:
                out = Path(tmp) / f"{precision}-{threads}.json"
                subprocess.run([sys.executable, __file__, "--child", precision, "--child-threads", str(threads),
                                "--repeats", str(args.repeats), "--batch-sets", str(args.batch_sets), "--out",
                                str(out)], check=True, cwd=REPO)
                suite["runs"].append(json.loads(out.read_text()))
    suite["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(f"shared-pass-{date}", suite, report(suite))


if __name__ == "__main__":
    main()
