"""The suite's result: FLOP utilisation and ratios added to every run, the suite's goals checked against
the measurements, the markdown tables and the two plots."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from perf.common import METRIC_LABEL, SINGLE, WORKLOADS, with_rates, write_bytes_atomic

SYSTEM_ORDER = ("multitune", "multitune-compile", "hf-default", "hf-tuned", "tasknet")
WORKLOAD_LABEL = {"sst2": "SST-2", "wnut17": "WNUT-17", "stsb": "STS-B (cross-encoder)",
                  "mixture": "Mixture (SST-2 + WNUT-17 + STS-B)"}
#: dev metrics may be this much below the baseline's and still count as equal (100-step runs are noisy)
METRIC_TOLERANCE = 0.01
#: adding a task may raise the cost per example this much; per-example cost may vary this much with data size
TASK_COST_TOLERANCE = 1.10
DATA_COST_TOLERANCE = 1.15


def build(spec: dict, records: dict[str, dict[str, dict]], peaks: dict, flops: dict, machine: dict, wall_s: float,
          date: str) -> dict:
    training: dict[str, dict[str, dict]] = {}
    for w in WORKLOADS:
        runs = records.get(w, {})
        if not runs:
            continue
        base = {s: runs.get(s) for s in ("hf-default", "hf-tuned")}
        for run in runs.values():
            if run.get("status") == "ok":
                if "real_tokens_per_s" not in run:
                    with_rates(run)
                useful = run["real_tokens"] * flops["train_flops_per_token"] / run["train_s"]
                run["useful_gflops"] = useful / 1e9
                run["mfu_bf16"] = useful / (peaks["bf16"] * 1e9)
                run["mfu_fp32"] = useful / (peaks["fp32"] * 1e9)
                for name, b in base.items():
                    if b and b.get("status") == "ok":
                        run[f"vs_{name.replace('-', '_')}"] = run["real_tokens_per_s"] / b["real_tokens_per_s"]
        training[w] = {s: runs[s] for s in SYSTEM_ORDER if s in runs}
    result: dict[str, Any] = {
        "date": date, "mode": spec["mode"], "suite_wall_s": wall_s, "machine": machine,
        "matmul_peak_gflops": peaks, "flops": flops, "steps": spec["steps"], "settings": spec["settings"],
        "multitune_precision": spec["multitune_precision"],
        "data": {w: {k: v for k, v in spec["data"][w].items() if k.startswith("n_")} for w in SINGLE},
        "training": training}
    inf = records.get("inference", {})
    if inf:
        mt, hf = inf.get("multitune", {}), inf.get("hf-pipelines", {})
        result["inference"] = {"multitune": mt, "hf-pipelines": hf, "items": spec["data"]["inference"]["items"]}
        if mt.get("status") == "ok" and hf.get("status") == "ok":
            result["inference"]["all_tasks_ratio"] = mt["all_tasks_items_per_s"] / hf["all_tasks_items_per_s"]
            result["inference"]["single_ratio"] = mt["single_texts_per_s"] / hf["single_texts_per_s"]
    scaling = records.get("scaling", {}).get("multitune")
    if scaling:
        result["scaling"] = scaling
    result["goals"] = goals(result)
    return result


def _ok(run: dict | None) -> bool:
    return bool(run) and run.get("status") == "ok"


def goals(result: dict) -> list[dict]:
    """The suite's goals, each with the measured value and whether it is met (None: not measured)."""
    out = []
    training = result["training"]

    def add(goal: str, measured: str, met: bool | None) -> None:
        out.append({"goal": goal, "measured": measured, "met": met})

    for w, runs in training.items():
        mt = runs.get("multitune")
        for base, target in (("hf-default", 3.0), ("hf-tuned", 1.3)):
            b = runs.get(base)
            if not (_ok(mt) and _ok(b)):
                add(f"{WORKLOAD_LABEL[w]}: >= {target}x {base} real tok/s at equal dev metrics", "not measured", None)
                continue
            ratio = mt["real_tokens_per_s"] / b["real_tokens_per_s"]
            worse = {k: round(mt["dev"][k] - b["dev"][k], 4) for k in mt["dev"]
                     if k in b["dev"] and mt["dev"][k] < b["dev"][k] - METRIC_TOLERANCE}
            text = f"{ratio:.2f}x" + (f"; dev metric lower by {worse}" if worse else "; dev metrics equal or better")
            add(f"{WORKLOAD_LABEL[w]}: >= {target}x {base} real tok/s at equal dev metrics", text,
                ratio >= target and not worse)
    bf16 = result["machine"].get("bf16_native")
    mfus = {w: runs["multitune"]["mfu_bf16" if bf16 else "mfu_fp32"] for w, runs in training.items()
            if _ok(runs.get("multitune"))}
    if mfus:
        text = ", ".join(f"{w} {100 * v:.1f}%" for w, v in mfus.items())
        if bf16:
            add(">= 40% of the measured bf16 matmul peak (useful FLOPs, multitune)", text, min(mfus.values()) >= 0.4)
        else:
            add("useful-FLOP utilisation stated on an fp32-only CPU (of the fp32 peak)", text, True)
    inf = result.get("inference", {})
    if "all_tasks_ratio" in inf:
        mode = inf["multitune"].get("mode", "")
        add(">= 2.5x three separate HF pipelines, all three tasks", f"{inf['all_tasks_ratio']:.2f}x ({mode})",
            inf["all_tasks_ratio"] >= 2.5)
        add(">= 2x HF pipeline, one task (sentiment)", f"{inf['single_ratio']:.2f}x", inf["single_ratio"] >= 2.0)
        hf = inf["hf-pipelines"]
        for precision, v in inf["multitune"].get("variants", {}).items():  # opt-in cheaper precisions
            agree = ", ".join(f"{k} {x:.3f}" for k, x in v["agreement"].items())
            add(f"(with precision={precision}) >= 2.5x three HF pipelines, all three tasks",
                f"{v['all_tasks_items_per_s'] / hf['all_tasks_items_per_s']:.2f}x; vs fp32: {agree}",
                v["all_tasks_items_per_s"] / hf["all_tasks_items_per_s"] >= 2.5)
            add(f"(with precision={precision}) >= 2x HF pipeline, one task",
                f"{v['single_texts_per_s'] / hf['single_texts_per_s']:.2f}x",
                v["single_texts_per_s"] / hf["single_texts_per_s"] >= 2.0)
    sc = result.get("scaling")
    if sc and sc.get("tasks"):
        first, last = sc["tasks"][0], sc["tasks"][-1]
        ratio = last["ms_per_example"] / first["ms_per_example"]
        add(f"adding tasks of the same size keeps the cost per example (within {TASK_COST_TOLERANCE - 1:.0%})",
            f"{last['tasks']} tasks / {first['tasks']} task: {ratio:.2f}x", ratio <= TASK_COST_TOLERANCE)
    if sc and sc.get("data"):
        first, last = sc["data"][0], sc["data"][-1]
        ratio = last["ms_per_example"] / first["ms_per_example"]
        add(f"cost grows no faster than linearly with data (per-example cost at {last['n']:,} examples within "
            f"{DATA_COST_TOLERANCE - 1:.0%} of {first['n']:,})", f"{ratio:.2f}x", ratio <= DATA_COST_TOLERANCE)
    for w, runs in training.items():
        mt, b = runs.get("multitune"), runs.get("hf-default")
        if _ok(mt) and _ok(b):
            add(f"{WORKLOAD_LABEL[w]}: peak memory <= HF Trainer", f"{mt['peak_rss_gb']:.2f} GB vs "
                f"{b['peak_rss_gb']:.2f} GB", mt["peak_rss_gb"] <= b["peak_rss_gb"])
    limit = 5 * 60 if result["mode"] == "quick" else 40 * 60
    add(f"the {result['mode']} suite runs in under {limit // 60} minutes", f"{result['suite_wall_s'] / 60:.1f} min",
        result["suite_wall_s"] < limit)
    return out


