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


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font, scalable (Pillow >= 10.1)


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(boxes: np.ndarray, sizes: list[tuple[float, float]], image_size: tuple[int, int]
                 ) -> list[tuple[float, float, float, float]]:
    """Where each box's label goes (xyxy of its background), in the order given (best first): the first of above
    the box, inside its top, below it, inside its bottom that stays in the image and covers no label placed before
    it; where every spot is taken, the first that stays in the image."""
    width, height = image_size
    placed: list[tuple[float, float, float, float]] = []
    for (x0, y0, _, y1), (w, h) in zip(boxes.tolist(), sizes, strict=True):
        left = min(max(0.0, x0), max(0.0, width - w))
        spots = [(left, y0 - h), (left, y0), (left, y1), (left, y1 - h)]
        rects = [(x, y, x + w, y + h) for x, y in spots]
        inside = [r for r in rects if r[1] >= 0 and r[3] <= height] or [(left, 0.0, left + w, h)]
        placed.append(next((r for r in inside if not any(_overlaps(r, p) for p in placed)), inside[0]))
    return placed


def draw_detections(
    image: Image.Image,
    boxes: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[int],
    scores: Sequence[float] | None = None,
    names: dict[int, str] | None = None,
    *,
    width: int | None = None,
    min_side: int | None = None,
    caption: str | None = None,
) -> Image.Image:
    """Return a copy of ``image`` with xyxy ``boxes`` drawn, labelled ``name score``.

    ``min_side``: upscale a smaller image so that its long side is at least this many pixels (a 224 px image is
    unreadable at its own size); lines and text scale with the drawn image (``width`` fixes the line width).
    Labels go where they cover no better box's label (:func:`place_labels`). ``caption``: a line drawn in the top
    left corner, e.g. the score threshold."""
    out = image.convert("RGB")
    scale = max(1.0, min_side / max(out.size)) if min_side else 1.0
    if scale > 1:
        out = out.resize((round(out.width * scale), round(out.height * scale)), Image.Resampling.LANCZOS)
    else:
        out = out.copy()
    draw = ImageDraw.Draw(out)
    long_side = max(out.size)
    font = _font(max(10, round(long_side / 45)))
    width = width or max(2, round(long_side / 250))
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4) * scale
    # best first: the best box's label takes the best spot, and is drawn last (on top)
    order = (np.argsort(-np.asarray(scores, dtype=float), kind="stable") if scores is not None
             else np.arange(len(boxes)))
    texts = []
    for i in order:
        text = (names or {}).get(int(labels[i]), str(int(labels[i])))
        texts.append(f"{text} {float(scores[i]):.2f}" if scores is not None else text)
    pad = max(2, width)
    sizes = []
    for text in texts:
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        sizes.append((x1 - x0 + 2 * pad, y1 - y0 + 2 * pad))
    spots = place_labels(boxes[order], sizes, out.size)
    for i in order[::-1]:
        draw.rectangle(boxes[i].tolist(), outline=color_for(labels[i]), width=width)
    for i, text, spot in list(zip(order, texts, spots, strict=True))[::-1]:
        draw.rectangle(spot, fill=color_for(labels[i]))
        draw.text((spot[0] + pad, spot[1] + pad), text, fill=(0, 0, 0), font=font, anchor="lt")
    if caption:
        x0, y0, x1, y1 = draw.textbbox((0, 0), caption, font=font)
        corner = (out.width - (x1 - x0) - 3 * pad, out.height - (y1 - y0) - 3 * pad)  # bottom right: labels sit high
        draw.rectangle((corner[0] - pad, corner[1] - pad, out.width, out.height), fill=(0, 0, 0))
        draw.text((corner[0] + pad, corner[1] + pad), caption, fill=(255, 255, 255), font=font, anchor="lt")
    return out


def contact_sheet(panels: Sequence[tuple[Image.Image, str]], *, columns: int = 4, cell: int = 360,
                  title: str | None = None) -> Image.Image:
    """A grid of pictures, each fitted into a ``cell`` x ``cell`` square with its title above it (e.g. predictions
    beside the ground truth of the same image)."""
    font, big = _font(max(12, cell // 24)), _font(max(14, cell // 18))
    head = cell // 12
    top = 2 * head if title else 0
    rows = max(1, -(-len(panels) // columns))
    sheet = Image.new("RGB", (columns * cell, top + rows * (cell + head)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, head // 2), title, fill=(0, 0, 0), font=big)
    for k, (picture, name) in enumerate(panels):
        x, y = (k % columns) * cell, top + (k // columns) * (cell + head)
        fitted = picture.convert("RGB")
        fitted.thumbnail((cell - 8, cell - 8), Image.Resampling.LANCZOS)
        sheet.paste(fitted, (x + (cell - fitted.width) // 2, y + head))
        while len(name) > 4 and draw.textlength(name, font=font) > cell - 12:  # a long file name: cut its end
            name = name[:-2].rstrip("…").rstrip() + "…"
        draw.text((x + 6, y + head // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return sheet
