"""COCO box AP of a detector on a COCO-format dataset (faster-coco-eval, pycocotools-compatible)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path

import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from detrkit.data import CocoDetection, collate
from detrkit.data.coco import to_coco_results
from detrkit.data.transforms import val_transforms
from detrkit.engine.distributed import broadcast_object, gather_objects, rank
from detrkit.models.postprocess import postprocess
from detrkit.registry import image_size_of
from detrkit.runtime import resolve_device
from detrkit.weights.formats import load_checkpoint

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_results(detections: list[dict], image_ids: list[int]) -> list[dict]:
    """Per-image detections (absolute xyxy, dataset category ids) -> COCO results (xywh)."""
    return [entry for image_id, det in zip(image_ids, detections, strict=True)
            for entry in to_coco_results(image_id, det["boxes"], det["scores"], det["labels"])]


def coco_box_ap(coco_gt: dict, results: list[dict], image_ids: list[int] | None = None) -> dict[str, float]:
    """COCO bbox AP, AP50, AP75, APs, APm, APl as fractions in [0, 1] (all 0 when there is nothing to score)."""

    if not results or not coco_gt.get("annotations"):
        return {k: 0.0 for k in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(copy.deepcopy(coco_gt))
        dt = gt.loadRes(results)
        ev = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a, **k: None)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: max(0.0, float(v)) for k, v in zip(METRIC_NAMES, ev.stats[:6], strict=False)}


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-line table of the AP metrics, in percent."""
    head = " | ".join(f"{k:>6}" for k in METRIC_NAMES)
    row = " | ".join(f"{100 * metrics[k]:6.2f}" for k in METRIC_NAMES)
    return f"{head}\n{row}"


@torch.no_grad()
def evaluate(model: nn.Module, loader, dataset, device: torch.device | str = "cpu", *,
             amp_dtype: torch.dtype | None = None, progress: bool = True,
             label_to_cat: list[int] | None = None) -> dict[str, float]:
    """Run ``model`` over ``loader`` and score it against ``dataset.coco`` (a :class:`~detrkit.data.CocoDetection`).

    ``label_to_cat``: the model's class index -> category id, when it is not the dataset's (a COCO model with
    91 outputs evaluated on COCO's 80 categories); default ``dataset.label_to_cat``.
    Under torch.distributed each process runs its shard of ``loader``; the detections are gathered (an image
    seen twice, from the sampler's padding, counts once) and rank 0's score is returned on every process.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    per_image: dict[int, list[dict]] = {}
    for batch in tqdm(loader, desc="eval", disable=not progress, unit="batch", leave=False):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(batch.images, batch.padding_mask)
        sizes = torch.stack([t["orig_size"] for t in batch.targets])
        dets = postprocess(outputs, sizes, score_activation=model.score_activation,
                           label_map=dataset.label_to_cat if label_to_cat is None else label_to_cat)
        for t, det in zip(batch.targets, dets, strict=False):
            per_image[int(t["image_id"])] = coco_results([det], [int(t["image_id"])])
    model.train(was_training)
    for part in gather_objects(per_image)[1:]:
        per_image.update(part)
    metrics = None
    if rank() == 0:
        metrics = coco_box_ap(dataset.coco, [r for rs in per_image.values() for r in rs], list(per_image))
    return broadcast_object(metrics)


def write_metrics(metrics: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(metrics, indent=2))


class UnpredictedCategoriesWarning(UserWarning):
    """The evaluation data has category ids the checkpoint never predicts (they can only count as misses)."""


def evaluate_checkpoint(checkpoint: str | Path, images: str | Path, ann: str | Path, *, source: str | None = None,
                        device: str = "auto", batch_size: int = 2, progress: bool = True) -> dict[str, float]:
    """COCO box AP of a detrkit checkpoint (file or run folder) on a COCO-format split, at the checkpoint's image size.

    The checkpoint's own label space maps its predictions (a 91-id COCO model scores on 80-category data);
    category ids of the data that the checkpoint never predicts are warned about. ``source``: the split's
    original annotation file when ``ann`` was converted from YOLO / VOC (for messages).
    """
    model, meta = load_checkpoint(checkpoint)
    dataset = CocoDetection(images, ann, val_transforms(image_size_of(meta)), source=source)
    unknown = sorted(set(dataset.label_to_cat) - set(meta["label_to_cat"]))
    if unknown:
        warnings.warn(f"{source or ann} has category ids the checkpoint never predicts: {unknown[:10]}; the checkpoint "
                      f"was trained on {meta['label_to_cat'][:10]}...", UnpredictedCategoriesWarning, stacklevel=2)
    device = resolve_device(device)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return evaluate(model.to(device), loader, dataset, device, label_to_cat=meta["label_to_cat"], progress=progress)

