"""D-FINE's decoder (Peng et al., ICLR 2025): RT-DETR's decoder with boxes as refined distributions.

Each layer is RT-DETR's (self-attention among queries, deformable cross-attention around each query's box, FFN)
with two of D-FINE's lightweight changes (section 4 and its official code): the cross-attention samples the
encoder's memory without value / output projections, and its output is fused with the residual by a learned gate
(:class:`Gate`) instead of an addition. The box head is FDR (section 3.1, :mod:`detrkit.layers.fdr`):

* layer 0 first predicts a box the RT-DETR way (``pre_bbox_head``: a refinement of the query's proposal in
  inverse-sigmoid space); that box, detached, is the *anchor* every later box is measured from;
* every layer ``l`` predicts residual logits of the four edge distributions from its hidden state plus the
  previous layer's (detached) hidden state and adds them to the previous layer's logits (eq. 4, kept undetached so
  that the refinement trains end to end); its box is the anchor moved by the distributions' expectations;
* the class logits get the layer's location-quality score (:class:`~detrkit.layers.fdr.LocationQualityEstimator`).

The last layer's distributions teach the earlier ones in training (GO-LSD, section 3.3;
:func:`~detrkit.losses.distribution.decoupled_distillation_loss`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.layers.deformable import MultiScaleDeformableAttention
from detrkit.layers.fdr import LocationQualityEstimator, distances_to_boxes, expected_distances, weighting_function
from detrkit.layers.mlp import MLP
from detrkit.ops import inverse_sigmoid
from detrkit.ops.ms_deform_attn import LevelShapes


class Gate(nn.Module):
    """D-FINE's gated residual after cross-attention: ``LayerNorm(g1 * residual + g2 * update)`` with
    ``(g1, g2) = sigmoid(Linear([residual, update]))`` per channel, so a layer can keep or replace what it had."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * d_model, 2 * d_model)
        self.norm = nn.LayerNorm(d_model)
        nn.init.zeros_(self.gate.weight)  # the official start: both halves weighted sigmoid(0.5)
        nn.init.constant_(self.gate.bias, 0.5)

    def forward(self, residual: Tensor, update: Tensor) -> Tensor:
        g1, g2 = self.gate(torch.cat([residual, update], -1)).sigmoid().chunk(2, -1)
        return self.norm(g1 * residual + g2 * update)


