"""D-FINE's boxes as distributions: Fine-grained Distribution Refinement (FDR).

D-FINE (Peng et al., ICLR 2025, "Redefine Regression Task in DETRs as Fine-grained Distribution Refinement",
section 3.1) predicts a box as its anchor (the first decoder layer's box, ``cxcywh``) plus four edge distances, and
each distance as a probability distribution over ``reg_max + 1`` bins. A bin ``n`` stands for the offset ``W(n)``
of the *weighting function* (eq. 3): zero in the middle bin, small and finely spaced around it, growing
exponentially towards the ends, ``+-2 a`` at the last bins (``a = up * reg_scale``). The distance is the
distribution's expectation ``sum_n Pr(n) W(n)`` (eq. 2), in units of ``w / reg_scale`` beyond the anchor's half-width
(eq. 1: ``x1 = cx - (1/2 + d_left / reg_scale) w``). Each decoder layer adds residual logits to the previous layer's
(eq. 4), so a deeper layer refines the distribution instead of regressing the box again.

Training targets (section 3.2; the losses are in losses/distribution.py): a ground-truth distance falls between two
neighbouring bins of ``W``; the two bins share it in linear proportion (:func:`bin_targets`).
:class:`LocationQualityEstimator` turns how peaked the four distributions are into a score added to the class
logits (D-FINE's official code; the paper's appendix calls it the localization quality estimator).

Shapes: ``corners`` are logits (..., 4 * (reg_max + 1)) in the order left, top, right, bottom.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.layers.mlp import MLP
from detrkit.ops.boxes import box_xyxy_to_cxcywh


def weighting_function(reg_max: int, up: float, reg_scale: float, *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> Tensor:
    """W(n) for n = 0 .. reg_max (D-FINE eq. 3): (reg_max + 1,).

    With ``a = |up| |reg_scale|`` and ``c = (a + 1) ** (2 / (reg_max - 2))``: ``W(0) = -2a``, ``W(reg_max) = 2a``,
    ``W(reg_max / 2) = 0`` and ``W(reg_max / 2 +- k) = +-(c**k - 1)`` for ``k = 1 .. reg_max / 2 - 1``, so the
    bins next to the last ones sit at ``+-a`` and the spacing is finest around zero (small corrections are
    expressed precisely, large ones coarsely). ``reg_max`` must be even and at least 4.
    """
    if reg_max < 4 or reg_max % 2:
        raise ValueError(f"reg_max must be an even number >= 4, got {reg_max}")
    a = abs(up) * abs(reg_scale)
    c = torch.tensor(a + 1.0, dtype=torch.float64) ** (2.0 / (reg_max - 2))
    side = c ** torch.arange(1, reg_max // 2, dtype=torch.float64) - 1  # (reg_max / 2 - 1,)
    ends = torch.tensor([2 * a], dtype=torch.float64)
    values = torch.cat([-ends, -side.flip(0), side.new_zeros(1), side, ends])  # (reg_max + 1,)
    return values.to(dtype=dtype, device=device)


def expected_distances(corners: Tensor, project: Tensor) -> Tensor:
    """The four edge distances as their distributions' expectations (D-FINE eq. 2).

    corners (..., 4 * (reg_max + 1)) logits, project = W (reg_max + 1,) -> (..., 4)."""
    bins = project.shape[0]
    probs = corners.unflatten(-1, (4, bins)).softmax(-1)  # (..., 4, reg_max + 1)
    # W as a (bins, 1) column, not a vector: OpenVINO 2026.4's MatMul fusion misreads a 1-D right operand
    return (probs @ project.to(probs)[:, None]).squeeze(-1)


def distances_to_boxes(anchors: Tensor, distances: Tensor, reg_scale: float) -> Tensor:
    """Anchor boxes (..., 4) cxcywh and edge distances (..., 4) -> boxes (..., 4) cxcywh (D-FINE eq. 1): each edge
    lies ``1/2 + d / reg_scale`` of the anchor's width (height) from its centre."""
    s = abs(reg_scale)
    cx, cy, w, h = anchors.unbind(-1)
    left, top, right, bottom = (0.5 + distances / s).unbind(-1)
    xyxy = torch.stack([cx - left * w, cy - top * h, cx + right * w, cy + bottom * h], -1)
    return box_xyxy_to_cxcywh(xyxy)


def boxes_to_distances(anchors: Tensor, boxes_xyxy: Tensor, reg_scale: float) -> Tensor:
    """The inverse of :func:`distances_to_boxes`: the edge distances (..., 4) that put ``anchors`` (cxcywh) on
    ``boxes_xyxy``; the fine-grained localization loss's targets."""
    s = abs(reg_scale)
    cx, cy, w, h = anchors.unbind(-1)
    x1, y1, x2, y2 = boxes_xyxy.unbind(-1)
    w, h = w / s + 1e-16, h / s + 1e-16  # the official code's guard against an empty anchor
    return torch.stack([(cx - x1) / w, (cy - y1) / h, (x2 - cx) / w, (y2 - cy) / h], -1) - 0.5 * s


def bin_targets(distances: Tensor, project: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Where each target distance falls on W (D-FINE section 3.2): (left bin index, its weight, the right bin's
    weight), each shaped like ``distances``. Inside W's range the two neighbouring bins share the distance in
    linear proportion, so ``W[left] * w_left + W[left + 1] * w_right == distance``; below it everything goes to the
    first bin, above it to the last."""
    reg_max = project.shape[0] - 1
    flat = distances.reshape(-1)
    left = (project[None] <= flat[:, None]).sum(1) - 1  # the last bin at or below the distance: -1 .. reg_max
    below, above = left < 0, left >= reg_max
    index = left.clamp(0, reg_max - 1)
    lo, hi = project[index], project[index + 1]
    w_right = ((flat - lo).abs() / ((flat - lo).abs() + (hi - flat).abs())).masked_fill(below, 0.0)
    w_right = w_right.masked_fill(above, 1.0)
    return index.view_as(distances), (1 - w_right).view_as(distances), w_right.view_as(distances)


class LocationQualityEstimator(nn.Module):
    """A score for how sure the box is, added to the class logits: the ``top_k`` largest probabilities of each
    edge's distribution and their mean (a peaked distribution = a well-placed edge) through a small MLP.

    Args:
        reg_max: bins - 1 of each edge's distribution.
        top_k: probabilities kept per edge (4 in D-FINE).
        hidden_dim / num_layers: the MLP (64 and 2 in D-FINE).
    """

    def __init__(self, reg_max: int = 32, top_k: int = 4, hidden_dim: int = 64, num_layers: int = 2) -> None:
        super().__init__()
        self.reg_max, self.top_k = reg_max, top_k
        self.reg_conf = MLP(4 * (top_k + 1), hidden_dim, 1, num_layers)  # named as in the official code
        nn.init.zeros_(self.reg_conf.layers[-1].weight)  # starts adding nothing to the class logits
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, logits: Tensor, corners: Tensor) -> Tensor:
        """logits (B, N, K), corners (B, N, 4 * (reg_max + 1)) -> logits + quality (B, N, K)."""
        probs = corners.unflatten(-1, (4, self.reg_max + 1)).softmax(-1)  # (B, N, 4, reg_max + 1)
        top = probs.topk(self.top_k, dim=-1).values  # (B, N, 4, top_k)
        stats = torch.cat([top, top.mean(-1, keepdim=True)], -1).flatten(-2)  # (B, N, 4 * (top_k + 1))
        return logits + self.reg_conf(stats)
