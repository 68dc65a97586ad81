"""The model cards of what multitune writes: the run's model and each export, with code that loads them in
each client (:mod:`multitune.cards` renders them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from multitune.cards import ModelCard, base_model_info, task_cards, training_summary, write_card
from multitune.tasks.regression import bi_encoder_score
from multitune.training.card import EXAMPLE, EXAMPLE_PAIR, example_call


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def run_files(run: Path) -> tuple[dict | None, dict | None]:
    results = _read(run / "results.json")
    config = None
    if (run / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            config = None
    return results if isinstance(results, dict) else None, config if isinstance(config, dict) else None


def export_card(directory: Path, final: Path, run: Path, task: str, meta: dict, report: dict) -> Path:
    """Write the model card of an exported task (``multitune export``), with code for every client that loads
    it exactly.

    Args:
        directory: where to write (the temporary directory before its rename).
        final: the export's final path (named in the card's code).
        run: the run directory it was exported from.
        task: the task.
        meta: the exported model's ``multitune.json`` content.
        report: :func:`multitune.export.hf.write_task_model`'s report.

    Returns:
        The card's path.
    """
    results, config = run_files(run)
    hub_id, license_ = base_model_info(meta.get("backbone_source"))
    tasks = [t for t in task_cards(meta, _task_results(results, task, report), config) if t.name == task]
    usage, notes = _usage(str(Path(final).resolve()), task, meta, report)
    kind = report["kind"]
    card = ModelCard(
        title=f"{task} ({meta['tasks'][task]['config']['type']})",
        summary=(f"Task `{task}` exported by multitune from a multi-task run "
                 f"({report.get('source', 'final')} weights, step {report.get('step')}): a standard "
                 f"{report['model_class']} that predicts exactly what `multitune predict` predicts."),
        library_name="sentence-transformers" if kind == "sentence_embedding" else "transformers",
        base_model=hub_id, license=license_, pipeline_tag=report["pipeline_tag"],
        tags=["multitune", kind.replace("_", "-")] + (["custom_code"] if report["trust_remote_code"] else []),
        datasets=sorted({t.dataset for t in tasks if t.dataset}), tasks=tasks, usage=usage,
        training=training_summary(config, results), notes=notes)
    return write_card(directory, card)


def _task_results(results: dict | None, task: str, report: dict) -> dict | None:
    """The run's results, with the task's metrics at the exported step when they are known (per-task best)."""
    if results is None or not report.get("metrics"):
        return results
    validation = {**(results.get("validation") or {}), task: report["metrics"]}
    return {**results, "validation": validation, "test": {k: v for k, v in (results.get("test") or {}).items()
                                                          if k != task}}


def _usage(path: str, task: str, meta: dict, report: dict) -> tuple[list[tuple[str, str]], list[str]]:
    entry = meta["tasks"][task]
    cfg, state = entry["config"], entry.get("state", {})
    kind = report["kind"]
    remote = ", trust_remote_code=True" if report["trust_remote_code"] else ""
    usage, notes = [], []
    if report["trust_remote_code"]:
        notes.append("The head (pooling as trained) has no stock transformers class: this directory carries its "
                     "model code in `modeling_multitune.py` (registered in `config.json`), so loading needs "
                     "`trust_remote_code=True`; without it transformers refuses the directory.")
    if kind == "sequence_classification" and cfg.get("type") == "regression":
        low, high = cfg.get("label_range") or (None, None)
        pair = "[{'text': 'A man is playing a guitar .', 'text_pair': 'Someone plays an instrument .'}]"
        if low is not None:
            usage.append(("transformers pipeline", "import math\n\nfrom transformers import pipeline\n\n"
                          f"scorer = pipeline('text-classification', model={path!r}{remote})\n"
                          f"logit = scorer({pair}, truncation=True)[0]['score']\n"
                          f"print({low} + ({high} - {low}) / (1 + math.exp(-logit)))\n"))
            usage.append(("sentence-transformers CrossEncoder", "from sentence_transformers import CrossEncoder\n\n"
                          f"cross = CrossEncoder({path!r}{remote})\n"
                          f"print({low} + ({high} - {low}) * cross.predict([{EXAMPLE_PAIR!r}])[0])\n"))
            notes.append(f"The model outputs a logit; the score on the data's scale is {low} + ({high} - {low}) * "
                         "sigmoid(logit) (`multitune_label_range` in `config.json`). CrossEncoder applies the "
                         "sigmoid itself.")
        else:
            usage.append(("transformers pipeline", "from transformers import pipeline\n\n"
                          f"scorer = pipeline('text-classification', model={path!r}{remote})\n"
                          f"print(scorer({pair}, truncation=True)[0]['score'])\n"))
    elif kind == "sequence_classification":
        call = (f"[{{'text': {EXAMPLE_PAIR[0]!r}, 'text_pair': {EXAMPLE_PAIR[1]!r}}}]" if state.get("pair_input")
                else f"[{EXAMPLE!r}]")
        usage.append(("transformers pipeline", "from transformers import pipeline\n\n"
                      f"classifier = pipeline('text-classification', model={path!r}{remote})\n"
                      f"print(classifier({call}, truncation=True, top_k=None))\n"))
        if state.get("thresholds"):
            notes.append(f"multitune tuned the decision threshold(s) on validation: {state['thresholds']} "
                         "(`multitune_thresholds` in `config.json`); the pipeline reports the scores, apply the "
                         "threshold to them to get multitune's labels.")
        if cfg.get("multi_label"):
            notes.append(f"Multi-label: a label applies when its sigmoid score is at least {cfg.get('threshold', 0.5)}.")
    elif kind == "token_classification":
        usage.append(("transformers pipeline", "from transformers import pipeline\n\n"
                      f"tagger = pipeline('token-classification', model={path!r}{remote}, "
                      "aggregation_strategy='first')\n"
                      "print(tagger('Maria flew from Lisbon to Oslo .'))\n"))
        notes.append("multitune reads each word's tag on its first sub-token: `aggregation_strategy='first'` "
                     "reproduces its entity spans (other strategies can split or merge them).")
    elif kind == "masked_lm":
        usage.append(("transformers pipeline", "from transformers import pipeline\n\n"
                      f"fill = pipeline('fill-mask', model={path!r})\n"
                      "print(fill(f'The film was {fill.tokenizer.mask_token} .'))\n"))
    elif kind == "generation":
        params = report.get("task_specific_params", {})
        prefix = params.get("prefix", "")
        if report["pipeline_tag"] == "text-generation":
            usage.append(("transformers", "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                          f"tokenizer = AutoTokenizer.from_pretrained({path!r})\n"
                          f"model = AutoModelForCausalLM.from_pretrained({path!r})\n"
                          f"prompt = {prefix!r} + 'Das Buch ist sehr interessant.'\n"
                          "inputs = tokenizer.apply_chat_template([{'role': 'user', 'content': prompt}], "
                          "add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
                          "inputs.pop('token_type_ids', None)\n"
                          "out = model.generate(**inputs)\n"
                          "print(tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))\n"))
        else:
            usage.append(("transformers", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n\n"
                          f"tokenizer = AutoTokenizer.from_pretrained({path!r})\n"
                          f"model = AutoModelForSeq2SeqLM.from_pretrained({path!r})\n"
                          f"inputs = tokenizer({prefix!r} + 'Das Buch ist sehr interessant.', return_tensors='pt', "
                          "truncation=True, return_token_type_ids=False)\n"
                          "print(tokenizer.decode(model.generate(**inputs)[0], skip_special_tokens=True))\n"))
        notes.append(f"Inputs start with the task prefix {prefix!r} (`task_specific_params` in `config.json`); the "
                     "generation settings multitune decoded with are in `generation_config.json`.")
        if params.get("decode") == "score_labels":
            how = "mean" if params.get("score_normalization") == "mean" else "sum"
            notes.append(f"multitune predicts this task by scoring its labels {params.get('labels')} "
                         "(`decode: score_labels` in `task_specific_params`), not by generating: for each label, "
                         f"the {how} of the log-probabilities of its tokens (the label's text, then the end token "
                         "the model generates last) as the continuation of the prompt; the prediction is the "
                         "label with the highest value, and a softmax of the values over the labels gives its "
                         "scores.")
    if kind in ("sequence_classification", "token_classification", "masked_lm", "sentence_embedding") \
            and meta.get("backbone_type") == "encoder":
        code = ("from sentence_transformers import SentenceTransformer\n\n"
                f"encoder = SentenceTransformer({path!r}{remote})\n")
        if kind == "sentence_embedding":
            low, high = cfg.get("label_range") or (0, 1)
            score = bi_encoder_score(state)
            code += (f"a, b = encoder.encode([{EXAMPLE_PAIR[0]!r}, {EXAMPLE_PAIR[1]!r}], convert_to_tensor=True)\n"
                     "cosine = float((a @ b) / (a.norm() * b.norm()))\n"
                     f"print({low} + ({high} - {low}) * {score})\n")
            notes.append(f"The similarity score is {low} + ({high} - {low}) * {score}, from the cosine of the two "
                         "sentence embeddings (`multitune_score` in `config.json`).")
        else:
            code += f"print(encoder.encode([{EXAMPLE!r}]).shape)\n"
        usage.append(("sentence-transformers (sentence embeddings)", code))
    usage.append(("multitune", "import multitune\n\n"
                  f"model = multitune.load({path!r})\n"
                  + (f"print(model.predict({task!r}, {example_call(meta, task)}))\n"
                     if cfg.get("type") != "masked_lm" else "print(list(model.tasks))\n")))
    return usage, notes
