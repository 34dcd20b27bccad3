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
    """logit(x) with x clamped to [eps, 1 - eps], as the deformable / DAB / DINO decoders use it.

    The clamp decides the boxes of queries whose reference is close to an image edge, so each family uses its
    reference implementation's: 1e-5 in fundamentalvision/Deformable-DETR and HF transformers (util/misc.py /
    modeling_*.py), 1e-3 in IDEA-Research's DAB-DETR, DN-DETR, DINO and detrex (their util/misc.py).
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