class DFineDecoderLayer(nn.Module):
    """Self-attention, projection-free deformable cross-attention with a :class:`Gate`, FFN; post-norm.
    ``n_points`` may be one count per level (D-FINE: 3 / 6 / 3)."""

    def __init__(self, d_model: int = 256, dim_feedforward: int = 1024, dropout: float = 0.0, n_levels: int = 3,
                 n_heads: int = 8, n_points: int | list[int] = 4, *, offset_scale: float = 0.5) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points,
                                                        offset_scale=offset_scale, projections=False)
        self.dropout2 = nn.Dropout(dropout)
        self.gateway = Gate(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: LevelShapes, level_start_index: Tensor, self_attn_mask: Tensor | None = None) -> Tensor:
        """tgt / query_pos (B, Q, C); reference_points (B, Q, 1, 4) boxes; memory (B, S, C) -> (B, Q, C)."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask=self_attn_mask,
                                                            need_weights=False)[0]))
        update = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index)
        tgt = self.gateway(tgt, self.dropout2(update))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3((tgt + self.dropout4(ffn)).clamp(-65504, 65504))  # the fp16 range, as the official code


@dataclass
class FDRDecoderOutput:
    """What the decoder predicts, per layer (L layers, B images, Q queries, K classes, R = reg_max).

    Attributes:
        pre_logits / pre_boxes: layer 0's RT-DETR-style prediction (B, Q, K) / (B, Q, 4) cxcywh, before FDR.
        logits: (L, B, Q, K) class logits with each layer's location-quality score added.
        boxes: (L, B, Q, 4) cxcywh, the anchor moved by each layer's distributions.
        corners: (L, B, Q, 4 * (R + 1)) each layer's edge-distribution logits (the last one teaches the others).
        anchors: (B, Q, 4) the detached layer-0 boxes every FDR box is measured from.
        hidden: (L, B, Q, C) each layer's output.
    """

    pre_logits: Tensor
    pre_boxes: Tensor
    logits: Tensor
    boxes: Tensor
    corners: Tensor
    anchors: Tensor
    hidden: Tensor


class FDRDecoder(nn.Module):
    """D-FINE's decoder (see the module docstring). Owns its heads: one class head and one distribution head per
    layer, ``pre_bbox_head`` and one location-quality estimator per layer.

    Args:
        layer: a :class:`DFineDecoderLayer`, copied ``num_layers`` times.
        num_classes: class logits per query.
        reg_max / reg_scale / up: the distributions' bins - 1 and the weighting function's shape (32, 4, 0.5).
        lqe_top_k / lqe_hidden / lqe_layers: the location-quality estimator (4, 64, 2).
        eval_idx: the layer whose prediction inference returns (-1: the last); layers after it run in training
            only (the last of them is GO-LSD's teacher): D-FINE-M trains 5 layers and infers with 4 (``-2``).
    """

    def __init__(self, layer: DFineDecoderLayer, num_layers: int, d_model: int, num_classes: int, *,
                 reg_max: int = 32, reg_scale: float = 4.0, up: float = 0.5, lqe_top_k: int = 4,
                 lqe_hidden: int = 64, lqe_layers: int = 2, eval_idx: int = -1) -> None:
        super().__init__()
        if not -num_layers <= eval_idx < num_layers:
            raise ValueError(f"eval_idx must index one of the {num_layers} decoder layers, got {eval_idx}")
        self.eval_idx = eval_idx % num_layers
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.query_pos_head = MLP(4, 2 * d_model, d_model, 2)
        self.pre_bbox_head = MLP(d_model, d_model, 4, 3)
        self.class_embed = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(num_layers))
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4 * (reg_max + 1), 3) for _ in range(num_layers))
        self.lqe_layers = nn.ModuleList(LocationQualityEstimator(reg_max, lqe_top_k, lqe_hidden, lqe_layers)
                                        for _ in range(num_layers))
        self.reg_max, self.reg_scale, self.up = reg_max, reg_scale, up
        self.eps = 1e-5  # inverse_sigmoid's clamp in the official and HF code (the denoising boxes use it too)
        self._reset_heads()

    def _reset_heads(self) -> None:
        """The official init: class heads at the focal prior (probability 0.01), the pre-FDR box head and every
        distribution head at zero (uniform distributions, whose expectation under the symmetric W is 0: every
        layer starts at its anchor), the query-position MLP Xavier."""
        for cls in self.class_embed:
            nn.init.constant_(cls.bias, -math.log((1 - 0.01) / 0.01))
        for head in [self.pre_bbox_head, *self.bbox_embed]:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, tgt: Tensor, anchors: Tensor, memory: Tensor, spatial_shapes: LevelShapes,
                level_start_index: Tensor, self_attn_mask: Tensor | None = None) -> FDRDecoderOutput:
        """tgt (B, Q, C) content queries; anchors (B, Q, 4) proposals before the sigmoid, detached."""
        # W(n) in the memory's dtype, made here (33 numbers) rather than kept as a float32 buffer cast later
        project = weighting_function(self.reg_max, self.up, self.reg_scale, dtype=memory.dtype, device=memory.device)
        ref = anchors.sigmoid()  # (B, Q, 4) the box each layer samples around, detached
        hidden, logits, boxes, corners = [], [], [], []
        prev_hidden, prev_corners = 0, 0
        last = len(self.layers) - 1 if self.training else self.eval_idx  # inference stops at eval_idx
        for lid, layer in enumerate(self.layers[:last + 1]):
            query_pos = self.query_pos_head(ref).clamp(-10, 10)  # (B, Q, C)
            tgt = layer(tgt, query_pos, ref[:, :, None], memory, spatial_shapes, level_start_index, self_attn_mask)
            if lid == 0:
                pre_boxes = (self.pre_bbox_head(tgt) + inverse_sigmoid(ref, self.eps)).sigmoid()
                pre_logits = self.class_embed[0](tgt)
                anchor = pre_boxes.detach()
            # FDR (eq. 4): residual logits on top of the previous layer's, from this and the previous hidden state
            layer_corners = self.bbox_embed[lid](tgt + prev_hidden) + prev_corners  # (B, Q, 4 * (R + 1))
            box = distances_to_boxes(anchor, expected_distances(layer_corners, project), self.reg_scale)
            logits.append(self.lqe_layers[lid](self.class_embed[lid](tgt), layer_corners))
            boxes.append(box)
            corners.append(layer_corners)
            hidden.append(tgt)
            prev_hidden, prev_corners, ref = tgt.detach(), layer_corners, box.detach()
        return FDRDecoderOutput(pre_logits, pre_boxes, torch.stack(logits), torch.stack(boxes), torch.stack(corners),
                                anchor, torch.stack(hidden))
