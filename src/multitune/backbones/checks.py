"""Checks of a model directory around transformers loading it, so that a broken or tampered
file is reported in one line naming it, never as a traceback from deep inside transformers or tokenizers.

- ``config.json``: valid JSON, a mapping, a ``model_type`` transformers knows (an ``auto_map`` to code in the
  directory only counts with ``trust_remote_code``);
- ``*.safetensors``: each file's header is valid and the file holds all the data it announces (a pickle saved
  under that name, a torn copy);
- the tokenizer: when transformers cannot load it, the file at fault (a JSON file that does not parse, a
  ``tokenizer.json`` the tokenizers library cannot read);
- ``max_length``: no longer than the position embeddings of the backbone (a longer input would fail in the
  middle of a run, at the first long enough example).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from multitune.errors import ConfigError, DataError, shown

#: sentences on which an exported model (stock transformers, PEFT) is checked against the task it came from
#: (varied lengths, so that a batch of them is padded)
PROBE_TEXTS = ("A wonderful film .", "The food was cold and the service was slow , but the view from the terrace "
               "made up for it .", "Maria flew from Lisbon to Oslo on Monday .", "no", "It is what it is ?",
               "The committee of the Royal Society met in London to discuss the budget for the next three years .")

#: the error's ending for a saved model's config.json whose model type only its own code defines
SAVED_MODEL_CODE = "multitune never runs when it loads a saved model"

#: JSON files a tokenizer directory may hold besides ``tokenizer.json`` (all read by ``AutoTokenizer``)
TOKENIZER_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

#: model types whose position ids start after the padding id (RoBERTa's ``create_position_ids_from_input_ids``):
#: of ``max_position_embeddings`` rows, ``pad_token_id + 1`` are never used for a token (514 -> 512 positions)
PADDING_OFFSET_MODEL_TYPES = frozenset({
    "camembert", "data2vec-text", "esm", "ibert", "layoutlmv3", "lilt", "longformer", "luke", "markuplm", "mpnet",
    "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod"})


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def read_json_file(file: Path, what: str) -> Any:
    """The content of a JSON file.

    Raises:
        DataError: the file is unreadable, not UTF-8 or not JSON (with its line), saying it is ``what``.
    """
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(str(file), f"cannot read {what}: invalid JSON: {exc.msg}", exc.lineno) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(str(file), f"cannot read {what}: {_one_line(exc)}") from None


def read_model_config(directory: str | Path, trust_remote_code: bool = False,
                      remote_code: str = "multitune runs only with trust_remote_code: true") -> dict:
    """``config.json`` of a local model directory, checked so that ``from_pretrained`` can read it.

    Args:
        directory: the model directory.
        trust_remote_code: whether a ``model_type`` defined by the directory's own code (``auto_map``) may load.
        remote_code: when multitune runs that code, for the error (a saved model never runs it).

    Raises:
        DataError: naming ``config.json``: not JSON, not a mapping, or a ``model_type`` transformers does not know
            (with an ``auto_map`` the model's own code could read it, but only with ``trust_remote_code``).
    """
    import transformers  # imported only when used: 0.5 s
    from transformers import CONFIG_MAPPING

    file = Path(directory) / "config.json"
    what = "the model config"
    config = read_json_file(file, what)
    if not isinstance(config, dict):
        raise DataError(str(file), f"cannot read {what}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is None or (isinstance(model_type, str) and model_type in CONFIG_MAPPING):
        return config  # without model_type transformers infers it from the name, or says why it cannot
    if not isinstance(model_type, str):
        raise DataError(str(file), f"model_type: expected a string, got {shown(model_type)}")
    auto_map = config.get("auto_map")
    if auto_map and trust_remote_code:
        return config
    known = f"model_type {shown(model_type)} is not one that transformers {transformers.__version__} knows"
    if auto_map:
        raise DataError(str(file), f"{known}; its auto_map names model code in the directory, which {remote_code}")
    raise DataError(str(file), f"{known} (and no auto_map names code that defines it)")


def check_safetensors_files(directory: str | Path) -> None:
    """Open each ``*.safetensors`` file of ``directory``: its header must parse and the file must hold all the
    tensor data the header announces. Cheap: nothing is read beyond the header.

    Raises:
        DataError: naming the first bad file: pickled data (``torch.save``) under that name, or a torn file.
    """
    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            with file.open("rb") as f:
                head = f.read(4)
            if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a bare pickle
                raise DataError(str(file), "cannot load the weights: the file holds pickled data (torch.save), "
                                           "not safetensors; multitune never unpickles weights") from None
            raise DataError(str(file), f"cannot load the weights: not a safetensors file, or a torn one "
                                       f"({_one_line(exc)})") from None


def load_tokenizer(source: str | Path, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(source)``; when it fails on a local directory, the tokenizer's files are
    read one by one to name the one at fault.

    Raises:
        DataError: naming the file that does not parse, or the directory (the hub id) when transformers
            refuses it for another reason.
    """
    from transformers import AutoTokenizer  # imported only when used: 0.7 s

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:  # a bad file makes transformers raise KeyError, TypeError, plain Exception...
        path = Path(source)
        if path.is_dir() and "gguf_file" not in kwargs:
            _check_tokenizer_json(path)
        raise DataError(str(source), f"cannot load the tokenizer: {_one_line(exc, 300)}") from None


def _check_tokenizer_json(path: Path) -> None:
    """Raise a :class:`DataError` naming the first JSON file of the tokenizer in ``path`` that does not parse,
    or its ``tokenizer.json`` when the tokenizers library cannot read it."""
    for name in TOKENIZER_JSON_FILES:
        if (path / name).is_file():
            read_json_file(path / name, "the tokenizer")
    if (path / "tokenizer.json").is_file():
        try:
            Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # the Rust library raises plain Exception for a file it cannot read
            raise DataError(str(path / "tokenizer.json"), f"not a tokenizer file the tokenizers library reads "
                                                          f"({_one_line(exc)})") from None


def position_limit(config: Any) -> tuple[int, str] | None:
    """How many tokens one input of a model with this config may have, and where the number comes from; None
    when nothing bounds it (relative positions: T5, DeBERTa-v3, XLNet).

    - ``max_position_embeddings`` (``n_positions`` on GPT-2, ``max_encoder_position_embeddings`` on LED) rows
      of learned or fixed position embeddings, or the context a rotary model was trained for;
    - RoBERTa and its relatives start counting positions after the padding id: 514 rows hold 512 positions;
    - a warm-started encoder-decoder: its encoder's limit (``max_length`` cuts the encoder's input).
    """
    if getattr(config, "model_type", None) == "encoder-decoder" and getattr(config, "encoder", None) is not None:
        return position_limit(config.encoder)
    if getattr(config, "position_biased_input", True) is False:  # DeBERTa-v2/v3: relative positions only
        return None
    for attr in ("max_encoder_position_embeddings", "max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            break
    else:
        return None
    model_type = getattr(config, "model_type", None)
    if model_type in PADDING_OFFSET_MODEL_TYPES:
        pad = getattr(config, "pad_token_id", None)
        offset = (pad if isinstance(pad, int) else 1) + 1
        return value - offset, f"its {attr} {value}, less the {offset} that {model_type} numbers positions after"
    return value, f"its {attr}"


def check_max_length(backbone_config: Any, max_length: int, field: str) -> None:
    """Refuse a ``max_length`` longer than the backbone's positions before anything runs: truncating to it would
    let an input past the position embeddings through, which fails in the middle of training or prediction.

    Args:
        backbone_config: the backbone's transformers config (``model.config``).
        max_length: tokens per input after truncation.
        field: the config field named in the error (``training.max_length``, or ``max_length`` of a saved model).

    Raises:
        ConfigError: naming ``field``, the limit and where it comes from.
    """
    limit = position_limit(backbone_config)
    if limit is not None and max_length > limit[0]:
        raise ConfigError(field, f"must be at most {limit[0]} for this backbone ({limit[1]}), got {max_length}")
