"""The typed shape of a run config. Field names are the user-facing contract (see docs/config.md).

Task, sampler and loss-weighting sections are typed by the config class that the named
implementation registers (``tasks.<name>.type``, ``sampling.strategy``, ``loss_weighting.strategy``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from multitune.config.adapters import AdapterConfig
from multitune.config.parse import check_field, datasets_kind, field
from multitune.errors import ConfigError, shown

TRACKERS = ["tensorboard", "mlflow"]
FORMATS = ["csv", "tsv", "jsonl", "parquet", "conll", "text", "parallel", "hf"]
#: largest seed: the unsigned 32-bit range that every random generator accepts (numpy's legacy ones too), with
#: room for the offsets each task and epoch adds to it
MAX_SEED = 2**32 - 1


@dataclass
class SplitConfig:
    """Where one split of a task's data comes from and how its columns map to task fields."""

    path: str | None = field(None, help="data file; for format: hf a datasets name, a directory written by "
                                        "save_to_disk, a parquet file or a folder of parquet files")
    format: str | None = field(None, help="file format; inferred from the file extension when omitted",
                               choices=FORMATS)
    dataset: Any = field(None, help="Python API: an in-memory datasets.Dataset to read instead of a file "
                                    "(config.yaml records its fingerprint, rows and columns)")
    text: str | None = field(None, help="column holding the text (default: 'text')")
    text_pair: str | None = field(None, help="column holding the second text of a pair (default: 'text_pair')")
    label: str | None = field(None, help="column holding the label or score (default: 'label')")
    tokens: str | None = field(None, help="jsonl/parquet/hf: column holding the token list (default: 'tokens')")
    tags: str | None = field(None, help="jsonl/parquet/hf: column holding the tag list (default: 'tags')")
    source: str | None = field(None, help="column holding the input text (default: 'source')")
    target: str | None = field(None, help="column holding the output text (default: 'target')")
    target_map: dict[str, str] | None = field(None, help="maps raw target values to text, e.g. {0: negative}")
    messages: str | None = field(None, help="column holding a conversation: a list of {role, content} messages "
                                            "(default: 'messages')")
    instruction: str | None = field(None, help="instruction data: column holding the instruction, the user turn "
                                               "(default: 'instruction')")
    input: str | None = field(None, help="instruction data: column holding an optional input, added to the user "
                                         "turn after a blank line (default: 'input')")
    output: str | None = field(None, help="instruction data: column holding the answer, the assistant turn "
                                          "(default: 'output')")
    split_by: str | None = field(None, help="a file of several tasks: the column naming each row's task; this task "
                                            "keeps the rows whose value is its name")
    columns: list[str] | None = field(None, help="csv/tsv without header: the column names, in order")
    header: bool = field(True, help="csv/tsv: the first row names the columns")
    delimiter: str | None = field(None, help="csv/tsv: field separator (default ',' for csv, tab for tsv)")
    token_column: int = field(0, help="conll: index of the token column")
    tag_column: int = field(-1, help="conll: index of the tag column (-1: last)")
    source_path: str | None = field(None, help="parallel: file of source lines")
    target_path: str | None = field(None, help="parallel: file of target lines, line N translates line N")
    subset: str | None = field(None, help="hf: dataset configuration name")
    split: str | None = field(None, help="hf: the Hugging Face dataset split to read, of a Hub dataset, a saved "
                                         "DatasetDict or a parquet folder (default: this split's name); not the "
                                         "split fractions, see data.split")
    encoding: str = field("utf-8", help="text encoding of the file")
    max_examples: int | None = field(None, help="keep a seeded random sample of at most this many examples",
                                     gt=0)

    def validate(self, path: str) -> None:
        if self.split_by is not None and not self.split_by.strip():
            raise ConfigError(f"{path}.split_by", "expected a column name, got an empty text")
        if self.dataset is not None:
            self._check_dataset(path)
        elif self.format == "parallel":
            for name in ("source_path", "target_path"):
                if not getattr(self, name):
                    raise ConfigError(f"{path}.{name}", "required for format: parallel")
        elif not self.path:
            raise ConfigError(f"{path}.path", "required field is missing (the data file)")

    def _check_dataset(self, path: str) -> None:
        saved = self.dataset
        if isinstance(saved, dict) and "fingerprint" in saved:  # what config.yaml records of one
            raise ConfigError(f"{path}.dataset", f"the run read an in-memory datasets.Dataset here ({saved.get('rows')} "
                                                 f"rows, fingerprint {saved.get('fingerprint')}), which config.yaml "
                                                 f"only records; give the dataset itself through the Python API "
                                                 f"(multitune.parse_config) to train, resume or evaluate")
        kind = datasets_kind(saved)
        if kind != "Dataset":
            raise ConfigError(f"{path}.dataset", f"expected a datasets.Dataset, got {kind or type(saved).__name__}")
        for name in ("path", "source_path", "target_path", "subset", "split"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{path}.{name}", "not with dataset: an in-memory Dataset is the data itself")
        if self.format not in (None, "hf"):
            raise ConfigError(f"{path}.format", f"an in-memory Dataset is read as format hf, got {self.format!r}")


@dataclass
class SplitFractions:
    """Fractions of the training data held out when a task has no validation data of its own. These field
    defaults are also what a task without a ``split:`` section gets."""

    validation: float = field(0.1, help="fraction of train held out for validation", min=0.0, max=0.9)
    test: float = field(0.1, help="fraction of train held out for test (0: none; a test file, when given, "
                                  "is used instead)", min=0.0, max=0.9)

    def validate(self, path: str) -> None:
        if self.validation + self.test >= 1.0:
            raise ConfigError(path, f"validation ({self.validation}) + test ({self.test}) fractions must leave "
                                    f"some training data (test is 0.1 unless set)")


@dataclass
class TaskDataConfig:
    train: SplitConfig | None = field(None, help="training data")
    validation: SplitConfig | None = field(None, help="validation data (evaluated during training)")
    test: SplitConfig | None = field(None, help="test data (evaluated once, on the restored best model)")
    split: SplitFractions | None = field(None, help="fractions of train carved out as validation and test when the "
                                                    "task has no validation data (default: validation 0.1, test "
                                                    "0.1); not a Hugging Face split name, which is "
                                                    "data.{train,validation,test}.split")

    def validate(self, path: str) -> None:
        if self.train is None:
            raise ConfigError(f"{path}.train", "required field is missing (training data)")


@dataclass
class TaskConfig:
    """Fields every task type has; each task type extends it with its own."""

    type: str = field(help="task type (see `multitune tasks`)")
    data: TaskDataConfig | None = field(None, help="train / validation / test data of the task (required in a run config)")
    labels: list[str] | None = field(None, help="label set; inferred (sorted) from train data when omitted")


@dataclass
class EarlyStoppingConfig:
    metric: str = field("mean", help="'mean' (of each task's main metric) or 'task/metric'")
    patience: int = field(3, help="evaluations without improvement before stopping", min=1)
    min_delta: float = field(0.0, help="smallest change that counts as an improvement", min=0.0)


@dataclass
class GradualUnfreezingConfig:
    """Howard & Ruder (2018), "Universal Language Model Fine-tuning for Text Classification": train the heads
    first, then release one layer group from the top every ``every`` steps (or epochs)."""

    every: int = field(help="steps (or epochs) between two unfreezing events", min=1)
    unit: str = field("steps", help="what `every` counts", choices=["steps", "epochs"])
    depth: int | None = field(None, help="layer groups unfrozen in the end, counted from the top "
                                         "(null: all, embeddings last)", min=1)


@dataclass
class TrainingConfig:
    max_steps: int = field(1000, help="optimizer steps", min=1)
    batch_size: int = field(32, help="examples per batch (per process)", min=1)
    eval_batch_size: int | None = field(None, help="examples per evaluation batch (default 2x batch_size)", min=1)
    eval_batch_tokens: int = field(8192, help="padded tokens per evaluation batch at most (rows x the longest "
                                              "row; a longer input is a batch of its own): bounds evaluation "
                                              "memory whatever max_length is", min=1)
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step", min=1)
    max_length: int = field(128, help="tokens per input after truncation", min=8)
    compile: bool = field(False, help="torch.compile the backbone (dynamic shapes); costs a one-off compile time, "
                                      "reported as train.compile_s in results.json")
    group_by_length: bool = field(True, help="batch rows of similar length together (seeded windows of 50 "
                                             "batches sorted by length within each task's label strata, batch "
                                             "order shuffled): far less padding, the label mix of each batch kept")
    unpadded: bool = field(False, help="in training and evaluation, run the encoder's token-wise layers (embeddings, "
                                       "projections, feed-forward, layer norms) on the real tokens only, attention "
                                       "per row: the same results as padded, less compute on padded batches; "
                                       "BERT-layout encoders (bert, roberta, xlm-roberta, camembert, "
                                       "data2vec-text, electra), not with prompt or prefix adapters (these run "
                                       "padded, with a warning)")
    packing: bool = field(False, help="decoder_only backbones: pack each text2text training batch's examples "
                                      "(the same examples as unpacked) into as few rows of max(max_length, "
                                      "longest example) tokens as fit, each example with position ids from 0 "
                                      "and attending only to itself: the same loss and gradients, less padding; "
                                      "needs attention eager, sdpa, flex_attention or flash_attention_2/3/4 "
                                      "(refused where examples would see each other); head tasks and evaluation "
                                      "batches are never packed (see docs/llm.md)")
    gradient_checkpointing: bool = field(False, help="recompute each backbone layer's activations in the backward "
                                                     "pass instead of keeping them (torch non-reentrant "
                                                     "checkpointing): less activation memory for about one more "
                                                     "forward pass per step, the same loss and gradients; every "
                                                     "backbone family, with adapters, unpadded and compile "
                                                     "(not with prefix tuning)")
    learning_rate: float = field(5e-5, help="learning rate of the backbone", gt=0.0)
    head_learning_rate: float | None = field(None, help="learning rate of task heads and other new parameters "
                                                        "(default: 1e-2 with adapters or when every head is a "
                                                        "linear head trained from scratch, else learning_rate)",
                                                   gt=0.0)
    layer_lr_decay: float | None = field(None, help="layer-wise LR decay: learning_rate on the top layer, times "
                                                    "this factor per layer downwards, embeddings lowest", gt=0.0,
                                         max=1.0)
    gradual_unfreezing: GradualUnfreezingConfig | None = field(None, help="start with the backbone frozen and "
                                                                          "release it layer by layer")
    weight_decay: float = field(0.01, help="AdamW weight decay (not applied to biases and LayerNorm)", min=0.0)
    warmup_ratio: float = field(0.0, help="fraction of max_steps spent warming up", min=0.0, max=1.0)
    warmup_steps: int | None = field(None, help="warmup steps (overrides warmup_ratio)", min=0)
    scheduler: str = field("linear", help="learning-rate schedule", choices=["linear", "cosine", "constant"])
    max_grad_norm: float | None = field(1.0, help="gradient clipping norm (null: off)", gt=0.0)
    max_bad_steps: int = field(10, help="a step whose loss or gradient is not finite is skipped; the run stops "
                                        "after this many such steps in a row", min=1)
    eval_every: int = field(200, help="evaluate every N optimizer steps (a value above max_steps is lowered to "
                                      "max_steps, with a note)", min=1)
    early_stopping: EarlyStoppingConfig | None = field(None, help="stop when the metric stops improving")
    per_task_best: bool = field(True, help="also keep each task's weights at its own best validation step in "
                                         "checkpoints/best-per-task/ (for `multitune export --task`); costs one "
                                         "copy of the trained parameters on disk per task whose best step is not "
                                         "the run's best step (a backbone per task "
                                         "under full fine-tuning, the task's adapter and head with per-task "
                                         "adapters); each task's best step is recorded in results.json either "
                                         "way")
    precision: str = field("auto", help="compute precision: fp32, bf16 autocast with fp32 master weights, or auto "
                                        "(bf16 where the GPU or CPU computes it natively, else fp32)",
                           choices=["fp32", "bf16", "auto"])
    attention: str = field("auto", help="attention kernels of the backbone while training: eager (plain matmuls), "
                                        "sdpa (torch's scaled_dot_product_attention) or auto (eager on a CPU, where "
                                        "sdpa's backward is slow on batches without padding; the model's default "
                                        "on a GPU); evaluation always uses the model's default",
                           choices=["auto", "eager", "sdpa"])
    log_every: int = field(10, help="log training losses every N steps", min=1)
    device: str = field("auto", help="auto | cpu | cuda", choices=["auto", "cpu", "cuda"])
    report_to: list[str] = field(help="trackers that get every metrics.jsonl record (default: none): tensorboard "
                                      "(RUN/tensorboard), mlflow (needs multitune[track]; see docs/reports.md)",
                                 factory=list)
    mlflow_tracking_uri: str | None = field(None, help="MLflow tracking URI (default: the MLFLOW_TRACKING_URI "
                                                       "variable, else sqlite:///RUN/mlflow.db)")
    #: the eval_every the config asked for when it exceeded max_steps and was lowered to it (None: not lowered);
    #: not a key of the config, and not saved (config.yaml holds the value the run used)
    requested_eval_every: int | None = dataclasses.field(default=None, init=False, repr=False, compare=False,
                                                         metadata={"internal": True})

    def validate(self, path: str) -> None:
        if self.unpadded and self.compile:
            raise ConfigError(f"{path}.unpadded", "not with compile: torch.compile compiles the backbone's forward, "
                                                  "which unpadded execution does not call; set one of them")
        for i, tracker in enumerate(self.report_to):
            check_field(tracker, {"choices": TRACKERS}, f"{path}.report_to[{i}]")
        if self.mlflow_tracking_uri is not None and "mlflow" not in self.report_to:
            raise ConfigError(f"{path}.mlflow_tracking_uri", "only used with report_to: [mlflow]")
        if self.eval_every > self.max_steps:
            # a newcomer who lowers max_steps should not have to lower eval_every too: the loop evaluates at
            # max_steps anyway, so this is the same run (parse_config says so in a note)
            self.requested_eval_every, self.eval_every = self.eval_every, self.max_steps


@dataclass
class AnalysisConfig:
    """Transfer analysis during training (see docs/transfer.md): how the tasks' gradients on the shared
    parameters relate (cosine similarity) and how a step on one task changes the others' losses
    (look-ahead task affinity, Fifty et al. 2021). Measuring never changes the training itself."""

    affinity_every: int = field(0, help="measure gradient cosine similarity and look-ahead task affinity every N "
                                        "optimizer steps (0: off)", min=0)
    batch_size: int | None = field(None, help="examples per task in each measurement (default: "
                                              "training.batch_size)", min=1)
    lookahead_lr: float | None = field(None, help="learning rate of the look-ahead SGD step (default: each "
                                                  "shared parameter's current learning rate)", gt=0.0)


BACKBONE_TYPES = ["auto", "encoder", "encoder_decoder", "decoder_only"]


@dataclass
class VocabularyExtensionConfig:
    """Add frequent domain words that the tokenizer splits into pieces (see docs/transfer.md)."""

    corpus: str = field(help="domain text: one text per line, or .jsonl with a text field")
    min_freq: int = field(5, help="keep words seen at least this often", min=1)
    max_new: int = field(2000, help="add at most this many words", min=1)


@dataclass
class BackboneConfig:
    """Which pretrained model the tasks share. ``backbone: NAME`` is short for ``backbone: {name: NAME}``."""

    type: str = field("auto", help="model family; auto: read it from the model's config.json",
                      choices=BACKBONE_TYPES)
    name: str | None = field(None, help="'default' (packaged MiniLM), 'smollm2' (packaged SmolLM2-135M-Instruct, "
                                        "decoder_only), a local model directory or a hub id")
    encoder: str | None = field(None, help="encoder_decoder warm-started from encoder checkpoints: the encoder "
                                           "('default', a directory or a hub id)")
    decoder: str | None = field(None, help="encoder_decoder warm start: the checkpoint the decoder starts from "
                                           "(gets causal self-attention and new cross-attention)")
    tie_encoder_decoder: bool = field(False, help="encoder_decoder warm start: share encoder and decoder weights")
    gguf_file: str | None = field(None, help="decoder_only: a GGUF file inside the model directory to load "
                                             "(dequantised to float)")
    extend_vocabulary: VocabularyExtensionConfig | None = field(
        None, help="add domain words to the tokenizer before training; new embedding rows start as the mean of "
                   "their old pieces")

    def validate(self, path: str) -> None:
        warm = self.encoder is not None or self.decoder is not None
        if warm:
            if self.type not in ("auto", "encoder_decoder"):
                raise ConfigError(f"{path}.type", f"encoder/decoder checkpoints build an encoder_decoder "
                                                  f"backbone, got type {self.type!r}")
            if self.name is not None:
                raise ConfigError(f"{path}.name", "give either name or encoder + decoder, not both")
            if self.encoder is None or self.decoder is None:
                missing = "encoder" if self.encoder is None else "decoder"
                raise ConfigError(f"{path}.{missing}", "required with a warm-started encoder_decoder "
                                                      "(e.g. encoder: default, decoder: default)")
            self.type = "encoder_decoder"
        elif self.name is None:
            if self.type == "encoder_decoder":  # the offline text-to-text default: MiniLM warm-started twice
                self.encoder = self.decoder = "default"
            elif self.type == "decoder_only":
                raise ConfigError(f"{path}.name", "required for a decoder_only backbone (a model directory, "
                                                  "a hub id or 'smollm2')")
            else:
                self.name = "default"
        if self.gguf_file is not None and self.type not in ("auto", "decoder_only"):
            raise ConfigError(f"{path}.gguf_file", "GGUF files hold decoder_only models")
        if self.tie_encoder_decoder and not warm and self.type != "encoder_decoder":
            raise ConfigError(f"{path}.tie_encoder_decoder", "only for an encoder_decoder warm start")


@dataclass
class FreezeConfig:
    """Parameters that never train. ``freeze: none | backbone | embeddings`` is short for the mapping."""

    backbone: bool = field(False, help="freeze the whole backbone: feature extraction, only heads train")
    embeddings: bool = field(False, help="freeze the embedding layer")
    word_embeddings: bool | None = field(None, help="freeze the word-embedding matrix only (position embeddings "
                                                     "and the embedding norm still train); null (auto): frozen "
                                                     "on an encoder backbone whose vocabulary is not extended, "
                                                     "unless a task's output layer is that matrix (masked_lm)")
    layers: list[int] | None = field(None, help="[first, last]: freeze backbone layers first..last (0-based, "
                                                "inclusive)")
    heads: list[str] | None = field(None, help="task names whose heads stay frozen (e.g. keep a finished task)")

    def validate(self, path: str) -> None:
        if self.layers is not None:
            if len(self.layers) != 2 or self.layers[0] < 0 or self.layers[0] > self.layers[1]:
                raise ConfigError(f"{path}.layers", f"expected [first, last] with 0 <= first <= last, "
                                                    f"got {shown(self.layers)}")


@dataclass
class StageConfig:
    """One stage of sequential training: its tasks train (earlier stages' tasks only through ``replay``)."""

    tasks: list[str] = field(help="names of the tasks trained in this stage")
    name: str | None = field(None, help="stage name used in the run directory and plots (default: the tasks)")
    training: dict[str, Any] | None = field(None, help="training settings of this stage, over the top-level "
                                                      "`training` (e.g. max_steps, learning_rate)")
    replay: float = field(0.0, help="share of batches drawn from earlier stages' tasks (forgetting mitigation)",
                          min=0.0, max=0.9)


@dataclass
class RunConfig:
    tasks: dict[str, Any] = field(help="task name -> task config")
    backbone: BackboneConfig = field(help="the shared pretrained model (a name, or a mapping for other families)",
                                     factory=lambda: BackboneConfig(name="default"))
    pooling: str | None = field(None, help="sentence pooling of head tasks (default: mean; last non-pad token on "
                                           "decoder_only backbones)", choices=["mean", "cls", "max", "last"])
    normalize_embeddings: bool = field(False, help="L2-normalise pooled sentence embeddings")
    output_dir: str = field("runs/run", help="run directory")
    seed: int = field(42, help="seed of every random choice in the run (0 to 4294967295)", min=0, max=MAX_SEED)
    sampling: dict[str, Any] = field(help="task sampling strategy", factory=lambda: {"strategy": "proportional"})
    loss_weighting: dict[str, Any] = field(help="loss combination", factory=lambda: {"strategy": "sum"})
    freeze: FreezeConfig = field(help="parameters that never train (none | backbone | embeddings | a mapping)",
                                 factory=FreezeConfig)
    training: TrainingConfig = field(help="optimisation settings", factory=TrainingConfig)
    adapters: AdapterConfig | None = field(None, help="parameter-efficient fine-tuning: adapters on a frozen "
                                                     "backbone (lora, dora, ia3, prefix, prompt, bottleneck; "
                                                     "see docs/adapters.md)")
    stages: list[StageConfig] | None = field(None, help="sequential training: stages run in order, each with "
                                                        "its tasks and training settings (see docs/staged-training.md)")
    analysis: AnalysisConfig = field(help="transfer analysis during training: gradient cosine similarity and "
                                          "look-ahead task affinity (see docs/transfer.md)", factory=AnalysisConfig)
    trust_remote_code: bool = field(False, help="allow model code from the backbone's repository to run")

    @property
    def runs_in_stages(self) -> bool:
        """Whether the run is a plan of several runs: ``stages``, or an adapter arrangement that trains in
        stages (AdapterFusion)."""
        return bool(self.stages) or (self.adapters is not None and self.adapters.layout.staged)
