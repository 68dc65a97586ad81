"""The task extension point: how a task encodes examples, its head, loss, decoding and metrics.

A task type is one module that subclasses :class:`Task`, declares its config dataclass and
registers itself: ``@TASKS.register("classification")``. Core code never branches on a type name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from multitune.backbones.architectures import BackboneArchitecture
from multitune.backbones.checks import PROBE_TEXTS as PROBE_TEXTS  # the task types' export probes
from multitune.config.schema import TaskConfig
from multitune.errors import ConfigError, DataError, InputError, MultituneError
from multitune.registry import Registry

TASKS: Registry[type[Task]] = Registry("task type")

IGNORE_INDEX = -100

TEXT, PAIR = "text", "pair"


def input_parts(item: Any, where: str) -> tuple[str, str | None]:
    """``(text, text_pair)`` of a prediction input: a string, a 2-sequence of strings or a mapping with ``text``
    (and optionally ``text_pair``).

    Raises:
        InputError: naming ``where``: another type, a text that is not a string, or an empty text.
    """
    if isinstance(item, str):
        text, pair = item, None
    elif isinstance(item, Mapping) and isinstance(item.get("text"), str):
        text, pair = item["text"], item.get("text_pair")
    elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        text, pair = item
    else:
        raise InputError(f"{where}: expected a text, a (text, text_pair) pair or {{'text': ..., 'text_pair': ...}}, "
                         f"got {type(item).__name__}")
    if pair is not None and not isinstance(pair, str):
        raise InputError(f"{where}.text_pair: expected a text, got {type(pair).__name__}")
    if not text.strip():
        raise InputError(f"{where}.text: is empty")
    if pair is not None and not pair.strip():
        raise InputError(f"{where}.text_pair: is empty")
    return text, pair


def form_mismatch(name: str, pair_input: bool, pair: bool) -> str | None:
    """Why an input (a pair when ``pair``) does not fit task ``name`` (None when it does): a task trained on pairs
    (``pair_input``) takes pairs only, every other task single texts only."""
    if bool(pair_input) == pair:
        return None
    if pair_input:
        return f"task {name!r} takes a text pair {{text, text_pair}}, got one text"
    return f"task {name!r} takes a single text, got a pair"


def prediction_examples(name: str, task: Task, inputs: Sequence[Any]) -> list[dict]:
    """The task's examples for raw prediction inputs, each checked as the server checks it: a non-empty text,
    or a pair for a task trained on pairs. A mapping without ``text`` (e.g. ``{"tokens": [...]}``, a
    text-to-text ``{"source": ...}``) is a ready example and passes as it is. A task whose ``text_inputs`` is
    False (chat: a list of messages) checks its inputs itself, in :meth:`Task.example_from_input`.

    Raises:
        InputError: naming ``inputs[i]``.
    """
    examples = []
    for i, item in enumerate(inputs):
        if not task.text_inputs:
            try:
                examples.append(task.example_from_input(item))
            except InputError as exc:
                raise InputError(f"inputs[{i}]: {exc}") from None
            continue
        if not (isinstance(item, Mapping) and "text" not in item):
            _, pair = input_parts(item, f"inputs[{i}]")
            problem = form_mismatch(name, task.pair_input, pair is not None)
            if problem:
                raise InputError(f"inputs[{i}]: {problem}")
        examples.append(task.example_from_input(item))
    return examples


@dataclass
class TaskOutput:
    """What a task's forward pass returns: the mean loss of the batch and whatever decode needs."""

    loss: torch.Tensor | None
    outputs: dict[str, torch.Tensor]


#: the inputs of one ``model.encode`` call: ``(input_ids, attention_mask, token_type_ids or None)``, right-padded
EncoderCall = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]



