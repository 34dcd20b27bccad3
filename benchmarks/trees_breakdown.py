"""Where a run's AP on the tree crowns is lost: per site, per stage of the model, and on its own training tiles.

The crowns' validation split (benchmarks/trees.py) holds three sites: tiles of a second Yellowstone image (the
training tiles come from another one), and one image each of OSBS (Florida) and SOAP (California). This scores

* per site: AP50 / AP / AP75, AR@100 and the recall at IoU 0.5 (100 boxes an image), of detrkit's run (its newest
  checkpoint: the weights the run's last evaluation scored) and, given ``--yolo``, of a YOLO weights file from
  benchmarks/vs_yolo.py scored the same way (its predictions as vs_yolo scores them);
* per stage, on the validation split and on the training tiles: the encoder's selected proposals (RT-DETR's
  query selection, a dense YOLO-like head) and each decoder layer's boxes, as if that stage were the output.

A model that scores far higher on its training tiles than on validation, at every stage, has fitted the training
image rather than crowns in general: the limit is what it learns from one image, not the decoder or the matching.

    python benchmarks/vs_yolo.py --dataset_name trees --minutes 5 --models '["yolo11n"]'
    python benchmarks/trees_breakdown.py --run runs/vs_yolo/trees-5/detrkit \
        --yolo runs/vs_yolo/trees-5/yolo11n/weights/last.pt

Prints two tables and writes benchmarks/results/trees_breakdown.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from vs_yolo import cpu_name, yolo_results  # noqa: E402

from detrkit.data import CocoDetection, collate  # noqa: E402
from detrkit.data.transforms import val_transforms  # noqa: E402
from detrkit.engine.checkpoint import latest_checkpoint  # noqa: E402
from detrkit.engine.evaluate import coco_eval, coco_results  # noqa: E402
from detrkit.models import postprocess  # noqa: E402
from detrkit.registry import preprocess_of  # noqa: E402
from detrkit.weights.formats import load_checkpoint  # noqa: E402

SITES = ("YELL", "OSBS", "SOAP")  # in the validation images' file names


def scores(coco: dict, results: list[dict], image_ids: list[int]) -> dict:
    """AP50 / AP / AP75 / AR@100 and recall at IoU 0.5 (100 boxes an image), in percent."""
    ev = coco_eval(coco, results, image_ids)
    if ev is None:
        return {k: 0.0 for k in ("AP50", "AP", "AP75", "AR100", "recall50")}
    s = ev.stats
    recall50 = float(ev.eval["recall"][0, :, 0, -1].mean())  # IoU 0.5, every class, all areas, 100 boxes
    return {k: round(100 * max(0.0, float(v)), 1)
            for k, v in dict(AP50=s[1], AP=s[0], AP75=s[2], AR100=s[8], recall50=recall50).items()}


def per_site(coco: dict, results: list[dict]) -> dict:
    groups = {"all": [i["id"] for i in coco["images"]]}
    groups |= {site: [i["id"] for i in coco["images"] if site in i["file_name"]] for site in SITES}
    ids = {k: set(v) for k, v in groups.items()}
    return {site: {**scores(coco, results, group),
                   "crowns": sum(a["image_id"] in ids[site] for a in coco["annotations"])}
            for site, group in groups.items()}


@torch.no_grad()
def stage_results(model, meta: dict, images: Path, ann: Path) -> tuple[dict, dict[str, list[dict]]]:
    """The split's COCO dict and, per stage (``encoder``, ``decoder layer i``), its detections as COCO results."""
    data = CocoDetection(images, ann, val_transforms(meta["image_size"], preprocess=preprocess_of(meta)))
    out: dict[str, list[dict]] = {}
    for batch in DataLoader(data, batch_size=8, collate_fn=collate):
        pred = model(batch.images, batch.padding_mask)
        layers = [pred.enc_outputs, *pred.aux_outputs, pred]
        names = ["encoder", *(f"decoder layer {i + 1}" for i in range(len(layers) - 1))]
        sizes = torch.stack([t["orig_size"] for t in batch.targets])
        ids = [int(t["image_id"]) for t in batch.targets]
        for name, layer in zip(names, layers, strict=True):
            stage = replace(pred, pred_logits=layer.pred_logits, pred_boxes=layer.pred_boxes)
            dets = postprocess(stage, sizes, score_activation=model.score_activation, label_map=data.label_to_cat)
            out.setdefault(name, []).extend(coco_results(dets, ids))
    return data.coco, out


def main(run: str = "runs/vs_yolo/trees-5/detrkit", yolo: str | None = None,
         out: str = "benchmarks/results/trees_breakdown.json") -> dict:
    run_dir = Path(run)
    data = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"])
    checkpoint = latest_checkpoint(run_dir)
    model, meta = load_checkpoint(checkpoint)
    model.eval()
    split = {s: (data / s, data / "annotations" / f"instances_{s}.json") for s in ("train", "val")}
    stages = {s: stage_results(model, meta, *paths) for s, paths in split.items()}
    coco, by_stage = stages["val"]
    last = list(by_stage)[-1]
    sites = {"detrkit": per_site(coco, by_stage[last])}
    if yolo:
        sites["YOLO"] = per_site(coco, yolo_results(Path(yolo), data, meta["image_size"]))
    layers = {s: {name: scores(c, r, [i["id"] for i in c["images"]]) for name, r in rs.items()}
              for s, (c, rs) in stages.items()}
    report = {"run": run, "checkpoint": str(checkpoint), "yolo": yolo, "cpu": cpu_name(),
              "command": " ".join(["python", "benchmarks/trees_breakdown.py", *sys.argv[1:]]),
              "per_site": sites, "per_stage": layers}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"\nper site (validation; percent)\n{'model, site':<16} {'crowns':>6} {'AP50':>6} {'AP':>6} {'AP75':>6} "
          f"{'AR100':>6} {'R@.5':>6}")
    for who, rows in sites.items():
        for site, r in rows.items():
            print(f"{who + ', ' + site:<16} {r['crowns']:6d} {r['AP50']:6.1f} {r['AP']:6.1f} {r['AP75']:6.1f} "
                  f"{r['AR100']:6.1f} {r['recall50']:6.1f}")
    print(f"\ndetrkit per stage: training tiles against validation (AP50 / AP75)\n{'stage':<16} {'train':>13} "
          f"{'val':>13}")
    for name in layers["val"]:
        t, v = layers["train"][name], layers["val"][name]
        print(f"{name:<16} {t['AP50']:6.1f} / {t['AP75']:4.1f} {v['AP50']:6.1f} / {v['AP75']:4.1f}")
    return report


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
