"""COCO box AP of a detector on a COCO-format dataset (faster-coco-eval, pycocotools-compatible)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import box_convert, box_iou
from tqdm import tqdm

from detrkit.data import CocoDetection, collate
from detrkit.data.coco import to_coco_results
from detrkit.data.formats import subset_coco
from detrkit.data.transforms import val_transforms
from detrkit.engine import plots
from detrkit.engine.distributed import broadcast_object, gather_objects, rank
from detrkit.models.postprocess import postprocess
from detrkit.registry import image_size_of, preprocess_of
from detrkit.runtime import resolve_device
from detrkit.weights.formats import load_checkpoint

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_results(detections: list[dict], image_ids: list[int]) -> list[dict]:
    """Per-image detections (absolute xyxy, dataset category ids) -> COCO results (xywh)."""
    return [entry for image_id, det in zip(image_ids, detections, strict=True)
            for entry in to_coco_results(image_id, det["boxes"], det["scores"], det["labels"])]


def coco_eval(coco_gt: dict, results: list[dict], image_ids: list[int] | None = None) -> COCOeval_faster | None:
    """faster-coco-eval's evaluator, evaluated, accumulated and summarised (None when there is nothing to score)."""
    if not results or not coco_gt.get("annotations"):
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(copy.deepcopy(coco_gt))
        dt = gt.loadRes(results)
        ev = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a, **k: None)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def coco_box_ap(coco_gt: dict, results: list[dict], image_ids: list[int] | None = None) -> dict[str, float]:
    """COCO bbox AP, AP50, AP75, APs, APm, APl as fractions in [0, 1] (all 0 when there is nothing to score)."""
    return _ap_metrics(coco_eval(coco_gt, results, image_ids))


def _ap_metrics(ev: COCOeval_faster | None) -> dict[str, float]:
    if ev is None:
        return {k: 0.0 for k in METRIC_NAMES}
    return {k: max(0.0, float(v)) for k, v in zip(METRIC_NAMES, ev.stats[:6], strict=False)}


def _precision(ev: COCOeval_faster | None, cat_ids: list[int]) -> np.ndarray:
    """faster-coco-eval's accumulated precision (T IoU thresholds, R = 101 recall points, K classes in the order
    of ``cat_ids``), area "all", 100 detections per image; -1 where a class has no ground truth."""
    if ev is None:
        return np.full((10, 101, len(cat_ids)), -1.0)
    p = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K of ev.params.catIds)
    column = {int(c): k for k, c in enumerate(ev.params.catIds)}
    return np.stack([p[:, :, column[c]] if c in column else np.full(p.shape[:2], -1.0) for c in cat_ids], -1)


def pr_curves(ev: COCOeval_faster | None, coco_gt: dict) -> dict:
    """Per-class precision-recall curves from the accumulated array (not recomputed): ``recall`` (101,),
    ``category_ids`` (K,), ``precision50`` (K, 101) at IoU 0.5 and ``precision`` (K, 101) averaged over IoU
    0.5:0.95; -1 for a class without ground truth."""
    cat_ids = sorted(c["id"] for c in coco_gt["categories"])
    p = _precision(ev, cat_ids)
    mean = np.where((p > -1).all(0), p.clip(0).mean(0), -1.0)  # (R, K)
    return {"recall": np.linspace(0, 1, 101), "category_ids": cat_ids, "precision50": p[0].T, "precision": mean.T}


def per_class_ap(ev: COCOeval_faster | None, coco_gt: dict) -> list[dict]:
    """One row per category: ``category_id``, ``name``, ``num_gt`` (non-crowd boxes), ``AP`` (IoU 0.5:0.95) and
    ``AP50``, averaged from the same precision array as the overall AP (None for a class without ground truth;
    0 for one with ground truth but no detections)."""
    counts: dict[int, int] = {}
    for a in coco_gt.get("annotations", []):
        if not a.get("iscrowd", 0):
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    cats = sorted(coco_gt["categories"], key=lambda c: c["id"])
    p = _precision(ev, [c["id"] for c in cats])
    rows = []
    for k, c in enumerate(cats):
        n = counts.get(c["id"], 0)
        pk = p[:, :, k]
        ap = float(pk[pk > -1].mean()) if n and (pk > -1).any() else (0.0 if n else None)
        ap50 = float(pk[0][pk[0] > -1].mean()) if n and (pk[0] > -1).any() else (0.0 if n else None)
        rows.append({"category_id": c["id"], "name": c.get("name", str(c["id"])), "num_gt": n, "AP": ap, "AP50": ap50})
    return rows


def format_per_class(rows: list[dict]) -> str:
    """The per-class table, in percent ("-" for a class without ground truth)."""
    width = max([5, *(len(r["name"]) for r in rows)])
    lines = [f"{'class':<{width}} | {'boxes':>6} | {'AP':>6} | {'AP50':>6}"]
    for r in rows:
        ap, ap50 = (f"{100 * r[k]:6.2f}" if r[k] is not None else f"{'-':>6}" for k in ("AP", "AP50"))
        lines.append(f"{r['name']:<{width}} | {r['num_gt']:>6} | {ap} | {ap50}")
    return "\n".join(lines)


