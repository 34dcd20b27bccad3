"""Draw detections on images: boxes, class names and scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A palette with well separated hues; class i gets colour i mod len.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
]


def color_for(label: int) -> tuple[int, int, int]:
    return _PALETTE[int(label) % len(_PALETTE)]


def draw_detections(
    image: Image.Image,
    boxes: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[int],
    scores: Sequence[float] | None = None,
    names: dict[int, str] | None = None,
    *,
    width: int = 2,
) -> Image.Image:
    """Return a copy of ``image`` with xyxy ``boxes`` drawn, labelled ``name score``."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    # lowest score first, so that where boxes overlap the best one's label stays readable on top
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable") if scores is not None else range(len(boxes))
    for i in order:
        box, label = boxes[i], labels[i]
        color = color_for(label)
        x0, y0, x1, y1 = box.tolist()
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        text = (names or {}).get(int(label), str(int(label)))
        if scores is not None:
            text = f"{text} {float(scores[i]):.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), text, font=font)
        ty = y0 - (ty1 - ty0) - 2 if y0 - (ty1 - ty0) - 2 >= 0 else y0
        draw.rectangle([x0, ty, x0 + (tx1 - tx0) + 4, ty + (ty1 - ty0) + 2], fill=color)
        draw.text((x0 + 2, ty), text, fill=(0, 0, 0), font=font)
    return out
