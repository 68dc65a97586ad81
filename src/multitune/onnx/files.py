"""What an ONNX model directory holds, and the optional packages that read and write it."""

from __future__ import annotations

import importlib
from types import ModuleType

from multitune.errors import MultituneError

#: the graph: token inputs in, every head task's raw outputs and the sentence embedding out
GRAPH_FILE = "model.onnx"
#: input and output names, opset, which task reads which outputs, labels
ONNX_META_FILE = "onnx.json"
ONNX_FORMAT = "multitune-onnx"
ONNX_FORMAT_VERSION = 1
SENTENCE_EMBEDDING = "sentence_embedding"
#: how a task's prediction comes from the graph
IN_GRAPH = "graph"  # the task's head is in the graph: its outputs are named ``<task>.<output>``
FROM_EMBEDDINGS = "embeddings"  # a head without parameters on sentence embeddings (bi-encoder cosine)


def require(module: str) -> ModuleType:
    """Import an optional package of the ``onnx`` extra.

    Args:
        module: ``onnx`` or ``onnxruntime``.

    Returns:
        The module.

    Raises:
        MultituneError: the package is not installed (naming the extra to install).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MultituneError(f"ONNX export and inference need the optional extra: pip install 'multitune[onnx]' "
                             f"({exc})") from None
