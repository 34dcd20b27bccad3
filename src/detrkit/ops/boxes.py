"""Box helpers. Inside detrkit boxes are normalized (cx, cy, w, h); users see absolute xyxy.

The conversions and the IoU come from torchvision.ops; this module only names them the way the
rest of the code speaks and adds the DETR-family helpers torchvision does not have.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert
from torchvision.ops import generalized_box_iou as _tv_generalized_box_iou


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre-size boxes -> (..., 4) corner boxes."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) corner boxes -> (..., 4) centre-size boxes."""
    return box_convert(boxes, "xyxy", "cxcywh")


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU (Rezatofighi et al. 2019) of (N, 4) and (M, 4) xyxy boxes -> (N, M).

    Computed in float32 even under autocast: the enclosing-box area can underflow in half precision.
    """
    return _tv_generalized_box_iou(boxes1.float(), boxes2.float())


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped away from 0 and 1, as the deformable / DAB / DINO decoders use it."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