class TaskModel(Protocol):
    """What a task uses of the model it runs in (:class:`multitune.model.MultiTaskModel`, or a stand-in for it
    in mixed-task and ONNX inference): the backbone, its token states and the sentence embeddings made from
    them. Tasks depend on this interface, never on the model class.

    Attributes:
        backbone: the transformers model (generative tasks drive it themselves).
    """

    backbone: nn.Module

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token states [batch, tokens, hidden] (the encoder's on an encoder-decoder)."""
        ...

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings [batch, hidden] pooled from token states as the model is configured."""
        ...

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings: pooled token states, L2-normalised when the model is configured so."""
        ...

    def input_embedding_weight(self) -> torch.Tensor:
        """The backbone's input embedding matrix [vocabulary, hidden] (tied output layers)."""
        ...


@dataclass
class ExportSpec:
    """How a task leaves multitune as a stock transformers model (see :mod:`multitune.export`).

    Attributes:
        kind: what the exported model is: ``sequence_classification``, ``token_classification``,
            ``masked_lm`` (a head on token states, exported through the matching Auto class), ``generation``
            (the backbone itself generates), ``sentence_embedding`` (the backbone and its pooling).
        pipeline_tag: the Hub pipeline tag (``text-classification``, ``token-classification``, ...).
        config: entries for the exported ``config.json`` (``num_labels``, ``id2label``, ``label2id``,
            ``problem_type``, ``task_specific_params``, ...).
        probes: prediction inputs on which the export is checked against the task.
        logits: ``(model, head, batch) -> tensor``: what the exported model must return as ``logits`` for the
            batch (None for ``generation`` and ``sentence_embedding``).
    """

    kind: str
    pipeline_tag: str
    config: dict = field(default_factory=dict)
    probes: list = field(default_factory=list)
    logits: Callable[[TaskModel, nn.Module, dict], torch.Tensor] | None = None


#: label counts up to which confusion matrices are dense lists; above, rows are :class:`CountRow`
DENSE_CONFUSION_LABELS = 1000


class CountRow:
    """One gold label's row of a sparse confusion matrix: reads as a sequence of ``n`` counts (0 where nothing
    was predicted) and stores only the non-zero cells."""

    __slots__ = ("cells", "n")

    def __init__(self, n: int):
        self.n, self.cells = n, {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        if not -self.n <= index < self.n:
            raise IndexError(index)
        return self.cells.get(index % self.n, 0)

    def __setitem__(self, index: int, value: int) -> None:
        self.cells[index % self.n] = value

    def __iter__(self):
        return (self.cells.get(i, 0) for i in range(self.n))

    def total(self) -> int:
        """The row's sum without reading its zeros."""
        return sum(self.cells.values())


class Task(ABC):
    """One task of a multi-task run.

    Class attributes:
        config_class: the task type's config dataclass (extends :class:`TaskConfig`).
        fields: canonical example fields the task reads; ``required``: those that must be present.
        stratify_key: example field used to stratify automatic splits (None: no stratification).
        main_metric: the metric that represents the task (early stopping ``mean``, tables).
        alternative_main_metrics: metrics that represent the task when ``main_metric`` is not among its
            results (a text-to-text task over a label set reports accuracy, not BLEU).
        lower_is_better: the task's metrics for which lower is better; the one place that decides the
            direction of a metric (selection, early stopping, comparisons).
        reads_token_states: inference only reads backbone token states through ``model.encode`` /
            ``model.embed`` (so rows of several such tasks can share one backbone pass); False for tasks
            that drive the backbone themselves (generation).
        pair_input: prediction inputs are text pairs (``text`` + ``text_pair``); tasks that read pairs set it
            in :meth:`setup` from their training data and keep it in :meth:`state`.
        outputs_word_embeddings: the task's output layer is the backbone's word-embedding matrix (a masked or
            causal LM head tied to it), so that matrix must train with the task.
        label_field: the example field holding the task's label names (``label``, ``tags``), whose order a
            dataset's ``ClassLabel`` gives when the config names no labels; None for tasks without a label set.
        text_inputs: prediction inputs are texts, pairs or ready example mappings, which
            :func:`prediction_examples` checks; False for tasks that check their own (chat: message lists).
        packable: the task's training batches are the backbone family's text-to-text batches, which
            ``training.packing`` may pack several examples to a row where the family ``packs``.
    """

    config_class: type[TaskConfig] = TaskConfig
    fields: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    stratify_key: str | None = None
    main_metric: str = ""
    alternative_main_metrics: tuple[str, ...] = ()
    lower_is_better: frozenset[str] = frozenset({"loss"})
    reads_token_states: bool = True
    pair_input: bool = False
    outputs_word_embeddings: bool = False
    label_field: str | None = None
    text_inputs: bool = True
    packable: bool = False

    def __init__(self, name: str, config: TaskConfig):
        self.name = name
        self.config = config
        self.architecture: BackboneArchitecture | None = None
        self.tokenizer: Any = None

    def bind(self, architecture: BackboneArchitecture, tokenizer: Any) -> None:
        """Learn which backbone family and tokenizer the task runs on (called before :meth:`encode`).

        Raises:
            ConfigError: the task cannot run on this backbone (e.g. text-to-text on an encoder).
        """
        self.architecture = architecture
        self.tokenizer = tokenizer

    # -- data -------------------------------------------------------------------------
    def setup(self, train_examples: Sequence[dict]) -> None:  # noqa: B027 - optional hook
        """Fix what the task learns from its training data (e.g. the label set). Default: nothing."""

    def check_examples(self, examples: Sequence[dict]) -> None:  # noqa: B027 - optional hook
        """Raise :class:`DataError` (file:line) for an example the task cannot use. Default: accept."""

    @abstractmethod
    def encode(self, examples: Sequence[dict], tokenizer: Any, max_length: int) -> list[dict]:
        """Tokenise examples once; returns one feature dict (lists of ints/floats) per example."""

    @abstractmethod
    def collate(self, features: Sequence[dict], pad_token_id: int, generator: torch.Generator | None = None
                ) -> dict[str, torch.Tensor]:
        """Pad a list of features into one batch of tensors (dynamic padding to the longest row)."""

    def training_features(self, features: list[dict]) -> list[dict]:
        """The features training batches are drawn from (default: all of :meth:`encode`'s output); a task drops
        here what only prediction and evaluation need, so that training never pads or counts it."""
        return features

    def example_from_input(self, item: Any) -> dict:
        """Turn a raw prediction input (a string, a pair, a dict) into an example."""
        if isinstance(item, dict):
            return dict(item)
        if isinstance(item, (list, tuple)) and len(item) == 2:
            return {"text": item[0], "text_pair": item[1]}
        return {"text": str(item)}

    # -- model ------------------------------------------------------------------------
    @abstractmethod
    def build_head(self, hidden_size: int) -> nn.Module:
        """The task's own parameters on top of the shared backbone."""

    @abstractmethod
    def forward(self, model: TaskModel, head: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """Run backbone + head on a batch; ``loss`` is set when the batch has labels."""

    def infer(self, model: TaskModel, head: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """The forward pass used for evaluation and prediction (default: :meth:`forward`; generative tasks
        generate here)."""
        return self.forward(model, head, batch)

    def encoder_inputs(self, batch: dict[str, torch.Tensor]) -> list[EncoderCall] | None:
        """The backbone inputs that :meth:`forward` encodes for ``batch``, one per ``model.encode`` call it makes
        (``model.embed`` makes one), in call order; a training step whose tasks all declare theirs runs one
        backbone pass over all of them (:meth:`multitune.model.MultiTaskModel.shared_encoding`), which hands
        each call its rows of that pass.

        Args:
            batch: a training batch of the task, as :meth:`collate` builds it.

        Returns:
            The calls' ``(input_ids, attention_mask, token_type_ids or None)``, or None (default): the task
            reads the backbone otherwise (it drives it itself, e.g. generation), or has not declared its
            calls, and runs its own forward pass.
        """
        return None

    # -- results ----------------------------------------------------------------------
    @abstractmethod
    def decode(self, output: TaskOutput, batch: dict[str, torch.Tensor], examples: Sequence[dict]) -> list[Any]:
        """Turn a batch's outputs into JSON-able predictions, one per example."""

    @abstractmethod
    def compute_metrics(self, predictions: Sequence[Any], examples: Sequence[dict]) -> dict[str, float]:
        """Score predictions against the gold examples."""

    # -- optional hooks the training loop honours ---------------------------------------
    def balance_groups(self, features: Sequence[dict]) -> list[int] | None:
        """Group ids for oversampling, asked once by :class:`~multitune.training.batching.TaskBatcher` when it
        is built on the training features.

        Each epoch then holds every feature of every group plus random repeats drawn up to the size of the
        largest group, shuffled (so an epoch is ``groups * largest`` features long).

        Args:
            features: the task's encoded training features, in batcher order.

        Returns:
            One integer group id (e.g. the class index) per feature, or None for plain shuffling (default).
        """
        return None

    def length_strata(self, features: Sequence[dict]) -> list[int] | None:
        """Strata that length-grouped batches keep mixed, asked once by
        :class:`~multitune.training.batching.TaskBatcher` with ``group_by_length``: where length goes with
        the label, batches of similar length alone would be one-sided.

        Returns:
            One integer stratum per training feature (e.g. its class), or None: group by length alone (default).
        """
        return None

    def calibrate(self, predictions: Sequence[Any], examples: Sequence[dict]) -> dict | None:
        """Tune decision settings (e.g. thresholds) on validation; the trainer calls it once after training,
        with the validation predictions of the restored best model, before the final evaluation and saving.

        Whatever it changes must be in :meth:`state` so that a loaded model predicts the same way.

        Args:
            predictions: :meth:`decode` output for ``examples``.
            examples: the gold validation examples.

        Returns:
            What changed, JSON-able (logged and reported), or None when nothing did (default).
        """
        return None

    def confusion(self, predictions: Sequence[Any], examples: Sequence[dict]
                  ) -> tuple[list[str], list[list[int]]] | None:
        """A confusion matrix of predictions against gold examples (the trainer plots it on validation).

        Args:
            predictions: :meth:`decode` output for ``examples``.
            examples: the gold examples.

        Returns:
            ``(labels, counts)`` with ``counts[gold][predicted]`` in label order, or None when the task has no
            such matrix (default). Rows are lists, or :class:`CountRow` (sparse) above
            :data:`DENSE_CONFUSION_LABELS` labels.
        """
        return None

    def new_head_learning_rate(self) -> float | None:
        """The learning rate this task's head gets when ``training.head_learning_rate`` is not set, for a head
        trained from scratch on a fine-tuned backbone: a measured rate, or None (the default) for the backbone's
        rate, e.g. for a head that starts from pretrained weights or whose rate was not measured."""
        return None

    def warm_start_head(self, head: nn.Module, backbone: nn.Module) -> None:  # noqa: B027 - optional hook
        """Initialise a new head from the pretrained backbone before training (e.g. the pooler layer of a
        ``head: pooler`` classifier from the backbone's own pooler). Called once, on a freshly built model;
        a loaded model's heads come from its files. Default: nothing."""

    def export_spec(self) -> ExportSpec | None:
        """How this task exports as a stock transformers model (``multitune export``), or None when it has
        no such form (default)."""
        return None

    def state(self) -> dict:
        """What must be saved with the model to decode again (e.g. label maps)."""
        return {}

    def load_state(self, state: dict) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state` returned."""

    def selection_score(self, metrics: dict[str, float]) -> float:
        """The task's main metric on a higher-is-better scale (for the ``mean`` selection metric)."""
        value = metrics[self.main_metric]
        return value if self.greater_is_better_for(self.main_metric) else -value

    @classmethod
    def greater_is_better_for(cls, metric: str) -> bool:
        """Whether a higher value of one of the task's metrics is better."""
        return metric not in cls.lower_is_better

    @classmethod
    def main_metric_in(cls, metrics: dict[str, float], config: TaskConfig | None = None) -> str:
        """The metric that represents the task among reported ``metrics`` (results of a finished run): the one
        the task's ``config`` chose (a ``metric`` field, where the type has one), else the type's main metric.

        Raises:
            MultituneError: none of the task type's main metrics is among them.
        """
        chosen = getattr(config, "metric", None)
        if isinstance(chosen, str) and chosen in metrics:
            return chosen
        for name in (cls.main_metric, *cls.alternative_main_metrics):
            if name in metrics:
                return name
        raise MultituneError(f"task type {cls.__name__}: no main metric among {', '.join(map(str, metrics))}")


# -- helpers shared by task modules ------------------------------------------------------

class LinearHead(nn.Module):
    """Dropout then a linear layer: the classifier of sentence and token classification."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


class PoolerHead(nn.Module):
    """First token -> dense -> tanh -> dropout -> linear: the layout of BERT's pooler and classifier, which
    ``AutoModelForSequenceClassification`` computes for BERT-family backbones, so that a task trained with it
    exports as the stock class (see :mod:`multitune.export`). ``dense`` starts from the backbone's own pooler
    when it has one (:func:`warm_start_pooler`)."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_outputs)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden``: token states [batch, tokens, hidden]; returns [batch, num_outputs]."""
        return self.classifier(self.dropout(torch.tanh(self.dense(hidden[:, 0]))))


#: the default rate of a linear head trained from scratch (:meth:`Task.new_head_learning_rate`): on the seed
#: mixture at 300 steps, the mean dev metric rose from 0.629 (heads at the backbone's 5e-5) through 0.668 (1e-3)
#: and 0.682 (3e-3) to 0.701 (1e-2), NER most (docs/benchmarks.md, "Head learning rate")
NEW_HEAD_LEARNING_RATE = 1e-2

#: the sentence heads of classification and cross-encoder regression (``tasks.<name>.head``)
SENTENCE_HEADS = ("auto", "pooled", "pooler")


def resolve_sentence_head(setting: str, architecture: BackboneArchitecture) -> str:
    """The head layout a ``head:`` setting means on a backbone family: ``auto`` is ``pooler`` on encoders (the
    layout their stock sequence-classification class computes) and ``pooled`` on the other families, whose
    first token has seen nothing (decoder-only) or that have no stock pooler."""
    if setting != "auto":
        return setting
    return "pooler" if architecture.type_name == "encoder" else "pooled"


def backbone_pooler(backbone: nn.Module) -> nn.Linear | None:
    """The dense layer of the backbone's pretrained pooler (BERT's ``pooler.dense``), or None."""
    for module in (backbone, getattr(backbone, "base_model", None)):
        dense = getattr(getattr(module, "pooler", None), "dense", None)
        if isinstance(dense, nn.Linear):
            return dense
    return None


def warm_start_pooler(head: nn.Module, backbone: nn.Module) -> None:
    """Copy the backbone's pretrained pooler into a :class:`PoolerHead` (when both exist and fit)."""
    dense = backbone_pooler(backbone)
    if isinstance(head, PoolerHead) and dense is not None and dense.weight.shape == head.dense.weight.shape:
        with torch.no_grad():
            head.dense.weight.copy_(dense.weight)
            head.dense.bias.copy_(dense.bias)


def pad(rows: Sequence[Sequence[int | float]], value: int | float, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Right-pad rows to the longest one."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def collate_inputs(features: Sequence[dict], pad_token_id: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (and ``token_type_ids`` when present) and build the attention mask."""
    ids = [f[prefix + "input_ids"] for f in features]
    batch = {prefix + "input_ids": pad(ids, pad_token_id),
             prefix + "attention_mask": pad([[1] * len(r) for r in ids], 0)}
    if prefix + "token_type_ids" in features[0]:
        batch[prefix + "token_type_ids"] = pad([f[prefix + "token_type_ids"] for f in features], 0)
    return batch


def tokenize_texts(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int
                   ) -> list[dict]:
    """Tokenise (pairs of) texts without padding; returns one dict of id lists per text."""
    enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True,
                    max_length=max_length, padding=False)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def where(example: dict) -> tuple[str, int | None]:
    return str(example.get("_file", "<input>")), example.get("_line")


def parse_float(example: dict, key: str) -> float:
    """Read a numeric field, raising DataError (file:line) when it is not a finite number."""
    raw = example.get(key)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        file, line = where(example)
        raise DataError(file, f"{key} must be a number, got {raw!r}", line) from None
    if not math.isfinite(value):
        file, line = where(example)
        raise DataError(file, f"{key} must be a finite number, got {raw!r}", line)
    return value


def label_sort_key(label: str) -> tuple:
    """Sort numeric labels numerically ("2" before "10"), the rest alphabetically."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def check_class_weights(spec: str | Sequence[float] | None, path: str) -> None:
    """Check a ``class_weights`` setting as far as possible before the labels are known.

    Args:
        spec: None, ``"balanced"`` or a list of weights.
        path: config path of the field, for the error.

    Raises:
        ConfigError: an unknown string or a negative weight.
    """
    if isinstance(spec, str) and spec != "balanced":
        raise ConfigError(path, f"expected 'balanced' or a list of numbers (one weight per label), got {spec!r}")
    if isinstance(spec, (list, tuple)) and any(w < 0 for w in spec):
        raise ConfigError(path, f"weights must not be negative, got {list(spec)}")


def class_weights(spec: str | Sequence[float] | None, counts: Sequence[int], labels: Sequence[str], path: str
                  ) -> list[float] | None:
    """Loss weight per class, for the ``weight=`` of a cross-entropy.

    ``balanced`` gives n / (K * n_c) (inverse frequency, scikit-learn's convention; a class absent from
    training gets weight 0); a list is taken as given, one weight per label in label order.

    Args:
        spec: None, ``"balanced"`` or a list of weights.
        counts: training count of each label, in label order.
        labels: the label set, in order (named in the error).
        path: config path of the field, for errors.

    Returns:
        One float per label, or None when ``spec`` is None.

    Raises:
        ConfigError: an unknown string, a negative weight or a list whose length is not the number of labels.
    """
    if spec is None:
        return None
    check_class_weights(spec, path)
    if isinstance(spec, str):
        total, k = sum(counts), len(counts)
        return [total / (k * c) if c else 0.0 for c in counts]
    if len(spec) != len(labels):
        raise ConfigError(path, f"expected {len(labels)} weights, one per label in this order: "
                                f"{', '.join(labels)}; got {len(spec)}")
    return [float(w) for w in spec]
