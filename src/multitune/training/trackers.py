"""Experiment trackers (``training.report_to``): TensorBoard and MLflow get every record of ``metrics.jsonl``.

Each tracker is a sink of the run's :class:`~multitune.training.runlog.RunLog`. It starts on the first record,
by replaying ``metrics.jsonl`` as it stands then (so a resumed run's tracker holds the kept lines and the new
ones, exactly the file), and afterwards logs each record as it comes. ``metrics.jsonl`` stays the record of
the run: a tracker that fails warns once and stops, it never ends a training run.

Scalar names (both trackers): ``lr``, ``loss/<task>``, ``loss_weight/<task>``, ``grad_stats/<stat>[/<key>]``
(train lines); ``validation/<task>/<metric>``, ``selection/<metric>``, ``epochs/<task>`` (eval lines);
``sampling/<task>`` (eval lines, train lines of samplers whose shares change, ``sampling`` records);
``<kind>/<path>`` for the numbers of any other record (e.g. ``affinity/cosine/<i>/<j>``); and
``test/<task>/<metric>`` from ``results.json`` when the run ends.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from multitune.config.parse import to_dict
from multitune.errors import ConfigError, printable, shorten_message
from multitune.fileio import read_jsonl, write_json_atomic
from multitune.training.callbacks import Callback

EXTRA = "pip install 'multitune[track]'"
# what each tracker imports; MLflow's database stores (the default: SQLite) also need SQLAlchemy and Alembic
NEEDS = {"tensorboard": ["tensorboard"], "mlflow": ["mlflow"]}
SQL_NEEDS = ["sqlalchemy", "alembic"]
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


_MLFLOW_KEY = re.compile(r"[^\w./\- :]")


def mlflow_key(name: str) -> str:
    """An MLflow metric or param name: characters MLflow refuses become ``_``."""
    return _MLFLOW_KEY.sub("_", name)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, float]]:
    """``(prefix/key/..., number)`` for every number inside nested mappings (strings and lists are skipped)."""
    if _number(value):
        yield prefix, float(value)
    elif isinstance(value, dict):
        for key, sub in value.items():
            yield from _flatten(sub, f"{prefix}/{key}" if prefix else str(key))


def scalars(record: dict) -> list[tuple[str, float]]:
    """The tracker scalars of one ``metrics.jsonl`` record, as ``(name, value)`` pairs (see the module doc).
    Both trackers get the same names: characters MLflow refuses in a name (e.g. the ``|`` of ``a|b``) are ``_``."""
    return [(mlflow_key(name), value) for name, value in _scalars(record)]


def _scalars(record: dict) -> list[tuple[str, float]]:
    kind = record.get("kind")
    if kind == "train":
        out = [("lr", float(record["lr"]))] if _number(record.get("lr")) else []
        out += _flatten(record.get("loss", {}), "loss")
        out += _flatten(record.get("loss_weights", {}), "loss_weight")
        out += _flatten(record.get("grad_stats", {}), "grad_stats")
        out += _flatten(record.get("sampling", {}), "sampling")  # samplers whose shares change over training
        return out
    if kind == "eval":
        selection = record.get("selection") or {}
        out = list(_flatten(record.get("metrics", {}), record.get("split", "validation")))
        if _number(selection.get("value")):
            out.append((f"selection/{selection.get('metric', 'value')}", float(selection["value"])))
        out += _flatten(record.get("sampling", {}), "sampling")
        out += _flatten(record.get("epochs", {}), "epochs")
        return out
    if kind == "sampling":  # an adaptive sampler's changes: the new shares (and the reasons, text)
        return list(_flatten(record.get("shares", {}), "sampling"))
    return list(_flatten({k: v for k, v in record.items() if k not in ("kind", "step")}, str(kind)))


def _test_scalars(results_path: Path) -> tuple[list[tuple[str, float]], int | None]:
    """``test/<task>/<metric>`` from ``results.json`` (logged at the run's last step), if the run has a test split."""
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [], None
    values = [(mlflow_key(k), v) for k, v in _flatten(results.get("test", {}), "test")]
    return values, (results.get("train") or {}).get("steps")


class _Sink:
    """Shared behaviour: replay ``metrics.jsonl`` on the first record, warn once and stop on a failure.
    A tracker implements :meth:`start`, :meth:`log` and :meth:`finish`."""

    name = ""

    def __init__(self, out: Path):
        self.out = out
        self.started = False
        self.failed = False
        self.last_step = 0

    def __call__(self, record: dict) -> None:
        self._guarded(self._record, record)

    def close(self) -> None:
        """Log the test metrics of ``results.json`` and close the tracker (the run ended well)."""
        self._guarded(self._close)

    def _guarded(self, fn, *args) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a tracker must not end a training run
            self.failed = True
            print(printable(shorten_message(f"multitune: warning: training.report_to: {self.name} stopped logging "
                                            f"({type(exc).__name__}: {exc}); metrics.jsonl has every record", 500)),
                  file=sys.stderr)

    def _record(self, record: dict) -> None:
        if self.started:
            self._write(record)
        else:  # the file already holds this record: RunLog appends before it calls the sinks
            self._replay()

    def _replay(self) -> None:
        self.started = True
        self.start()
        for r in read_jsonl(self.out / "metrics.jsonl"):
            self._write(r)

    def _write(self, record: dict) -> None:
        step = int(record.get("step", self.last_step))
        self.last_step = max(self.last_step, step)
        values = scalars(record)
        if values:
            self.log(values, step)

    def _close(self) -> None:
        if not self.started:  # no record in this process (e.g. --resume of a finished run)
            self._replay()
        values, steps = _test_scalars(self.out / "results.json")
        if values:
            self.log(values, steps if steps is not None else self.last_step)
        self.finish()

    def start(self) -> None:
        """Open the tracker (the run directory exists by now)."""

    def log(self, values: list[tuple[str, float]], step: int) -> None:
        """Log scalars at ``step``."""

    def finish(self) -> None:
        """Flush and close."""


class TensorBoardSink(_Sink):
    """Scalars into ``RUN/tensorboard/`` (``tensorboard --logdir RUN/tensorboard``)."""

    name = "tensorboard"

    def __init__(self, out: Path):
        super().__init__(out)
        self.writer = None

    def start(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        logdir = self.out / "tensorboard"
        if logdir.exists():  # a resumed run: rewritten from metrics.jsonl, which dropped the lines past the resume
            shutil.rmtree(logdir)
        self.writer = SummaryWriter(str(logdir), flush_secs=10)  # a live `tensorboard` sees new points soon

    def log(self, values: list[tuple[str, float]], step: int) -> None:
        for tag, value in values:
            self.writer.add_scalar(tag, value, step)

    def finish(self) -> None:
        self.writer.close()


def _params(config: dict, prefix: str = "") -> Iterator[tuple[str, str]]:
    """The config flattened to dotted keys (``training.learning_rate``); lists and nulls as their JSON text."""
    for key, value in config.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            yield from _params(value, path)
        else:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            yield mlflow_key(path)[:250], text[:6000]  # MLflow's limits on key and value length


class MlflowSink(_Sink):
    """One MLflow run per training run: the flattened config as params, the scalars as metrics, and
    ``results.json`` and ``config.yaml`` as artifacts. ``RUN/mlflow_run.json`` names the run; a resumed
    training run replaces (deletes) the MLflow run of its earlier attempt.

    Args:
        out: the run directory.
        tracking_uri: where runs go; the default is an SQLite store in the run directory, with artifacts
            in ``RUN/mlartifacts`` (MLflow 3 keeps plain file stores in maintenance mode only).
        params: the run's config as plain data.
    """

    name = "mlflow"

    def __init__(self, out: Path, tracking_uri: str | None, params: dict):
        super().__init__(out)
        self.tracking_uri = tracking_uri
        self.params = params
        self.client = None
        self.run_id = None

    def start(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "creating tables" lines in the run's console
        local = self.tracking_uri is None
        uri = self.tracking_uri or f"sqlite:///{(self.out / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "multitune")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = (self.out / "mlartifacts").resolve().as_uri() if local else None
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        record = self.out / "mlflow_run.json"
        if record.is_file():  # an earlier attempt of this run (--resume): this run replays all it kept
            try:
                earlier = json.loads(record.read_text(encoding="utf-8"))
                if earlier.get("tracking_uri") == uri:
                    self.client.delete_run(earlier["run_id"])
            except Exception:  # noqa: BLE001 - already gone, or not readable: nothing to replace
                pass
        run = self.client.create_run(experiment_id, run_name=self.out.resolve().name,
                                     tags={"multitune.run_dir": str(self.out.resolve())})
        self.run_id = run.info.run_id
        write_json_atomic(record, {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": self.run_id})
        params = [Param(k, v) for k, v in dict(_params(self.params)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, values: list[tuple[str, float]], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self) -> None:
        for name in ("results.json", "config.yaml"):
            if (self.out / name).is_file():
                self.client.log_artifact(self.run_id, str(self.out / name))
        self.client.set_terminated(self.run_id)


def mlflow_uri(config_uri: str | None) -> str | None:
    """The MLflow tracking URI: ``training.mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else None (the
    SQLite store in the run directory)."""
    return config_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_trackers(report_to: list[str], tracking_uri: str | None) -> None:
    """Fail before a run writes anything when a tracker's package is missing.

    Args:
        report_to: ``training.report_to``.
        tracking_uri: the MLflow tracking URI (None: the default SQLite store).

    Raises:
        ConfigError: naming ``training.report_to`` and the pip extra that installs the package.
    """
    for tracker in dict.fromkeys(report_to):
        needs = list(NEEDS[tracker])
        if tracker == "mlflow" and (tracking_uri is None or tracking_uri.startswith(SQL_SCHEMES)):
            needs += SQL_NEEDS
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError("training.report_to", f"{tracker} needs the package{'s' * (len(missing) > 1)} "
                                                    f"{', '.join(missing)}: {EXTRA}")


def attach_trackers(log: Any, config: Any, out: Path) -> None:
    """Add a sink to ``log`` for every tracker in ``config.training.report_to`` (on the main process only;
    every process checks the packages, so that all of them stop together).

    Args:
        log: the run's :class:`~multitune.training.runlog.RunLog`.
        config: the run's :class:`~multitune.config.schema.RunConfig`.
        out: the run directory.

    Raises:
        ConfigError: a tracker's package is missing (see :func:`check_trackers`).
    """
    tcfg = config.training
    if not tcfg.report_to:
        return
    uri = mlflow_uri(tcfg.mlflow_tracking_uri)
    check_trackers(tcfg.report_to, uri)
    if not log.enabled:
        return
    for tracker in dict.fromkeys(tcfg.report_to):
        log.add_sink(TensorBoardSink(out) if tracker == "tensorboard" else MlflowSink(out, uri, to_dict(config)))


class Trackers(Callback):
    """The run's trackers as a callback: their packages are checked when it is built (before the run writes
    anything), the sinks attached when the run starts (:func:`attach_trackers`).

    Raises:
        ConfigError: a tracker's package is missing.
    """

    def __init__(self, config: Any, out: Path):
        self.config, self.out = config, Path(out)
        check_trackers(config.training.report_to, mlflow_uri(config.training.mlflow_tracking_uri))

    def on_run_start(self, run: Any) -> None:
        attach_trackers(run.log, self.config, self.out)
