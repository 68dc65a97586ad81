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
        from multitune.backbones.checks import SAVED_MODEL_CODE, read_model_config

        read_model_config(path, remote_code=SAVED_MODEL_CODE)
        try:
            return auto_class.from_pretrained(path, use_safetensors=True)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise MultituneError(f"{path}: cannot load the backbone: {' '.join(str(exc).split())[:200]}") from None
    try:
        settings = dict(export["backbone_config"])
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        weights_prefix, backbone_prefix = str(export["weights_prefix"]), str(export["backbone_prefix"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MultituneError(f"{path / 'multitune.json'}: export: cannot rebuild the backbone "
                             f"({' '.join(str(exc).split())[:200]})") from None
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
    try:
        backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit the config
        raise MultituneError(f"{path / 'model.safetensors'}: does not fit the backbone of multitune.json: "
                             f"{' '.join(str(exc).split())[:200]}") from None
    backbone.tie_weights()
    return backbone
