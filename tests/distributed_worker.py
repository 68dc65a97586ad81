"""Run by tests/test_distributed.py under `accelerate launch`: trains a config and records, at every evaluation,
a digest of this process's model weights and its validation metrics (one JSON line per evaluation in
DIGESTS/rank<R>.jsonl).

    accelerate launch --num_processes 2 --cpu tests/distributed_worker.py CONFIG DIGESTS
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from multitune.config import load_config
from multitune.training import train


def main() -> None:
    config, digests = load_config(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    digests.mkdir(parents=True, exist_ok=True)

    def record(step, results, tasks, model):
        h = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        with open(digests / f"rank{rank}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "digest": h.hexdigest(), "results": results}) + "\n")

    results = train(config, progress=False, on_evaluate=record)
    (digests / f"results-rank{rank}.json").write_text(json.dumps(results["train"]), encoding="utf-8")


if __name__ == "__main__":
    main()