def confusion_matrix(coco_gt: dict, results: list[dict], *, iou_threshold: float = 0.5,
                     score_threshold: float = 0.25) -> np.ndarray:
    """Detection confusion matrix (K+1, K+1) over the images of ``coco_gt``: row = true class, column =
    predicted class, in the order of the sorted category ids, with background last. Detections scoring at least
    ``score_threshold`` are matched to ground truth of any class, greedily by IoU (>= ``iou_threshold``, each box
    used once); an unmatched ground truth counts in the background column (missed), an unmatched detection in the
    background row (false positive). Crowd boxes are ignored."""
    cat_ids = sorted(c["id"] for c in coco_gt["categories"])
    index = {c: k for k, c in enumerate(cat_ids)}
    bg = len(cat_ids)
    matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    gts: dict[int, list] = {}
    for a in coco_gt.get("annotations", []):
        if not a.get("iscrowd", 0):
            gts.setdefault(a["image_id"], []).append(a)
    dets: dict[int, list] = {}
    for r in results:
        if r["score"] >= score_threshold and r["category_id"] in index:
            dets.setdefault(r["image_id"], []).append(r)
    for image_id in {img["id"] for img in coco_gt["images"]}:
        g, d = gts.get(image_id, []), dets.get(image_id, [])
        g_used, d_used = set(), set()
        if g and d:
            iou = box_iou(_xyxy(g), _xyxy(d))  # (G, D)
            pairs = (iou >= iou_threshold).nonzero().tolist()
            for gi, di in sorted(pairs, key=lambda ij: -float(iou[ij[0], ij[1]])):
                if gi not in g_used and di not in d_used:
                    g_used.add(gi)
                    d_used.add(di)
                    matrix[index[g[gi]["category_id"]], index[d[di]["category_id"]]] += 1
        for gi, a in enumerate(g):
            if gi not in g_used:
                matrix[index[a["category_id"]], bg] += 1
        for di, r in enumerate(d):
            if di not in d_used:
                matrix[bg, index[r["category_id"]]] += 1
    return matrix


def _xyxy(entries: list[dict]) -> torch.Tensor:
    """The COCO ``bbox`` (xywh) of annotations or results as an (N, 4) xyxy tensor."""
    return box_convert(torch.tensor([e["bbox"] for e in entries], dtype=torch.float64), "xywh", "xyxy")


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-line table of the AP metrics, in percent."""
    head = " | ".join(f"{k:>6}" for k in METRIC_NAMES)
    row = " | ".join(f"{100 * metrics[k]:6.2f}" for k in METRIC_NAMES)
    return f"{head}\n{row}"


@torch.no_grad()
def evaluate(model: nn.Module, loader, dataset, device: torch.device | str = "cpu", *,
             amp_dtype: torch.dtype | None = None, progress: bool = True,
             label_to_cat: list[int] | None = None, report_dir: str | Path | None = None) -> dict:
    """Run ``model`` over ``loader`` and score it against ``dataset.coco`` (a :class:`~detrkit.data.CocoDetection`).

    Returns the COCO AP metrics (:data:`METRIC_NAMES`, fractions) and ``per_class`` (:func:`per_class_ap`);
    ``report_dir``: also write the PR curves, per-class AP bars and confusion matrix there (:func:`score`).
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
        metrics = score(dataset.coco, [r for rs in per_image.values() for r in rs], list(per_image), report_dir)
    return broadcast_object(metrics)


def score(coco_gt: dict, results: list[dict], image_ids: list[int], report_dir: str | Path | None = None) -> dict:
    """COCO AP (:data:`METRIC_NAMES`) plus ``per_class`` rows of ``results`` on the images ``image_ids`` of
    ``coco_gt``; with ``report_dir``, also the pictures: ``pr_curves.png``, ``per_class_ap.png`` and
    ``confusion_matrix.png``."""
    ev = coco_eval(coco_gt, results, image_ids)
    metrics: dict = _ap_metrics(ev)
    gt = subset_coco(coco_gt, set(image_ids))
    metrics["per_class"] = per_class_ap(ev, gt)
    if report_dir is not None:
        names = [c.get("name", str(c["id"])) for c in sorted(gt["categories"], key=lambda c: c["id"])]
        plots.plot_pr_curves(pr_curves(ev, gt), names, Path(report_dir) / "pr_curves.png")
        plots.plot_per_class_ap(metrics["per_class"], Path(report_dir) / "per_class_ap.png")
        plots.plot_confusion_matrix(confusion_matrix(gt, results), names, Path(report_dir) / "confusion_matrix.png")
    return metrics


def write_metrics(metrics: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(metrics, indent=2))


class UnpredictedCategoriesWarning(UserWarning):
    """The evaluation data has category ids the checkpoint never predicts (they can only count as misses)."""


def evaluate_checkpoint(checkpoint: str | Path, images: str | Path, ann: str | Path, *, source: str | None = None,
                        device: str = "auto", batch_size: int = 2, progress: bool = True,
                        report_dir: str | Path | None = None, amp_dtype: torch.dtype | None = None) -> dict:
    """COCO box AP of a detrkit checkpoint (file or run folder) on a COCO-format split, at the checkpoint's image size.

    The checkpoint's own label space maps its predictions (a 91-id COCO model scores on 80-category data);
    category ids of the data that the checkpoint never predicts are warned about. ``source``: the split's
    original annotation file when ``ann`` was converted from YOLO / VOC (for messages); ``amp_dtype``: autocast
    (None: full precision).
    """
    model, meta = load_checkpoint(checkpoint)
    transform = val_transforms(image_size_of(meta), preprocess=preprocess_of(meta))  # the model's own input
    dataset = CocoDetection(images, ann, transform, source=source)
    unknown = sorted(set(dataset.label_to_cat) - set(meta["label_to_cat"]))
    if unknown:
        warnings.warn(f"{source or ann} has category ids the checkpoint never predicts: {unknown[:10]}; the checkpoint "
                      f"was trained on {meta['label_to_cat'][:10]}...", UnpredictedCategoriesWarning, stacklevel=2)
    device = resolve_device(device)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return evaluate(model.to(device), loader, dataset, device, amp_dtype=amp_dtype, label_to_cat=meta["label_to_cat"],
                    progress=progress, report_dir=report_dir)

