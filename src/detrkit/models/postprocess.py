"""From model outputs to detections users see: scores, dataset labels, absolute xyxy boxes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from detrkit.ops import box_cxcywh_to_xyxy


@torch.no_grad()
def postprocess(
    outputs,
    image_sizes: Tensor | Sequence[tuple[int, int]],
    *,
    activation: str = "softmax",
    top_k: int = 100,
    threshold: float = 0.0,
    label_map: Sequence[int] | Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Turn a :class:`~detrkit.models.DetectionOutput` into per-image detections.

    Args:
        outputs: the model's output (``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) normalized cxcywh).
        image_sizes: (B, 2) original (height, width) of each image; boxes are scaled to it.
        activation: ``"softmax"`` (DETR: the last class is no-object, one label per query) or ``"sigmoid"``
            (focal-loss models: the ``top_k`` best (query, class) pairs over the whole image).
        top_k: most detections kept per image.
        threshold: drop detections scoring below it.
        label_map: contiguous class index -> dataset category id (e.g. COCO ids); identity when None.

    Returns:
        One dict per image: ``scores`` (N,), ``labels`` (N,) int64, ``boxes`` (N, 4) absolute xyxy, sorted by score.
    """
    logits, boxes = outputs.pred_logits.float(), outputs.pred_boxes.float()
    b, q, k = logits.shape
    if activation == "softmax":
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # (B, Q) each
        query_idx = torch.arange(q, device=logits.device).expand(b, q)
    elif activation == "sigmoid":
        flat = logits.sigmoid().flatten(1)  # (B, Q*K)
        scores, flat_idx = flat.topk(min(top_k, flat.shape[1]), dim=1)  # (B, k) each
        query_idx, labels = flat_idx // k, flat_idx % k
    else:
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")

    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=boxes.device).reshape(b, 2)
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)  # (B, 4): w, h, w, h
    xyxy = box_cxcywh_to_xyxy(boxes) * scale[:, None]  # (B, Q, 4)
    if label_map is not None:
        label_map = torch.as_tensor(label_map, dtype=torch.int64, device=labels.device)

    results = []
    for i in range(b):
        s, lab, bx = scores[i], labels[i], xyxy[i, query_idx[i]]
        order = s.argsort(descending=True)[:top_k]
        s, lab, bx = s[order], lab[order], bx[order]
        keep = s >= threshold
        s, lab, bx = s[keep], lab[keep], bx[keep]
        if label_map is not None:
            lab = label_map[lab]
        results.append({"scores": s, "labels": lab, "boxes": bx})
    return results
