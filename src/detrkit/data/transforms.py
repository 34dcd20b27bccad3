"""Train / val transforms of the DETR recipe, on torchvision.transforms.v2 with tv_tensors.BoundingBoxes.

DETR (Carion et al. 2020, appendix A.4): horizontal flip; then either a multi-scale resize of the
shorter side to one of 480..800 (longer side at most 1333), or a random crop branch (resize to
400/500/600, crop a random 384..600 region, resize multi-scale again). Validation resizes the
shorter side to 800. Every size is a parameter so that lite presets can train at ~640 px or less.

RT-DETR (Zhao et al. 2024, section 5.1, and its official code) preprocesses differently, so each preset declares
its ``preprocess`` (:mod:`detrkit.registry`) and every transform here takes it: pixels scaled to [0, 1] without
mean / std, a fixed square input (640 x 640), and in training photometric distortion, zoom-out, IoU crop and
flip (:func:`rtdetr_train_transforms`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DETR_SCALES = tuple(range(480, 801, 32))


class RandomSizeCrop:
    """Crop a region whose height and width are drawn uniformly from [min_size, min(side, max_size)].

    torchvision has no transform with exactly this law (RandomResizedCrop draws area and aspect ratio),
    so this small callable does it with the v2 functional ``crop``, which moves the boxes too.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        h, w = F.get_size(image)
        ch = _randint(min(self.min_size, h), min(h, self.max_size))
        cw = _randint(min(self.min_size, w), min(w, self.max_size))
        top, left = _randint(0, h - ch), _randint(0, w - cw)
        image = F.crop(image, top, left, ch, cw)
        target = {**target, "boxes": F.crop(target["boxes"], top, left, ch, cw)}
        return image, target


def _randint(low: int, high: int) -> int:
    """Uniform in [low, high] from torch's generator, like the v2 transforms (one seed makes a sample exact)."""
    return int(torch.randint(low, high + 1, ()).item())


