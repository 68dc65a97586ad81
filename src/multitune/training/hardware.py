"""What the machine can do: whether bf16 compute pays, and which precision ``auto`` resolves to."""

from __future__ import annotations

import torch


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX (oneDNN's bf16 kernels); elsewhere bf16 autocast is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16``: ``auto`` picks bf16 autocast (fp32 master weights) where it is native."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_supported(device) else "fp32"
