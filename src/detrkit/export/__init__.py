"""Deployment: ONNX export of a detector with its postprocessing."""

from detrkit.export.onnx import ExportableDetector, ExportMismatchError, check_onnx, export_onnx, verify_onnx

__all__ = ["ExportMismatchError", "ExportableDetector", "check_onnx", "export_onnx", "verify_onnx"]
