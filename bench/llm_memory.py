"""Peak memory of LoRA training steps on the packaged SmolLM2-135M-Instruct with and without gradient
checkpointing (``training.gradient_checkpointing``) and, where bitsandbytes is installed, with 4-bit base
weights (``adapters.quantize: 4bit``). Writes bench/results/llm-memory-<date>.json and .md.

    python bench/llm_memory.py [--steps 4] [--batch-size 8] [--seq-len 256] [--variants plain checkpointed ...]

Each variant runs in a fresh process (peak resident memory only grows within a process): it loads the backbone
as training does (``multitune.backbones.load_backbone``; the GGUF file dequantised to fp32), quantises its
linear layers for the 4-bit variants, attaches one shared LoRA adapter (r 8 on the query and value projections)
with multitune's AdapterSet, freezes the base, turns checkpointing on for the checkpointed variants, and runs
``--steps`` forward + backward passes of the teacher-forced LM loss on a fixed batch of random token ids
(``--seq-len`` tokens per row, the first eighth of each row a prompt without loss), in fp32 on the CPU, or
under bf16 autocast on a GPU. Reported per variant: the process's resident memory after loading and its peak
over the steps (on a GPU: ``torch.cuda.max_memory_allocated``), their difference (what the steps add), and the
median seconds per step. The steps' peak is measured from the end of loading (Linux: VmHWM reset through
/proc/self/clear_refs), so that loading's own peak (the GGUF file dequantised) does not hide it. Needs the llm
extra (``pip install 'multitune[llm]'``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
#: name -> (gradient checkpointing, adapters.quantize)
VARIANTS = {"plain": (False, None), "checkpointed": (True, None), "4bit": (False, "4bit"),
            "4bit-checkpointed": (True, "4bit")}

from perf.common import machine_info, peak_rss_gb, write_results  # noqa: E402  (bench/perf/, next to this script)


def _status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def release_freed_memory() -> None:
    """Hand memory freed since loading (the float weights the k-bit layers replaced) back to the OS, so that the
    resident memory after loading shows what the model holds (glibc keeps freed blocks otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Start the peak resident memory (VmHWM) afresh from now (Linux >= 4.0), so that the peak of the training
    steps is not the peak of loading the model; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(name: str, steps: int, batch_size: int, seq_len: int, seed: int) -> dict:
    """One variant in this process: load, adapt, train ``steps`` steps; returns its measurements."""
    import torch

    from multitune.adapters import AdapterSet
    from multitune.backbones import load_backbone
    from multitune.backbones.architectures import architecture_for
    from multitune.backbones.quantize import quantize_linear_layers
    from multitune.config.adapters import AdapterConfig
    from multitune.config.schema import BackboneConfig
    from multitune.training.setup import apply_gradient_checkpointing

    checkpointing, quantize = VARIANTS[name]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(seed)
    model, tokenizer = load_backbone(BackboneConfig(type="decoder_only", name="smollm2"))
    model.set_attn_implementation("sdpa" if cuda else "eager")  # training.attention: auto
    model.to(device)
    if quantize:
        quantize_linear_layers(model, quantize)
    architecture = architecture_for(model, tokenizer)
    adapters = AdapterSet(AdapterConfig(method="lora", arrangement="shared"), model, architecture, ["t"]).to(device)
    model.requires_grad_(False)
    if checkpointing:
        apply_gradient_checkpointing(model, adapters)
    model.train()
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, int(model.config.vocab_size), (batch_size, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : seq_len // 8] = -100
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": labels.to(device)}
    gc.collect()
    release_freed_memory()
    loaded = _status_gb("VmRSS")
    reset = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded_device = torch.cuda.memory_allocated() / 1024**3
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        with adapters.route("t"), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = architecture.text2text_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    # the steps' peak: VmHWM since the reset (else the process's peak, which may be the load's)
    peak = _status_gb("VmHWM") if reset else peak_rss_gb()
    out = {"variant": name, "gradient_checkpointing": checkpointing, "quantize": quantize, "device": device.type,
           "loss": round(float(loss.detach()), 4), "loaded_rss_gb": round(loaded, 3),
           "peak_rss_gb": round(peak, 3), "step_rss_gb": round(peak - loaded, 3), "peak_since_load": reset,
           "load_peak_rss_gb": round(peak_rss_gb(), 3), "s_per_step": round(statistics.median(seconds), 3)}
    if cuda:
        out["loaded_cuda_gb"] = round(loaded_device, 3)
        out["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        out["step_cuda_gb"] = round(out["peak_cuda_gb"] - loaded_device, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                    help="default: all (the 4-bit ones only where bitsandbytes is installed)")
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.seq_len, args.seed)), flush=True)
        return

    import importlib.util

    variants = args.variants or [v for v, (_, q) in VARIANTS.items()
                                 if q is None or importlib.util.find_spec("bitsandbytes") is not None]
    info = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "steps": args.steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "runs": []}
    for name in variants:
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            info["runs"].append({"variant": name, "error": tail[0][:300]})
        else:
            info["runs"].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(info["runs"][-1]), flush=True)
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(f"llm-memory-{info['date']}", info, report(info))


def report(info: dict) -> str:
    m = info["machine"]
    lines = [f"# LLM training memory - {info['date']}", "",
             f"SmolLM2-135M-Instruct (packaged GGUF, dequantised to fp32) with one shared LoRA adapter (r 8, "
             f"query and value projections), base frozen; {info['steps']} training steps of the LM loss on "
             f"{info['batch_size']} rows of {info['seq_len']} random tokens; each variant in a fresh process "
             f"(scripts: bench/llm_memory.py).", "",
             f"Machine: {m.get('cpu')}, {m.get('cpus')} cores, {m.get('memory_gb')} GB, torch {m.get('torch')}, "
             f"transformers {m.get('transformers')}.", "",
             "| variant | checkpointing | base weights | device | RSS after load (GB) | peak RSS of the steps (GB) | "
             "added by the steps (GB) | peak device memory (GB) | s/step |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in info["runs"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{r['quantize'] or 'fp32'} | {r['device']} | {r['loaded_rss_gb']:.2f} | "
                     f"{r['peak_rss_gb']:.2f} | {r['step_rss_gb']:.2f} | "
                     f"{r.get('peak_cuda_gb', '-')} | {r['s_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
