"""Read a finished run directory: what the report is made from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multitune.errors import MultituneError
from multitune.fileio import read_jsonl


@dataclass
class Timeline:
    """The ``metrics.jsonl`` of one training loop: the run's own, or one stage's of a sequential run."""

    label: str  # "" for a single-stage run, else the stage directory's name (e.g. "01-ner")
    path: Path  # the directory holding metrics.jsonl (and that loop's parameters.json, confusion_*.png)
    records: list[dict]


@dataclass
class RunFiles:
    """Everything the report reads from ``RUN_DIR``."""

    path: Path
    results: dict
    timelines: list[Timeline]
    config: dict | None = None  # config.yaml as plain data
    config_text: str | None = None
    parameters: list[tuple[str, list[dict]]] = field(default_factory=list)  # (timeline label, rows)

    def records(self, kind: str) -> list[tuple[Timeline, dict]]:
        return [(t, r) for t in self.timelines for r in t.records if r.get("kind") == kind]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MultituneError(f"{path}: cannot read it as JSON ({exc})") from None


def load_run(run_dir: str | Path) -> RunFiles:
    """Read ``results.json``, ``metrics.jsonl`` (a sequential run's: each stage's), ``config.yaml`` and
    ``parameters.json`` of a run directory.

    Raises:
        MultituneError: the directory is not a run: the message names the missing file.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise MultituneError(f"{run}: not a run directory (no such directory)")
    if not (run / "results.json").is_file():
        raise MultituneError(f"{run}: not a run directory: results.json is missing")
    results = _read_json(run / "results.json")
    if not isinstance(results, dict):
        raise MultituneError(f"{run / 'results.json'}: expected a JSON object")
    if (run / "metrics.jsonl").is_file():
        dirs = [("", run)]
    else:  # a sequential run: each stage is a run of its own in stages/NN-name/
        dirs = [(d.name, d) for d in sorted((run / "stages").glob("*")) if (d / "metrics.jsonl").is_file()]
        if not dirs:
            raise MultituneError(f"{run}: not a run directory: metrics.jsonl is missing")
    timelines = [Timeline(label, d, read_jsonl(d / "metrics.jsonl")) for label, d in dirs]
    files = RunFiles(run, results, timelines)
    if (run / "config.yaml").is_file():
        files.config_text = (run / "config.yaml").read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(files.config_text)
        except yaml.YAMLError:
            loaded = None
        files.config = loaded if isinstance(loaded, dict) else None
    for label, d in [("", run)] + [(label, d) for label, d in dirs if label]:  # the run's, else each stage's
        if (d / "parameters.json").is_file():
            rows = _read_json(d / "parameters.json")
            if isinstance(rows, list) and rows:
                files.parameters.append((label, rows))
    return files
