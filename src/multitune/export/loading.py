"""Reload the backbone of an exported task model, for ``multitune.load`` on an export directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multitune.errors import MultituneError


def load_exported_backbone(path: Path, export: dict, auto_class: Any) -> Any:
    """The multitune backbone stored in an export directory.

    Args:
        path: the export directory.
        export: the ``export`` entry of its ``multitune.json`` (see :func:`multitune.export.hf.write_task_model`).
        auto_class: the backbone family's Auto class (``AutoModel``, ``AutoModelForCausalLM``, ...).

    Raises:
        MultituneError: the entry is malformed, or the weights do not hold the backbone.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if not isinstance(export, dict) or export.get("layout") not in ("backbone", "task_model"):
        raise MultituneError(f"{path / 'multitune.json'}: export: expected a layout of backbone or task_model")
    if export["layout"] == "backbone":
        return auto_class.from_pretrained(path, use_safetensors=True)
    try:
        settings = dict(export["backbone_config"])
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        weights_prefix, backbone_prefix = str(export["weights_prefix"]), str(export["backbone_prefix"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MultituneError(f"{path / 'multitune.json'}: export: cannot rebuild the backbone ({exc})") from None
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise MultituneError(f"{path / 'model.safetensors'}: cannot load: {' '.join(str(exc).split())[:200]}") from None
    backbone = auto_class.from_config(config)
    own = backbone.state_dict()
    state = {backbone_prefix + k[len(weights_prefix):]: v for k, v in tensors.items() if k.startswith(weights_prefix)}
    state = {k: v for k, v in state.items() if k in own}
    if not state:
        raise MultituneError(f"{path / 'model.safetensors'}: holds no weights of the backbone")
    backbone.load_state_dict(state, strict=False)
    backbone.tie_weights()
    return backbone
