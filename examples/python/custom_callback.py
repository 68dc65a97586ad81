"""A user callback on the quickstart data: log each evaluation to a CSV file and stop once every task is good
enough.

    python examples/python/custom_callback.py [OUTPUT_DIR]     # default: runs/callback-example

Runs offline on the packaged backbone and on data the package generates (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import multitune
from multitune.config import parse_config
from multitune.quickstart.data import write_quickstart_data
from multitune.quickstart.run import quickstart_config


class CsvMetrics(multitune.Callback):
    """One CSV row per validation evaluation: step, task, metric, value."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_run_start(self, run):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["step", "task", "metric", "value"])

    def on_evaluate(self, run, results):
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            for task, metrics in results.items():
                for name, value in metrics.items():
                    writer.writerow([run.state.step, task, name, value])


class StopWhenGoodEnough(multitune.Callback):
    """Ends training (the best checkpoint is still restored and saved) once every task's selection score
    reaches ``target``."""

    def __init__(self, target: float):
        self.target = target

    def on_evaluate(self, run, results):
        scores = {task: run.tasks[task].selection_score(metrics) for task, metrics in results.items()}
        if all(score >= self.target for score in scores.values()):
            run.console.print(f"every task reached {self.target} at step {run.state.step}: stopping")
            run.should_stop = True

    def on_run_end(self, run, results):
        results["stopped_by_callback"] = run.should_stop and not run.stopped_early


def main(out: Path, backbone: str = "default", steps: int = 300, progress: bool = True) -> dict:
    data = write_quickstart_data(out / "data")
    raw = quickstart_config(data, out / "run", steps=steps)
    raw["backbone"] = backbone
    raw["training"]["eval_every"] = max(1, steps // 6)
    results = multitune.train(parse_config(raw), overwrite=True, progress=progress,
                              callbacks=[CsvMetrics(out / "evaluations.csv"), StopWhenGoodEnough(0.9)])
    print(f"{out / 'evaluations.csv'}; stopped by the callback: {results['stopped_by_callback']}")
    return results


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/callback-example"))
