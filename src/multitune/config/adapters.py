"""The ``adapters:`` section: which parameter-efficient method, how adapters map to tasks, and the
method's own settings.

The section is one flat mapping (``adapters: {method: lora, r: 8}``). The keys that every method shares
are fields of :class:`AdapterConfig`; the others are the method's own, typed by the config class that the
method registers (``METHODS.get(name).config_class``, as task types, samplers and loss weightings do).
This layer cannot import the methods (they sit above it), so parsing keeps those keys as given and
:meth:`AdapterConfig.resolve`, called with the method registry where a run config is loaded
(:func:`multitune.config.loader.parse_config`) and where adapters are built, types and checks them.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from multitune.config.parse import field, from_dict, to_dict
from multitune.errors import ConfigError, shown


@dataclass(frozen=True)
class Arrangement:
    """How adapters map to tasks, declared once: code asks these attributes, never the arrangement's name.

    Attributes:
        per_task: one adapter per task (else one shared adapter).
        task_embedding: the shared adapter is conditioned on a learned task embedding.
        staged: the run is a plan of two runs: one adapter per task, then AdapterFusion layers over them for
            the target tasks (Pfeiffer et al. 2021); the method must declare ``fusable``.
    """

    name: str
    per_task: bool = False
    task_embedding: bool = False
    staged: bool = False


ARRANGEMENT_KINDS = {a.name: a for a in (Arrangement("per_task", per_task=True), Arrangement("shared"),
                                         Arrangement("shared_conditioned", task_embedding=True),
                                         Arrangement("fusion", per_task=True, staged=True))}
ARRANGEMENTS = list(ARRANGEMENT_KINDS)
FUSION_KEYS = ("fusion_targets", "fusion_steps", "fusion_learning_rate")


@dataclass
class AdapterConfig:
    """Parameter-efficient fine-tuning on a frozen backbone (see docs/adapters.md)."""

    method: str = field(help="the adapter method (lora | dora | ia3 | prefix | prompt | bottleneck); its own "
                             "keys are in the tables `adapters with method: NAME`")
    arrangement: str = field("per_task", help="per_task: one adapter per task; shared: one for all tasks; "
                                              "shared_conditioned: one shared adapter plus a learned task "
                                              "embedding; fusion: per-task adapters, then AdapterFusion "
                                              "layers for the target tasks (a second stage)",
                             choices=ARRANGEMENTS)
    learning_rate: float | None = field(None, help="learning rate of adapter parameters (default: the "
                                                   "method's own: 3e-3 for lora, dora, ia3 and prefix, 1e-3 for "
                                                   "bottleneck, 3e-2 for prompt)", gt=0.0)
    options: Any = field(None, help="the method's own keys, given flat beside the others; typed by the "
                                    "method's config class once resolved", flat=True)
    quantize: str | None = field(None, help="k-bit frozen base weights (QLoRA): the backbone's linear layers, "
                                            "except its output layer, through bitsandbytes in 4bit (NF4, "
                                            "double-quantised scales, bf16 compute) or 8bit (LLM.int8); the "
                                            "adapters train in fp32; checkpoints, the saved model and exports "
                                            "hold the base weights dequantised to float (see docs/llm.md); "
                                            "needs multitune[qlora] (null: full precision)",
                                 choices=["4bit", "8bit"])
    fusion_targets: list[str] | None = field(None, help="fusion: tasks that get AdapterFusion layers in the "
                                                        "second stage (default: every task)")
    fusion_steps: int | None = field(None, help="fusion: optimizer steps of the fusion stage (default: "
                                                "training.max_steps)", min=1)
    fusion_learning_rate: float | None = field(None, help="fusion: learning rate of the fusion layers "
                                                          "(default 5e-5, as in Pfeiffer et al. 2021)", gt=0.0)
    unset_keys: tuple[str, ...] = field((), help="the other methods' keys, written as null so that a saved "
                                                 "config reads as it did when all methods shared one section",
                                        internal=True)

    @property
    def layout(self) -> Arrangement:
        """What :attr:`arrangement` means (per-task adapters, a task embedding, a staged fusion run)."""
        return ARRANGEMENT_KINDS[self.arrangement]

    def validate(self, path: str) -> None:
        if self.layout.staged:
            if self.fusion_learning_rate is None:
                self.fusion_learning_rate = 5e-5
        else:
            for key in FUSION_KEYS:
                if getattr(self, key) is not None:
                    raise ConfigError(f"{path}.{key}", f"only for arrangement fusion, not {self.arrangement!r}")

    @property
    def resolved(self) -> bool:
        """Whether :attr:`options` is the method's typed config (see :meth:`resolve`)."""
        return dataclasses.is_dataclass(self.options)

    def resolve(self, methods: Any, path: str = "adapters") -> AdapterConfig:
        """Type the method's own keys with its config class, in place; returns ``self``.

        Args:
            methods: the adapter method registry (``multitune.adapters.METHODS``): each entry declares
                ``config_class`` and ``fusable``.
            path: the section's field path, for errors.

        Raises:
            ConfigError: an unknown method, a key of another method (naming the methods that accept it),
                an unknown key, a bad value, or fusion with a method that cannot be fused.
        """
        impl = methods.get(self.method, f"{path}.method")
        given = to_dict(self.options) if self.resolved else dict(self.options or {})
        accepted = {name: _keys(methods.get(name).config_class) for name in methods.names()}
        own = accepted[self.method]
        for key, value in given.items():
            if key in own:
                continue
            users = sorted(name for name, keys in accepted.items() if key in keys)
            if users and value is None:  # a saved config writes the other methods' keys as null
                continue
            if users:
                raise ConfigError(f"{path}.{key}", f"only for method {' / '.join(users)}, not {self.method!r}")
            valid = [f.name for f in dataclasses.fields(self) if not _hidden(f)] + own
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}.{key}", f"unknown key{hint}; valid keys for method {self.method}: "
                                               f"{', '.join(valid)}")
        # a null own key takes the default, as an unset one does
        self.options = from_dict(impl.config_class, {k: v for k, v in given.items() if k in own and v is not None},
                                 path)
        self.unset_keys = tuple(dict.fromkeys(k for keys in accepted.values() for k in keys if k not in own))
        if self.layout.staged and not impl.fusable:
            fusable = [name for name in methods.names() if methods.get(name).fusable]
            raise ConfigError(f"{path}.arrangement", f"fusion attends over the outputs of adapters that change a "
                                                     f"sub-layer's output (Pfeiffer et al. 2021); method "
                                                     f"{shown(self.method)} cannot be fused, set method: "
                                                     f"{' or '.join(fusable)}")
        return self

    def to_data(self) -> dict[str, Any]:
        """The flat plain-data form (what ``config.yaml`` holds): the method's keys beside the shared ones,
        the other methods' keys as null."""
        shared = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if not _hidden(f)}
        own = to_dict(self.options) if self.resolved else dict(self.options or {})
        head = {k: shared.pop(k) for k in ("method", "arrangement", "learning_rate")}
        return {**head, **{k: None for k in self.unset_keys}, **own, **shared}

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: a method's own key, e.g. config.r for lora
        options = self.__dict__.get("options")
        if not name.startswith("_") and dataclasses.is_dataclass(options) and hasattr(options, name):
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def _keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _hidden(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("flat") or f.metadata.get("internal"))
