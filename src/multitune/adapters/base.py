"""What a parameter-efficient method implements, and the router that sends each row of a batch to its
adapter.

Adapters are attached with forward hooks, never by replacing backbone modules: the backbone keeps its
module tree and state-dict keys, so it still saves as a plain transformers model, and every adapter of
every task lives in one place (:class:`multitune.adapters.model.AdapterSet`) where one run can train them
all. A hook asks the router which adapter each row uses: one index for a single-task batch (the fast
path), or a ``[batch]`` index tensor for a mixed-task batch, so that rows of different tasks go through
their own adapters in one forward pass.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from multitune.config.adapters import AdapterConfig
from multitune.errors import ConfigError, MultituneError
from multitune.registry import Registry

METHODS: Registry[type[AdapterMethod]] = Registry("adapter method")


@dataclass
class MethodConfig:
    """A method's own keys of the ``adapters`` section (none here); each method's config class extends it,
    e.g. :class:`multitune.adapters.lora.LoraConfig`."""


class Router:
    """Which adapter each row of the current batch uses.

    ``index`` is ``None`` (no adapter: the plain backbone), an ``int`` (every row uses that adapter) or a
    LongTensor ``[batch]`` of adapter indices.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.index: int | torch.Tensor | None = None

    def select(self, stacked: torch.Tensor) -> torch.Tensor:
        """Pick, from ``stacked`` ``[num_adapters, ...]``, the entry of each row: ``[...]`` for one adapter,
        ``[batch, ...]`` for per-row routing."""
        if isinstance(self.index, int):
            return stacked[self.index]
        return stacked[self.index.to(stacked.device)]

    @property
    def per_row(self) -> bool:
        return isinstance(self.index, torch.Tensor)


def matches(path: str, targets: Sequence[str] | str) -> bool:
    """``targets`` as PEFT reads them: a list of names matching the path or its dotted suffix, or one
    regular expression matching the whole path."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def linear_sites(backbone: nn.Module, targets: Sequence[str] | str, field: str) -> list[str]:
    """Paths of the ``nn.Linear`` modules that ``targets`` selects.

    Raises:
        ConfigError: nothing matches, or a match is not a linear layer.
    """
    found = []
    for path, module in backbone.named_modules():
        if path and matches(path, targets):
            if not isinstance(module, nn.Linear):
                if isinstance(targets, str) or any(path.endswith(t) for t in targets):
                    raise ConfigError(field, f"{path} is a {type(module).__name__}; adapters attach to "
                                             f"nn.Linear layers only")
                continue
            found.append(path)
    if not found:
        linear = sorted({p.rsplit(".", 1)[-1] for p, m in backbone.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(field, f"no linear layer of the backbone matches {targets!r}; its linear layer names: "
                                 f"{', '.join(linear)}")
    return found


def first_matching(backbone: nn.Module, candidates: Sequence[Sequence[str] | str]) -> Sequence[str] | str:
    """The first candidate target list that selects at least one linear layer of ``backbone`` (default
    targets differ between families: BERT ``query``, LLaMA/BART ``q_proj``, T5 ``q``)."""
    for cand in candidates:
        if any(p and isinstance(m, nn.Linear) and matches(p, cand) for p, m in backbone.named_modules()):
            return cand
    return candidates[0]


class AdapterMethod(ABC):
    """One parameter-efficient method. Subclasses register with ``@METHODS.register(name)``.

    Class attributes:
        config_class: the dataclass of the method's own keys in the ``adapters`` section (every field
            defaulted, with ``help``); they sit flat beside ``method`` and ``arrangement`` in the YAML.
        mergeable: the adapter can be folded into the backbone weights (``export --merge``).
        fusable: the adapter adds a change to a sub-layer's output, so AdapterFusion can attend over the
            outputs of several adapters (implements :meth:`delta`).
        peft_type: the PEFT type whose on-disk layout :meth:`peft_export` writes (None: multitune's own).
        peft_prompt_learning: the PEFT form is one tensor for the whole model (prompt and prefix tuning), not
            one adapter per module.
        peft_inexact: why PEFT's implementation computes something else than multitune's, so that no PEFT
            export can predict what multitune predicts (None: it computes the same).
        families: backbone families the method supports.
        feeds_cache: the adapters reach the layers as a pre-filled key/value cache (prefix tuning), which
            gradient checkpointing drops in the layers it recomputes.
        default_learning_rate: the rate of the method's parameters when ``adapters.learning_rate`` is not set
            (a few new parameters on a frozen backbone want far larger steps than full fine-tuning).

    Args:
        config: the validated ``adapters`` section, resolved (:meth:`AdapterConfig.resolve`): the method's
            own keys are ``config.options``, also kept as :attr:`options`.
        backbone: the backbone the adapters attach to (read, never modified here).
        architecture: the backbone family (see :mod:`multitune.backbones.architectures`).
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = False
    fusable: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None
    peft_prompt_learning: ClassVar[bool] = False
    peft_inexact: ClassVar[str | None] = None
    families: ClassVar[tuple[str, ...]] = ("encoder", "encoder_decoder", "decoder_only")
    feeds_cache: ClassVar[bool] = False
    default_learning_rate: ClassVar[float] = 1e-3

    def __init__(self, config: AdapterConfig, backbone: nn.Module, architecture: Any):
        self.config = config
        self.options = config.options
        self.architecture = architecture
        if architecture.type_name not in self.families:
            raise ConfigError("adapters.method", f"{config.method} supports {', '.join(self.families)} "
                                                 f"backbones, not {architecture.type_name}")

    @abstractmethod
    def sites(self, backbone: nn.Module) -> list[str]:
        """Paths of the backbone modules that get an adapter ("" is the whole token model)."""

    @abstractmethod
    def new_adapter(self, backbone: nn.Module, path: str, module: nn.Module) -> nn.Module:
        """A fresh adapter for the module at ``path``: a small ``nn.Module`` holding its parameters."""

    @abstractmethod
    def attach(self, backbone: nn.Module, path: str, module: nn.Module, adapters: Callable[[], list[nn.Module]],
               router: Router) -> list[Any]:
        """Register the hooks that apply ``adapters()[i]`` to the rows routed to adapter ``i``; return the
        hook handles."""

    def delta(self, adapter: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The change ``adapter`` makes to its site's output ``h`` (only if ``fusable``)."""
        raise MultituneError(f"{self.config.method} adapters cannot be fused")

    def merge(self, module: nn.Module, adapter: nn.Module) -> None:
        """Fold ``adapter`` into ``module``'s weights in place (only if ``mergeable``)."""
        raise ConfigError("adapters.method", f"{self.config.method} adapters cannot be merged into the backbone "
                                             f"(they are not a linear change of its weights)")

    def peft_export(self, backbone: nn.Module, adapters: dict[str, nn.Module]) -> tuple[Any, dict[str, torch.Tensor]]:
        """A PEFT config object and the adapter state dict in PEFT's key layout, for one adapter given as
        ``{site path: adapter module}`` (only methods that declare a ``peft_type``).

        Raises:
            MultituneError: this backbone family has no PEFT layout for the method.
        """
        raise MultituneError(f"{self.config.method} adapters have no PEFT layout")
