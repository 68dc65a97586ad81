"""k-bit base weights for adapters (``adapters.quantize``): QLoRA (Dettmers et al. 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs").

The frozen backbone's linear layers are replaced, in place, by bitsandbytes' ``Linear4bit`` (NF4 weights in
blocks of 64 with double-quantised scales, bf16 compute) or ``Linear8bitLt`` (LLM.int8: int8 rows with one
scale each); the output layer (the LM head, often tied to the input embeddings) and the embeddings stay as
they are. Adapters attach to the new layers as to any ``nn.Linear`` and train in fp32; the k-bit weights
never change.

What a run writes never holds k-bit tensors: the state dict of a quantised layer holds its weight
dequantised to the layer's original dtype (the weights training computed with), so checkpoints, the saved
model and its exports are plain float checkpoints that any loader reads without bitsandbytes, and the
adapters on them predict what they predicted in training (up to the compute dtype). Loading a state dict
into a quantised layer checks that its weight is the layer's own dequantised weight (a checkpoint of the same
run) and keeps the k-bit one.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import nn

from multitune.errors import ConfigError

QUANTIZE_MODES = ["4bit", "8bit"]
#: the attribute a replaced layer keeps its original weight dtype in
DTYPE_ATTRIBUTE = "multitune_weight_dtype"


def _bitsandbytes(field: str) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(field, "needs the bitsandbytes package, which is not installed: pip install "
                                 "'multitune[qlora]' (or set quantize: null)")
    # bitsandbytes looks for faster CPU kernels on the Hugging Face Hub as it loads, and warns when it is offline
    # (it falls back to its own): the warning names a package the user never asked for
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # optional dependency: only k-bit base weights need it
    except (ImportError, RuntimeError, OSError) as exc:
        raise ConfigError(field, f"bitsandbytes is installed but does not load ({' '.join(str(exc).split())[:200]}); "
                                 f"reinstall it for this torch, or set quantize: null") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer that :func:`quantize_linear_layers` replaced."""
    return hasattr(module, DTYPE_ATTRIBUTE)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as a float tensor [out, in]: a k-bit layer's dequantised (in its original
    dtype), any other layer's own ``weight``."""
    if not is_quantized(module):
        return module.weight
    import bitsandbytes.functional as bnbf  # present: the layer was made with it

    weight, dtype = module.weight, getattr(module, DTYPE_ATTRIBUTE)
    if getattr(weight, "quant_state", None) is not None:  # Linear4bit
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = module.state.SCB  # Linear8bitLt moves the scales to its state at the first forward pass
    return (weight.data.float() * (scale.float()[:, None] / 127.0)).to(dtype)


def _save_float(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    # the layer wrote its k-bit weight and quantisation state; a run writes the float weight instead
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in ("weight", "bias")]:
        del state_dict[key]
    dtype = getattr(module, DTYPE_ATTRIBUTE)
    state_dict[prefix + "weight"] = dequantized_weight(module).detach()
    if state_dict.get(prefix + "bias") is not None:  # Linear4bit casts its bias to the compute dtype
        state_dict[prefix + "bias"] = state_dict[prefix + "bias"].to(dtype)


def _load_float(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    key = prefix + "weight"
    given = state_dict.get(key)
    if given is None or not given.is_floating_point():
        return
    own = dequantized_weight(module)
    if given.shape != own.shape or not torch.equal(given.to(own.device, own.dtype), own):
        raise RuntimeError(f"{key}: a k-bit layer keeps its quantised weight; the state dict holds other "
                           f"weights than its own dequantised ones")
    state_dict[key] = module.weight  # itself: the layer keeps its k-bit weight


def quantize_linear_layers(model: nn.Module, mode: str, field: str = "adapters.quantize") -> int:
    """Replace ``model``'s linear layers, except its output layer, with bitsandbytes k-bit layers, in place.

    Args:
        model: a transformers model on the device it will train on (CPU before ``prepare``: the k-bit layers move
            with the model).
        mode: ``4bit`` (NF4, double-quantised scales, bf16 compute) or ``8bit`` (LLM.int8).
        field: the config field named in errors.

    Returns:
        The number of layers replaced.

    Raises:
        ConfigError: bitsandbytes is missing or does not load, or this build cannot run ``mode`` on the
            model's device (naming what to do).
    """
    bnb = _bitsandbytes(field)
    device = next(model.parameters()).device
    supported = getattr(bnb, "supported_torch_devices", {"cuda"})
    if device.type not in supported:
        raise ConfigError(field, f"bitsandbytes {bnb.__version__} runs k-bit layers on {', '.join(sorted(supported))}, "
                                 f"not on {device.type}; train on one of those or set quantize: null")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(path, module) for path, module in model.named_modules()
               if type(module) is nn.Linear and module is not output]
    for path, linear in targets:
        parent_path, _, name = path.rpartition(".")
        layer = _kbit_layer(bnb, linear, mode, device)
        setattr(layer, DTYPE_ATTRIBUTE, linear.weight.dtype)
        layer.register_state_dict_post_hook(_save_float)
        layer.register_load_state_dict_pre_hook(_load_float)
        setattr(model.get_submodule(parent_path) if parent_path else model, name, layer)
    return len(targets)


def _kbit_layer(bnb: Any, linear: nn.Linear, mode: str, device: torch.device) -> nn.Module:
    bias = linear.bias is not None
    weight = linear.weight.data
    if mode == "4bit":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.bfloat16,
                                  quant_type="nf4", compress_statistics=True, device="meta")
        # its CPU inference path repacks the weight in place, which dequantized_weight does not read
        layer.support_avx512bf16_for_cpu = False
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                         module=layer).to(device)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer
