"""Tiled prediction for images much larger than the model's input (aerial, satellite, microscopy, inspection).

Resizing a 2500-pixel photo to a 640-pixel input shrinks small objects below what the model can see. Instead the
image is cut into overlapping tiles of ``tile`` pixels (each then resized to the model's input as usual),
predicted in batches, and the detections moved back into the image's coordinates and merged.

How tiles are merged, and why. DETR-family outputs are NMS-free within one image, so nothing is suppressed among
the detections of one tile. Only pairs from *different* tiles of the same class are compared, which is where
duplicates come from: an object inside the overlap of two tiles is found in both (IoU above ``iou``: the lower score
goes), and an object crossing a tile's inner border is found cut in one tile and whole in its neighbour, whose tile
contains it when the overlap is at least the object's size (the cut box, mostly covered by the whole one, goes).
Class-wise NMS over all boxes would also delete true neighbours of one class inside a tile, and weighted box fusion
would average a cut box into a whole one; neither is wanted. Objects larger than the overlap can be cut in every
tile: choose ``overlap`` * ``tile`` above the largest object, or tiles larger than it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou


def tile_windows(width: int, height: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """xyxy windows of ``tile`` pixels covering the image, neighbours sharing ``overlap`` of a tile (the last row and
    column end at the image border; an image smaller than a tile is one window)."""
    if tile < 1 or not 0 <= overlap < 1:
        raise ValueError(f"tile {tile}, overlap {overlap}: need tile >= 1 pixel and 0 <= overlap < 1")
    stride = max(1, round(tile * (1 - overlap)))

    def starts(size: int) -> list[int]:
        if size <= tile:
            return [0]
        out = list(range(0, size - tile, stride))
        return out + [size - tile]

    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in starts(height) for x in starts(width)]


def cut_by_tile_border(boxes: Tensor, windows: Tensor, width: int, height: int, margin: float = 2.0) -> Tensor:
    """(N,) whether each box (image coordinates) touches a side of its tile (``windows``, (N, 4)) that lies inside
    the image: such a box may be a cut-off part of an object."""
    inner = torch.stack([windows[:, 0] > 0, windows[:, 1] > 0, windows[:, 2] < width, windows[:, 3] < height], 1)
    near = torch.stack([boxes[:, 0] - windows[:, 0], boxes[:, 1] - windows[:, 1], windows[:, 2] - boxes[:, 2],
                        windows[:, 3] - boxes[:, 3]], 1) <= margin
    return (inner & near).any(1)


def merge_tiles(boxes: Tensor, scores: Tensor, labels: Tensor, tile_ids: Tensor, cut: Tensor, *, iou: float = 0.5,
                cover: float = 0.7) -> Tensor:
    """Indices of the detections kept, best first (see the module's docstring): whole boxes before cut ones, then by
    score; a box goes when a kept box of the same class from another tile overlaps it by IoU > ``iou``, or, for a cut
    box, covers more than ``cover`` of its area."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    order = sorted(range(len(boxes)), key=lambda i: (bool(cut[i]), -float(scores[i])))
    ious = box_iou(boxes, boxes)
    lt, rb = torch.max(boxes[:, None, :2], boxes[None, :, :2]), torch.min(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1)
    covered = inter / area[:, None].clamp(min=1e-6)  # [i, k]: share of box i inside box k
    rival = (labels[:, None] == labels[None, :]) & (tile_ids[:, None] != tile_ids[None, :])
    kept: list[int] = []
    for i in order:
        if kept:
            k = torch.tensor(kept)
            dup = rival[i, k] & ((ious[i, k] > iou) | (cut[i] & (covered[i, k] > cover)))
            if dup.any():
                continue
        kept.append(i)
    kept_t = torch.tensor(kept, dtype=torch.long)
    return kept_t[scores[kept_t].argsort(descending=True)]
