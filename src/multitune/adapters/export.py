"""``multitune export``: one task of an adapter model as a deployable directory.

- ``merge=True``: the task's LoRA / DoRA / IA3 adapter folded into the backbone weights. The result is a
  plain transformers model directory (``AutoModel.from_pretrained`` loads it, no adapter code needed) that
  is also a one-task multitune model (``multitune.load`` / ``predict`` work on it).
- ``merge=False``: the task's adapter alone, in PEFT's layout (``adapter_config.json`` +
  ``adapter_model.safetensors``; bottleneck adapters in multitune's own ``adapter.safetensors``), plus the
  task's head (``head.safetensors``) and ``task.json`` with its labels and settings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from multitune.config.parse import to_dict
from multitune.errors import MultituneError
from multitune.fileio import replace_dir


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def export_task(run: str | Path, task: str, output: str | Path, merge: bool = False, overwrite: bool = False) -> dict:
    """Write ``task`` of the model in ``run`` to ``output`` (see the module docstring).

    Returns:
        A report: ``output``, ``files`` and ``bytes`` (bytes of the adapter files for an unmerged export).

    Raises:
        MultituneError: no such task, a model without adapters, a method that does not merge, or a non-empty
            ``output`` without ``overwrite``.
    """
    from multitune.model import MultiTaskModel

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise MultituneError(f"{output}: exists and is not empty (pass --overwrite to replace it)")
    model = MultiTaskModel.load(run)
    if task not in model.tasks:
        raise MultituneError(f"the model has no task {task!r}; its tasks: {', '.join(model.tasks)}")
    if model.adapters is None:
        raise MultituneError(f"{run}: the model has no adapters; its model directory already is the export")
    if task in model.adapters.fusion_targets:
        raise MultituneError(f"task {task!r} uses AdapterFusion over every task's adapter; it has no "
                             f"single-adapter export, deploy the run's model directory")
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if merge:
            adapters = model.adapters
            adapters.remove_hooks()
            adapters.merge_into(model.backbone, task)
            single = MultiTaskModel(model.backbone, {task: model.tasks[task]}, model.tokenizer, model.pooling,
                                    model.normalize_embeddings, model.max_length,
                                    architecture=model.architecture.type_name)
            single.heads[task].load_state_dict(model.heads[task].state_dict())
            single.save(tmp, extra={"exported_from": str(run), "merged_adapter": adapters.config.method})
            report_bytes = _size(tmp)
        else:
            tmp.mkdir(parents=True)
            if model.adapters.method.peft_type is not None:
                model.adapters.export_peft(model.backbone, task, tmp)
            else:  # no PEFT equivalent (bottleneck): multitune's own layout
                state = {f"{p}.{k}": v.detach().cpu().contiguous()
                         for p, ad in model.adapters.modules_by_site(task).items() for k, v in ad.state_dict().items()}
                save_file(state, str(tmp / "adapter.safetensors"), metadata={"format": "multitune-adapter"})
                (tmp / "adapter_config.json").write_text(json.dumps(to_dict(model.adapters.config), indent=2))
            report_bytes = _size(tmp)
            head = {k: v.detach().cpu().contiguous() for k, v in model.heads[task].state_dict().items()}
            save_file(head, str(tmp / "head.safetensors"), metadata={"format": "multitune-head"})
            cfg = to_dict(model.tasks[task].config)
            cfg.pop("data", None)
            (tmp / "task.json").write_text(json.dumps({"name": task, "config": cfg, "state": model.tasks[task].state(),
                                                      "pooling": model.pooling}, indent=2))
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(output), "task": task, "merged": merge,
            "files": sorted(f.name for f in output.iterdir()), "bytes": report_bytes}
