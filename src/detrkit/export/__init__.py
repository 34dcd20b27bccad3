"""Deployment: ONNX and OpenVINO export of a detector with its postprocessing."""

from detrkit.export.onnx import (
    ExportableDetector,
    ExportMismatchError,
    ExportSettingError,
    check_onnx,
    export_onnx,
    graph_operators,
    largest_stride,
    verify_onnx,
)
from detrkit.export.openvino import check_openvino, compile_openvino, export_openvino, verify_openvino

__all__ = ["ExportMismatchError", "ExportSettingError", "ExportableDetector", "check_onnx", "export_onnx",
           "graph_operators", "largest_stride", "verify_onnx", "check_openvino", "compile_openvino", "export_openvino",
           "verify_openvino"]
