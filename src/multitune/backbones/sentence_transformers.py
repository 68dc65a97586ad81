"""The sentence-transformers layout of an encoder model directory: ``modules.json`` (transformer -> pooling
[-> normalize]), ``1_Pooling/config.json`` with the trained pooling, ``2_Normalize`` when embeddings are
normalised, and ``sentence_bert_config.json`` with the training ``max_length`` beside the transformer's
weights, so that ``SentenceTransformer(directory).encode(texts)`` computes exactly multitune's embeddings
(same truncation, pooling and normalisation)."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from multitune.fileio import write_json_atomic

#: multitune pooling -> sentence-transformers pooling mode
POOLING_MODES = {"mean": "mean", "cls": "cls", "max": "max", "last": "lasttoken"}
_LEGACY_KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
                "lasttoken": "pooling_mode_lasttoken"}


def _installed_major() -> int:
    try:
        return int(version("sentence-transformers").split(".")[0])
    except Exception:  # not installed or an unusual version string: write the layout every version reads
        return 0


def pooling_config(pooling: str, dimension: int) -> dict:
    """``1_Pooling/config.json`` for ``pooling``: the keys of the installed sentence-transformers (6 renamed
    them; older versions read the ``pooling_mode_*`` flags)."""
    mode = POOLING_MODES[pooling]
    if _installed_major() >= 6:
        return {"embedding_dimension": dimension, "pooling_mode": mode, "include_prompt": True}
    return {"word_embedding_dimension": dimension, **{key: m == mode for m, key in _LEGACY_KEYS.items()},
            "pooling_mode_mean_sqrt_len_tokens": False}


def write_sentence_transformers_layout(directory: Path, transformer_dir: str, pooling: str, normalize: bool,
                                       max_length: int, dimension: int) -> None:
    """Write the sentence-transformers modules of a model directory.

    Args:
        directory: the model directory.
        transformer_dir: the transformer's weights, relative to ``directory`` (``""``: the directory itself).
        pooling: multitune's pooling (mean, cls, max, last).
        normalize: embeddings are L2-normalised.
        max_length: truncation length of training and of multitune's ``embed``.
        dimension: the embedding width.
    """
    directory = Path(directory)
    modules = [{"idx": 0, "name": "0", "path": transformer_dir, "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "1_Pooling").mkdir(exist_ok=True)
    write_json_atomic(directory / "1_Pooling" / "config.json", pooling_config(pooling, dimension))
    write_json_atomic(directory / transformer_dir / "sentence_bert_config.json",
                      {"max_seq_length": max_length, "do_lower_case": False})
    write_json_atomic(directory / "config_sentence_transformers.json",
                      {"__version__": _versions(), "prompts": {}, "default_prompt_name": None,
                       "similarity_fn_name": "cosine"})
    (directory / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")


def _versions() -> dict:
    out = {}
    for name in ("sentence-transformers", "transformers", "torch"):
        try:
            out[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            pass
    return out
