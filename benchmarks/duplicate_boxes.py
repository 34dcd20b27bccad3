"""How much of a short run's missing AP is duplicate boxes: AP50 / AP of trained runs as they are (NMS-free, what
detrkit reports) and after a class-wise NMS, a diagnostic only; and the class-agnostic AP50 (every class merged)
before and after a class-agnostic NMS, which tells duplicates from misclassification.

A DETR learns to suppress its own duplicates (one-to-one matching, and the decoder's self-attention through which
the queries see each other), but that is learned late: after a few hundred steps two queries on one object may both
score high, and every second one counts as a false positive. If NMS lifts AP a lot, the boxes are found and
classified but not yet de-duplicated; if it lifts little, the model misses or misclassifies objects. detrkit's
inference stays NMS-free (it is what the models are trained for, and what the exported graph does); this script
only measures the gap.

Each run is evaluated from its newest checkpoint on the held-out split of the dataset in its ``config.yaml``:

    python benchmarks/duplicate_boxes.py                                      # every run under runs/demo_recipe
    python benchmarks/duplicate_boxes.py --runs '["runs/demo_recipe/no_crop"]' --nms_iou 0.5

Prints a table and writes benchmarks/results/duplicate_boxes.json (runs measured earlier with the same settings are
kept).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from torchvision.ops import batched_nms, box_iou

from detrkit.data import CocoDetection, collate
from detrkit.data.transforms import val_transforms
from detrkit.engine.checkpoint import latest_checkpoint
from detrkit.engine.evaluate import coco_box_ap, coco_results
from detrkit.models import postprocess
from detrkit.registry import preprocess_of
from detrkit.weights.formats import load_checkpoint


def duplicate_share(det: dict, iou: float, min_score: float) -> tuple[int, int]:
    """(detections scoring >= ``min_score``, how many of them overlap a higher-scoring one of the same class by
    IoU >= ``iou``): the duplicates NMS would remove among the confident boxes."""
    keep = det["scores"] >= min_score
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
    order = scores.argsort(descending=True)
    boxes, labels = boxes[order], labels[order]
    overlap = (box_iou(boxes, boxes) >= iou) & (labels[:, None] == labels[None, :])
    earlier = torch.ones_like(overlap).tril(-1)  # [i, j]: j scores higher than i
    return len(boxes), int((overlap & earlier).any(1).sum())


def evaluate_run(run: Path, nms_iou: float, min_score: float) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data = Path(cfg["data"])
    model, meta = load_checkpoint(latest_checkpoint(run))
    model.eval()
    val = CocoDetection(data / "val", data / "annotations" / "instances_val.json",
                        transforms=val_transforms(meta["image_size"], preprocess=preprocess_of(meta)))
    raw, nms, agnostic_nms, ids, confident, duplicates = [], [], [], [], 0, 0
    with torch.no_grad():
        for batch in DataLoader(val, batch_size=8, collate_fn=collate):
            sizes = torch.stack([t["orig_size"] for t in batch.targets])
            dets = postprocess(model(batch.images, batch.padding_mask), sizes,
                               score_activation=model.score_activation, label_map=val.label_to_cat)
            batch_ids = [int(t["image_id"]) for t in batch.targets]
            for det, image_id in zip(dets, batch_ids, strict=True):
                for out, labels in ((nms, det["labels"]), (agnostic_nms, torch.zeros_like(det["labels"]))):
                    keep = batched_nms(det["boxes"], det["scores"], labels, nms_iou)
                    out += coco_results([{k: v[keep] for k, v in det.items()}], [image_id])
                n, d = duplicate_share(det, nms_iou, min_score)
                confident, duplicates = confident + n, duplicates + d
            raw += coco_results(dets, batch_ids)
            ids += batch_ids
    a, b = coco_box_ap(val.coco, raw, ids), coco_box_ap(val.coco, nms, ids)
    one = {**val.coco, "categories": [{"id": 1, "name": "object"}],  # every class merged: localisation alone
           "annotations": [{**x, "category_id": 1} for x in val.coco["annotations"]]}
    merged = [coco_box_ap(one, [{**r, "category_id": 1} for r in rs], ids)["AP50"] for rs in (raw, agnostic_nms)]
    return {"model": meta.get("model", cfg["model"]), "AP50": a["AP50"], "AP": a["AP"], "AP50_nms": b["AP50"],
            "AP_nms": b["AP"], "agnostic_AP50": merged[0], "agnostic_AP50_nms": merged[1],
            "confident_boxes": confident,
            "duplicate_share": round(duplicates / confident, 3) if confident else None}


def main(runs: list[str] | None = None, nms_iou: float = 0.6, min_score: float = 0.3,
         out: str = "benchmarks/results/duplicate_boxes.json") -> dict:
    paths = [Path(r) for r in runs] if runs else sorted(
        p for p in Path("runs/demo_recipe").iterdir() if (p / "checkpoints").is_dir() and (p / "config.yaml").is_file())
    table = {}
    for run in paths:
        table[str(run)] = evaluate_run(run, nms_iou, min_score)
        print(f"{run}: {json.dumps(table[str(run)])}", flush=True)
    meta = {"nms_iou": nms_iou, "min_score": min_score, "cpu": platform.processor() or platform.machine(),
            "note": "AP as detrkit reports it (NMS-free) and after class-wise NMS (diagnostic only)"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
    kept = earlier.get("runs", {}) if {k: earlier.get(k) for k in ("nms_iou", "min_score")} == {
        "nms_iou": nms_iou, "min_score": min_score} else {}  # a run of some runs keeps the others (same settings)
    Path(out).write_text(json.dumps({**meta, "runs": {**kept, **table}}, indent=2))
    print(f"\nNMS-free vs class-wise NMS at IoU {nms_iou} (percent); duplicates: share of boxes scoring >= {min_score} "
          f"that overlap a higher-scoring box of their class")
    print(f"{'run':<50} {'AP50':>6} {'+NMS':>6} {'AP':>6} {'+NMS':>6} {'agn50':>6} {'+NMS':>6} {'dup':>6}")
    for name, r in table.items():
        share = r["duplicate_share"]
        print(f"{Path(name).name[:50]:<50} {100 * r['AP50']:6.1f} {100 * r['AP50_nms']:6.1f} {100 * r['AP']:6.1f} "
              f"{100 * r['AP_nms']:6.1f} {100 * r['agnostic_AP50']:6.1f} {100 * r['agnostic_AP50_nms']:6.1f} "
              f"{'-' if share is None else f'{100 * share:5.1f}%':>6}")
    return table


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
