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

# Transparent pixels become the ImageNet mean colour, which normalizes to zero: what the model sees on padding.
BACKGROUND = (124, 116, 104)
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
