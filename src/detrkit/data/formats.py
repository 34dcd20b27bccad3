"""Dataset layouts other than COCO json, read into the COCO dict everything else uses.

* YOLO (Ultralytics): ``data.yaml`` with ``names`` and ``train`` / ``val`` image folders (or list files);
  each image ``.../images/x.jpg`` has ``.../labels/x.txt`` with one ``class cx cy w h`` line per object,
  normalized to the image size (a segmentation line's polygon becomes its bounding box). Category ids are
  YOLO's class indices. Without a data.yaml, a ``classes.txt`` (one name per line) names the classes, and the
  images are ``images/{train,val}``, ``images/`` or the folder itself, each image's .txt beside it.
* COCO per split (Roboflow's COCO export and similar): ``{train,valid|val,test}/`` each holding its images and one
  COCO json (``_annotations.coco.json``, ``annotations.json``, ``instances_*.json``, or the folder's only json);
  ``file_name`` is relative to that folder.
* Pascal VOC: ``Annotations/*.xml`` + ``JPEGImages/`` + ``ImageSets/Main/{train,val,test}.txt`` (a
  ``VOCdevkit/VOC2007`` folder, or one containing such folders), or flat: images with their .xml beside them (no
  split lists: all of it is the train split). An XML file whose ``<filename>`` does not exist names the image with
  its stem (any image extension), with one warning counting such files. VOC pixel boxes are 1-based and inclusive:
  ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` in COCO terms, as detectron2 and mmdet read them.
  ``difficult`` objects become ``iscrowd`` 1: left out of training and ignored by COCO evaluation, as VOC's
  own evaluation ignores them.

Lines or files that cannot be parsed become annotations with ``bbox: None`` and a ``source`` naming the file
and line, so that the dataset doctor reports them with everything else (and ``--skip_invalid`` drops them).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import yaml
from PIL import UnidentifiedImageError

from detrkit.data.coco import DatasetError
from detrkit.data.image import image_size

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


# -- layout detection --------------------------------------------------------------------------------------
def detect_layout(root: str | Path) -> str:
    """``coco``, ``coco_split``, ``yolo`` or ``voc`` for a dataset folder (or a YOLO ``data.yaml``)."""
    root = Path(root)
    if root.is_file() and root.suffix in (".yaml", ".yml"):
        return "yolo"
    if root.is_file():
        raise DatasetError(f"{root} is a file: give the dataset's folder (or a YOLO data.yaml; a COCO json goes with "
                           "--train_ann / --val_ann and its image folder)")
    if (root / "annotations").is_dir() and any((root / "annotations").glob("*.json")):
        return "coco"
    if _coco_split_ann(root, "train") is not None:
        return "coco_split"
    if _yolo_yaml(root) is not None or (root / "classes.txt").is_file():
        return "yolo"
    if _voc_root(root) is not None:
        return "voc"
    raise DatasetError(f"{root}: not a dataset folder detrkit knows. Expected COCO (annotations/instances_train.json + "
                       "train/), COCO per split (train/ and valid/ or val/, each with its images and "
                       "_annotations.coco.json or annotations.json: Roboflow's COCO export), "
                       "YOLO (data.yaml + images/ + labels/) or Pascal VOC (Annotations/ + JPEGImages/ + "
                       "ImageSets/Main/).")


def describe_layout(root: str | Path) -> str:
    """One line naming the layout found in a dataset folder, for the user to check it is the one they meant."""
    root = Path(root)
    layout = detect_layout(root)
    if layout == "coco":
        return f"COCO dataset ({', '.join(sorted(p.name for p in (root / 'annotations').glob('*.json')))})"
    if layout == "coco_split":
        found = [p for p in (_coco_split_ann(root, s) for s in ("train", "val", "test")) if p is not None]
        return "COCO dataset per split (" + ", ".join(str(p.relative_to(root)) for p in found) + ")"
    if layout == "yolo":
        yaml_file = _yolo_yaml(root)
        return f"YOLO dataset ({yaml_file.name if yaml_file else 'classes.txt, no data.yaml'})"
    ann_dir, img_dir = _voc_dirs(root)
    if ann_dir == img_dir:
        return f"Pascal VOC dataset, flat: {len(list(ann_dir.glob('*.xml')))} .xml files beside the images"
    return f"Pascal VOC dataset ({ann_dir.relative_to(root) if ann_dir.is_relative_to(root) else ann_dir}, " \
           f"{len(list(ann_dir.glob('*.xml')))} .xml files)"


def resolve_split(data: str | Path | None, split: str, *, images: str | Path | None = None,
                  ann: str | Path | None = None) -> tuple[Path, Path | dict, str | None]:
    """(images folder, annotations, source name) of ``split`` ("train" / "val"): explicit paths, or from ``data``.

    ``data`` may be a COCO folder (annotations are then a json path: ``annotations/instances_{split}*.json`` and
    the image folder named like it, else ``{split}/``), a YOLO dataset (folder with data.yaml, or the yaml) or a
    Pascal VOC one (annotations are then a COCO dict read from them).
    """
    if images and ann:
        if Path(ann).is_dir():  # a folder of Pascal VOC XML files and the folder of their images
            return read_voc(ann, split, dirs=(Path(ann), Path(images)))
        return Path(images), Path(ann), None
    if data is None:
        raise DatasetError(f"no {split} data: pass --data DIR (a COCO, YOLO or VOC dataset folder) or --{split}_images "
                           f"and --{split}_ann")
    root = Path(data)
    if not root.exists():
        raise DatasetError(f"dataset not found: {root}")
    layout = None if ann else detect_layout(root)
    if layout == "coco_split":
        found = _coco_split_ann(root, split)
        if found is None:
            raise DatasetError(f"{root}: no {split} split: expected {' or '.join(f'{d}/' for d in _SPLIT_DIRS[split])} "
                               "with its images and a COCO json (_annotations.coco.json or annotations.json)")
        return found.parent, found, None
    if layout not in (None, "coco"):
        return read_split(root, split)
    if not ann:
        found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
        ann = found[0] if found else root / "annotations" / f"instances_{split}.json"
    ann = Path(ann)
    if not images:
        stem = ann.stem.removeprefix("instances_")  # instances_train2017.json -> train2017/
        images = root / stem if (root / stem).is_dir() else root / split
    return Path(images), ann, None


def read_split(root: str | Path, split: str) -> tuple[Path, dict, str]:
    """(images folder, COCO dict, source name) of ``split`` ("train" / "val") of a YOLO or VOC dataset."""
    layout = detect_layout(root)
    if layout == "yolo":
        return read_yolo(root, split)
    if layout == "voc":
        return read_voc(root, split)
    if layout == "coco_split":
        images, ann, _ = resolve_split(root, split)
        try:
            return images, json.loads(ann.read_text()), str(ann)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{ann}: not valid JSON ({e})") from None
    raise DatasetError(f"{root} is a COCO dataset: read it with load_coco_json")


# -- COCO per split ----------------------------------------------------------------------------------------
_SPLIT_DIRS = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
_SPLIT_JSONS = ("_annotations.coco.json", "annotations.json")


def _coco_split_ann(root: Path, split: str) -> Path | None:
    """The COCO json of ``split`` in a per-split layout (``root/{split folder}/...json``), or None."""
    for name in _SPLIT_DIRS.get(split, (split,)):
        folder = root / name
        if not folder.is_dir():
            continue
        for candidate in _SPLIT_JSONS:
            if (folder / candidate).is_file():
                return folder / candidate
        jsons = sorted(folder.glob("instances_*.json")) or sorted(folder.glob("*.json"))
        if len(jsons) == 1 or (jsons and jsons[0].name.startswith("instances_")):
            return jsons[0]
    return None


# -- YOLO --------------------------------------------------------------------------------------------------
def _yolo_yaml(root: Path) -> Path | None:
    if root.is_file():
        return root if root.suffix in (".yaml", ".yml") else None
    for name in ("data.yaml", "data.yml", "dataset.yaml"):
        if (root / name).is_file():
            return root / name
    return None


def _yolo_spec_from_classes(root: Path) -> dict | None:
    """A data.yaml's content for a YOLO export without one: ``classes.txt`` (one name per line, as LabelImg and
    many exporters write it) and ``images/{train,val}``, ``images/``, or images with their .txt beside them."""
    classes = root / "classes.txt"
    if not classes.is_file():
        return None
    spec = {"names": [line.strip() for line in classes.read_text().splitlines() if line.strip()], "path": str(root)}
    if (root / "images" / "train").is_dir():
        spec["train"] = "images/train"
        val = next((d for d in ("val", "valid", "test") if (root / "images" / d).is_dir()), None)
        if val:
            spec["val"] = f"images/{val}"
    else:
        spec["train"] = "images" if (root / "images").is_dir() else "."
    return spec


def _yolo_images(spec, base: Path) -> list[Path]:
    """Image files of a data.yaml split entry: a folder, a .txt list of files, or a list of either."""
    files = []
    for entry in spec if isinstance(spec, list) else [spec]:
        path = Path(entry) if Path(entry).is_absolute() else base / entry
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix == ".txt":
            for line in path.read_text().splitlines():
                if line.strip():
                    p = Path(line.strip())
                    files.append(p if p.is_absolute() else (path.parent / p).resolve())
        else:
            raise DatasetError(
                f"YOLO split entry {entry!r} ({path}) is neither an image folder nor a .txt list of images"
            )
    return files


def _yolo_label_file(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def read_yolo(root: str | Path, split: str) -> tuple[Path, dict, str]:
    """A YOLO dataset's ``split`` as (images root, COCO dict, source). Boxes use each image's displayed size."""
    yaml_file = _yolo_yaml(Path(root))
    spec = None if yaml_file is not None else _yolo_spec_from_classes(Path(root))
    if yaml_file is None and spec is None:
        raise DatasetError(f"{root}: no data.yaml (a YOLO dataset lists 'names' and its 'train' / 'val' folders there) "
                           "and no classes.txt")
    if spec is None:
        try:
            spec = yaml.safe_load(yaml_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise DatasetError(f"{yaml_file}: not valid YAML ({e})") from None
        if not isinstance(spec, dict):
            raise DatasetError(f"{yaml_file}: expected a YOLO data.yaml mapping (names, train, val)")
    else:
        yaml_file = Path(root) / "classes.txt"  # named in messages
    names = spec.get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not names:
        raise DatasetError(f"{yaml_file}: no 'names'; list the class names (index = class id)")
    base = Path(spec.get("path") or yaml_file.parent)
    base = base if base.is_absolute() else (yaml_file.parent / base)
    key = split if split in spec else {"val": "test"}.get(split, split)
    if key not in spec:
        raise DatasetError(f"{yaml_file}: no '{split}' images; give their folder (a '{split}' entry in data.yaml), "
                           "or hold out part of the training images (--val_split 0.1)")
    files = _yolo_images(spec[key], base)
    if not files:
        raise DatasetError(f"{yaml_file}: the '{key}' entry ({spec[key]}) holds no images")
    root_dir = Path(os.path.commonpath([str(f.parent) for f in files]))
    images, anns = [], []
    for image_id, file in enumerate(files, start=1):
        info = {"id": image_id, "file_name": file.relative_to(root_dir).as_posix()}
        try:
            info["width"], info["height"] = image_size(file)
        except (UnidentifiedImageError, OSError):
            images.append(info)  # the doctor reports the unreadable file
            continue
        images.append(info)
        labels = _yolo_label_file(file)
        if labels.is_file():
            anns += _yolo_annotations(labels, image_id, info["width"], info["height"], len(anns))
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": i, "name": str(n)} for i, n in enumerate(names)]}
    return root_dir, coco, f"{yaml_file} [{key}]"


def _yolo_annotations(labels: Path, image_id: int, w: int, h: int, first_id: int) -> list[dict]:
    out = []
    for line_no, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        ann = {"id": first_id + len(out) + 1, "image_id": image_id, "iscrowd": 0, "source": f"{labels} line {line_no}"}
        fields = line.split()
        try:
            values = [float(v) for v in fields[1:]]
            ann["category_id"] = int(fields[0])
        except ValueError:
            values, ann["category_id"] = [], None
        if len(values) == 4:
            cx, cy, bw, bh = values
        elif len(values) >= 6 and len(values) % 2 == 0:  # segmentation polygon x1 y1 x2 y2 ...
            xs, ys = values[0::2], values[1::2]
            cx, cy, bw, bh = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
        else:
            ann["bbox"] = None
            ann["source"] += f" ({line.strip()!r}: expected 'class cx cy w h', normalized)"
            out.append(ann)
            continue
        ann["bbox"] = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
        ann["area"] = bw * w * bh * h
        out.append(ann)
    return out


# -- Pascal VOC --------------------------------------------------------------------------------------------
def _voc_dirs(root: Path) -> tuple[Path, Path] | None:
    """(XML folder, image folder) of a Pascal VOC dataset: ``Annotations/`` + ``JPEGImages/`` (in ``root``, a
    ``VOC*`` folder or ``VOCdevkit/VOC*``), or flat: images and their .xml side by side in ``root``, as LabelImg and
    most annotation tools write them."""
    candidates = [root, *sorted(root.glob("VOC*")), *sorted(root.glob("VOCdevkit/VOC*"))]
    for c in candidates:
        if (c / "Annotations").is_dir() and (c / "JPEGImages").is_dir():
            return c / "Annotations", c / "JPEGImages"
    if root.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in root.iterdir()) and any(root.glob("*.xml")):
        return root, root
    return None


def _voc_root(root: Path) -> Path | None:
    dirs = _voc_dirs(root)
    return None if dirs is None else dirs[0].parent if dirs[0].name == "Annotations" else dirs[0]


def _voc_image_name(images: Path, file_name: str | None, stem: str, renamed: list[str]) -> str:
    """The image an XML file belongs to: its <filename> when that exists, else the file with the XML's stem and any
    image extension (annotation tools keep the original name, often another format: OSBS_029.tif -> .png)."""
    if file_name and (images / file_name).is_file():
        return file_name
    for suffix in (".jpg", *sorted(IMAGE_SUFFIXES - {".jpg"})):
        for name in (stem + suffix, stem + suffix.upper()):
            if (images / name).is_file():
                if file_name and file_name != name:
                    renamed.append(f"{file_name} -> {name}")
                return name
    return file_name or f"{stem}.jpg"  # missing for real: the doctor reports it with the XML file


def _voc_text(node, tag: str):
    child = node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def read_voc(root: str | Path, split: str, *, dirs: tuple[Path, Path] | None = None) -> tuple[Path, dict, str]:
    """A Pascal VOC dataset's ``split`` as (JPEGImages, COCO dict, source). The categories are the object
    names of all the XML files (sorted), so every split of one dataset gets the same ids. ``dirs``: an XML folder
    and an image folder given explicitly (``--train_ann XMLS --train_images IMAGES``): all of its files are the
    split."""
    explicit = dirs is not None
    dirs = dirs or _voc_dirs(Path(root))
    if dirs is None:
        raise DatasetError(f"{root}: no Annotations/ and JPEGImages/ folders of a Pascal VOC dataset, nor images "
                           "with their .xml files side by side")
    ann_dir, img_dir = dirs
    voc = ann_dir if explicit else _voc_root(Path(root))
    sets = voc / "ImageSets" / "Main"
    key = split if (sets / f"{split}.txt").is_file() else {"val": "test"}.get(split, split)
    xml_files = sorted(ann_dir.glob("*.xml"))
    if (sets / f"{key}.txt").is_file():
        stems = [s.split()[0] for s in (sets / f"{key}.txt").read_text().splitlines() if s.strip()]
    elif explicit or (split == "train" and not sets.is_dir()):
        stems = [f.stem for f in xml_files]  # no split lists: everything is this split's
    else:
        raise DatasetError(f"{voc}: no ImageSets/Main/{split}.txt listing the {split} images; write that list (one "
                           f"file stem per line), give the {split} data explicitly (--{split}_images --{split}_ann), "
                           "or hold out part of the training images (--val_split 0.1)")
    parsed = {f.stem: _parse_voc_xml(f) for f in xml_files}
    names = sorted({o["name"] for p in parsed.values() if p for o in p["objects"] if o.get("name")})
    cat_ids = {n: i + 1 for i, n in enumerate(names)}
    images, anns, renamed = [], [], []
    for image_id, stem in enumerate(stems, start=1):
        xml = ann_dir / f"{stem}.xml"
        doc = parsed.get(stem)
        file_name = _voc_image_name(img_dir, (doc or {}).get("filename"), stem, renamed)
        info = {"id": image_id, "file_name": file_name, "source": str(xml)}
        if doc and doc["width"] and doc["height"]:
            info["width"], info["height"] = doc["width"], doc["height"]
        images.append(info)
        if doc is None:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": None, "bbox": None,
                         "source": f"{xml} (missing or not valid XML)"})
            continue
        for k, obj in enumerate(doc["objects"], start=1):
            ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": cat_ids.get(obj.get("name")),
                   "iscrowd": int(obj["difficult"]), "source": f"{xml} object {k} ({obj.get('name')})"}
            box = obj["box"]
            ann["bbox"] = None if box is None else [box[0] - 1, box[1] - 1, box[2] - box[0] + 1, box[3] - box[1] + 1]
            if ann["bbox"]:
                ann["area"] = ann["bbox"][2] * ann["bbox"][3]
            anns.append(ann)
    coco = {"images": images, "annotations": anns, "categories": [{"id": i, "name": n} for n, i in cat_ids.items()]}
    if not coco["categories"]:
        raise DatasetError(f"{ann_dir}: no <object><name> in any XML file")
    if renamed:
        warnings.warn(f"{ann_dir}: {len(renamed)} of {len(stems)} XML files of the {split} split name an image that "
                      f"does not exist; using the image with the XML file's stem instead (e.g. {renamed[0]})",
                      stacklevel=2)
    return img_dir, coco, f"{voc} [{key}]"


def _parse_voc_xml(file: Path) -> dict | None:
    try:
        tree = ET.parse(file).getroot()
    except (ET.ParseError, OSError):
        return None
    size = tree.find("size")

    def num(node, tag):
        try:
            return float(_voc_text(node, tag))
        except (TypeError, ValueError):
            return None

    objects = []
    for obj in tree.findall("object"):
        bnd = obj.find("bndbox")
        box = None if bnd is None else [num(bnd, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        objects.append({"name": _voc_text(obj, "name"), "difficult": _voc_text(obj, "difficult") in ("1", "true"),
                        "box": None if box is None or None in box else box})
    return {"filename": _voc_text(tree, "filename"), "objects": objects,
            "width": int(num(size, "width") or 0) if size is not None else 0,
            "height": int(num(size, "height") or 0) if size is not None else 0}


# -- a validation split where the dataset has none ---------------------------------------------------------
def split_coco(coco: dict, fraction: float, seed: int = 0) -> tuple[dict, dict]:
    """``coco``'s images in two parts, (train, val): ``fraction`` of them (at least one) drawn at random with
    ``seed``, the same for the same images whatever their order in the file; categories shared."""
    if not 0 < fraction < 1:
        raise DatasetError(f"--val_split {fraction}: the share of images held out for validation must be in (0, 1)")
    ids = sorted(img["id"] for img in coco["images"])
    if len(ids) < 2:
        raise DatasetError(f"--val_split: {len(ids)} image(s) cannot be split into training and validation")
    order = np.random.default_rng(seed).permutation(len(ids))
    val_ids = {ids[i] for i in order[:min(len(ids) - 1, max(1, round(fraction * len(ids))))]}

    return subset_coco(coco, set(ids) - val_ids), subset_coco(coco, val_ids)


def subset_coco(coco: dict, image_ids: set) -> dict:
    """``coco`` with only the images of ``image_ids`` and their annotations (categories kept)."""
    return {**coco, "images": [img for img in coco["images"] if img["id"] in image_ids],
            "annotations": [a for a in coco.get("annotations", []) if a["image_id"] in image_ids]}


# -- conversion --------------------------------------------------------------------------------------------
def convert_dataset(source: str | Path, out: str | Path, *, splits=("train", "val"), images: str = "link",
                    val_split: float = 0.0, seed: int = 42) -> dict:
    """Write a YOLO / VOC / per-split COCO dataset as a COCO folder: ``out/annotations/instances_{split}.json`` and
    ``out/{split}/`` (``images``: ``link`` a symlink to the source image folder, ``copy`` the files, ``none``
    nothing). ``val_split``: where the source has no val split, hold out that share of the train images as one
    (drawn with ``seed``, as ``detrkit train --val_split`` does). Returns {split: number of images}. Annotations
    that could not be parsed are written out as they are, for ``detrkit data check`` to report."""
    out = Path(out)
    found = {}
    for split in splits:
        try:
            found[split] = read_split(source, split)[:2]
        except DatasetError:
            if split == "train":
                raise
    if val_split and "val" in splits and "val" not in found:
        images_dir, coco = found["train"]
        train_part, val_part = split_coco(coco, val_split, seed)
        found["train"], found["val"] = (images_dir, train_part), (images_dir, val_part)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    written = {}
    for split, (images_dir, coco) in found.items():
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        target = out / split
        if images != "none" and not target.exists():
            if images == "link":
                try:
                    target.symlink_to(images_dir.resolve(), target_is_directory=True)
                except OSError:  # no symlinks (Windows without developer mode): copy
                    images = "copy"
            if images == "copy":
                target.mkdir(parents=True)
                for img in coco["images"]:
                    dst = target / img["file_name"]
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(images_dir / img["file_name"], dst)
        written[split] = len(coco["images"])
    return written
