"""Text-to-text: text in, text out, told apart from other tasks by a prefix (the T5 recipe), on an
encoder-decoder or a decoder-only backbone."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sacrebleu
import torch
from torch import nn

from multitune.config.parse import field
from multitune.config.schema import TaskConfig
from multitune.errors import ConfigError
from multitune.tasks import metrics as task_metrics
from multitune.tasks.base import IGNORE_INDEX, TASKS, ExportSpec, Task, TaskOutput

# targets with at most this many distinct values, each seen ~10 times on average, form a label set
MAX_INFERRED_LABELS = 32
DECODE_MODES = ["generate", "score_labels"]
# what ``tasks.<name>.metric`` may name: free-text answers, and answers from a label set
FREE_TEXT_METRICS = ("bleu", "chrf", "exact_match")
LABEL_SET_METRICS = ("accuracy", "macro_f1", "exact_match")
# metrics on sacrebleu's 0-100 scale (the `mean` selection metric averages tasks on a 0-1 scale)
PERCENT_METRICS = ("bleu", "chrf")


@dataclass
class GenerationSettings:
    num_beams: int = field(1, help="beam search width (1: greedy)", min=1)
    max_new_tokens: int = field(32, help="most tokens generated per example", min=1)
    no_repeat_ngram_size: int = field(0, help="forbid repeating n-grams of this size (0: off)", min=0)
    length_penalty: float = field(1.0, help="beam search: >1 favours longer outputs, <1 shorter")


@dataclass
class Text2TextConfig(TaskConfig):
    prefix: str = field("", help="prepended to every source, e.g. 'translate German to English: '")
    max_target_length: int = field(64, help="target tokens kept for training (longer targets are cut)", min=1)
    generation: GenerationSettings = field(help="how evaluation and predict generate", factory=GenerationSettings)
    chat_template: bool = field(True, help="decoder_only: wrap the prompt in the tokenizer's chat template when "
                                           "it has one")
    label_smoothing: float = field(0.0, help="label smoothing of the token loss", min=0.0, max=0.5)
    lowercase_metrics: bool | None = field(None, help="compare lowercased text in bleu/chrf/exact_match "
                                                      "(default: when the tokenizer lowercases, e.g. uncased BERT)")
    decode: str = field("generate", help="how evaluation and predict answer: generate (free text) or "
                                         "score_labels (the label whose text is most likely after the prompt; "
                                         "needs a label set)", choices=DECODE_MODES)
    score_normalization: str = field("sum", help="score_labels: rank labels by the sum of their tokens' "
                                                 "log-probabilities, or by the mean (no bias towards short labels)",
                                     choices=["sum", "mean"])
    metric: str | None = field(None, help="the task's main metric (what early stopping's 'mean' averages and "
                                          "per-task model selection maximises): bleu, chrf or exact_match for free "
                                          "text; accuracy, macro_f1 or exact_match with a label set (default: "
                                          "accuracy with a label set, else bleu; chat: chrf)",
                               choices=list(dict.fromkeys(FREE_TEXT_METRICS + LABEL_SET_METRICS)))

    def validate(self, path: str) -> None:
        if self.decode != "score_labels" and self.score_normalization != "sum":
            raise ConfigError(f"{path}.score_normalization", "only applies with decode: score_labels")


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


@TASKS.register("text2text")
class Text2TextTask(Task):
    """Teacher-forced LM loss on the target tokens only; evaluation generates and scores the text.

    Metrics: ``exact_match`` always; ``bleu`` and ``chrf`` (sacrebleu, corpus level) for free text; and when
    the targets form a fixed label set (``labels``, or at most 32 distinct train targets), ``accuracy``,
    ``macro_f1`` and ``invalid`` (share of outputs outside the label set), so that sentiment-as-text is
    scored like a classifier. Main metric: the config's ``metric``, else ``accuracy`` with a label set, else
    ``bleu``.

    With ``decode: score_labels`` the task does not generate: it scores every label's text as the continuation
    of the prompt (:meth:`BackboneArchitecture.label_log_likelihoods`) and predicts the most likely label, with
    the label probabilities (a softmax over the label set of the summed, or mean, token log-likelihoods).
    """

    reads_token_states = False
    packable = True  # its training batches are the backbone family's (text2text_collate / text2text_loss)

    config_class = Text2TextConfig
    fields = ("source", "target")
    required = ("source", "target")
    main_metric = "bleu"
    outputs_word_embeddings = True  # T5, BART and most decoder LMs tie their LM head to the input embeddings
    alternative_main_metrics = ("accuracy",)

    def __init__(self, name: str, config: Text2TextConfig):
        super().__init__(name, config)
        self.labels: list[str] = list(config.labels) if config.labels else []
        self.lowercase = bool(config.lowercase_metrics)
        self._label_tokens: tuple[tuple[str, ...], list[list[int]]] | None = None
        self.main_metric = self.chosen_main_metric()

    def chosen_main_metric(self) -> str:
        """The config's ``metric``, else ``accuracy`` with a label set, else the type's free-text metric."""
        if self.config.metric is not None:
            return self.config.metric
        return "accuracy" if self.labels else type(self).main_metric

    def bind(self, architecture, tokenizer) -> None:
        super().bind(architecture, tokenizer)
        if not architecture.generative:
            raise ConfigError(f"tasks.{self.name}.type", f"text2text needs a generative backbone "
                                                         f"(backbone.type encoder_decoder or decoder_only), "
                                                         f"not {architecture.type_name}")
        if self.config.lowercase_metrics is None:
            ids = tokenizer("Word", add_special_tokens=False)["input_ids"]
            self.lowercase = ids == tokenizer("word", add_special_tokens=False)["input_ids"]

    def setup(self, train_examples: Sequence[dict]) -> None:
        if not self.labels:
            counts = Counter(str(ex["target"]).strip() for ex in train_examples)
            if len(counts) <= MAX_INFERRED_LABELS and len(train_examples) >= 10 * len(counts):
                self.labels = sorted(counts)
        allowed = LABEL_SET_METRICS if self.labels else FREE_TEXT_METRICS
        if self.config.metric is not None and self.config.metric not in allowed:
            kind = (f"a task with a label set ({len(self.labels)} labels)" if self.labels
                    else "a free-text task (no label set)")
            raise ConfigError(f"tasks.{self.name}.metric", f"{self.config.metric} is not reported by {kind}; "
                                                           f"expected one of {', '.join(allowed)}")
        self.main_metric = self.chosen_main_metric()
        if self.config.decode == "score_labels" and not self.labels:
            raise ConfigError(f"tasks.{self.name}.decode", f"score_labels scores the texts of a label set, and this "
                                                          f"task has none: give tasks.{self.name}.labels (targets "
                                                          f"with at most {MAX_INFERRED_LABELS} distinct values, "
                                                          f"each seen about 10 times, are one too) or decode: generate")

    # -- data ------------------------------------------------------------------------
    def example_from_input(self, item: Any) -> dict:
        if isinstance(item, dict):
            return {"source": item["text"]} if "source" not in item and "text" in item else dict(item)
        return {"source": str(item)}

    def encode(self, examples: Sequence[dict], tokenizer: Any, max_length: int) -> list[dict]:
        arch = self.architecture
        return [arch.text2text_features(tokenizer, self.config.prefix + str(ex["source"]),
                                        None if ex.get("target") is None else str(ex["target"]).strip(),
                                        max_length, self.config.max_target_length, self.config.chat_template)
                for ex in examples]

    def collate(self, features, pad_token_id, generator=None):
        return self.architecture.text2text_collate(features)

    # -- model -----------------------------------------------------------------------
    def build_head(self, hidden_size: int) -> nn.Module:
        return nn.Identity()  # the backbone's own LM head does the work

    def forward(self, model, head, batch) -> TaskOutput:
        loss = None
        if "labels" in batch:
            loss = self.architecture.text2text_loss(model.backbone, batch, self.config.label_smoothing)
        return TaskOutput(loss, {})

    def infer(self, model, head, batch) -> TaskOutput:
        if self.config.decode == "score_labels":
            tokens = self.label_tokens()
            scores = self.architecture.label_log_likelihoods(model.backbone, batch, tokens)
            if self.config.score_normalization == "mean":
                scores = scores / torch.tensor([len(t) for t in tokens], dtype=scores.dtype, device=scores.device)
            return TaskOutput(None, {"label_scores": scores})
        return TaskOutput(None, {"generated": self.generate(model, batch)})

    def generate(self, model, batch) -> torch.Tensor:
        """Generated token ids of a batch with the task's generation settings, whatever ``decode`` is (exports
        compare them with a stock client's); the caller routes the task's adapter."""
        g = self.config.generation
        return self.architecture.generate(model.backbone, batch, num_beams=g.num_beams,
                                          max_new_tokens=g.max_new_tokens, length_penalty=g.length_penalty,
                                          no_repeat_ngram_size=g.no_repeat_ngram_size)

    def label_features(self) -> list[dict]:
        """One training feature per label, in label order: the label as the target of an empty source."""
        return self.encode([{"source": "", "target": label} for label in self.labels], self.tokenizer, 8)

    def label_tokens(self) -> list[list[int]]:
        """The tokens each label is trained as (its text, then the end token), in label order: the label
        encoded as the target of an empty source, the prompt cut off (:meth:`BackboneArchitecture.target_tokens`).

        Raises:
            ConfigError: the task has no label set (``tasks.<name>.decode``).
        """
        if not self.labels:
            raise ConfigError(f"tasks.{self.name}.decode", "score_labels needs a label set; this task has none")
        key = tuple(self.labels)
        if self._label_tokens is None or self._label_tokens[0] != key:
            self._label_tokens = (key, [self.architecture.target_tokens(f) for f in self.label_features()])
        return self._label_tokens[1]

    # -- results ---------------------------------------------------------------------
    def length_strata(self, features: Sequence[dict]) -> list[int] | None:
        """With a label set (labels as text): each feature's target, so that length-grouped batches keep the
        label mix; free text: length alone."""
        if not self.labels or not features or "labels" not in features[0]:
            return None
        ids: dict[tuple, int] = {}
        return [ids.setdefault(tuple(t for t in f["labels"] if t != IGNORE_INDEX), len(ids)) for f in features]

    def decode(self, output, batch, examples) -> list[dict]:
        if "label_scores" in output.outputs:
            probs = output.outputs["label_scores"].double().softmax(-1).cpu().tolist()
            preds = []
            for row in probs:
                label = self.labels[max(range(len(row)), key=row.__getitem__)]  # ties: the first label
                preds.append({"label": label, "text": label,
                              "scores": {lab: round(p, 6) for lab, p in zip(self.labels, row)}})
            return preds
        texts = self.tokenizer.batch_decode(output.outputs["generated"], skip_special_tokens=True)
        preds = []
        for text in texts:
            text = " ".join(text.split())
            pred: dict[str, Any] = {"text": text}
            if self.labels:
                match = [lab for lab in self.labels if _norm(lab) == _norm(text)]
                pred["label"] = match[0] if match else None
            preds.append(pred)
        return preds

    def compute_metrics(self, predictions, examples) -> dict[str, float]:
        hyps = [p["text"] for p in predictions]
        refs = [" ".join(str(ex["target"]).split()) for ex in examples]
        norm = _norm if self.lowercase else (lambda s: " ".join(s.split()))
        metrics = {"exact_match": sum(norm(h) == norm(r) for h, r in zip(hyps, refs)) / max(len(refs), 1)}
        if self.labels:
            index = {_norm(lab): i for i, lab in enumerate(self.labels)}
            gold = [index.get(_norm(r), -1) for r in refs]
            pred = [index.get(_norm(h), -1) for h in hyps]  # -1: not a label, always wrong
            metrics["accuracy"] = sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1)
            metrics["macro_f1"] = task_metrics.macro_f1(gold, pred, len(self.labels))
            metrics["invalid"] = sum(p == -1 for p in pred) / max(len(pred), 1)
        else:
            metrics["bleu"] = sacrebleu.corpus_bleu(hyps, [refs], lowercase=self.lowercase).score
            metrics["chrf"] = sacrebleu.corpus_chrf([h.lower() for h in hyps] if self.lowercase else hyps,
                                                    [[r.lower() for r in refs] if self.lowercase else refs]).score
        return metrics

    def selection_score(self, metrics: dict[str, float]) -> float:
        value = metrics[self.main_metric]
        return value / 100.0 if self.main_metric in PERCENT_METRICS else value

    def export_spec(self) -> ExportSpec:
        """The backbone itself (``AutoModelForSeq2SeqLM`` / ``AutoModelForCausalLM``) with this task's generation
        settings; the prefix is in ``task_specific_params`` under the task's name."""
        g = self.config.generation
        settings = {"num_beams": g.num_beams, "max_new_tokens": g.max_new_tokens,
                    "no_repeat_ngram_size": g.no_repeat_ngram_size, "length_penalty": g.length_penalty}
        tag = "text-generation" if self.architecture is not None and self.architecture.causal \
            else "text2text-generation"
        params = {"prefix": self.config.prefix, **settings, "chat_template": self.config.chat_template,
                  "decode": self.config.decode}
        if self.config.decode == "score_labels":
            params["score_normalization"] = self.config.score_normalization
        if self.labels:
            params["labels"] = list(self.labels)
        return ExportSpec("generation", tag, {"task_specific_params": {self.name: params}})

    def state(self) -> dict:
        return {"labels": self.labels, "lowercase": self.lowercase}

    def load_state(self, state: dict) -> None:
        self.labels = list(state.get("labels") or [])
        self.lowercase = bool(state.get("lowercase", False))
        self.main_metric = self.chosen_main_metric()