# -- markdown -------------------------------------------------------------------------------------------
def _metric(w: str, dev: dict) -> str:
    if w != "mixture":
        return f"{METRIC_LABEL[w]} {dev[w]:.3f}" if w in dev else "-"
    return " / ".join(f"{dev[k]:.3f}" if k in dev else "-" for k in SINGLE)


def headline(result: dict) -> str:
    """One line: multitune's real tokens/s over HF Trainer's per workload, and the inference ratios."""
    parts = []
    for w, runs in result["training"].items():
        mt = runs.get("multitune") or {}
        if "vs_hf_default" in mt or "vs_hf_tuned" in mt:
            parts.append(f"{WORKLOAD_LABEL[w].split(' (')[0]} {_ratio(mt, 'vs_hf_default')} / {_ratio(mt, 'vs_hf_tuned')}")
    text = "**Headline**: multitune's training real tokens/s over HF Trainer defaults / tuned: " + (
        "; ".join(parts) if parts else "not measured") + "."
    inf = result.get("inference", {})
    if "all_tasks_ratio" in inf:
        text += (f" Inference over HF pipelines: all three tasks {inf['all_tasks_ratio']:.2f}x, one task "
                 f"{inf['single_ratio']:.2f}x.")
    return text


def _ratio(run: dict, key: str) -> str:
    return f"{run[key]:.2f}x" if key in run else "-"


