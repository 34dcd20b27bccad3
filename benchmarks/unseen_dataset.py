"""Does the demo's recipe learn on data it was never shaped on? A second generator, trained with `detrkit demo`'s
preset and recipe unchanged.

The demo's dataset (``detrkit.data.synthetic``) has five filled shapes, 1-20 per image, on textured backgrounds
with distractors. This one shares nothing with it but the COCO format: four other classes (hexagon, ring, arrow,
crescent: outlines and non-convex shapes among them), 1-10 objects of 12-100 px drawn with a drop shadow and
noise, on gradient + grid + photo-like noise backgrounds, at 256 px (so the training scale rescales it). The recipe
comes from :func:`detrkit.cli.train.demo_config`, the one the demo calls; nothing here tunes it. Validation images
never train.

    python benchmarks/unseen_dataset.py            # the demo's budget (its images per epoch and epochs)

Prints AP50 / AP (and the class-agnostic AP50) and writes benchmarks/results/unseen_dataset.json.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("hexagon", "ring", "arrow", "crescent")
IMAGE_SIZE = 256


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A two-colour gradient at a random angle, a faint grid or lines, and fine noise."""
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, 2 * math.pi)
    t = np.clip((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta) + 0.5, 0, 1)[..., None]
    img = a * (1 - t) + b * t + rng.normal(0, rng.uniform(2, 14), (size, size, 3))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    step = int(rng.integers(16, 48))
    line = tuple(int(v) for v in rng.uniform(0, 255, 3))
    for p in range(0, size, step) if rng.uniform() < 0.6 else []:
        draw.line([(p, 0), (p, size)], fill=line, width=1)
        draw.line([(0, p), (size, p)], fill=line, width=1)
    return pil


def _shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """The object's pixels as an L mask of the whole image."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    ca, sa = math.cos(angle), math.sin(angle)

    def place(pts):
        return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]

    if kind == "hexagon":
        draw.polygon(place([(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]), fill=255)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=max(2, int(r * 0.3)))
    elif kind == "arrow":
        draw.polygon(place([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)]),
                     fill=255)
    else:  # crescent: a disc minus an offset disc
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + 0.45 * r * ca, cy + 0.45 * r * sa
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=0)
    return mask


def draw_image(seed: int, split: str, index: int) -> tuple[Image.Image, list[tuple[int, list[float], float]]]:
    """One image and its objects (class index, xyxy box, area), a pure function of (seed, split, index)."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split], index, 7])
    img = _background(rng, IMAGE_SIZE)
    objects = []
    for _ in range(int(rng.integers(1, 11))):
        cls = int(rng.integers(len(CLASSES)))
        r = float(np.exp(rng.uniform(math.log(6), math.log(50))))
        cx, cy = rng.uniform(r * 0.6, IMAGE_SIZE - r * 0.6, 2)
        mask = _shape_mask(CLASSES[cls], IMAGE_SIZE, cx, cy, r, rng.uniform(0, 2 * math.pi))
        box = mask.getbbox()
        if box is None or min(box[2] - box[0], box[3] - box[1]) < 6:
            continue
        if any(_iou(box, other) > 0.4 for _, other, _ in objects):
            continue
        shadow = Image.new("RGB", img.size, (0, 0, 0))
        img.paste(shadow, (2, 2), mask.filter(ImageFilter.GaussianBlur(1.5)).point(lambda v: v // 2))
        img.paste(tuple(int(v) for v in rng.uniform(0, 255, 3)), (0, 0), mask)
        objects.append((cls, [float(v) for v in box], float(np.count_nonzero(np.asarray(mask)))))
    return img, objects


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def write_dataset(out: Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """``out/{train,val}/*.jpg`` and ``out/annotations/instances_{train,val}.json``."""
    for split, n in (("train", num_train), ("val", num_val)):
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            img, objects = draw_image(seed, split, i)
            img.save(out / split / f"{i:06d}.jpg", quality=90)
            images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": IMAGE_SIZE, "height": IMAGE_SIZE})
            for cls, (x0, y0, x1, y1), area in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "iscrowd": 0})
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]}))
    return out


def main(num_train: int | None = None, num_val: int = 200, epochs: int | None = None, device: str = "auto",
         work_dir: str = "runs/unseen", out: str = "benchmarks/results/unseen_dataset.json") -> dict:
    """Write the dataset, train the demo's recipe on it (``num_train`` / ``epochs`` None = the demo's), print and
    save AP."""
    from convergence import class_agnostic_ap50

    from detrkit.cli.train import DEMO, demo_config
    from detrkit.engine.train import train

    num_train = num_train or DEMO["num_train"]
    work = Path(work_dir)
    data = work / f"data-{num_train}-{num_val}"
    if not (data / "annotations" / "instances_val.json").is_file():
        write_dataset(data, num_train, num_val)
    cfg = demo_config(data, work / "run", epochs=epochs or DEMO["epochs"], device=device)
    t0 = time.perf_counter()
    metrics = train(cfg)
    result = {"AP50": metrics["AP50"], "AP": metrics["AP"],
              "class_agnostic_AP50": class_agnostic_ap50(work / "run", data, device),
              "wall_s": round(time.perf_counter() - t0, 1), "num_train": num_train, "num_val": num_val,
              "config": {k: v for k, v in vars(cfg).items() if k not in ("data", "output_dir")},
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    print(f"unseen dataset ({', '.join(CLASSES)}), {num_train} / {num_val} images, the demo's recipe: "
          f"AP50 {100 * result['AP50']:.1f}  AP {100 * result['AP']:.1f}  class-agnostic AP50 "
          f"{100 * result['class_agnostic_AP50']:.1f}  ({result['wall_s']:.0f} s)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
