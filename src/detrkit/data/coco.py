"""COCO-format detection datasets: an image folder plus an annotation json.

Category ids stay the dataset's own (COCO's 1..90 with gaps, or anything else) at the edges; the
model sees contiguous indices 0..K-1, and :attr:`CocoDetection.label_to_cat` maps back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors

from detrkit.ops import box_xyxy_to_cxcywh


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and the fix."""


def load_coco_json(ann_file: str | Path) -> dict:
    """Read and sanity-check a COCO detection json; raises :class:`DatasetError` naming the problem."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetError(f"annotation file not found: {ann_file}. Pass the path of a COCO-format json "
                           "(e.g. annotations/instances_train.json), or create a dataset with `detrkit data synth`.")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file} is not valid JSON ({e}); re-export the annotations in COCO format.") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a JSON object with 'images', 'annotations' and 'categories'.")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing the '{key}' list of a COCO detection file.")
    data.setdefault("annotations", [])
    if not data["categories"]:
        raise DatasetError(f"{ann_file}: 'categories' is empty; list every class as {{'id': ..., 'name': ...}}.")
    cat_ids = {c["id"] for c in data["categories"]}
    image_ids = {img["id"] for img in data["images"]}
    for ann in data["annotations"]:
        where = f"{ann_file}: annotation id {ann.get('id')} (image_id {ann.get('image_id')})"
        if ann.get("category_id") not in cat_ids:
            raise DatasetError(f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories' "
                               f"(ids {sorted(cat_ids)}); add the category or fix the annotation.")
        if ann.get("image_id") not in image_ids:
            raise DatasetError(f"{where} refers to an image id that is not in 'images'; remove the annotation or add the image.")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise DatasetError(f"{where} has bbox {bbox!r}; COCO boxes are [x, y, width, height] in pixels.")
    return data


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset.

    Args:
        images_dir: folder the ``file_name`` of each image is relative to.
        ann_file: COCO json with ``images``, ``annotations`` and ``categories``.
        transforms: v2 transform applied to ``(image, target)``, e.g. :func:`~detrkit.data.build_transforms`.
        drop_crowd: leave ``iscrowd`` boxes out of the targets (DETR trains without them; COCO
            evaluation reads them from the json itself).

    Each sample is ``(image (3, h, w) float, target)`` with target ``labels`` (n,) contiguous int64,
    ``boxes`` (n, 4) normalized cxcywh of the transformed image, ``image_id``, ``orig_size``, ``size``.
    Images without annotations are kept (they teach the model to predict nothing).
    """

    def __init__(self, images_dir: str | Path, ann_file: str | Path, transforms: Callable | None = None,
                 *, drop_crowd: bool = True) -> None:
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.coco = load_coco_json(ann_file)
        if not self.images_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.images_dir} (images of {self.ann_file}); pass the folder "
                               "that the 'file_name' entries are relative to.")
        self.transforms = transforms
        self.drop_crowd = drop_crowd
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])
        self.cat_ids = sorted(c["id"] for c in self.coco["categories"])
        self.cat_to_label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat = list(self.cat_ids)
        names = {c["id"]: c.get("name", str(c["id"])) for c in self.coco["categories"]}
        self.class_names = [names[cid] for cid in self.cat_ids]
        self._anns: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in self.coco["annotations"]:
            self._anns[ann["image_id"]].append(ann)
        missing = [im["file_name"] for im in self.images if not (self.images_dir / im["file_name"]).is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) listed in {self.ann_file} are missing from {self.images_dir}, "
                               f"e.g. {missing[0]!r}; copy them there or remove them from the json.")

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> Image.Image:
        path = self.images_dir / self.images[index]["file_name"]
        try:
            with Image.open(path) as img:
                return ImageOps.exif_transpose(img).convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"cannot read image {path} ({e}); replace the file or remove it from {self.ann_file}.") from None

    def __getitem__(self, index: int):
        info = self.images[index]
        image = self.load_image(index)
        w, h = image.size
        anns = [a for a in self._anns[info["id"]] if not (self.drop_crowd and a.get("iscrowd", 0))]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        xyxy = torch.minimum(xyxy.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])  # degenerate boxes carry no signal
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64).reshape(-1)
        target = {
            "boxes": tv_tensors.BoundingBoxes(xyxy[keep], format="XYXY", canvas_size=(h, w)),
            "labels": labels[keep],
        }
        img = tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))  # (3, h, w) uint8
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        th, tw = img.shape[-2:]
        boxes = box_xyxy_to_cxcywh(target["boxes"].as_subclass(torch.Tensor)) / torch.tensor([tw, th, tw, th], dtype=torch.float32)
        return img.as_subclass(torch.Tensor), {
            "labels": target["labels"],
            "boxes": boxes.reshape(-1, 4),
            "image_id": torch.tensor(info["id"]),
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([th, tw]),
        }
