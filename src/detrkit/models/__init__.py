"""Detectors, one file per family. Importing this package registers every preset."""

from detrkit.models.d_fine import DFINE, build_d_fine
from detrkit.models.dab_detr import DABDETR, build_dab_detr
from detrkit.models.deformable_detr import DeformableDETR, build_deformable_detr
from detrkit.models.detr import DETR, build_detr
from detrkit.models.dino import DINO, build_dino
from detrkit.models.outputs import DetectionOutput, LayerOutput, LossConfig
from detrkit.models.postprocess import postprocess
from detrkit.models.rt_detr import RTDETR, build_rt_detr

__all__ = ["DABDETR", "DETR", "DFINE", "DINO", "RTDETR", "DeformableDETR", "DetectionOutput", "LayerOutput",
           "LossConfig", "build_d_fine", "build_dab_detr", "build_deformable_detr", "build_detr", "build_dino",
           "build_rt_detr", "postprocess"]
