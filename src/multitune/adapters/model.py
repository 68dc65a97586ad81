"""Every adapter of a run, attached to one backbone: building, routing, counting, merging and export."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from multitune.adapters.base import METHODS, Router
from multitune.adapters.fusion import AdapterFusionLayer, fusion_hook
from multitune.config.adapters import AdapterConfig
from multitune.errors import ConfigError, MultituneError

SHARED = "shared"


class AdapterSet(nn.Module):
    """The adapters of all tasks on a (frozen) backbone, with hooks that route each row to its adapter.

    ``per_task`` gives each task its own adapter; ``shared`` one adapter for every task;
    ``shared_conditioned`` one shared adapter plus a learned task embedding (zero at the start) added to
    every input token embedding, so that the shared adapter knows which task a row belongs to; ``fusion``
    one adapter per task plus, for each target task, AdapterFusion layers that attend over every task's
    adapter output (see :mod:`multitune.adapters.fusion`).

    Args:
        config: the validated ``adapters`` section.
        backbone: the backbone; hooks are registered on its modules, its parameters are not touched.
        architecture: the backbone family.
        tasks: the run's task names, in order.

    Raises:
        ConfigError: the method does not fit the backbone (family, target modules).
    """

    def __init__(self, config: AdapterConfig, backbone: nn.Module, architecture: Any, tasks: Sequence[str]):
        super().__init__()
        if not config.resolved:  # built from a plain mapping, not through the config loader
            config.resolve(METHODS, "adapters")
        self.config = config
        self.task_names = list(tasks)
        self.method = METHODS.get(config.method, "adapters.method")(config, backbone, architecture)
        per_task = config.layout.per_task
        self.names = self.task_names if per_task else [SHARED]
        self.assignment = {t: (t if per_task else SHARED) for t in self.task_names}
        self.site_paths = self.method.sites(backbone)
        self.adapters = nn.ModuleDict({
            name: nn.ModuleDict({f"s{i}": self.method.new_adapter(backbone, p, backbone.get_submodule(p))
                                 for i, p in enumerate(self.site_paths)})
            for name in self.names})
        self.router = Router(self.names)
        self.fusion = None
        self.fusion_targets: list[str] = []
        if config.layout.staged:  # AdapterFusion: fusion layers over the per-task adapters
            self._build_fusion(backbone)
        self._handles = []
        for i, path in enumerate(self.site_paths):
            def of_site(i=i):
                return [self.adapters[n][f"s{i}"] for n in self.names]
            module = backbone.get_submodule(path)
            if self.fusion is not None:
                def fusion_of_site(i=i):
                    return [self.fusion[t][f"s{i}"] for t in self.fusion_targets]
                self._handles.append(module.register_forward_hook(fusion_hook(
                    of_site, self.method.delta, fusion_of_site, self.router, self.fusion_router,
                    self._record_attention)))
            else:
                self._handles += self.method.attach(backbone, path, module, of_site, self.router)
        self.task_router = Router(self.task_names)
        self.task_embeddings = None
        if config.layout.task_embedding:
            emb = architecture.token_model(backbone).get_input_embeddings()
            self.task_embeddings = nn.Parameter(torch.zeros(len(self.task_names), emb.embedding_dim,
                                                            device=emb.weight.device))

            def condition(mod, args, output):
                if self.task_router.index is None:
                    return None
                e = self.task_router.select(self.task_embeddings)
                return output + (e.unsqueeze(1) if self.task_router.per_row else e).to(output.dtype)

            self._handles.append(emb.register_forward_hook(condition))

    def _build_fusion(self, backbone: nn.Module) -> None:
        """AdapterFusion layers for the target tasks (see :mod:`multitune.adapters.fusion`)."""
        if not self.method.fusable:
            raise ConfigError("adapters.arrangement", f"fusion attends over adapter outputs; method "
                                                      f"{self.config.method!r} cannot be fused (use bottleneck)")
        self.fusion_targets = list(self.config.fusion_targets or self.task_names)
        for t in self.fusion_targets:
            if t not in self.task_names:
                raise ConfigError("adapters.fusion_targets", f"no task {t!r} in this model (tasks: "
                                                             f"{', '.join(self.task_names)})")
        self.fusion = nn.ModuleDict({
            t: nn.ModuleDict({f"s{i}": AdapterFusionLayer(backbone.get_submodule(p).out_features,
                                                          backbone.get_submodule(p).weight.device)
                              for i, p in enumerate(self.site_paths)})
            for t in self.fusion_targets})
        self.fusion_router = Router(self.fusion_targets)
        self._attention_sum = torch.zeros(len(self.fusion_targets), len(self.names), dtype=torch.float64)
        self._attention_count = torch.zeros(len(self.fusion_targets), dtype=torch.float64)

    def _record_attention(self, target: int, attention: torch.Tensor, rows: torch.Tensor | None) -> None:
        if self.training:  # bookkeeping of inference only; training steps must stay cheap
            return
        self._attention_sum[target] += attention.detach().float().mean(dim=(0, 1)).double().cpu()
        self._attention_count[target] += 1

    def fusion_attention(self, reset: bool = True) -> dict[str, dict[str, float]]:
        """Mean fusion attention of each target task over the adapters, averaged over sites and the
        inference batches since the last reset: which tasks' adapters a target draws on."""
        if self.fusion is None:
            return {}
        out = {}
        for j, t in enumerate(self.fusion_targets):
            if self._attention_count[j] > 0:
                mean = self._attention_sum[j] / self._attention_count[j]
                out[t] = {n: round(float(v), 4) for n, v in zip(self.names, mean)}
        if reset:
            self._attention_sum.zero_()
            self._attention_count.zero_()
        return out

    # -- routing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, tasks: str | Sequence[str] | None) -> Iterator[None]:
        """Within the block, the backbone runs with the adapter of ``tasks``: one task name for the whole
        batch, one name per row (mixed-task batch), or None (the shared adapter if there is one, else the
        plain backbone)."""
        fusion = self.fusion_router if self.fusion is not None else Router([])
        saved = self.router.index, self.task_router.index, fusion.index
        if tasks is None:
            self.router.index = 0 if self.names == [SHARED] else None
            self.task_router.index = fusion.index = None
        elif isinstance(tasks, str):
            self.router.index = self.names.index(self.assignment[tasks])
            self.task_router.index = self.task_names.index(tasks)
            fusion.index = self.fusion_targets.index(tasks) if tasks in self.fusion_targets else None
        else:
            self.router.index = torch.tensor([self.names.index(self.assignment[t]) for t in tasks])
            self.task_router.index = torch.tensor([self.task_names.index(t) for t in tasks])
            fusion.index = torch.tensor([self.fusion_targets.index(t) if t in self.fusion_targets else -1
                                         for t in tasks])
        try:
            yield
        finally:
            self.router.index, self.task_router.index, fusion.index = saved

    def recompute_context(self) -> contextlib.AbstractContextManager:
        """A context that brings back the routing in force now (for gradient checkpointing: a checkpointed layer
        runs again in the backward pass, after its :meth:`route` block has ended, and must go through the same
        adapters as in the forward pass)."""
        fusion = self.fusion_router if self.fusion is not None else Router([])
        routers = (self.router, self.task_router, fusion)
        forward = tuple(r.index for r in routers)

        @contextlib.contextmanager
        def restored() -> Iterator[None]:
            saved = tuple(r.index for r in routers)
            for r, index in zip(routers, forward):
                r.index = index
            try:
                yield
            finally:
                for r, index in zip(routers, saved):
                    r.index = index

        return restored()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- reporting -------------------------------------------------------------------------------
    def parameters_of(self, task: str) -> list[nn.Parameter]:
        """The adapter parameters a task's rows go through: its adapter (every task's adapter and its fusion
        layers for an AdapterFusion target); its task embedding row is counted by :meth:`bytes_per_task`."""
        if task in self.fusion_targets:
            return list(self.adapters.parameters()) + list(self.fusion[task].parameters())
        return list(self.adapters[self.assignment[task]].parameters())

    def bytes_per_task(self) -> dict[str, int]:
        """Bytes stored for each task's adapter (shared adapters are counted once per task that uses them,
        plus the task's embedding row)."""
        out = {}
        for t in self.task_names:
            n = sum(p.numel() * p.element_size() for p in self.parameters_of(t))
            if self.task_embeddings is not None:
                n += self.task_embeddings.shape[1] * self.task_embeddings.element_size()
            out[t] = n
        return out

    def modules_by_site(self, task: str) -> dict[str, nn.Module]:
        ad = self.adapters[self.assignment[task]]
        return {p: ad[f"s{i}"] for i, p in enumerate(self.site_paths)}

    # -- export ----------------------------------------------------------------------------------
    def merge_into(self, backbone: nn.Module, task: str) -> None:
        """Fold ``task``'s adapter into ``backbone``'s weights (a backbone without these hooks).

        Raises:
            MultituneError: the method does not merge, or the task's rows also need a task embedding.
        """
        if not self.method.mergeable:
            raise MultituneError(f"{self.config.method} adapters cannot be merged into the backbone "
                                 f"(only lora, dora and ia3 are linear in the weights)")
        if self.task_embeddings is not None:
            raise MultituneError("shared_conditioned adapters add a task embedding to the inputs; "
                                 "they cannot be merged into plain backbone weights")
        for path, ad in self.modules_by_site(task).items():
            self.method.merge(backbone.get_submodule(path), ad)

    def export_peft(self, backbone: nn.Module, task: str, directory: str | Path) -> Path:
        """Write ``task``'s adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's
        layout (``peft.PeftModel.from_pretrained(base_model, directory)`` loads it).

        Raises:
            MultituneError: the method has no PEFT equivalent (bottleneck) or needs a task embedding.
        """
        if self.method.peft_type is None or self.task_embeddings is not None:
            raise MultituneError(f"{self.config.method} ({self.config.arrangement}) has no PEFT equivalent; "
                                 f"use the multitune model directory")
        config, state = self.method.peft_export(backbone, self.modules_by_site(task))
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config.base_model_name_or_path = None
        config.inference_mode = True
        config.save_pretrained(str(directory))
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()},
                  str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        return directory


