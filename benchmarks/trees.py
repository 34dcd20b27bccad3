"""Real photos for the benchmarks: aerial RGB tree crowns from the MIT-licensed ``deepforest`` wheel's data folder.

The wheel (fetched with ``pip download --no-deps``, never installed) ships four annotated NEON airborne images
(Pascal VOC xml, one box per crown): two crops of the Yellowstone site (2299x2472 px, 574 crowns; 1249x1035 px,
279 crowns) and two 400x400 tiles of other sites (OSBS_029: 61 crowns; SOAP_061: 37, labelled Alive / Dead).
One class, many small objects per image (crowns of 8-107 px, median ~37 px): the opposite of the demo's shapes.

Splits, by image (no tile of a validation image ever trains):
  train: the large Yellowstone crop, cut into 400 px tiles every 200 px (overlapping tiles, 132 of them);
  val:   the other Yellowstone crop in 400 px tiles without overlap (the last row and column aligned to the
         border), plus OSBS_029 and SOAP_061 whole (Alive / Dead both "Tree").
A box is kept in a tile when at least half of its area lies inside (clipped to the tile).

A tuning copy (``make_trees_dataset(out, tuning=True)``) never touches those validation images: it splits the
training image itself at x = 1500 px, the left part tiled as above for training (84 tiles, 1173 crowns), the right
part in 400 px tiles without overlap for validation (14 tiles, 297 crowns). Settings are chosen there; the
validation split above only reports.

    python benchmarks/trees.py --out data/trees     # writes the COCO dataset and prints its size
    python benchmarks/trees.py --out data/trees-tuning --tuning
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from PIL import Image

WHEEL = "deepforest==2.1.0"
CACHE = Path.home() / ".cache" / "detrkit-bench"
TILE = 400
TRAIN_IMAGES = ("2019_YELL_2_528000_4978000_image_crop2",)
VAL_TILED = ("2019_YELL_2_541000_4977000_image_crop",)
VAL_WHOLE = ("OSBS_029", "SOAP_061")
TUNING_SPLIT_X = 1500  # the tuning copy: the training image's columns left of this train, the rest validate


def deepforest_data(cache: Path = CACHE) -> Path:
    """The ``deepforest/data`` folder of the wheel, downloaded once (``pip download --no-deps``) and unzipped."""
    data = cache / "deepforest" / "deepforest" / "data"
    if data.is_dir():
        return data
    cache.mkdir(parents=True, exist_ok=True)
    if not list(cache.glob("deepforest-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(cache)], check=True)
    with zipfile.ZipFile(next(cache.glob("deepforest-*.whl"))) as wheel:
        wheel.extractall(cache / "deepforest", [n for n in wheel.namelist() if n.startswith("deepforest/data/")])
    return data


def _boxes(xml: Path) -> list[tuple[float, float, float, float]]:
    root = ET.parse(xml).getroot()
    return [tuple(float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            for o in root.iter("object")]


def _starts(length: int, stride: int) -> list[int]:
    """Tile origins along one side: every ``stride`` px, the last one aligned to the far border."""
    last = max(0, length - TILE)
    return sorted({*range(0, last, stride), last})


def _tiles(image: Image.Image, boxes: list, stride: int):
    """(tile image, boxes in tile pixels) for every tile; a box stays where half its area or more is inside."""
    w, h = image.size
    for y0 in _starts(h, stride):
        for x0 in _starts(w, stride):
            kept = []
            for x1, y1, x2, y2 in boxes:
                cx1, cy1, cx2, cy2 = max(x1, x0), max(y1, y0), min(x2, x0 + TILE), min(y2, y0 + TILE)
                if cx2 - cx1 < 2 or cy2 - cy1 < 2:
                    continue
                if (cx2 - cx1) * (cy2 - cy1) >= 0.5 * (x2 - x1) * (y2 - y1):
                    kept.append((cx1 - x0, cy1 - y0, cx2 - x0, cy2 - y0))
            yield f"{x0}_{y0}", image.crop((x0, y0, x0 + TILE, y0 + TILE)), kept


def _write_split(out: Path, split: str, items) -> dict:
    images, annotations = [], []
    (out / split).mkdir(parents=True, exist_ok=True)
    for name, image, boxes in items:
        image_id = len(images) + 1
        image.save(out / split / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.png", "width": image.width, "height": image.height})
        for x1, y1, x2, y2 in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "tree"}]}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return {"images": len(images), "boxes": len(annotations)}


def _side(image: Image.Image, boxes: list, left: bool) -> tuple[Image.Image, list]:
    """The part of ``image`` left (or right) of :data:`TUNING_SPLIT_X`, with the boxes whose half or more lies in
    it, clipped and in its pixels."""
    x0, x1 = (0, TUNING_SPLIT_X) if left else (TUNING_SPLIT_X, image.width)
    kept = []
    for a, b, c, d in boxes:
        ca, cc = max(a, x0), min(c, x1)
        if cc - ca >= 2 and (cc - ca) >= 0.5 * (c - a):
            kept.append((ca - x0, b, cc - x0, d))
    return image.crop((x0, 0, x1, image.height)), kept


def make_trees_dataset(out: str | Path, tuning: bool = False) -> dict:
    """Write the tree-crown dataset (COCO layout: train/, val/, annotations/) under ``out``; returns its counts.
    ``tuning``: the tuning copy instead, both splits cut from the training image (the module docstring)."""
    out, src = Path(out), deepforest_data()
    marker = out / "trees.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    if tuning:
        (stem,) = TRAIN_IMAGES
        image, boxes = Image.open(src / f"{stem}.png").convert("RGB"), _boxes(src / f"{stem}.xml")
        counts = {"source": f"{WHEEL} (deepforest/data, MIT): {stem} split at x = {TUNING_SPLIT_X}"}
        for split, left, stride in (("train", True, 200), ("val", False, TILE)):
            part, kept = _side(image, boxes, left)
            counts[split] = _write_split(out, split, ((f"{stem}_{split}_{tag}", tile, b)
                                                      for tag, tile, b in _tiles(part, kept, stride)))
        marker.write_text(json.dumps(counts))
        return counts

    def tiled(stems, stride):
        for stem in stems:
            image = Image.open(src / f"{stem}.png").convert("RGB")
            for tag, tile, boxes in _tiles(image, _boxes(src / f"{stem}.xml"), stride):
                yield f"{stem}_{tag}", tile, boxes

    def whole(stems):
        for stem in stems:
            yield stem, Image.open(src / f"{stem}.png").convert("RGB"), _boxes(src / f"{stem}.xml")

    counts = {"source": f"{WHEEL} (deepforest/data, MIT)", "train": _write_split(out, "train",
                                   tiled(TRAIN_IMAGES, 200)),
              "val": _write_split(out, "val", [*tiled(VAL_TILED, TILE), *whole(VAL_WHOLE)])}
    marker.write_text(json.dumps(counts))
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/trees")
    parser.add_argument("--tuning", action="store_true", help="the tuning copy, cut from the training image alone")
    args = parser.parse_args()
    print(json.dumps(make_trees_dataset(args.out, tuning=args.tuning)))
