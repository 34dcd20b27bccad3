"""Mosaic (four training images in one, YOLOv4's) and MixUp (two blended, Zhang et al. ICLR 2018): the two
augmentations DEIM (Huang et al. CVPR 2025, section 3.2) uses for "dense one-to-one" matching: more objects per
training image gives the one-to-one matcher more positive queries per step, without changing the model or its
NMS-free inference.

The four images are scaled so that their longer side is ``size`` and placed around a random centre of a
(2 size, 2 size) canvas: the first to its upper left, then upper right, lower left, lower right, each touching the
centre, cut where it leaves the canvas. Boxes move with their image and are clipped to the part that stays;
boxes cut down to nothing are dropped by the transforms' SanitizeBoundingBoxes. The transforms then resize the
whole canvas to the training size, which halves every object (DEIM's mosaic: more, smaller objects). With
``crop=True`` a window of the images' own size around the centre is cut from the canvas instead (YOLOv5's mosaic,
whose random affine crops the canvas back to the training size): the four images keep their scale, so objects as
small as the dataset's own are not shrunk below what the model can see. Random draws come from torch's
generator, which :class:`~detrkit.data.sampler.SeededSamples` seeds per sample, so a resumed run repeats them.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision import tv_tensors

from detrkit.data.image import BACKGROUND


def _scaled(image: Tensor, boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """image (3, h, w), boxes (n, 4) xyxy -> both scaled so that the longer side is ``size``."""
    h, w = image.shape[-2:]
    r = size / max(h, w)
    return _resized(image, boxes, max(1, round(h * r)), max(1, round(w * r)))


def _resized(image: Tensor, boxes: Tensor, nh: int, nw: int) -> tuple[Tensor, Tensor]:
    """image (3, h, w), boxes (n, 4) xyxy -> both resized to (nh, nw)."""
    h, w = image.shape[-2:]
    image = F.resize(image, [nh, nw], antialias=True)
    return image, boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])


def mosaic(samples: list[tuple[Tensor, dict]], size: int, crop: bool = False) -> tuple[tv_tensors.Image, dict]:
    """Four ``(image (3, h, w) uint8, {"boxes": BoundingBoxes xyxy, "labels"})`` -> one, on a (2 size)^2 canvas
    filled with the ImageNet mean colour (zero after normalisation, what the model sees on padding); ``crop``: a
    random (size, size) window of it that holds the centre, where the four images meet."""
    if len(samples) != 4:
        raise ValueError(f"mosaic takes 4 images, got {len(samples)}")
    side = 2 * size
    canvas = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1).repeat(1, side, side)
    xc = int(torch.randint(size // 2, side - size // 2 + 1, ()).item())
    yc = int(torch.randint(size // 2, side - size // 2 + 1, ()).item())
    boxes, labels = [], []
    for quadrant, (image, target) in enumerate(samples):
        image, b = _scaled(image.as_subclass(Tensor), target["boxes"].as_subclass(Tensor).float(), size)
        h, w = image.shape[-2:]
        x0 = xc - w if quadrant in (0, 2) else xc  # where the image's top-left corner lands on the canvas
        y0 = yc - h if quadrant in (0, 1) else yc
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, side), min(y0 + h, side)  # the part on the canvas
        canvas[:, cy0:cy1, cx0:cx1] = image[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        b = b + torch.tensor([x0, y0, x0, y0], dtype=b.dtype)
        lo, hi = torch.tensor([cx0, cy0, cx0, cy0], dtype=b.dtype), torch.tensor([cx1, cy1, cx1, cy1], dtype=b.dtype)
        boxes.append(torch.maximum(torch.minimum(b, hi), lo))  # clipped to the visible part of its own image
        labels.append(target["labels"])
    boxes = torch.cat(boxes)
    if crop:  # the window's left / top edge anywhere that keeps both the centre and the window on the canvas
        x0 = int(torch.randint(max(0, xc - size), min(xc, side - size) + 1, ()).item())
        y0 = int(torch.randint(max(0, yc - size), min(yc, side - size) + 1, ()).item())
        canvas = canvas[:, y0 : y0 + size, x0 : x0 + size]
        boxes = (boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)).clamp(0, size)  # empty ones dropped later
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(canvas.shape[-2:])),
              "labels": torch.cat(labels)}
    return tv_tensors.Image(canvas), target


def mixup(first: tuple[Tensor, dict], second: tuple[Tensor, dict]) -> tuple[tv_tensors.Image, dict]:
    """Two ``(image (3, h, w) uint8, {"boxes": BoundingBoxes xyxy, "labels"})`` -> one: the second image resized to
    the first's size and blended in, the first weighted by a draw from U(0.45, 0.55) (DEIM's), with the objects of
    both (each keeps its full box: a half-visible object is still an object to find)."""
    (a, ta), (b, tb) = first, second
    h, w = a.shape[-2:]
    b, boxes_b = _resized(b.as_subclass(Tensor), tb["boxes"].as_subclass(Tensor).float(), h, w)
    weight = 0.45 + 0.1 * torch.rand(()).item()
    image = (a.as_subclass(Tensor).float() * weight + b.float() * (1 - weight)).round().to(torch.uint8)
    boxes = torch.cat([ta["boxes"].as_subclass(Tensor).float(), boxes_b])
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
              "labels": torch.cat([ta["labels"], tb["labels"]])}
    return tv_tensors.Image(image), target
