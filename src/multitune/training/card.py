"""The model card of a run's model (``RUN/model/README.md``), with code that loads it
(:mod:`multitune.cards` renders it; :mod:`multitune.export.usage` writes the cards of exports)."""

from __future__ import annotations

from pathlib import Path

from multitune.cards import ModelCard, base_model_info, task_cards, training_summary, write_card

EXAMPLE = "A wonderful film ."
EXAMPLE_PAIR = ("A man is playing a guitar .", "Someone plays an instrument .")


def example_call(meta: dict, task: str) -> str:
    """The argument of ``model.predict(task, ...)`` in a card's example code."""
    entry = meta["tasks"][task]
    kind = entry["config"]["type"]
    if entry.get("state", {}).get("pair_input"):
        return f"[{EXAMPLE_PAIR!r}]"
    if kind == "text2text":
        return '["Das Buch ist sehr interessant."]'
    return f"[{EXAMPLE!r}]"


def run_model_card(directory: Path, final: Path, meta: dict, results: dict | None, config: dict | None) -> Path:
    """Write the model card of a run's model directory (``RUN/model``).

    Args:
        directory: where to write (the temporary directory before its rename).
        final: the model directory's final path (named in the card's code).
        meta: its ``multitune.json`` content.
        results: the run's ``results.json`` content (metrics), when known.
        config: the run's config as a dict, when known.

    Returns:
        The card's path.
    """
    hub_id, license_ = base_model_info(meta.get("backbone_source"))
    tasks = task_cards(meta, results, config)
    final = str(Path(final).resolve())
    usage = [("multitune", "import multitune\n\n"
              f"model = multitune.load({final!r})\n"
              + "".join(f"print(model.predict({t!r}, {example_call(meta, t)}))\n"
                        for t in meta["tasks"] if meta["tasks"][t]["config"]["type"] != "masked_lm"))]
    if (Path(directory) / "modules.json").is_file():
        usage.append(("sentence-transformers (the shared sentence embeddings)",
                      "from sentence_transformers import SentenceTransformer\n\n"
                      f"encoder = SentenceTransformer({final!r})\n"
                      f"print(encoder.encode([{EXAMPLE!r}]).shape)\n"))
    card = ModelCard(
        title=f"multitune model: {', '.join(meta['tasks'])}",
        summary=(f"One {meta.get('backbone_type', 'encoder')} backbone shared by {len(meta['tasks'])} task(s), "
                 "trained with multitune. This directory is multitune's own format (the backbone in `backbone/`, "
                 "the task heads in `heads.safetensors`); `multitune export RUN --task NAME` writes one task as a "
                 "model that transformers, PEFT and sentence-transformers load."),
        library_name="multitune", base_model=hub_id, license=license_,
        pipeline_tag=tasks[0].pipeline_tag if len(tasks) == 1 else None,
        tags=["multitune", "multi-task"], datasets=sorted({t.dataset for t in tasks if t.dataset}),
        tasks=tasks, usage=usage, training=training_summary(config, results),
        notes=["Stock transformers task classes refuse this directory (it has no top-level config.json), so none "
               "can load it with a newly initialised head."])
    return write_card(directory, card)
