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
    score_activation: str = "softmax",
    top_k: int = 100,
    threshold: float = 0.0,
    label_map: Sequence[int] | Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Turn a :class:`~detrkit.models.DetectionOutput` into per-image detections.

    Args:
        outputs: the model's output (``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) normalized cxcywh).
        image_sizes: (B, 2) original (height, width) of each image; boxes are scaled to it.
        score_activation: ``"softmax"`` (DETR: the last class is no-object, one label per query) or ``"sigmoid"``
            (focal-loss models: the ``top_k`` best (query, class) pairs over the whole image).
        top_k: most detections kept per image.
        threshold: drop detections scoring below it.
        label_map: contiguous class index -> dataset category id (e.g. COCO ids); identity when None.

    Returns:
        One dict per image: ``scores`` (N,), ``labels`` (N,) int64, ``boxes`` (N, 4) absolute xyxy, sorted by score.
    """
    scores, labels, xyxy, _ = select_detections(outputs.pred_logits, outputs.pred_boxes, score_activation, top_k)
    b = scores.shape[0]
    sizes = torch.as_tensor(image_sizes, dtype=xyxy.dtype, device=xyxy.device).reshape(b, 2)
    xyxy = xyxy * torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)[:, None]  # w, h, w, h
    if label_map is not None:
        label_map = torch.as_tensor(label_map, dtype=torch.int64, device=labels.device)

    results = []
    for i in range(b):
        keep = scores[i] >= threshold
        lab = labels[i][keep]
        results.append({"scores": scores[i][keep], "labels": lab if label_map is None else label_map[lab],
                        "boxes": xyxy[i][keep]})
    return results


def select_detections(logits: Tensor, boxes: Tensor, score_activation: str,
                      top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``top_k`` best detections of each image, best first, as batched tensors (what ONNX export keeps too).

    Args:
        logits: (B, Q, K) class logits; boxes: (B, Q, 4) normalized cxcywh.
        score_activation: ``"softmax"`` (DETR: the last class is no-object, one label per query) or ``"sigmoid"``
            (focal-loss models: the best (query, class) pairs over the whole image).

    Returns:
        scores (B, k), labels (B, k) int64 class indices, boxes (B, k, 4) normalized xyxy, and the query each came
        from (B, k); k = min(top_k, candidates).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)  # half-precision outputs scored in float32
    logits, boxes = logits.to(dtype), boxes.to(dtype)
    b, q, k = logits.shape
    if score_activation == "softmax":
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # (B, Q) each
        scores, query_idx = scores.topk(min(top_k, q), dim=1)  # (B, k) each
        labels = labels.gather(1, query_idx)
    elif score_activation == "sigmoid":
        scores, flat_idx = logits.sigmoid().flatten(1).topk(min(top_k, q * k), dim=1)  # over (B, Q*K)
        query_idx, labels = flat_idx // k, flat_idx % k
    else:
        raise ValueError(f"score_activation must be 'softmax' or 'sigmoid', got {score_activation!r}")
    xyxy = box_cxcywh_to_xyxy(boxes).gather(1, query_idx[..., None].expand(-1, -1, 4))  # (B, k, 4)
    return scores, labels, xyxy, query_idx
