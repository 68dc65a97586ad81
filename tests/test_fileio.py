"""Atomic writes leave files with the permissions a plain open() would give."""

from __future__ import annotations


def test_atomic_writes_get_normal_file_permissions(tmp_path):
    import os
    import stat

    from multitune.fileio import write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"a": 1})
    mode = stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # as open() would create it, not mkstemp's private 0600
