"""Detectors, one file per family. Importing this package registers every preset."""

from detrkit.models.deformable_detr import DeformableDETR, build_deformable_detr
from detrkit.models.detr import DETR, build_detr
from detrkit.models.outputs import DetectionOutput
from detrkit.models.postprocess import postprocess

__all__ = ["DETR", "DeformableDETR", "DetectionOutput", "build_deformable_detr", "build_detr", "postprocess"]
