"""OpenVINO export: the ONNX graph of :mod:`detrkit.export.onnx` converted to OpenVINO IR (``.xml`` + ``.bin``) and
checked in OpenVINO's CPU runtime against PyTorch.

Same inputs and outputs as the ONNX graph (``images`` normalized, ``boxes`` / ``scores`` / ``labels``), dynamic batch
and image size kept. OpenVINO is an optional extra: ``pip install 'detrkit[openvino]'``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from detrkit.export.onnx import (
    ExportableDetector,
    detection_difference,
    export_onnx,
    refuse_mismatch,
    verification_images,
)

MISSING = "OpenVINO export needs the openvino package: pip install 'detrkit[openvino]'"


def _openvino():
    try:
        import openvino  # optional extra
    except ImportError:
        raise ImportError(MISSING) from None
    return openvino


def export_openvino(model: nn.Module, path: str | Path, *, image_size: tuple[int, int] = (640, 640),
                    batch_size: int = 1, label_to_cat: list[int] | None = None, top_k: int = 100,
                    dynamic: bool = True, sampling: str = "grid_sample", opset: int = 18) -> Path:
    """Export ``model`` + postprocessing to ONNX (``path`` with suffix .onnx, kept) and convert it to OpenVINO IR
    at ``path`` (.xml, its weights in the .bin beside it). Options as for :func:`~detrkit.export.export_onnx`."""
    ov = _openvino()
    path = Path(path).with_suffix(".xml")
    onnx_path = export_onnx(model, path.with_suffix(".onnx"), image_size=image_size, batch_size=batch_size,
                            label_to_cat=label_to_cat, top_k=top_k, dynamic=dynamic, sampling=sampling, opset=opset)
    # save_model would store the weights in float16 by default (compress_to_fp16): keep them exact
    ov.save_model(ov.convert_model(str(onnx_path)), str(path), compress_to_fp16=False)
    return path


def compile_openvino(path: str | Path, *, precision: str = "f32"):
    """The IR at ``path`` compiled for OpenVINO's CPU plugin. ``precision``: the inference precision hint; ``f32``
    by default, because on CPUs with bf16 units OpenVINO would otherwise compute in bf16 (faster, ~3 digits)."""
    ov = _openvino()
    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision})


def check_openvino(path: str | Path, model: nn.Module, images: Tensor, *, label_to_cat: list[int] | None = None,
                   top_k: int = 100, compiled=None) -> dict:
    """Run the IR at ``path`` in OpenVINO (CPU, f32) on ``images`` and compare with the PyTorch model; returns the
    max differences (as :func:`~detrkit.export.onnx.check_onnx`)."""
    compiled = compiled or compile_openvino(path)
    with torch.no_grad():
        expected = ExportableDetector(model, label_to_cat, top_k).eval()(images.float())
    result = compiled(images.float().numpy())
    got = tuple(result[compiled.output(i)] for i in range(3))  # boxes, scores, labels
    return detection_difference(expected, got, tuple(images.shape[-2:]))


def verify_openvino(path: str | Path, model: nn.Module, *, image_size: tuple[int, int], batch_size: int = 1,
                    dynamic: bool = True, label_to_cat: list[int] | None = None, top_k: int = 100,
                    tolerance: float = 1e-3) -> list[dict]:
    """:func:`check_openvino` on the images of :func:`~detrkit.export.onnx.verification_images`; raises
    :class:`~detrkit.export.ExportMismatchError` beyond ``tolerance``."""
    compiled = compile_openvino(path)
    rows = [{"shape": tuple(images.shape), **check_openvino(path, model, images, label_to_cat=label_to_cat,
                                                             top_k=top_k, compiled=compiled)}
            for images in verification_images(image_size, batch_size, dynamic)]
    return refuse_mismatch(rows, f"the OpenVINO model {path}", tolerance)
