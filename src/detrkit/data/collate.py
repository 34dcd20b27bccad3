"""Batching images of different sizes: pad to the largest, and mark the padding in a mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    """A padded batch.

    Attributes:
        images: (B, 3, H, W) normalized images, zero-padded at the bottom / right.
        padding_mask: (B, H, W) bool, True on padded pixels (DETR's convention).
        targets: per image ``labels`` (n,) int64, ``boxes`` (n, 4) normalized cxcywh of the unpadded image,
            ``image_id``, ``orig_size`` (h, w) of the file, ``size`` (h, w) after transforms.
    """

    images: Tensor
    padding_mask: Tensor
    targets: list[dict[str, Tensor]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            self.padding_mask.to(device, non_blocking=non_blocking),
            [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets],
        )

    def __len__(self) -> int:
        return self.images.shape[0]


def pad_images(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """list of (3, h_i, w_i) -> images (B, 3, H, W) and padding mask (B, H, W), True on padding."""
    h = max(img.shape[-2] for img in images)
    w = max(img.shape[-1] for img in images)
    batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[-2], : img.shape[-1]] = img
        mask[i, : img.shape[-2], : img.shape[-1]] = False
    return batch, mask


def collate(samples: list[tuple[Tensor, dict]]) -> Batch:
    """DataLoader collate_fn for :class:`~detrkit.data.CocoDetection` samples."""
    images, mask = pad_images([s[0] for s in samples])
    return Batch(images, mask, [s[1] for s in samples])
