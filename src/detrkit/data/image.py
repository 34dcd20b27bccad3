"""Reading any image file users bring as the 8-bit RGB the models expect.

Datasets hold more than 8-bit RGB JPEGs: grayscale scans, RGBA screenshots, palette PNGs (with a transparent
colour), 16-bit PNG / TIFF from sensors, CMYK JPEGs, and phone photos whose pixels are stored sideways with an
EXIF orientation tag. ``convert("RGB")`` alone gets three of these wrong: 16-bit values are clipped to 255
(an all-white image), transparent pixels keep whatever colour they hide, and EXIF rotation is ignored (the
annotation tools show, and annotate, the rotated image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor

# Transparent pixels become the ImageNet mean colour, which normalizes to zero: what the model sees on padding.
BACKGROUND = (124, 116, 104)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited on :data:`BACKGROUND`, 16/32-bit integers scaled down
    (65535 -> 255, as OpenCV does), floats in [0, 1] scaled up, everything else through PIL's conversion."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":  # I;16, I;16B, I;16L, I (16-bit PNGs open as I), F
        arr = np.asarray(image).astype(np.float64)
        if image.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif image.mode != "F":
            arr = arr / 257.0  # 16-bit range onto 8-bit: 65535 -> 255, 257 -> 1
        gray = np.nan_to_num(arr).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def open_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully (so a truncated file raises here, not later) as upright 8-bit RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of ``path`` as displayed (after EXIF rotation), reading only the header."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in _ROTATING_ORIENTATIONS else (w, h)


def to_pil(image) -> Image.Image:
    """PIL image, path, (H, W, 3) uint8 array or (3, H, W) tensor in [0, 1] / uint8 -> RGB PIL image."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        return open_rgb(path)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, Tensor):
        arr = image.detach().cpu()
        arr = (arr * 255).round().clamp(0, 255).byte() if arr.is_floating_point() else arr
        return Image.fromarray(arr.permute(1, 2, 0).numpy())
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    raise TypeError(f"cannot read an image from {type(image).__name__}; pass a path, PIL image, numpy array or tensor")
