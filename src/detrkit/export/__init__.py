"""Deployment: ONNX export of a detector with its postprocessing."""

from detrkit.export.onnx import ExportableDetector, check_onnx, export_onnx

__all__ = ["ExportableDetector", "check_onnx", "export_onnx"]
