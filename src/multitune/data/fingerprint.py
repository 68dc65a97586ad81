"""Fingerprints of a run's data files, so that ``--resume`` notices data that changed under a checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from multitune.errors import MultituneError

_PATH_FIELDS = ("path", "source_path", "target_path")


def data_files(config: Any, base_dir: Path | None = None) -> list[Path]:
    """Every local data file a run config reads (``tasks.*.data.{train,validation,test}`` paths that are
    files; Hub datasets and in-memory datasets have no file to fingerprint)."""
    base = base_dir or Path.cwd()
    found: list[Path] = []
    for task in config.tasks.values():
        for split in ("train", "validation", "test"):
            spec = getattr(task.data, split, None)
            for name in _PATH_FIELDS:
                value = getattr(spec, name, None) if spec is not None else None
                if isinstance(value, str) and value:
                    path = Path(value).expanduser()
                    path = path if path.is_absolute() else base / path
                    if path.is_file() and path not in found:
                        found.append(path)
    return found


def fingerprint(path: Path) -> dict:
    """Size, modification time and SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    stat = path.stat()
    return {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": digest.hexdigest()}


def fingerprints(paths: list[Path]) -> dict[str, dict]:
    return {str(p.resolve()): fingerprint(p) for p in paths}


def check_unchanged(recorded: dict[str, dict] | None, current: dict[str, dict], checkpoint: Path) -> None:
    """Refuse to resume when a data file differs from the one the checkpoint was trained on.

    Files are compared by content (size and SHA-256); a file that was only touched passes.

    Raises:
        MultituneError: naming the first file that changed, was added or went missing.
    """
    if recorded is None:  # a checkpoint written before fingerprints were recorded
        return
    hint = ("; restore it, or pass --accept-changed-data to continue on the new data (the run then no longer "
            "matches one trained from the start)")
    for path, old in recorded.items():
        new = current.get(path)
        if new is None:
            raise MultituneError(f"{path}: the checkpoint {checkpoint} was trained on this data file, which the "
                                 f"config no longer reads{hint}")
        if (new["size"], new["sha256"]) != (old.get("size"), old.get("sha256")):
            raise MultituneError(f"{path}: the data file changed since checkpoint {checkpoint} was written "
                                 f"({old.get('size')} -> {new['size']} bytes){hint}")
    for path in current:
        if path not in recorded:
            raise MultituneError(f"{path}: a data file the checkpoint {checkpoint} was not trained on{hint}")
