"""``multitune train`` in a subprocess for tests/test_crash_resume.py, with a hook that tells the test when to
kill it (SIGKILL, from the test).

    python tests/crash_driver.py MODE N MARKER TRAIN_ARGS...

MODE:
    batch    after the N-th training batch, write MARKER and go on (the test kills at a random moment after)
    in-save  in the N-th checkpoint file written with safetensors (the model file, before the optimizer
             state), write MARKER and wait to be killed
    rename   in the N-th replacement of ``checkpoints/last``, between moving the old one aside and renaming
             the new one into place, write MARKER and wait to be killed
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> int:
    mode, n, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    calls = {"n": 0}

    def reached() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    def announce(wait: bool) -> None:
        marker.write_text(str(calls["n"]))
        if wait:
            time.sleep(120)

    if mode == "batch":
        from multitune.training.batching import TaskBatcher

        next_batch = TaskBatcher.next_batch

        def counted(self):
            batch = next_batch(self)
            if reached():
                announce(wait=False)
            return batch

        TaskBatcher.next_batch = counted
    elif mode == "in-save":
        import multitune.training.checkpoint as checkpoint

        save_model = checkpoint.save_model

        def slow_save(model, filename, *args, **kwargs):
            save_model(model, filename, *args, **kwargs)
            if reached():
                announce(wait=True)

        checkpoint.save_model = slow_save
    elif mode == "rename":
        replace = os.replace

        def slow_replace(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if Path(dst).name == "last.old" and reached():
                announce(wait=True)

        os.replace = slow_replace
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    from multitune.cli import main as cli

    return cli(sys.argv[4:])


if __name__ == "__main__":
    sys.exit(main())
