"""``fxadapt.export_onnx``: ONNX export with BatchNorm folding, simplification and a numerical check.

The exporter is ``fxadapt.hw.onnx`` (the onnxruntime targets measure models through it, and ``hw`` sits
below ``export``); this module is its public path.
"""

from fxadapt.hw.onnx import ATOL, ExportError, ExportResult, export_onnx, float_dtype, prepare

__all__ = ["ATOL", "ExportError", "ExportResult", "export_onnx", "float_dtype", "prepare"]
