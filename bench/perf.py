"""Performance suite: multitune against HF Trainer (defaults and tuned) and tasknet, in one run.

Training on SST-2, WNUT-17, STS-B alone and the three as one multi-task mixture, with the same examples,
steps and settings for every system; inference over real texts for all three tasks; scaling curves of
multitune's cost per example as tasks and data grow. Each (workload, system) runs in its own process, so
peak memory is that system's. Writes bench/results/perf-<date>.json, .md, -training.png and -scaling.png.

    python bench/perf.py [--quick] [--steps N] [--mixture-steps N] [--only sst2,wnut17,stsb,mixture,inference,scaling]
                         [--systems multitune,hf-default,hf-tuned,tasknet] [--multitune-precision auto]

Run from the repository root with ../shared/data beside it (`make bench` runs the full suite; about
14 minutes on 2 quiet cores, --quick 3).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from perf import common, report  # noqa: E402  (bench/perf/, next to this script)

SYSTEMS = ("multitune", "multitune-compile", "hf-default", "hf-tuned", "tasknet")
PARTS = (*common.WORKLOADS, "inference", "scaling")
RESULTS = common.REPO / "bench" / "results"

FULL = {"steps": 100, "sst2_train": 12800, "train_cap": None, "dev_cap": None, "inference_items": 2000,
        "scaling": {"tasks": [1, 2, 4, 8], "task_examples": 1600, "steps_per_task": 20, "dev_rows": 100,
                    "data_sizes": [1000, 2000, 4000, 8000]}}
QUICK = {"steps": 8, "sst2_train": 1000, "train_cap": 1000, "dev_cap": 200, "inference_items": 200,
         "scaling": {"tasks": [1, 2, 4, 8], "task_examples": 320, "steps_per_task": 1, "dev_rows": 50,
                     "data_sizes": [64, 256]}}


def run_child(workload: str, system: str, out: Path) -> None:
    """The body of one (workload, system) process: run it and write its record as JSON."""
    from perf.common import peak_rss_gb, write_json_atomic

    spec = json.loads((out / "spec.json").read_text())
    dest = out / "runs" / f"{workload}--{system}.json"
    try:
        if workload == "scaling":
            from perf import mt
            record = mt.run_scaling(spec)
        elif workload == "inference":
            if system == "multitune":
                from perf import mt
                record = mt.run_inference(spec, spec["inference_models"]["multitune"])
            else:
                from perf import hf
                record = hf.run_pipelines(spec, spec["inference_models"]["hf"])
        elif system in ("multitune", "multitune-compile"):
            from perf import mt
            record = mt.run(workload, spec, compile_model=system == "multitune-compile")
        elif system == "tasknet":
            from perf import tn
            record = tn.run_mixture(spec)
        else:
            from perf import hf
            tuned = system == "hf-tuned"
            if workload == "mixture":
                record = hf.run_mixture(spec, tuned)
            else:
                save = str(Path(spec["models_dir"]) / f"{workload}-{system}") if not tuned else None
                record = hf.run_single(workload, spec, tuned, save_dir=save)
        if "train_s" in record and "real_tokens_per_s" not in record:
            record = common.with_rates(record)
        record["status"] = "ok"
        record["peak_rss_gb"] = peak_rss_gb()
    except Exception as exc:  # recorded, and the suite goes on with the next run
        traceback.print_exc()
        record = {"status": "did not run" if system == "tasknet" else "failed", "error": common.first_line(exc),
                  "peak_rss_gb": peak_rss_gb()}
    write_json_atomic(dest, record)


def plan(args, steps: dict) -> list[tuple[str, str]]:
    """The runs, in order. HF on the mixture is one Trainer per task with a third of the steps each: exactly
    the single-task runs, so when those are in the plan with matching steps it is composed from them."""
    runs = []
    only = args.only.split(",")
    systems = args.systems.split(",")
    derived = steps["mixture"] == len(common.SINGLE) * steps["sst2"] and all(w in only for w in common.SINGLE)
    for w in common.WORKLOADS:
        if w not in only:
            continue
        for s in systems:
            if s == "tasknet" and w != "mixture":
                continue
            if s == "multitune-compile" and w != "sst2":  # torch.compile is measured on one workload
                continue
            if w == "mixture" and s.startswith("hf-") and derived:
                continue
            runs.append((w, s))
    if "inference" in only:
        runs += [("inference", "multitune"), ("inference", "hf-pipelines")]
    if "scaling" in only:
        runs.append(("scaling", "multitune"))
    return runs


def _fmt(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _summary(record: dict) -> str:
    if record.get("status") != "ok":
        return f"{record.get('status')}: {record.get('error')}"
    if "real_tokens_per_s" in record:
        return (f"{record['steps']} steps in {record['train_s']:.0f}s, {record['real_tokens_per_s']:,.0f} real tok/s, "
                f"dev {', '.join(f'{k} {v:.3f}' for k, v in record['dev'].items())}, "
                f"peak RSS {record['peak_rss_gb']:.2f} GB")
    if "all_tasks_items_per_s" in record:
        return (f"{record['all_tasks_items_per_s']:.1f} items/s (all tasks), "
                f"{record['single_texts_per_s']:.1f} texts/s (sentiment)")
    return "done"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run in about 5 minutes")
    ap.add_argument("--steps", type=int, help="steps of each single-task workload (default 100, quick 8)")
    ap.add_argument("--mixture-steps", type=int, help="steps of the mixture (default 3x --steps)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"parts to run, of: {','.join(PARTS)}")
    ap.add_argument("--systems", default=",".join(s for s in SYSTEMS if s != "multitune-compile"),
                    help=f"training systems, of: {','.join(SYSTEMS)} (multitune-compile, SST-2 only, is opt-in: "
                         "compiling takes minutes on a CPU)")
    ap.add_argument("--multitune-precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--out", default="runs/bench-perf", help="work directory (data, models, logs)")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON, markdown and plots go")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds one run may take")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the result files from the last suite run in --out (no measuring)")
    ap.add_argument("--one", nargs=2, metavar=("WORKLOAD", "SYSTEM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if args.one:
        return run_child(*args.one, out)
    if args.report_only:
        return write_report(json.loads((out / "suite.json").read_text()), Path(args.results))
    for part in args.only.split(","):
        if part not in PARTS:
            raise SystemExit(f"--only: unknown part {part!r}; valid: {', '.join(PARTS)}")
    for system in args.systems.split(","):
        if system not in SYSTEMS:
            raise SystemExit(f"--systems: unknown system {system!r}; valid: {', '.join(SYSTEMS)}")

    started = time.perf_counter()
    mode = QUICK if args.quick else FULL
    single = args.steps or mode["steps"]
    steps = {**{w: single for w in common.SINGLE}, "mixture": args.mixture_steps or 3 * single}
    machine = common.machine_info()
    print(f"machine: {machine.get('cpu')}, {machine.get('cpus')} CPUs, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), bf16 native: {machine['bf16_native']}, "
          f"load average {machine.get('load_average')}", flush=True)
    peaks = {d: common.matmul_peak(d) for d in ("fp32", "bf16")}
    print(f"matmul peak (2048x2048): fp32 {peaks['fp32']:,.0f} GFLOP/s, bf16 {peaks['bf16']:,.0f} GFLOP/s",
          flush=True)
    layer_peaks = {d: common.layer_matmul_peak(d) for d in ("fp32", "bf16")}
    print(f"matmuls at MiniLM's shapes (384 tokens x 384 x 1536): fp32 {layer_peaks['fp32']:,.0f} GFLOP/s, "
          f"bf16 {layer_peaks['bf16']:,.0f} GFLOP/s", flush=True)
    model_path = common.default_model_path()
    data = common.prepare_data(out / "data", mode["sst2_train"], 42, mode["inference_items"], mode["dev_cap"],
                               mode["train_cap"])
    print("data: " + ", ".join(f"{w} {data[w]['n_train']} train / {data[w]['n_validation']} dev"
                               for w in common.SINGLE) + f", inference {data['inference']['items']} items",
          flush=True)
    models = out / "models"
    spec = {"mode": "quick" if args.quick else "full", "model_path": model_path, "data": data, "steps": steps,
            "models_dir": str(models), "hf_cache": str(out / "hf-cache"), "machine": machine,
            "multitune_precision": args.multitune_precision, "scaling": mode["scaling"],
            "settings": {"batch_size": 32, "max_length": 128, "learning_rate": 5e-5, "warmup_ratio": 0.1,
                         "scheduler": "linear", "weight_decay": 0.01, "seed": 42, "inference_batch_size": 32},
            "inference_models": {"multitune": str(models / "mixture-multitune"),
                                 "hf": {w: str(models / f"{w}-hf-default") for w in common.SINGLE}}}
    common.write_json_atomic(out / "spec.json", spec)
    shutil.rmtree(out / "hf-cache", ignore_errors=True)  # datasets' cache of an earlier suite run
    (out / "logs").mkdir(parents=True, exist_ok=True)

    runs = plan(args, steps)
    records: dict[str, dict[str, dict]] = {}
    for i, (workload, system) in enumerate(runs, 1):
        log = out / "logs" / f"{workload}--{system}.log"
        dest = out / "runs" / f"{workload}--{system}.json"
        dest.unlink(missing_ok=True)
        print(f"[{i}/{len(runs)}] {workload} / {system}: started at {_fmt(time.perf_counter() - started)} "
              f"(log: {log})", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            try:
                proc = subprocess.run([sys.executable, __file__, "--one", workload, system, "--out", str(out)],
                                      stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if dest.exists():
            record = json.loads(dest.read_text())
        else:
            record = {"status": "failed", "error": f"the run's process ended ({code}) without a result; see {log}"}
        record["process_s"] = time.perf_counter() - t0
        records.setdefault(workload, {})[system] = record
        print(f"[{i}/{len(runs)}] {workload} / {system}: {_summary(record)}; {record['process_s']:.0f}s, "
              f"total {_fmt(time.perf_counter() - started)}", flush=True)

    mixture_steps_each = steps["mixture"] // len(common.SINGLE)
    for system in ("hf-default", "hf-tuned"):
        parts = {w: records.get(w, {}).get(system) for w in common.SINGLE}
        if ("mixture" in args.only.split(",") and system in args.systems.split(",")
                and system not in records.get("mixture", {})):
            if all(p and p.get("status") == "ok" and p["steps"] == mixture_steps_each for p in parts.values()):
                combined = common.combine_runs(parts)
                combined.update(status="ok", composed="from the three single-task runs (one Trainer per task)")
                records.setdefault("mixture", {})[system] = combined

    suite = {"date": datetime.date.today().isoformat(), "spec": spec, "records": records, "peaks": peaks,
             "layer_peaks": layer_peaks,
             "flops": common.flop_params(model_path), "wall_s": time.perf_counter() - started}
    common.write_json_atomic(out / "suite.json", suite)
    write_report(suite, Path(args.results))


def write_report(suite: dict, results_dir: Path) -> None:
    """The result files of a suite run (also rebuilt from ``OUT/suite.json`` by ``--report-only``)."""
    spec, date = suite["spec"], suite["date"]
    result = report.build(spec, suite["records"], suite["peaks"], suite["flops"], spec["machine"], suite["wall_s"],
                          date)
    if suite.get("layer_peaks"):
        result["matmul_layer_shapes_gflops"] = suite["layer_peaks"]
    stem = f"perf-{date}" + ("-quick" if spec["mode"] == "quick" else "")
    common.write_json_atomic(results_dir / f"{stem}.json", result)
    report.plot_training(result, results_dir / f"{stem}-training.png")
    if result.get("scaling"):
        report.plot_scaling(result, results_dir / f"{stem}-scaling.png")
    text = report.markdown(result, stem)
    common.write_text_atomic(results_dir / f"{stem}.md", text)
    print("\n" + text)
    print(f"wrote {results_dir / stem}.json, .md and plots; suite wall time {_fmt(suite['wall_s'])}")


if __name__ == "__main__":
    sys.exit(main())
