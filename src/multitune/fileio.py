"""Crash-safe file writes: everything is written beside its target and renamed into place.

Files may be hard links of one another (:func:`link_or_copy`: a checkpoint that holds the same weights as
another one shares their file). That is safe because nothing here ever writes into an existing file: every
write goes to a new file that is renamed into place, so a name that is replaced gets a new file and every
other name of the old one keeps its content. Code that writes a run's files keeps to the same rule.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread starts
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would (0666 less the umask)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None: JSON has no such numbers, and its readers
    (jq, JavaScript, most JSON libraries) refuse the ``NaN`` that Python's json module writes by default."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON (non-finite numbers as null, see :func:`finite_json`) atomically."""
    write_text_atomic(path, json.dumps(finite_json(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (a torn last line from a crash is skipped by :func:`read_jsonl`)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(finite_json(record), ensure_ascii=False, allow_nan=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):  # a damaged line can still parse (a number, a string): skip it too
                rows.append(row)
    return rows


def _fsync_tree(path: Path) -> None:
    """Flush every file below ``path`` (and ``path`` itself) to disk, so that a rename that publishes the
    directory never publishes data still in the page cache (a power loss would otherwise leave empty files)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries (its renames); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``; the old ``final`` survives until the new one is in place.

    Steps: move ``final`` aside to ``final.old``, rename ``tmp`` to ``final``, delete ``final.old``. A process
    killed at any moment leaves a complete directory at ``final``, or, between the two renames, only the
    complete old one at ``final.old`` (:func:`recover_dir` finds it; the next call puts it back first).
    ``final.old`` is only ever deleted while a complete ``final`` exists.
    """
    _fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    if old.exists():
        if final.exists():  # a crash after the new directory was in place left a stale copy
            shutil.rmtree(old)
        else:  # a crash between the renames: old is the last complete directory
            os.replace(old, final)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def discard_stale_copy(final: Path) -> None:
    """Delete ``final.old`` when a complete ``final`` exists: a process killed after :func:`replace_dir` put
    the new directory in place, but before it deleted the old one, leaves that copy behind."""
    old = final.with_name(final.name + ".old")
    if old.exists() and final.exists():
        shutil.rmtree(old)


def recover_dir(final: Path) -> Path | None:
    """The directory to read after a possible crash inside :func:`replace_dir` (``final``, else the complete
    ``final.old`` a crash between its two renames left), or None. Reads only."""
    if final.exists():
        return final
    old = final.with_name(final.name + ".old")
    return old if old.exists() else None


# errors of os.link that mean "no hard links here" (another filesystem, one without links, too many links)
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def link_or_copy(src: str | Path, dst: str | Path) -> bool:
    """Give the file ``src`` a second name ``dst`` (a hard link: no bytes are written), or copy it where the
    filesystem has no hard links. ``dst`` must not exist. Since no multitune code writes into an existing
    file (see the module docstring), replacing or deleting one name never changes what the other holds.

    Returns:
        True when ``dst`` is a link, False when it is a copy.
    """
    try:
        os.link(src, dst)
        return True
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
    shutil.copyfile(src, dst)  # a new file with a new modification time: it was written
    shutil.copymode(src, dst)
    return False


def copy_tree_linked(src: str | Path, dst: str | Path) -> None:
    """Copy the directory ``src`` to the new directory ``dst`` with every file linked (:func:`link_or_copy`)."""
    shutil.copytree(src, dst, copy_function=link_or_copy)


def files_on_disk(root: str | Path) -> dict[tuple[int, int, int], int]:
    """Every regular file below ``root``, one entry per file on disk however many names (hard links) it has:
    ``(device, inode, modification time in ns)`` -> size in bytes. The modification time tells a new file from
    an old one whose inode number the filesystem gave again. Reads only; files that vanish meanwhile are
    skipped."""
    found: dict[tuple[int, int, int], int] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):  # a symbolic link is not a file of its own
                found[(st.st_dev, st.st_ino, st.st_mtime_ns)] = st.st_size
    return found
