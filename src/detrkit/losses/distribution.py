"""D-FINE's distribution losses (Peng et al., ICLR 2025): the fine-grained localization (FGL) loss of section 3.2
and GO-LSD's decoupled distillation focal (DDF) loss of section 3.3, on the edge distributions of
:mod:`detrkit.layers.fdr` (its :func:`~detrkit.layers.fdr.bin_targets` makes FGL's targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fine_grained_localization_loss(corners: Tensor, index: Tensor, w_left: Tensor, w_right: Tensor,
                                   weight: Tensor, num_boxes: float) -> Tensor:
    """D-FINE's FGL loss (section 3.2, eq. 5): for each matched edge, cross-entropy on the two bins around the
    target, each in its share of the target, weighted by the match's IoU; summed and divided by the number of
    boxes.

    corners (M, 4 * (reg_max + 1)) logits of the matched queries; index / w_left / w_right (M, 4) from
    :func:`bin_targets`; weight (M,) the IoU of each prediction with its target."""
    logits = corners.reshape(-1, corners.shape[-1] // 4)  # (M * 4, reg_max + 1)
    index = index.reshape(-1)
    loss = (F.cross_entropy(logits, index, reduction="none") * w_left.reshape(-1)
            + F.cross_entropy(logits, index + 1, reduction="none") * w_right.reshape(-1))
    return (loss * weight.repeat_interleave(4)).sum() / num_boxes


def decoupled_distillation_loss(corners: Tensor, teacher: Tensor, weight: Tensor, matched: Tensor,
                                temperature: float = 5.0) -> Tensor:
    """GO-LSD's decoupled distillation focal (DDF) loss (D-FINE section 3.3, eq. 6): each earlier layer's edge
    distributions learn the last layer's (the teacher's, detached) through a KL divergence at ``temperature``,
    weighted per query (the IoU of a matched query, the class confidence of an unmatched one); matched and
    unmatched queries are averaged apart and mixed in the ratio of the square roots of their counts, so that the
    few matched queries are not drowned by the many unmatched ones.

    corners / teacher (B, N, 4 * (reg_max + 1)); weight (B, N); matched (B, N) bool. Zero when ``corners`` equals
    ``teacher`` (the last layer teaching itself)."""
    if torch.equal(corners, teacher):  # the teacher itself: exactly zero, not KL's round-off
        return corners.sum() * 0
    bins = corners.shape[-1] // 4
    student = F.log_softmax(corners.reshape(-1, bins) / temperature, -1)
    target = F.softmax(teacher.detach().reshape(-1, bins) / temperature, -1)
    kl = F.kl_div(student, target, reduction="none").sum(-1) * temperature**2  # (B * N * 4,)
    kl = kl * weight.detach()[..., None].expand(*weight.shape, 4).reshape(-1)
    mask = matched[..., None].expand(*matched.shape, 4).reshape(-1)
    per_image = 1 / corners.shape[0]
    n_pos, n_neg = (mask.sum().to(kl) * per_image).sqrt(), ((~mask).sum().to(kl) * per_image).sqrt()
    pos = kl[mask].mean() if mask.any() else kl.new_zeros(())
    neg = kl[~mask].mean() if (~mask).any() else kl.new_zeros(())
    return (pos * n_pos + neg * n_neg) / (n_pos + n_neg)
