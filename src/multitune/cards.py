"""Hub model cards: the README.md (YAML front matter, then Markdown) of each model directory multitune writes.

A card is built from what a run already wrote: ``multitune.json`` (tasks, labels, backbone source) feeds
:func:`task_cards` and :func:`base_model_info`, ``results.json`` gives each task's metrics and
``config.yaml`` the brief :func:`training_summary`. The caller fills a :class:`ModelCard` (it knows which
clients load the directory, so it supplies the usage code), :func:`render_card` turns it into the text the
Hub reads (front matter with a ``model-index`` of every task's metrics) and :func:`write_card` puts it in
place atomically. Unknown facts are left out, never filled with placeholder text. Nothing here imports
torch or uses the network.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multitune.card_sources import CARD_FILE, MODEL_FILE, base_model_info, clean_text, is_hub_id
from multitune.errors import MultituneError
from multitune.fileio import write_text_atomic

__all__ = ["CARD_FILE", "MODEL_FILE", "ModelCard", "TaskCard", "base_model_info", "code_blocks", "render_card",
           "task_cards", "training_summary", "write_card"]

MAX_LABELS_SHOWN = 20

# the metrics a card reports per task type, the default main metric first (a task's own choice of main metric,
# state ``main_metric``, moves to the front, as in multitune's own tables)
TASK_METRICS: dict[str, tuple[str, ...]] = {
    # micro_f1: multi-label only; mcc: single-label only; f1 (of the positive class): binary only
    "classification": ("accuracy", "macro_f1", "micro_f1", "mcc", "f1"),
    "token_classification": ("f1", "precision", "recall"),
    "regression": ("pearson", "spearman"),
    "masked_lm": ("accuracy", "perplexity"),
    "text2text": ("accuracy", "macro_f1", "bleu", "chrf"),  # accuracy, macro_f1 with labels; else BLEU, chrF
}
# multitune metric -> (metric id on the Hub, display name, F1 averaging)
_METRIC_IDS: dict[str, tuple[str, str, str | None]] = {
    "accuracy": ("accuracy", "Accuracy", None), "macro_f1": ("f1", "Macro F1", "macro"),
    "micro_f1": ("f1", "Micro F1", "micro"), "f1": ("f1", "F1", None),  # f1: entity F1 / positive-class F1
    "mcc": ("matthews_correlation", "Matthews correlation", None),
    "precision": ("precision", "Precision", None), "recall": ("recall", "Recall", None),
    "pearson": ("pearsonr", "Pearson", None), "spearman": ("spearmanr", "Spearman", None),
    "bleu": ("sacrebleu", "BLEU", None), "chrf": ("chrf", "chrF", None),
    "perplexity": ("perplexity", "Perplexity", None), "exact_match": ("exact_match", "Exact match", None),
    "mse": ("mse", "MSE", None),
}


@dataclass
class TaskCard:
    """One task of a model as its card describes it.

    Attributes:
        name: the task's name in the run (what ``predict`` takes).
        type: the multitune task type (classification, token_classification, regression, masked_lm,
            text2text).
        description: one line, e.g. ``sentence-pair classification, 3 labels``.
        labels: the label names in the model's order (None for regression, masked LM and free text-to-text).
        metrics: the task's main metrics on ``split`` (main metric first).
        split: ``validation`` or ``test``.
        dataset: the Hub dataset the task was trained on, when known (None for local files).
        pipeline_tag: the Hub pipeline the task corresponds to (None when there is none).
        dataset_config: the Hub dataset's configuration (subset), when it has one.
    """

    name: str
    type: str
    description: str
    labels: list[str] | None
    metrics: dict[str, float]
    split: str
    dataset: str | None
    pipeline_tag: str | None
    dataset_config: str | None = None


@dataclass
class ModelCard:
    """Everything a model directory's README.md says.

    Attributes:
        title: the heading, and the model's name in ``model-index``.
        summary: one to three sentences: what this directory is.
        library_name: the client that loads it: transformers, sentence-transformers, peft, multitune or onnx.
        base_model: the Hub id of the pretrained model it was fine-tuned from, when known.
        license: the license, carried from the base model when known.
        pipeline_tag: the Hub pipeline of the directory as a whole.
        tags: Hub tags (``multitune`` is always added).
        datasets: Hub dataset ids (the tasks' own datasets are added).
        tasks: the tasks, with their metrics.
        usage: (heading, python code) blocks: how to load and predict with each client.
        training: the brief training configuration (see :func:`training_summary`).
        notes: further facts a user needs (e.g. which aggregation strategy reproduces the model's spans).
    """

    title: str
    summary: str
    library_name: str
    base_model: str | None = None
    license: str | None = None
    pipeline_tag: str | None = None
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    tasks: list[TaskCard] = field(default_factory=list)
    usage: list[tuple[str, str]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- rendering ---------------------------------------------------------------------------------------------
def render_card(card: ModelCard) -> str:
    """The README.md text of ``card``: YAML front matter the Hub reads, then the Markdown body.

    The front matter holds ``library_name``, ``base_model``, ``license``, ``pipeline_tag``, ``tags``,
    ``datasets`` and a ``model-index`` with one result per task that has metrics; keys whose value is
    unknown are left out. The body has the title, the summary, a tasks table, "How to use" (each usage block
    as a fenced python block under its heading), "Training", "Evaluation" and "Notes"; empty sections are
    left out.

    Args:
        card: what to say.

    Returns:
        The text, ending with a newline.

    Raises:
        ValueError: the card has no title.
    """
    if not card.title.strip():
        raise ValueError("a model card needs a title (it also names the model in model-index)")
    meta = yaml.safe_dump(_card_metadata(card), sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{meta}---\n\n" + "\n".join(_card_body(card)).rstrip("\n") + "\n"


def _card_metadata(card: ModelCard) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key in ("library_name", "base_model", "license", "pipeline_tag"):
        value = getattr(card, key)
        if value:
            data[key] = value
    data["tags"] = _unique(["multitune", *card.tags])
    datasets = _unique([*card.datasets, *(t.dataset for t in card.tasks if t.dataset)])
    if datasets:
        data["datasets"] = datasets
    results = [r for r in (_index_result(t, card.pipeline_tag) for t in card.tasks) if r is not None]
    if results:
        data["model-index"] = [{"name": card.title, "results": results}]
    return data


def _index_result(task: TaskCard, fallback_tag: str | None) -> dict[str, Any] | None:
    """The task's ``model-index`` result (None without metrics or without a pipeline tag to file it under)."""
    tag = task.pipeline_tag or fallback_tag
    if not task.metrics or not tag:
        return None
    if task.dataset:
        subset = f" ({task.dataset_config})" if task.dataset_config else ""
        dataset: dict[str, Any] = {"name": task.dataset + subset, "type": task.dataset}
        if task.dataset_config:
            dataset["config"] = task.dataset_config
    else:  # the Hub requires a dataset entry; the task's own data has no Hub id
        dataset = {"name": f"{task.name} data", "type": task.name}
    dataset["split"] = task.split
    metrics = []
    for key, value in task.metrics.items():
        metric_id, display, average = _METRIC_IDS.get(key, (key, key, None))
        entry: dict[str, Any] = {"type": metric_id, "value": float(value), "name": display}
        if average:
            entry["args"] = {"average": average}
        metrics.append(entry)
    return {"task": {"type": tag, "name": task.name}, "dataset": dataset, "metrics": metrics}


def _card_body(card: ModelCard) -> list[str]:
    lines = [f"# {card.title.strip()}", ""]
    if card.summary.strip():
        lines += [card.summary.strip(), ""]
    if card.tasks:
        lines += ["## Tasks", "", "| Task | Type | Labels | Main metric |", "| --- | --- | --- | --- |"]
        for t in card.tasks:
            kind = f"{t.description} (`{t.type}`)" if t.description else f"`{t.type}`"
            main = next(iter(t.metrics.items()), None)
            shown = f"{_metric_name(main[0])} {_format_value(main[1])} ({t.split})" if main else "–"
            lines.append(f"| {_cell(t.name)} | {_cell(kind)} | {_cell(_label_list(t.labels))} | {shown} |")
        lines.append("")
    if card.usage:
        lines += ["## How to use", ""]
        for heading, code in card.usage:
            fence = "`" * max(3, _longest_backtick_run(code) + 1)
            lines += [f"### {heading.strip()}", "", f"{fence}python", code.strip("\n"), fence, ""]
    training = _training_lines(card)
    if training:
        lines += ["## Training", "", *training, ""]
    scored = [t for t in card.tasks if t.metrics]
    if scored:
        lines += ["## Evaluation", "", _evaluation_sentence(scored), "",
                  "| Task | Split | Metric | Value |", "| --- | --- | --- | --- |"]
        for t in scored:
            for key, value in t.metrics.items():
                lines.append(f"| {_cell(t.name)} | {t.split} | {_metric_name(key)} "
                             f"| {_format_value(value)} |")
        lines.append("")
    if card.notes:
        lines += ["## Notes", "", *(f"- {note.strip()}" for note in card.notes), ""]
    return lines


def _training_lines(card: ModelCard) -> list[str]:
    lines = []
    if card.base_model:
        lines.append(f"- Base model: [{card.base_model}](https://huggingface.co/{card.base_model})")
    hub_data = [t for t in card.tasks if t.dataset]
    if hub_data:
        parts = [f"[{t.dataset}](https://huggingface.co/datasets/{t.dataset})"
                 + (f" ({t.dataset_config})" if t.dataset_config else "") + f" for {t.name}"
                 for t in hub_data]
        lines.append("- Training data: " + "; ".join(parts))
    for key, value in card.training.items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        lines.append(f"- {key.replace('_', ' ').capitalize()}: {_format_setting(value)}")
    return lines


def _evaluation_sentence(tasks: list[TaskCard]) -> str:
    splits = {t.split for t in tasks}
    text = ("Metrics computed by multitune after training, on each task's "
            + (f"{splits.pop()} split." if len(splits) == 1 else "test split where it had one, else its "
                                                                 "validation split."))
    if any(t.split == "validation" for t in tasks):
        text += (" Validation data also chose the saved checkpoint, so validation numbers are slightly "
                 "optimistic.")
    return text


def _metric_name(key: str) -> str:
    return _METRIC_IDS.get(key, (key, key.replace("_", " "), None))[1]


def _format_value(value: float) -> str:
    magnitude = abs(value)
    return f"{value:.4f}" if magnitude < 1 else f"{value:.2f}" if magnitude < 100 else f"{value:.1f}"


def _format_setting(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_setting(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_setting(v) for v in value)
    return str(value)


def _label_list(labels: list[str] | None) -> str:
    if not labels:
        return "–"
    shown = ", ".join(str(lab) for lab in labels[:MAX_LABELS_SHOWN])
    rest = len(labels) - MAX_LABELS_SHOWN
    return f"{shown} and {rest} more" if rest > 0 else shown


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _longest_backtick_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"`+", text)), default=0)


