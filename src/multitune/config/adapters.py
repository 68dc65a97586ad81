"""The ``adapters:`` section: which parameter-efficient method, how adapters map to tasks, and the
method's own settings. Method-specific keys are checked against the chosen method."""

from __future__ import annotations

from dataclasses import dataclass

from multitune.config.parse import field
from multitune.errors import ConfigError

ARRANGEMENTS = ["per_task", "shared", "shared_conditioned", "fusion"]

# keys each method reads, beside method / arrangement / learning_rate / fusion settings
METHOD_KEYS: dict[str, set[str]] = {
    "lora": {"r", "alpha", "dropout", "target_modules"},
    "dora": {"r", "alpha", "dropout", "target_modules"},
    "ia3": {"target_modules", "feedforward_modules"},
    "prefix": {"num_virtual_tokens"},
    "prompt": {"num_virtual_tokens"},
    "bottleneck": {"reduction_factor", "placement", "non_linearity"},
}
FUSION_KEYS = ("fusion_targets", "fusion_steps", "fusion_learning_rate")
FUSABLE_METHODS = ["bottleneck"]  # methods that change a sub-layer's output, which fusion attends over
_DEFAULTS = {"r": 8, "alpha": 16.0, "dropout": 0.1, "num_virtual_tokens": 20, "reduction_factor": 16,
             "placement": "pfeiffer", "non_linearity": "relu"}


@dataclass
class AdapterConfig:
    """Parameter-efficient fine-tuning on a frozen backbone (see docs/adapters.md)."""

    method: str = field(help="lora | dora | ia3 | prefix | prompt | bottleneck",
                        choices=list(METHOD_KEYS))
    arrangement: str = field("per_task", help="per_task: one adapter per task; shared: one for all tasks; "
                                              "shared_conditioned: one shared adapter plus a learned task "
                                              "embedding; fusion: per-task adapters, then AdapterFusion "
                                              "layers for the target tasks (a second stage)",
                        choices=ARRANGEMENTS)
    learning_rate: float | None = field(None, help="learning rate of adapter parameters (default: "
                                                   "training.learning_rate)", gt=0.0)
    r: int | None = field(None, help="lora/dora: rank of the update (default 8)", min=1)
    alpha: float | None = field(None, help="lora/dora: scaling numerator, the update is scaled by alpha/r "
                                           "(default 16)", gt=0.0)
    dropout: float | None = field(None, help="lora/dora: dropout on the adapter's input (default 0.1)",
                                  min=0.0, max=0.9)
    target_modules: list[str] | str | None = field(
        None, help="lora/dora/ia3: module names (suffixes such as query, value) or one regular expression "
                   "matched against the full module path (default: the attention query/value projections; "
                   "ia3: key, value and the feed-forward output)")
    feedforward_modules: list[str] | str | None = field(
        None, help="ia3: targets whose input (not output) is scaled: the feed-forward output layers")
    num_virtual_tokens: int | None = field(None, help="prefix/prompt: virtual tokens per adapter (default 20)",
                                           min=1)
    reduction_factor: int | None = field(None, help="bottleneck: hidden size / bottleneck size (default 16)",
                                         min=1)
    placement: str | None = field(None, help="bottleneck: houlsby (after attention and feed-forward) or "
                                             "pfeiffer (after feed-forward only; default)",
                                  choices=["houlsby", "pfeiffer"])
    non_linearity: str | None = field(None, help="bottleneck: activation inside the bottleneck (default relu)",
                                      choices=["relu", "gelu", "swish", "tanh"])

    fusion_targets: list[str] | None = field(None, help="fusion: tasks that get AdapterFusion layers in the "
                                                        "second stage (default: every task)")
    fusion_steps: int | None = field(None, help="fusion: optimizer steps of the fusion stage (default: "
                                                "training.max_steps)", min=1)
    fusion_learning_rate: float | None = field(None, help="fusion: learning rate of the fusion layers "
                                                          "(default 5e-5, as in Pfeiffer et al. 2021)", gt=0.0)

    def validate(self, path: str) -> None:
        allowed = METHOD_KEYS[self.method]
        for key in set().union(*METHOD_KEYS.values()) - allowed:
            if getattr(self, key) is not None:
                users = sorted(m for m, keys in METHOD_KEYS.items() if key in keys)
                raise ConfigError(f"{path}.{key}", f"only for method {' / '.join(users)}, not {self.method!r}")
        for key in allowed:
            if getattr(self, key) is None and key in _DEFAULTS:
                setattr(self, key, _DEFAULTS[key])
        if self.arrangement == "fusion":
            if self.method not in FUSABLE_METHODS:
                raise ConfigError(f"{path}.arrangement", f"fusion attends over the outputs of bottleneck adapters "
                                                         f"(Pfeiffer et al. 2021); method {self.method!r} cannot "
                                                         f"be fused, set method: bottleneck")
            if self.fusion_learning_rate is None:
                self.fusion_learning_rate = 5e-5
        else:
            for key in FUSION_KEYS:
                if getattr(self, key) is not None:
                    raise ConfigError(f"{path}.{key}", f"only for arrangement fusion, not {self.arrangement!r}")
