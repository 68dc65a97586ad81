"""ONNX export of a multi-task model (one graph: one backbone pass, every head) and inference on onnxruntime.

``onnx`` and ``onnxruntime`` are optional (``pip install 'multitune[onnx]'``); they are imported when a
function needs them. See docs/onnx.md.
"""

from multitune.onnx.export import export_onnx
from multitune.onnx.runtime import OnnxMultiTaskModel, is_onnx_model_dir

__all__ = ["OnnxMultiTaskModel", "export_onnx", "is_onnx_model_dir"]