def _unique(items: Any) -> list:
    seen: list = []
    for item in items:
        if item and item not in seen:
            seen.append(item)
    return seen


def write_card(directory: str | Path, card: ModelCard) -> Path:
    """Write ``card`` as ``directory/README.md``: rendered first, then written beside the target and renamed,
    so an existing README.md is only ever replaced by a complete card.

    Args:
        directory: an existing model directory.
        card: the card.

    Returns:
        The path of the README.md.

    Raises:
        MultituneError: ``directory`` is not a directory.
        ValueError: the card cannot be rendered (see :func:`render_card`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MultituneError(f"{directory}: not a directory; a model card goes into an existing model "
                             f"directory")
    text = render_card(card)
    path = directory / CARD_FILE
    write_text_atomic(path, text)
    return path


_FENCE_OPEN = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")


def code_blocks(markdown: str) -> list[str]:
    """The fenced python code blocks of a Markdown text, in order (CommonMark fences of backticks or tildes).

    Args:
        markdown: e.g. a rendered card.

    Returns:
        Each block's code, without its fences and without a final newline.
    """
    blocks = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE_OPEN.match(lines[i])
        i += 1
        if not match or (match.group(2)[0] == "`" and "`" in match.group(3)):
            continue
        indent, fence, info = len(match.group(1)), match.group(2), match.group(3).strip()
        body = []
        while i < len(lines):
            line = lines[i]
            i += 1
            closing = line.strip()
            if (len(line) - len(line.lstrip(" ")) <= 3 and closing and set(closing) == {fence[0]}
                    and len(closing) >= len(fence)):
                break
            strip = min(indent, len(line) - len(line.lstrip(" ")))
            body.append(line[strip:])
        if info.split()[:1] in (["python"], ["py"], ["python3"]):
            blocks.append("\n".join(body))
    return blocks


# -- what the run files say --------------------------------------------------------------------------------
def task_cards(meta: dict, results: dict | None, config: dict | None = None) -> list[TaskCard]:
    """The card entries of a model's tasks.

    Each task's metrics come from ``results``: its test metrics when the run had test data for it, else its
    validation metrics; only the ones that matter for its type are kept (:data:`TASK_METRICS`: accuracy,
    macro F1, Matthews correlation and positive-class F1 for classification, F1/precision/recall for token
    classification, Pearson/Spearman for regression, accuracy or BLEU/chrF for text-to-text,
    accuracy/perplexity for masked LM; every plain metric for a task type not listed), the main metric first
    (a classification task's ``metric`` choice).

    Args:
        meta: the content of the model's ``multitune.json``.
        results: the content of the run's ``results.json`` (None: no metrics).
        config: the content of the run's ``config.yaml``, which names the tasks' data (None: datasets
            unknown).

    Returns:
        One :class:`TaskCard` per task, in the model's order.

    Raises:
        MultituneError: ``meta`` has no ``tasks`` mapping.
    """
    tasks = meta.get("tasks") if isinstance(meta, dict) else None
    if not isinstance(tasks, dict):
        raise MultituneError("multitune.json: expected a 'tasks' mapping of task name -> config and state")
    family = meta.get("backbone_type", "encoder")
    cards = []
    for name, entry in tasks.items():
        cfg = (entry.get("config") or {}) if isinstance(entry, dict) else {}
        state = (entry.get("state") or {}) if isinstance(entry, dict) else {}
        kind = str(cfg.get("type", ""))
        split, metrics = _task_metrics(name, kind, results, state.get("main_metric") or cfg.get("metric"))
        dataset, subset = _hub_dataset(config, name)
        labels = state.get("labels") or cfg.get("labels") or None
        cards.append(TaskCard(name=name, type=kind, description=_describe(kind, cfg, state),
                              labels=[str(lab) for lab in labels] if labels else None, metrics=metrics,
                              split=split, dataset=dataset, pipeline_tag=_pipeline_tag(kind, cfg, family),
                              dataset_config=subset))
    return cards


def _task_metrics(name: str, kind: str, results: dict | None, main: Any = None) -> tuple[str, dict[str, float]]:
    """(split, metrics) of a task's card entry; ``main``: the task's chosen main metric, shown first."""
    for split in ("test", "validation"):
        scores = (results or {}).get(split)
        scores = scores.get(name) if isinstance(scores, dict) else None
        if not isinstance(scores, dict):
            continue
        keys = list(TASK_METRICS.get(kind) or [k for k in scores if "/" not in k])
        if main in keys:
            keys.remove(main)
            keys.insert(0, main)
        picked = {k: float(scores[k]) for k in keys if _finite(scores.get(k))}
        if picked:
            return split, picked
    return "validation", {}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _hub_dataset(config: dict | None, task: str) -> tuple[str | None, str | None]:
    """(Hub dataset id, subset) of a task's training data read with ``format: hf``, else (None, None)."""
    try:
        train = config["tasks"][task]["data"]["train"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None, None
    if not isinstance(train, dict) or train.get("format") != "hf":
        return None, None
    path = train.get("path")
    if not isinstance(path, str) or not is_hub_id(path):  # a local dataset directory or script
        return None, None
    return path, clean_text(train.get("subset"))


def _pipeline_tag(kind: str, cfg: dict, family: str) -> str | None:
    if kind == "regression":
        return "sentence-similarity" if cfg.get("encoder") == "bi" else "text-classification"
    if kind == "text2text":
        return "text-generation" if family == "decoder_only" else "text2text-generation"
    return {"classification": "text-classification", "token_classification": "token-classification",
            "masked_lm": "fill-mask"}.get(kind)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _describe(kind: str, cfg: dict, state: dict) -> str:
    labels = state.get("labels") or cfg.get("labels") or []
    if kind == "classification":
        text = "sentence-pair classification" if state.get("pair_input") else "text classification"
        if cfg.get("multi_label"):
            text = "multi-label " + text
        return text + (f", {_count(len(labels), 'label')}" if labels else "")
    if kind == "token_classification":
        types = _unique(str(tag)[2:] for tag in labels if str(tag) != "O")
        return "token classification (BIO tags)" + (f", {_count(len(types), 'entity type')}" if types else "")
    if kind == "regression":
        if cfg.get("encoder") == "bi":
            text = "bi-encoder regression: cosine similarity of two sentence embeddings"
        else:
            text = "sentence-pair regression" if state.get("pair_input") else "text regression"
        span = cfg.get("label_range")
        if isinstance(span, list) and len(span) == 2 and all(_finite(v) for v in span):
            text += f", scores in [{span[0]:g}, {span[1]:g}]"
        return text
    if kind == "masked_lm":
        share = cfg.get("mask_probability")
        return "masked language modelling" + (f" ({share:.0%} of tokens masked)" if _finite(share) else "")
    if kind == "text2text":
        text = f"text-to-text over {_count(len(labels), 'label')}" if labels else "text-to-text generation"
        prefix = cfg.get("prefix")
        return text + (f', prefix "{prefix.strip()}"' if isinstance(prefix, str) and prefix.strip() else "")
    return kind


def training_summary(config: dict | None, results: dict | None = None) -> dict[str, Any]:
    """The brief training configuration of a card, from a run's ``config.yaml`` content.

    Keys (each only when the config states it): ``steps``, ``batch_size``, ``gradient_accumulation_steps``
    (above 1), ``learning_rate``, ``head_learning_rate``, ``adapter_learning_rate``, ``layer_lr_decay``,
    ``schedule``, ``sampling``, ``loss_weighting``, ``precision``, ``adapters``, ``frozen``, ``stages``,
    ``max_length``, ``seed``. With ``results``, ``steps`` is the number of steps trained, ``max_steps`` is
    added when training stopped early, ``best_step`` is the step whose weights were kept, and ``precision``
    is the one the run resolved (``auto`` becomes bf16 or fp32).

    Args:
        config: the content of ``config.yaml`` (None: nothing known).
        results: the content of ``results.json``, optional.

    Returns:
        An ordered mapping of setting -> value (numbers, or short strings such as ``temperature
        (temperature=2)``).
    """
    if not isinstance(config, dict):
        return {}
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    train_info = (results or {}).get("train") if isinstance((results or {}).get("train"), dict) else {}
    out: dict[str, Any] = {}
    max_steps = training.get("max_steps")
    steps = train_info.get("steps", max_steps)
    if steps is not None:
        out["steps"] = steps
    if train_info.get("steps") is not None and max_steps is not None and train_info["steps"] < max_steps:
        out["max_steps"] = max_steps
    if train_info.get("best_step") is not None:
        out["best_step"] = train_info["best_step"]
    out["batch_size"] = training.get("batch_size")
    if (training.get("gradient_accumulation_steps") or 1) > 1:
        out["gradient_accumulation_steps"] = training["gradient_accumulation_steps"]
    out["learning_rate"] = training.get("learning_rate")
    out["head_learning_rate"] = training.get("head_learning_rate")
    adapters = config.get("adapters") if isinstance(config.get("adapters"), dict) else None
    if adapters:
        out["adapter_learning_rate"] = adapters.get("learning_rate")
    out["layer_lr_decay"] = training.get("layer_lr_decay")
    out["schedule"] = _schedule(training)
    out["sampling"] = _strategy(config.get("sampling"))
    out["loss_weighting"] = _strategy(config.get("loss_weighting"))
    out["precision"] = train_info.get("precision") or training.get("precision")
    if adapters and adapters.get("method"):
        settings = {k: v for k, v in adapters.items()
                    if k not in ("method", "arrangement", "learning_rate") and v is not None
                    and not k.startswith("fusion_")}
        detail = [str(adapters.get("arrangement") or "per_task")]
        detail += [f"{k}={_param(v)}" for k, v in settings.items()]
        out["adapters"] = f"{adapters['method']} ({', '.join(detail)})"
    out["frozen"] = _frozen(config.get("freeze"))
    stages = config.get("stages")
    if isinstance(stages, list) and stages:
        out["stages"] = " -> ".join(str(s.get("name") or "+".join(s.get("tasks") or [])) for s in stages
                                    if isinstance(s, dict))
    out["max_length"] = training.get("max_length")
    out["seed"] = config.get("seed")
    return {k: v for k, v in out.items() if v is not None and v != ""}


def _strategy(section: Any) -> str | None:
    if isinstance(section, str):
        return section
    if not isinstance(section, dict) or not section.get("strategy"):
        return None
    params = [f"{k}={_param(v)}" for k, v in section.items() if k != "strategy" and v is not None]
    return str(section["strategy"]) + (f" ({', '.join(params)})" if params else "")


def _param(value: Any) -> str:
    """A setting's value inside parentheses: lists and mappings bracketed, so their commas stay readable."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_param(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_param(v) for v in value) + "]"
    return _format_setting(value)


def _schedule(training: dict) -> str | None:
    scheduler = training.get("scheduler")
    if not scheduler:
        return None
    if training.get("warmup_steps"):
        return f"{scheduler}, {training['warmup_steps']} warmup steps"
    if training.get("warmup_ratio"):
        return f"{scheduler}, warmup {training['warmup_ratio'] * 100:g}% of the steps"
    return str(scheduler)


def _frozen(freeze: Any) -> str | None:
    if isinstance(freeze, str):
        return None if freeze == "none" else freeze
    if not isinstance(freeze, dict):
        return None
    parts = []
    if freeze.get("backbone"):
        parts.append("backbone")
    if freeze.get("embeddings"):
        parts.append("embeddings")
    layers = freeze.get("layers")
    if isinstance(layers, list) and len(layers) == 2:
        parts.append(f"layers {layers[0]}-{layers[1]}")
    if freeze.get("heads"):
        parts.append("heads of " + ", ".join(map(str, freeze["heads"])))
    return ", ".join(parts) or None