def markdown(result: dict, stem: str) -> str:
    m = result["machine"]
    peaks = result["matmul_peak_gflops"]
    lines = [f"# Performance suite, {result['date']} ({result['mode']})", "",
             f"Machine: {m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('memory_gb')} GB, torch {m['torch']}, "
             f"transformers {m['transformers']}; bf16 native: {m.get('bf16_native')}; load average at the start "
             f"{m.get('load_average')}. Matmul peak (2048x2048, measured at the start): fp32 "
             f"{peaks['fp32']:,.0f} GFLOP/s, bf16 {peaks['bf16']:,.0f} GFLOP/s. Suite wall time "
             f"{result['suite_wall_s'] / 60:.1f} min.", "",
             f"Settings for every system: packaged MiniLM-L6, batch {result['settings']['batch_size']}, max length "
             f"{result['settings']['max_length']}, dynamic padding, lr {result['settings']['learning_rate']:g}, "
             f"linear schedule with warmup {result['settings']['warmup_ratio']:g} of the steps, weight decay "
             f"{result['settings']['weight_decay']:g}, seed {result['settings']['seed']}; steps: "
             + ", ".join(f"{w} {n}" for w, n in result["steps"].items())
             + ". Data: " + ", ".join(f"{w} {d['n_train']:,} train / {d['n_validation']:,} dev"
                                      for w, d in result["data"].items())
             + f". multitune precision: {result['multitune_precision']}.", "",
             headline(result), "",
             "Useful FLOPs = 6 x transformer-layer parameters x real tokens (embeddings, attention scores and heads "
             f"left out); MFU = useful FLOP/s / measured matmul peak. Per token: {result['flops']['train_flops_per_token'] / 1e6:.1f} MFLOP.",
             ""]
    layer = result.get("matmul_layer_shapes_gflops")
    if layer:  # what the model's own (small) matmuls reach: the practical ceiling of MFU here
        lines[-1:] = [f"The matmuls of one MiniLM layer at a training step's shapes (384 tokens x 384 x 1536) reach "
                      f"{layer['fp32']:,.0f} GFLOP/s in fp32 and {layer['bf16']:,.0f} GFLOP/s in bf16 on this machine "
                      f"({100 * layer['bf16'] / result['matmul_peak_gflops']['bf16']:.0f}% of the 2048 x 2048 bf16 "
                      "peak).", ""]
    head = ("| system | steps | train s | examples/s | real tok/s | padded tok/s | useful GFLOP/s | MFU bf16 % | "
            "MFU fp32 % | peak RSS GB | dev metric | tok/s vs HF default | vs HF tuned |")
    for w, runs in result["training"].items():
        label = WORKLOAD_LABEL[w] + (" (dev: accuracy / entity F1 / Pearson)" if w == "mixture" else "")
        lines += [f"## Training: {label}", "", head, "|---" * 13 + "|"]
        for system, r in runs.items():
            if not _ok(r):
                lines.append(f"| {system} | {r.get('status', 'failed')}: {r.get('error', '')} |" + " |" * 11)
                continue
            name = system + (f" ({r['precision']})" if r.get("precision") else "")
            lines.append(
                f"| {name} | {r['steps']} | {r['train_s']:.1f} | {r['examples_per_s']:.1f} | "
                f"{r['real_tokens_per_s']:,.0f} | {r['padded_tokens_per_s']:,.0f} | {r['useful_gflops']:.1f} | "
                f"{100 * r['mfu_bf16']:.1f} | {100 * r['mfu_fp32']:.1f} | {r['peak_rss_gb']:.2f} | "
                f"{_metric(w, r['dev'])} | {_ratio(r, 'vs_hf_default')} | {_ratio(r, 'vs_hf_tuned')} |")
        notes = [f"{s}: {r['composed']}" for s, r in runs.items() if r.get("composed")]
        notes += [f"{s}: {r['note']}" for s, r in runs.items() if r.get("note")]
        notes += [f"tasknet steps per task: {r['steps_per_task']}" for s, r in runs.items() if r.get("steps_per_task")]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
    inf = result.get("inference")
    if inf:
        lines += [f"## Inference: {inf['items']:,} items (a sentence for sentiment and NER, a sentence pair for "
                  "similarity), batch 32", "",
                  "| system | all three tasks: s | items/s | sentiment alone: s | texts/s | peak RSS GB | how |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in (("multitune", inf["multitune"]), ("three HF pipelines", inf["hf-pipelines"])):
            if not _ok(r):
                lines.append(f"| {name} | {r.get('status', 'not run')}: {r.get('error', '')} | | | | | |")
                continue
            how = r.get("mode", "text-classification, token-classification (simple), text-classification on pairs")
            lines.append(f"| {name} | {r['all_tasks_s']:.1f} | {r['all_tasks_items_per_s']:.1f} | {r['single_s']:.1f} | "
                         f"{r['single_texts_per_s']:.1f} | {r['peak_rss_gb']:.2f} | {how} |")
            for precision, v in r.get("variants", {}).items():
                agree = ", ".join(f"{k} {x:.3f}" for k, x in v["agreement"].items())
                lines.append(f"| multitune, precision={precision} | {v['all_tasks_s']:.1f} | "
                             f"{v['all_tasks_items_per_s']:.1f} | {v['single_s']:.1f} | {v['single_texts_per_s']:.1f} "
                             f"| (same process) | agreement with fp32: {agree} |")
        if "all_tasks_ratio" in inf:
            lines += ["", f"multitune / HF pipelines: all three tasks {inf['all_tasks_ratio']:.2f}x, sentiment alone "
                      f"{inf['single_ratio']:.2f}x. Per task, multitune one task at a time: "
                      + ", ".join(f"{w} {s:.1f}s" for w, s in inf["multitune"]["seconds"].items())
                      + "; HF pipelines: " + ", ".join(f"{w} {s:.1f}s" for w, s in inf["hf-pipelines"]["seconds"].items())
                      + "."]
        lines.append("")
    sc = result.get("scaling")
    if sc and sc.get("status") == "ok":
        lines += ["## Scaling (multitune)", "",
                  f"Tasks of the same size: copies of {sc['settings']['task_examples']:,} SST-2 examples under different "
                  f"task names, {sc['settings']['steps_per_task']} steps per task, round robin.", "",
                  "| tasks | steps | train s | ms per example | real tok/s |", "|---|---|---|---|---|"]
        for p in sc["tasks"]:
            lines.append(f"| {p['tasks']} | {p['steps']} | {p['train_s']:.1f} | {p['ms_per_example']:.2f} | "
                         f"{p['real_tokens_per_s']:,.0f} |")
        lines += ["", "Data growth: one SST-2 task, one epoch; cost = tokenisation + training.", "",
                  "| examples | steps | tokenise s | train s | ms per example | ms per example, whole call |",
                  "|---|---|---|---|---|---|"]
        for p in sc["data"]:
            lines.append(f"| {p['n']:,} | {p['steps']} | {p['tokenize_s'] or 0:.2f} | {p['train_s']:.1f} | "
                         f"{p['ms_per_example']:.2f} | {p['ms_per_example_call']:.2f} |")
        lines += ["", f"![training throughput]({stem}-training.png) ![scaling]({stem}-scaling.png)", ""]
    elif sc:
        lines += ["## Scaling (multitune)", "", f"{sc.get('status')}: {sc.get('error')}", ""]
    lines += ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for g in result["goals"]:
        met = "not measured" if g["met"] is None else ("met" if g["met"] else "**not met**")
        lines.append(f"| {g['goal']} | {g['measured']} | {met} |")
    return "\n".join(lines) + "\n"


# -- plots ----------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def plot_training(result: dict, path: Path) -> None:
    """Bars of real tokens/s per workload, one bar per system; multitune's ratio to HF defaults on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(result["training"])
    systems = [s for s in SYSTEM_ORDER if any(s in result["training"][w] for w in workloads)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(systems), 1)
    for j, s in enumerate(systems):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            r = result["training"][w].get(s)
            if _ok(r):
                xs.append(i + (j - (len(systems) - 1) / 2) * width)
                ys.append(r["real_tokens_per_s"])
        ax.bar(xs, ys, width, label=s)
        if s == "multitune":
            for x, y, w in zip(xs, ys, [w for w in workloads if _ok(result["training"][w].get(s))]):
                ratio = result["training"][w][s].get("vs_hf_default")
                if ratio:
                    ax.text(x, y, f"{ratio:.1f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(workloads)), [WORKLOAD_LABEL[w].split(" (")[0] for w in workloads])
    ax.set_ylabel("real tokens / s (training)")
    ax.set_title(f"Training throughput, {result['date']} ({result['mode']}); label: multitune / HF defaults")
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_scaling(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = result["scaling"]
    if sc.get("status") != "ok":
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot([p["tasks"] for p in sc["tasks"]], [p["ms_per_example"] for p in sc["tasks"]], "o-")
    a.set_xscale("log", base=2)
    a.set_xticks([p["tasks"] for p in sc["tasks"]], [str(p["tasks"]) for p in sc["tasks"]])
    a.set_xlabel("tasks (same size each)")
    a.set_ylabel("training ms per example")
    a.set_ylim(bottom=0)
    a.set_title("Cost per example vs tasks")
    b.plot([p["n"] for p in sc["data"]], [p["ms_per_example"] for p in sc["data"]], "o-", label="tokenise + train")
    b.plot([p["n"] for p in sc["data"]], [p["ms_per_example_call"] for p in sc["data"]], "s--",
           label="whole train() call")
    b.set_xscale("log", base=2)
    b.set_xticks([p["n"] for p in sc["data"]], [f"{p['n']:,}" for p in sc["data"]])
    b.set_xlabel("training examples (one epoch)")
    b.set_ylabel("ms per example")
    b.set_ylim(bottom=0)
    b.set_title("Cost per example vs data")
    b.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
