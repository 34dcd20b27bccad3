"""Prediction heads shared by the query-based families (Deformable DETR, DAB-DETR, DN-DETR, DINO)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrkit.layers.mlp import MLP
from detrkit.ops import inverse_sigmoid


@dataclass(frozen=True)
class LayerOutput:
    """One set of predictions: a decoder layer's, the two-stage encoder proposals', or a layer's denoising queries.

    Attributes:
        pred_logits: (B, N, K) class logits.
        pred_boxes: (B, N, 4) boxes, normalized (cx, cy, w, h) in [0, 1].
        corners: D-FINE: (B, N, 4 * (reg_max + 1)) the layer's edge-distribution logits (FDR), else None.
        anchors: D-FINE: (B, N, 4) the detached boxes the distributions are measured from, else None.
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    corners: Tensor | None = None
    anchors: Tensor | None = None


def focal_class_head(d_model: int, num_classes: int, prior_prob: float = 0.01) -> nn.Linear:
    """A sigmoid class head whose every class starts at probability ``prior_prob``.

    The focal loss's prior initialisation (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017,
    section 4.1): with most queries matched to nothing, a 0.5 start would let the background swamp the first steps.
    """
    head = nn.Linear(d_model, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
    return head


def zero_box_head(d_model: int, num_layers: int = 3) -> MLP:
    """A box head (MLP -> 4 deltas in inverse-sigmoid space) whose last layer starts at zero, so that the first
    prediction of each query is exactly its reference box (Deformable DETR appendix A.4, DAB-DETR, DINO)."""
    head = MLP(d_model, d_model, 4, num_layers)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


def aux_outputs(logits: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[LayerOutput]:
    """Per-layer predictions (L, B, Q, *) -> a :class:`LayerOutput` for every layer but the last, first to
    second-to-last: the auxiliary decoding losses' inputs (DETR section 3.2)."""
    return [LayerOutput(lg, bx) for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)]


def refined_predictions(hidden: Tensor, refs: Sequence[Tensor], class_embed: Sequence[nn.Module],
                        bbox_embed: Sequence[nn.Module], eps: float) -> tuple[Tensor, Tensor]:
    """Iterative box refinement's outputs (Deformable DETR section 4.2, as DINO and RT-DETR use it): each decoder
    layer's logits, and its box as its box head's offset added, in inverse-sigmoid space, to the box the layer refines.
    hidden (L, B, N, C), refs [(B, N, 4)] * L in sigmoid space -> logits (L, B, N, K), boxes (L, B, N, 4)."""
    logits = torch.stack([class_embed[i](h) for i, h in enumerate(hidden)])
    boxes = torch.stack([(bbox_embed[i](h) + inverse_sigmoid(refs[i], eps)).sigmoid() for i, h in enumerate(hidden)])
    return logits, boxes
