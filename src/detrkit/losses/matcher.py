"""Bipartite matching between predictions and ground truth (DETR section 3.1, equation 1).

The matching cost of prediction i and object j is
    cost_class * C_class(i, j) + cost_bbox * |b_i - b_j|_1 + cost_giou * (-GIoU(b_i, b_j)),
and the Hungarian algorithm (scipy's linear_sum_assignment) picks the assignment of least total
cost per image. All cost matrices of a batch are computed on the device in one pass and moved to
the CPU in one transfer; only the assignment itself runs per image.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detrkit.ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Match each image's targets to its predictions one to one.

    Args:
        cost_class: weight of the classification cost.
        cost_bbox: weight of the L1 distance of normalized cxcywh boxes.
        cost_giou: weight of the negative generalized IoU.
        focal: classification cost of focal-loss models (Deformable DETR onwards) instead of -p(class).
        alpha, gamma: focal cost parameters.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        *,
        focal: bool = False,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal, self.alpha, self.gamma = focal, alpha, gamma

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        """pred_logits (B, Q, K), pred_boxes (B, Q, 4) -> cost (B, Q, T) against all T targets of the batch."""
        b, q = pred_logits.shape[:2]
        logits = pred_logits.flatten(0, 1).float()  # (B*Q, K)
        boxes = pred_boxes.flatten(0, 1).float()  # (B*Q, 4)
        tgt_ids = torch.cat([t["labels"] for t in targets])  # (T,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()  # (T, 4)

        if self.focal:
            prob = logits.sigmoid()
            neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
            pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
            c_class = pos[:, tgt_ids] - neg[:, tgt_ids]  # (B*Q, T)
        else:
            c_class = -logits.softmax(-1)[:, tgt_ids]  # (B*Q, T); the constant 1 of 1 - p is dropped
        c_bbox = torch.cdist(boxes, tgt_boxes, p=1)  # (B*Q, T)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))  # (B*Q, T)
        cost = self.cost_bbox * c_bbox + self.cost_class * c_class + self.cost_giou * c_giou
        return cost.view(b, q, -1)  # (B, Q, T)

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Returns, per image, (prediction indices, target indices), each (min(Q, n_i),) int64 on the CPU."""
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        cost = self.cost_matrix(pred_logits, pred_boxes, targets).cpu()  # one device -> host transfer
        if not torch.isfinite(cost).all():
            raise FloatingPointError("HungarianMatcher: the cost matrix has NaN or inf (did the model diverge?)")
        indices = []
        for i, c in enumerate(cost.split(sizes, dim=-1)):  # c: (B, Q, n_i); image i's block is c[i]
            if sizes[i] == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
