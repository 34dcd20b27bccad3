"""Bipartite matching between predictions and ground truth (DETR section 3.1, equation 1).

The matching cost of prediction i and object j is
    cost_class * C_class(i, j) + cost_bbox * |b_i - b_j|_1 + cost_giou * (-GIoU(b_i, b_j)),
and the Hungarian algorithm (scipy's linear_sum_assignment) picks the assignment of least total
cost per image. The cost matrices of a whole batch, for every decoder layer at once, are computed on
the device in one pass and moved to the CPU in one transfer (one GPU sync per training step instead
of one per layer); only the assignment itself runs per layer and image.
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
    def forward(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Returns, per image, (prediction indices, target indices), each (min(Q, n_i),) int64 on the CPU."""
        return self.match_layers([pred_logits], [pred_boxes], targets)[0]

    @torch.no_grad()
    def match_layers(
        self, logits: list[Tensor], boxes: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Match several decoder layers' predictions (each (B, Q, K) / (B, Q, 4)) to the same targets at once:
        one cost pass over all layers on the device, one transfer to the CPU, then one assignment per layer and
        image. Returns indices[layer][image] as :meth:`forward` does."""
        b = len(targets)
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [[(empty, empty) for _ in targets] for _ in logits]
        cost = self.cost_matrix(torch.cat(logits), torch.cat(boxes), targets)  # (layers*B, Q, T)
        cost = cost.cpu()  # the only device -> host transfer (and sync) of the matching
        if not torch.isfinite(cost).all():
            raise FloatingPointError("HungarianMatcher: the cost matrix has NaN or inf (did the model diverge?)")
        blocks = cost.split(sizes, dim=-1)  # per image i: (layers*B, Q, n_i), of which rows layer*B + i are its own
        indices = []
        for layer in range(len(logits)):
            per_image = []
            for i, n in enumerate(sizes):
                if n == 0:
                    per_image.append((empty, empty))
                    continue
                rows, cols = linear_sum_assignment(blocks[i][layer * b + i].numpy())
                per_image.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            indices.append(per_image)
        return indices


def union_matches(layer_matches: list[list[tuple[Tensor, Tensor]]]) -> list[tuple[Tensor, Tensor]]:
    """GO-LSD's union set of matches (D-FINE, Peng et al. ICLR 2025, section 3.3): every query that any layer
    matched, each to the object the most layers matched it to (ties: the lowest object index). D-FINE applies its
    box and localization losses on this set in every layer, so a query one layer finds good keeps its box
    supervision in the others (the last layer's distributions then teach more queries).

    layer_matches[layer][image] = (query indices, object indices), as :meth:`HungarianMatcher.match_layers` returns
    them. Returns per image (queries, objects), queries ascending; one object may now go with several queries."""
    out = []
    for image in zip(*layer_matches, strict=True):
        rows = torch.cat([r for r, _ in image])
        cols = torch.cat([c for _, c in image])
        if len(rows) == 0:
            out.append((rows, cols))
            continue
        n_obj, n_layers = int(cols.max()) + 1, len(image)
        pairs, count = torch.unique(rows * n_obj + cols, return_counts=True)  # each (query, object) and its votes
        query, obj = pairs // n_obj, pairs % n_obj
        # order by query, then most votes, then lowest object; the first pair of each query wins
        order = torch.argsort((query * (n_layers + 1) + (n_layers - count)) * n_obj + obj)
        query, obj = query[order], obj[order]
        first = torch.ones_like(query, dtype=torch.bool)
        first[1:] = query[1:] != query[:-1]
        out.append((query[first], obj[first]))
    return out
