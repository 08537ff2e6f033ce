"""Export of deploy-form (re-parameterised) models to ONNX and ``torch.export``.

``export_onnx(model, path, input_size)`` re-parameterises a copy of ``model``, exports it with plain ``Conv``
nodes and checks it in onnxruntime; ``export_program(model, example)`` returns a ``torch.export`` program.
"""

from .onnx import ExportError, OnnxExport, check_onnx, example_input, export_onnx, export_program, plain_dwconv

__all__ = ["export_onnx", "export_program", "check_onnx", "plain_dwconv", "example_input", "OnnxExport",
           "ExportError"]
