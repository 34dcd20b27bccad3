"""COCO-format detection datasets: an image folder plus an annotation json.

Category ids stay the dataset's own (COCO's 1..90 with gaps, or anything else) at the edges; the
model sees contiguous indices 0..K-1, and :attr:`CocoDetection.label_to_cat` maps back.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from detrkit.data.check import check_dataset, drop_invalid
from detrkit.data.image import open_rgb
from detrkit.data.mosaic import mixup, mosaic
from detrkit.ops import box_xyxy_to_cxcywh


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and the fix."""


def to_coco_results(image_id: int, boxes, scores, labels, *, rounded: bool = False) -> list[dict]:
    """One image's detections (absolute xyxy pixels, dataset category ids) -> COCO results entries (bbox x, y, w, h).

    The one writer of COCO's results format (evaluation, ``detrkit predict``'s results.json). ``rounded``: boxes to
    2 decimals and scores to 5, for files people read; evaluation keeps full precision.
    """
    out = []
    scores, labels = torch.as_tensor(scores).tolist(), torch.as_tensor(labels).tolist()
    for (x0, y0, x1, y1), s, c in zip(boxes.tolist(), scores, labels, strict=True):
        if rounded:
            out.append({"image_id": int(image_id), "category_id": int(c), "score": round(float(s), 5),
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]})
        else:
            out.append({"image_id": int(image_id), "category_id": int(c), "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(s)})
    return out


def load_coco_json(ann_file: str | Path) -> dict:
    """Read a COCO detection json and check its structure; raises :class:`DatasetError` naming the problem.

    Problems inside the lists (a bad box, an unknown category, a missing image) are the dataset doctor's
    (:func:`~detrkit.data.check.check_dataset`), which reports them all at once.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetError(f"annotation file not found: {ann_file}. Pass the path of a COCO-format json "
                           "(e.g. annotations/instances_train.json), or create a dataset with `detrkit data synth`.")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file} is not valid JSON ({e}); re-export the annotations in COCO format.") from None
    return validate_coco(data, str(ann_file))


def validate_coco(data, source: str) -> dict:
    """The structure every reader relies on: 'images', 'annotations' and 'categories' lists, categories with ids."""
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: expected a JSON object with 'images', 'annotations' and 'categories'.")
    data.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list) or not all(isinstance(x, dict) for x in data[key]):
            raise DatasetError(f"{source}: missing the '{key}' list of objects of a COCO detection file.")
    if not data["categories"]:
        raise DatasetError(f"{source}: 'categories' is empty; list every class as {{'id': ..., 'name': ...}}.")
    if any("id" not in c for c in data["categories"]):
        raise DatasetError(f"{source}: every category needs an 'id' (and a 'name').")
    return data


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset.

    Args:
        images_dir: folder the ``file_name`` of each image is relative to.
        ann_file: COCO json with ``images``, ``annotations`` and ``categories``, or such a dict (what the YOLO
            and VOC readers of :mod:`detrkit.data.formats` return; ``source`` names it in messages).
        transforms: v2 transform applied to ``(image, target)``, e.g. :func:`~detrkit.data.build_transforms`.
        drop_crowd: leave ``iscrowd`` boxes out of the targets (DETR trains without them; COCO
            evaluation reads them from the json itself).
        check_images: how the dataset doctor looks at the image files first: ``header`` (exists, readable
            header, size), ``full`` (decode each), ``none``. Annotations are always checked.
        skip_invalid: drop the images and annotations with errors (with a warning counting them) instead of
            raising a :class:`DatasetError` with the report.
        mosaic: probability that a training sample (:meth:`sample`) is a mosaic of four images, before the
            transforms; ``mosaic_epochs``: the epoch from which mosaics stop (None: never), so that the last
            epochs train on images as they are (DEIM's schedule). ``mixup``: probability that it is blended
            with another image (after the mosaic, in the same epochs). ``aug_stop_epoch``: from this epoch on,
            samples go through ``plain_transforms`` (e.g. the validation transforms) instead, without mosaics.
            ``mosaic_crop``: each mosaic is a window of one image's size cut from the four (objects keep their
            scale), instead of the four shrunk into one (:func:`~detrkit.data.mosaic.mosaic`).

    Each sample is ``(image (3, h, w) float, target)`` with target ``labels`` (n,) contiguous int64,
    ``boxes`` (n, 4) normalized cxcywh of the transformed image, ``image_id``, ``orig_size``, ``size``.
    Images without annotations are kept (they teach the model to predict nothing).
    """

    def __init__(self, images_dir: str | Path, ann_file: str | Path | dict, transforms: Callable | None = None,
                 *, drop_crowd: bool = True, check_images: str = "header", skip_invalid: bool = False,
                 source: str | None = None, progress: bool = False, mosaic: float = 0.0,
                 mosaic_epochs: int | None = None, mixup: float = 0.0, aug_stop_epoch: int | None = None,
                 plain_transforms: Callable | None = None, mosaic_crop: bool = False) -> None:
        self.images_dir = Path(images_dir)
        if isinstance(ann_file, dict):  # a dataset read from another format (YOLO, VOC)
            self.ann_file, self.coco = Path(source or "annotations"), validate_coco(ann_file, source or "annotations")
        else:
            self.ann_file, self.coco = Path(ann_file), load_coco_json(ann_file)
        if not self.images_dir.is_dir():
            raise DatasetError(
                f"image folder not found: {self.images_dir} (images of {self.ann_file}); pass the folder "
                "that the 'file_name' entries are relative to."
            )
        self.report = check_dataset(self.coco, self.images_dir, source=str(self.ann_file), images=check_images,
                                    progress=progress)
        if not self.report.ok:
            if not skip_invalid:
                raise DatasetError(
                    f"{self.report.format(examples=3, errors_only=True)}\n"
                    "Fix these (`detrkit data check` prints the full "
                    "report), or train with --skip_invalid true to drop the broken images and annotations."
                )
            self.coco, dropped = drop_invalid(self.coco, self.report)
            warnings.warn(f"{self.ann_file}: --skip_invalid dropped {dropped['images']} image(s) and "
                          f"{dropped['annotations']} annotation(s) with errors "
                          f"({len(self.report.errors)} problems; `detrkit data check` lists them)", stacklevel=2)
        self.transforms = transforms
        self.mosaic, self.mosaic_epochs, self.mixup, self.mosaic_crop = mosaic, mosaic_epochs, mixup, mosaic_crop
        self.aug_stop_epoch, self.plain_transforms = aug_stop_epoch, plain_transforms
        if aug_stop_epoch is not None and plain_transforms is None:
            raise ValueError("aug_stop_epoch needs plain_transforms: what the images go through after it")
        self.drop_crowd, self.skip_invalid = drop_crowd, skip_invalid
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])
        self.cat_ids = sorted(c["id"] for c in self.coco["categories"])
        self.cat_to_label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat = list(self.cat_ids)
        names = {c["id"]: c.get("name", str(c["id"])) for c in self.coco["categories"]}
        self.class_names = [names[cid] for cid in self.cat_ids]
        self._anns: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in self.coco["annotations"]:
            self._anns[ann["image_id"]].append(ann)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> Image.Image:
        path = self.images_dir / self.images[index]["file_name"]
        try:
            return open_rgb(path)
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(
                f"cannot read image {path} ({e}); replace the file or remove it from {self.ann_file}."
            ) from None

    def __getitem__(self, index: int):
        return self._read(index, self.transforms)

    def _read(self, index: int, transforms: Callable | None):
        for attempt in range(len(self)):
            try:
                return self._sample((index + attempt) % len(self), transforms)
            except DatasetError as e:
                if not self.skip_invalid:
                    raise
                # a file the header check could not see is broken (truncated): train on the next image instead
                warnings.warn(f"{e} --skip_invalid: the next image is used in its place.", stacklevel=2)
        raise DatasetError(f"no image of {self.ann_file} can be read")

    def sample(self, index: int, epoch: int):
        """``self[index]`` in training epoch ``epoch``: with probability ``mosaic`` (before ``mosaic_epochs``), the
        image and three others drawn at random, as one mosaic (:mod:`detrkit.data.mosaic`); then, with probability
        ``mixup``, blended with another one; from ``aug_stop_epoch`` on, through ``plain_transforms`` only."""
        if self.aug_stop_epoch is not None and epoch >= self.aug_stop_epoch:
            return self._read(index, self.plain_transforms)
        if self.mosaic_epochs is not None and epoch >= self.mosaic_epochs:
            return self[index]
        with_mosaic = bool(self.mosaic) and torch.rand(()).item() < self.mosaic
        with_mixup = bool(self.mixup) and torch.rand(()).item() < self.mixup
        if not (with_mosaic or with_mixup):
            return self[index]
        try:
            if with_mosaic:
                raw = [self._raw(i) for i in [index, *torch.randint(len(self), (3,)).tolist()]]
                size = raw[0][0].shape[-2:]
                img, target = mosaic(raw, max(size), crop=self.mosaic_crop)
            else:
                img, target = self._raw(index)
                size = img.shape[-2:]
            if with_mixup:
                img, target = mixup((img, target), self._raw(int(torch.randint(len(self), ()).item())))
        except DatasetError:
            if not self.skip_invalid:
                raise
            return self[index]  # an unreadable image among those drawn: this sample as it is (and its warning)
        return self._finish(img, target, self.images[index], size, self.transforms)

    def _raw(self, index: int) -> tuple[tv_tensors.Image, dict]:
        """Image ``index`` (3, h, w) uint8 and its {"boxes": BoundingBoxes xyxy, "labels"}, before any transform."""
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
        return tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)), target  # (3, h, w)

    def _sample(self, index: int, transforms: Callable | None):
        img, target = self._raw(index)
        return self._finish(img, target, self.images[index], img.shape[-2:], transforms)

    def _finish(self, img: tv_tensors.Image, target: dict, info: dict, orig_size,
                transforms: Callable | None) -> tuple[torch.Tensor, dict]:
        """``transforms``, then the model's target: cxcywh boxes normalized by the transformed size."""
        h, w = orig_size
        if transforms is not None:
            img, target = transforms(img, target)
        th, tw = img.shape[-2:]
        boxes = box_xyxy_to_cxcywh(target["boxes"].as_subclass(torch.Tensor)) / torch.tensor(
            [tw, th, tw, th], dtype=torch.float32
        )
        return img.as_subclass(torch.Tensor), {
            "labels": target["labels"],
            "boxes": boxes.reshape(-1, 4),
            "image_id": torch.tensor(info["id"]),
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([th, tw]),
        }
