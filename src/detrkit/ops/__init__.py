"""Tensor operations shared by every detector: box conversions, IoU, multi-scale deformable attention."""

from detrkit.ops.boxes import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
)
from detrkit.ops.ms_deform_attn import level_shapes, level_shapes_tensor, ms_deform_attn, ms_deform_attn_reference

__all__ = [
    "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou", "inverse_sigmoid",
    "level_shapes", "level_shapes_tensor", "ms_deform_attn", "ms_deform_attn_reference",
]
