"""Test helpers: write a COCO-format dataset out as YOLO, Pascal VOC or per-split COCO (Roboflow) files, and
break datasets on purpose."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.sax.saxutils import escape


def read_coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def write_yolo(coco_root: Path, out: Path, splits=("train", "val")) -> Path:
    """``coco_root`` (COCO folder) as a YOLO dataset in ``out``: data.yaml, images/{split}, labels/{split}."""
    names = None
    for split in splits:
        coco = read_coco(coco_root, split)
        cats = sorted(c["id"] for c in coco["categories"])
        names = [next(c["name"] for c in coco["categories"] if c["id"] == cid) for cid in cats]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for img in coco["images"]:
            shutil.copy(coco_root / split / img["file_name"], out / "images" / split / img["file_name"])
            w, h = img["width"], img["height"]
            lines = [f"{cats.index(a['category_id'])} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.6f} "
                     f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.6f} {a['bbox'][2] / w:.6f} {a['bbox'][3] / h:.6f}"
                     for a in coco["annotations"] if a["image_id"] == img["id"]]
            (out / "labels" / split / Path(img["file_name"]).with_suffix(".txt")).write_text("\n".join(lines) + "\n")
    (out / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {json.dumps(names)}\n")
    return out


def write_coco_per_split(coco_root: Path, out: Path, json_name: str = "_annotations.coco.json",
                         val_dir: str = "valid") -> Path:
    """``coco_root`` laid out as Roboflow's COCO export: ``train/`` and ``valid/``, each with its images and json."""
    for split, folder in (("train", "train"), ("val", val_dir)):
        shutil.copytree(coco_root / split, out / folder)
        (out / folder / json_name).write_text(json.dumps(read_coco(coco_root, split)))
    return out


def write_voc(coco_root: Path, out: Path, splits=("train", "val")) -> Path:
    """``coco_root`` as a Pascal VOC folder (VOC pixel convention: 1-based inclusive corners)."""
    voc = out / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for split in splits:
        coco = read_coco(coco_root, split)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        stems = []
        for img in coco["images"]:
            stem = f"{split}_{Path(img['file_name']).stem}"
            stems.append(stem)
            shutil.copy(coco_root / split / img["file_name"], voc / "JPEGImages" / f"{stem}.jpg")
            objs = []
            for a in coco["annotations"]:
                if a["image_id"] != img["id"]:
                    continue
                x, y, w, h = a["bbox"]
                objs.append(f"<object><name>{escape(names[a['category_id']])}</name><difficult>0</difficult><bndbox>"
                            f"<xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax>"
                            "</bndbox></object>")
            (voc / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}.jpg</filename><size><width>{img['width']}</width>"
                f"<height>{img['height']}</height><depth>3</depth></size>{''.join(objs)}</annotation>")
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return out


def square_copy(coco_root: Path, out: Path, size: int, splits=("train", "val")) -> Path:
    """``coco_root`` with every image resized to ``size`` x ``size`` (boxes scaled): batches need no padding,
    so a batch split over processes computes exactly what the whole batch does in one."""
    from PIL import Image

    for split in splits:
        coco = read_coco(coco_root, split)
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        scale = {}
        for img in coco["images"]:
            with Image.open(coco_root / split / img["file_name"]) as im:
                im.convert("RGB").resize((size, size)).save(out / split / img["file_name"])
            scale[img["id"]] = (size / img["width"], size / img["height"])
            img["width"] = img["height"] = size
        for a in coco["annotations"]:
            sx, sy = scale[a["image_id"]]
            x, y, w, h = a["bbox"]
            a["bbox"] = [x * sx, y * sy, w * sx, h * sy]
            a["area"] = a["bbox"][2] * a["bbox"][3]
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return out
