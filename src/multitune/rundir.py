"""Ownership of the directories multitune writes: it deletes or rewrites only what it created.

A directory multitune creates (a run, a sequential run's stages, a search, a comparison, an export) carries a
marker file, :data:`MARKER`. ``--overwrite`` clears a directory only when it holds that marker (or is empty,
or is a run written before markers existed), and never when it is or contains the config file, a data file
of the run, the current directory, the home directory or a filesystem root. ``--resume`` refuses a non-empty
directory that is not a run. A symlink is judged by its target.

One writer per directory: :func:`lock_dir` takes an exclusive OS lock (``flock``) on the directory itself,
which the OS releases when the process ends, so a killed run never leaves a stale lock. The holder's PID is
in the marker, so a second process is told who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from multitune import __version__
from multitune.errors import MultituneError
from multitune.fileio import write_json_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, see lock_dir
    fcntl = None

MARKER = ".multitune"


class RunDirError(MultituneError):
    """A directory multitune was asked to write, clear or resume is not one it may touch."""


def read_marker(directory: Path) -> dict | None:
    """The marker of ``directory`` (kind, version, creation time, PID of the last writer), or None."""
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("created_by") == "multitune" else None


def created_by_multitune(directory: Path) -> bool:
    """Whether ``directory`` is one multitune wrote: it has the marker, or it is a run from before the marker
    (at its top level ``config.yaml``, and ``metrics.jsonl`` with ``model/`` or ``checkpoints/``, or the
    ``stages/`` of a sequential run)."""
    if (directory / MARKER).is_file():
        return True
    if not (directory / "config.yaml").is_file():
        return False
    return (directory / "stages").is_dir() or (directory / "metrics.jsonl").is_file() and any(
        (directory / n).is_dir() for n in ("model", "checkpoints"))


def write_marker(directory: Path, kind: str) -> None:
    """Mark ``directory`` as multitune's (keeps the first creation time; records this process as the writer)."""
    previous = read_marker(directory) or {}
    write_json_atomic(directory / MARKER, {
        "created_by": "multitune", "kind": previous.get("kind", kind), "version": __version__,
        "created": previous.get("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")), "pid": os.getpid()})


def _is_empty(directory: Path) -> bool:
    return not any(p.name != MARKER for p in directory.iterdir())


def _forbidden(target: Path, protected: Iterable[Path]) -> str | None:
    """Why ``target`` (resolved) must never be cleared, or None."""
    if target.parent == target:
        return "it is a filesystem root"
    if target == Path.home().resolve():
        return "it is your home directory"
    cwd = Path.cwd().resolve()
    if cwd == target or cwd.is_relative_to(target):
        return "it is or contains the current directory"
    for path in protected:
        resolved = Path(path).resolve()
        if resolved == target or resolved.is_relative_to(target):
            return f"it contains {path}, an input of this run"
    return None


def check_output_dir(out: Path, *, overwrite: bool, resume: bool, protected: Iterable[Path] = (),
                     field: str = "output_dir", kind: str = "run") -> bool:
    """Check that a run may write into ``out``; return True when ``out`` already holds multitune's files.

    Reads only. Raises :class:`RunDirError` (one line: why, and what to do) when ``out`` is a file; is not
    empty and neither ``overwrite`` nor ``resume`` is given; is not empty, not multitune's, and ``overwrite``
    or ``resume`` would change it; or ``overwrite`` would clear a directory that must never be cleared.
    """
    if out.is_symlink() and not out.exists():
        raise RunDirError(f"{field}: {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{field}: {out} exists and is not a directory")
    if not out.exists() or _is_empty(out):
        return False
    target = out.resolve()
    where = f"{out}" + (f" (a link to {target})" if out.is_symlink() else "")
    ours = created_by_multitune(target)
    if resume:
        if not ours:
            raise RunDirError(f"{field}: {where} is not a multitune {kind} directory (it has no {MARKER} file), so "
                              f"there is nothing to resume; choose the run's own output_dir")
        return True
    if not overwrite:
        hint = "pass --overwrite to replace it or --resume to continue the run in it" if kind == "run" else \
            "pass --overwrite to replace it"
        raise RunDirError(f"{field}: {where} is not empty; {hint}" if ours else
                          f"{field}: {where} is not empty and was not written by multitune; choose another "
                          f"{field} (multitune never deletes files it did not create)")
    if not ours:
        raise RunDirError(f"{field}: {where} is not empty and was not written by multitune (no {MARKER} file); "
                          f"--overwrite only replaces multitune's own directories: choose another {field} or "
                          f"empty it yourself")
    reason = _forbidden(target, protected)
    if reason is not None:
        raise RunDirError(f"{field}: refusing to clear {where} with --overwrite: {reason}; choose another {field}")
    return True


def clear_dir(out: Path, protected: Iterable[Path] = ()) -> None:
    """Remove what ``out`` holds (its target, for a symlink), keeping the directory itself (and so its lock).

    Only call after :func:`check_output_dir` allowed ``--overwrite``; checks the never-clear rule again.
    """
    target = out.resolve()
    reason = _forbidden(target, protected)
    if reason is not None or not created_by_multitune(target) and not _is_empty(target):
        raise RunDirError(f"refusing to clear {out}: {reason or 'it was not written by multitune'}")
    for entry in target.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# --------------------------------------------------------------------------------------------------- locking

_HELD: dict[str, int] = {}  # resolved directory -> open descriptor holding its lock (this process)
_SCOPES: list[list[str]] = []


@contextlib.contextmanager
def lock_scope() -> Iterator[None]:
    """Locks taken by :func:`lock_dir` inside the block are released when it ends (nested blocks: the block
    that took a lock releases it)."""
    taken: list[str] = []
    _SCOPES.append(taken)
    try:
        yield
    finally:
        _SCOPES.pop()
        for key in taken:
            release_dir(key)


def lock_dir(directory: Path) -> None:
    """Take the exclusive write lock of ``directory`` (created if needed) for this process.

    Re-entrant within a process. Without OS support for ``flock`` (Windows) nothing is locked.

    Raises:
        RunDirError: another process holds the lock (the message names its PID).
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    if key not in _HELD:
        if fcntl is None:  # no advisory locks here: one writer is then the user's responsibility
            return
        fd = os.open(key, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return  # a filesystem without locks (some network mounts): proceed unlocked
            holder = (read_marker(Path(key)) or {}).get("pid")
            raise RunDirError(f"{directory}: another multitune process{f' (PID {holder})' if holder else ''} is "
                              f"writing this directory; wait for it to finish or choose another directory") from None
        _HELD[key] = fd
        if _SCOPES:
            _SCOPES[-1].append(key)


def release_dir(key: str) -> None:
    fd = _HELD.pop(key, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def holds_lock(directory: Path) -> bool:
    return str(directory.resolve()) in _HELD