def build_transforms(
    train: bool,
    *,
    scales: Sequence[int] = DETR_SCALES,
    max_size: int = 1333,
    val_size: int = 800,
    crop: bool = True,
    crop_scales: Sequence[int] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
    with_boxes: bool = True,
    preprocess: str = "detr",
    scale_jitter: float = 0.0,
    photometric: str | None = None,
) -> T.Compose:
    """The transform applied to ``(image, target)``; target holds ``boxes`` (BoundingBoxes) and ``labels``.

    ``with_boxes=False`` (validation only) gives the image-only transform used for inference. ``preprocess``:
    the model's (``"detr"`` or ``"rtdetr"``: then ``val_size`` is the side of the square input). ``photometric``:
    the colour changes of training (:func:`photometric_distortion`; None = the family's own: RT-DETR's, none for DETR).
    """
    if preprocess == "rtdetr":
        if not train:
            return _rtdetr_val(val_size, with_boxes)
        return rtdetr_train_transforms(val_size, crop, scale_jitter, photometric or "rtdetr")
    if scale_jitter:
        raise ValueError("scale_jitter is for the RT-DETR family's square inputs; DETR's multi-scale resize "
                         "(scales) already varies the scale")
    to_input = [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    finish = [
        *to_input,
        T.ClampBoundingBoxes(),
        T.SanitizeBoundingBoxes(min_size=1),  # drops boxes cropped away, with their labels
    ]
    if not train:
        return T.Compose([T.Resize(val_size, max_size=max_size), *(finish if with_boxes else to_input)])
    resize = T.RandomShortestSize(list(scales), max_size=max_size)
    if crop:
        resize = T.RandomChoice([
            resize,
            T.Compose([T.RandomShortestSize(list(crop_scales)), RandomSizeCrop(*crop_size), resize]),
        ])
    return T.Compose([*photometric_distortion(photometric or "none"), T.RandomHorizontalFlip(), resize, *finish])


PHOTOMETRIC = ("rtdetr", "yolo", "none")


def photometric_distortion(name: str) -> list:
    """The colour changes of a training image, by name.

    ``rtdetr``: RT-DETR's (official code, after SSD): torchvision's RandomPhotometricDistort, each of brightness
    (x 0.875-1.125), contrast, saturation (x 0.5-1.5), hue (+-0.05) and a channel swap with probability 0.5.
    ``yolo``: Ultralytics YOLO's HSV gains (hsv_h 0.015, hsv_s 0.7, hsv_v 0.4) on every image: brightness (the V of
    HSV) x 0.6-1.4, saturation x 0.3-1.7, hue +-0.015 of the circle; stronger light changes, no channel swap.
    ``none``: the colours as they are."""
    if name == "rtdetr":
        return [T.RandomPhotometricDistort(p=0.5)]
    if name == "yolo":
        return [T.ColorJitter(brightness=0.4, saturation=0.7, hue=0.015)]
    if name == "none":
        return []
    raise ValueError(f"photometric must be one of {', '.join(PHOTOMETRIC)}, got {name!r}")


def rtdetr_train_transforms(size: int = 640, crop: bool = True, scale_jitter: float = 0.0,
                            photometric: str = "rtdetr") -> T.Compose:
    """RT-DETR's training augmentation (official code): photometric distortion, zoom-out (up to 4x, black fill),
    SSD's IoU crop (p = 0.8), horizontal flip, resize to size x size, pixels in [0, 1].

    ``crop=False`` leaves out the zoom-out and the IoU crop (the geometry changes, which shrink and cut objects):
    for short schedules, where the model has not yet learned the objects at their own size. ``scale_jitter=s``
    adds YOLO's milder geometry (Ultralytics' ``random_perspective`` with its ``scale`` and ``translate`` only):
    the image scaled by a factor in [1 - s, 1 + s] and shifted by up to 10% of its side, on a grey canvas of the
    same size; boxes cut to the canvas, those left under 1 px dropped. ``photometric``: the colour changes
    (:func:`photometric_distortion`)."""
    if not 0.0 <= scale_jitter < 1.0:
        raise ValueError(f"scale_jitter must be in [0, 1) (a scale factor in [1 - s, 1 + s]), got {scale_jitter}")
    geometry = [T.RandomZoomOut(fill=0, p=0.5), T.RandomApply([T.RandomIoUCrop()], p=0.8)] if crop else []
    if scale_jitter:
        geometry.append(T.RandomAffine(degrees=0.0, translate=(0.1, 0.1), scale=(1 - scale_jitter, 1 + scale_jitter),
                                       fill=114))
    return T.Compose([
        *photometric_distortion(photometric),
        *geometry,
        T.SanitizeBoundingBoxes(min_size=1),
        T.RandomHorizontalFlip(),
        T.Resize((size, size)),
        T.ToDtype(torch.float32, scale=True),
        T.ClampBoundingBoxes(),
        T.SanitizeBoundingBoxes(min_size=1),
    ])


def _rtdetr_val(size: int, with_boxes: bool) -> T.Compose:
    steps = [T.Resize((size, size)), T.ToDtype(torch.float32, scale=True)]
    if with_boxes:
        steps += [T.ClampBoundingBoxes(), T.SanitizeBoundingBoxes(min_size=1)]
    return T.Compose(steps)


def denormalize(images: Tensor, preprocess: str = "detr") -> Tensor:
    """Model inputs (B, 3, H, W) or (3, H, W) -> pixels in [0, 1] for display."""
    if preprocess == "rtdetr":
        return images.clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def scales_for(image_size: int) -> dict:
    """DETR's multi-scale recipe (defined at 800 px) scaled to ``image_size``."""
    r = image_size / 800
    lo = max(32, int(round(480 * r / 32)) * 32)
    scales = list(range(lo, image_size + 1, 32)) or [image_size]
    if scales[-1] != image_size:
        scales.append(image_size)
    return {
        "scales": scales,
        "max_size": int(round(1333 * r)),
        "val_size": image_size,
        "crop_scales": [int(round(s * r)) for s in (400, 500, 600)],
        "crop_size": (int(round(384 * r)), int(round(600 * r))),
    }


def val_transforms(image_size: int, *, with_boxes: bool = True, preprocess: str = "detr"):
    """The evaluation / inference resize of a model trained at ``image_size`` (DETR's 800 / 1333 scaled; RT-DETR's
    fixed square)."""
    recipe = scales_for(image_size)
    return build_transforms(False, val_size=recipe["val_size"], max_size=recipe["max_size"], with_boxes=with_boxes,
                            preprocess=preprocess)
