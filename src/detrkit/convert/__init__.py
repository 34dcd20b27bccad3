"""Checkpoint conversion from the reference implementations to detrkit's parameter names."""

from detrkit.convert.detrex import convert_detectron2_resnet_key, convert_detrex, convert_detrex_dino
from detrkit.convert.hf import convert_hf_dab_detr, convert_hf_deformable_detr, convert_hf_detr, convert_hf_resnet_key
from detrkit.convert.official import (
    convert_official_dab_detr,
    convert_official_deformable_detr,
    convert_official_detr,
    convert_official_dino,
)

__all__ = [
    "convert_detectron2_resnet_key",
    "convert_detrex",
    "convert_detrex_dino",
    "convert_hf_dab_detr",
    "convert_hf_deformable_detr",
    "convert_hf_detr",
    "convert_hf_resnet_key",
    "convert_official_dab_detr",
    "convert_official_deformable_detr",
    "convert_official_detr",
    "convert_official_dino",
]
