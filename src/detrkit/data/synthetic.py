"""The built-in synthetic detection dataset ("shapes"), written in COCO format.

A fair small detection task, not a toy: five classes that differ by shape only (colours are random
for every object), sizes from 8 px to half the image on a log scale, 1 to ``max_objects`` per
image with partial overlaps (later shapes occlude earlier ones), textured and cluttered
backgrounds, and distractor shapes (ellipses, bars, arcs, blobs) that are not classes and must be
ignored. Every image is a pure function of (seed, split, index), so the dataset is reproducible.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

CLASSES = ("circle", "square", "triangle", "star", "cross")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a class shape of circumradius r, rotated by ``angle``."""
    if kind == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif kind == "star":
        pts = [((1.0 if i % 2 == 0 else 0.42) * math.cos(a), (1.0 if i % 2 == 0 else 0.42) * math.sin(a))
               for i, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)]
    elif kind == "cross":
        t = 0.34
        pts = [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
    else:
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A textured background: smooth colour field + one of stripes / checks / noise, plus clutter."""
    low = rng.uniform(0, 255, size=(rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    texture = rng.integers(0, 3)
    if texture == 0:  # stripes at a random angle and period
        a, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
        img += 30 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period)[..., None]
    elif texture == 1:  # checkerboard
        cell = rng.integers(8, 48)
        img += 25 * (((xx // cell) + (yy // cell)) % 2 * 2 - 1)[..., None]
    img += rng.normal(0, rng.uniform(4, 18), size=img.shape)  # sensor-like noise
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 12)):  # clutter: random lines
        x0, y0, x1, y1 = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h)
        draw.line(
            [(x0, y0), (x1, y1)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4))
        )
    return img


def _distractor(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int) -> None:
    """A shape that is not a class: elongated ellipse, thin bar, arc or irregular blob."""
    s = rng.uniform(8, min(w, h) / 3)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    kind = rng.integers(0, 4)
    if kind == 0:  # ellipse, aspect >= 2.5 so it never looks like a circle
        draw.ellipse([cx - s, cy - s / rng.uniform(2.5, 4), cx + s, cy + s / rng.uniform(2.5, 4)], fill=color)
    elif kind == 1:  # bar
        a, t = rng.uniform(0, math.pi), rng.uniform(2, max(3, s / 5))
        dx, dy = s * math.cos(a), s * math.sin(a)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=color, width=int(t))
    elif kind == 2:  # open arc
        start = rng.uniform(0, 360)
        draw.arc(
            [cx - s, cy - s, cx + s, cy + s],
            start,
            start + rng.uniform(60, 200),
            fill=color,
            width=int(rng.integers(2, 5)),
        )
    else:  # irregular blob: a star-shaped polygon with random radii
        n = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = s * rng.uniform(0.3, 1.0, n)
        draw.polygon(
            [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii, strict=False)], fill=color
        )


def _contrasting_color(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least 60 grey levels away from the mean colour under the object."""
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(20):
        c = rng.integers(0, 256, 3)
        if np.abs(c - mean).max() >= 60:
            break
    return tuple(int(v) for v in c)


def _overlaps_too_much(box: np.ndarray, boxes: list[np.ndarray], max_cover: float = 0.4) -> bool:
    """Reject a placement that hides more than ``max_cover`` of an earlier object (or is itself mostly inside one)."""
    for other in boxes:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        area_o = (other[2] - other[0]) * (other[3] - other[1])
        area_b = (box[2] - box[0]) * (box[3] - box[1])
        if inter > max_cover * area_o or inter > max_cover * area_b:
            return True
    return False


def draw_image(seed: int, split: str, index: int, image_size: int = 320, max_objects: int = 20):
    """Draw one image. Returns (PIL image, list of (class index, [x0, y0, x1, y1], area))."""
    rng = np.random.default_rng([seed, _SPLIT_IDS.get(split, 3), index])
    w = int(image_size * rng.uniform(0.8, 1.2))
    h = int(image_size * rng.uniform(0.8, 1.2))
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 4)):
        _distractor(draw, rng, w, h)

    objects, boxes = [], []
    target = int(rng.integers(1, max_objects + 1))
    max_side = min(w, h) / 2
    for _ in range(target * 10):  # placement attempts
        if len(objects) == target:
            break
        side = math.exp(rng.uniform(math.log(8), math.log(max_side)))  # log-uniform object size
        cls = int(rng.integers(len(CLASSES)))
        kind = CLASSES[cls]
        r = side / 2 if kind in ("circle", "square") else side / 2 * 1.05
        if kind == "square":
            r = side / math.sqrt(2)  # a square of side `side` (before rotation)
        cx, cy = rng.uniform(r * 0.5, w - r * 0.5), rng.uniform(r * 0.5, h - r * 0.5)
        if kind == "circle":
            pts = None
            box = np.array([cx - r, cy - r, cx + r, cy + r])
        else:
            pts = _polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
            xy = np.array(pts)
            box = np.array([xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()])
        box = np.clip(box, 0, [w, h, w, h])
        if min(box[2] - box[0], box[3] - box[1]) < 6 or _overlaps_too_much(box, boxes):
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        color = _contrasting_color(rng, np.asarray(img)[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)])
        if pts is None:
            draw.ellipse(box.tolist(), fill=color)
            area = math.pi * r * r
        else:
            draw.polygon(pts, fill=color)
            xy = np.array(pts)
            area = 0.5 * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))
        boxes.append(box)
        objects.append((cls, box.tolist(), float(area)))
    if rng.uniform() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))  # soften edges sometimes
    return img, objects


def write_split(out: Path, split: str, num_images: int, *, seed: int = 0, image_size: int = 320,
                max_objects: int = 20, progress: bool = True) -> Path:
    """Write ``out/split/*.jpg`` and ``out/annotations/instances_{split}.json``; returns the json path."""

    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in tqdm(range(num_images), desc=f"synth {split}", disable=not progress, unit="img"):
        img, objects = draw_image(seed, split, i, image_size, max_objects)
        name = f"{i:06d}.jpg"
        img.save(out / split / name, quality=92)
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        for cls, (x0, y0, x1, y1), area in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round(area, 2), "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    ann_file = out / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps({
        "info": {"description": f"detrkit synthetic shapes, seed {seed}, split {split}"},
        "images": images, "annotations": annotations, "categories": categories,
    }))
    return ann_file


def make_synthetic_dataset(out: str | Path, *, num_train: int = 1000, num_val: int = 200, seed: int = 0,
                           image_size: int = 320, max_objects: int = 20, progress: bool = True) -> Path:
    """Write the train and val splits of the synthetic dataset under ``out``; returns ``out``."""
    out = Path(out)
    write_split(out, "train", num_train, seed=seed, image_size=image_size, max_objects=max_objects, progress=progress)
    write_split(out, "val", num_val, seed=seed, image_size=image_size, max_objects=max_objects, progress=progress)
    return out
