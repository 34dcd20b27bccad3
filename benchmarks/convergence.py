"""Convergence of the lite presets on the built-in synthetic dataset with one equal budget.

Every model trains on the same images for the same number of epochs (so the same images seen),
batch size and learning rate, and is evaluated (COCO AP on the held-out split) after every epoch.
Each paper of the line claims faster convergence than its predecessor: Deformable DETR over DETR
(Zhu et al. 2021, figure 1), DAB-DETR over DETR (Liu et al. 2022, table 2), DN-DETR over DAB-DETR
(Li et al. 2022, figure 1), DINO over all (Zhang et al. 2022, table 1). This script shows whether
ours do, and how long each epoch took here. The defaults are the demo's budget (`detrkit demo`),
so the dino_lite row is the demo's run:

    python benchmarks/convergence.py            # all lite presets, 4 epochs x 1000 images, 224 px
    python benchmarks/convergence.py --models '["rtdetr_lite"]' --out benchmarks/results/convergence_rtdetr_lite.json
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from detrkit.data import make_synthetic_dataset
from detrkit.engine.config import TrainConfig
from detrkit.engine.train import train


def class_agnostic_ap50(run: Path, data: Path, device: str) -> float:
    """AP50 of the run's final checkpoint with every class merged into one: how well it *localises*,
    whatever it calls the objects (tells a slow detector from a slow classifier)."""
    from torch.utils.data import DataLoader

    from detrkit.data import CocoDetection, collate
    from detrkit.data.transforms import val_transforms
    from detrkit.engine.checkpoint import latest_checkpoint
    from detrkit.engine.evaluate import coco_box_ap, coco_results
    from detrkit.models import postprocess
    from detrkit.registry import preprocess_of
    from detrkit.runtime import resolve_device
    from detrkit.weights.formats import load_checkpoint

    dev = resolve_device(device)
    model, meta = load_checkpoint(latest_checkpoint(run))
    model.to(dev).eval()
    val = CocoDetection(data / "val", data / "annotations" / "instances_val.json",
                        transforms=val_transforms(meta["image_size"], preprocess=preprocess_of(meta)))
    results, ids = [], []
    with torch.no_grad():
        for batch in DataLoader(val, batch_size=8, collate_fn=collate):
            batch = batch.to(dev)
            sizes = torch.stack([t["orig_size"] for t in batch.targets])
            dets = postprocess(model(batch.images, batch.padding_mask), sizes, score_activation=model.score_activation)
            batch_ids = [int(t["image_id"]) for t in batch.targets]
            results += coco_results(dets, batch_ids)
            ids += batch_ids
    gt = {**val.coco, "categories": [{"id": 1, "name": "object"}],
          "annotations": [{**a, "category_id": 1} for a in val.coco["annotations"]]}
    return coco_box_ap(gt, [{**r, "category_id": 1} for r in results], ids)["AP50"]


def main(
    models: list[str] = ["dino_lite", "dn_dab_detr_lite", "dab_detr_lite", "deformable_detr_lite", "detr_lite",  # noqa: B006
                         "rtdetr_lite"],
    epochs: int = 4,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 224,
    batch_size: int = 4,
    lr: float = 2e-4,
    device: str = "auto",
    work_dir: str = "runs/convergence",
    out: str = "benchmarks/results/convergence.json",
    reuse_runs: bool = False,
) -> dict:
    """Train each preset with the same budget; print AP50 / AP per epoch and write JSON.

    ``reuse_runs``: keep a model's finished run in ``work_dir`` instead of training it again.
    """
    work = Path(work_dir)
    data = work / "data"
    if not (data / "annotations" / "instances_val.json").is_file():
        make_synthetic_dataset(data, num_train=num_train, num_val=num_val, image_size=image_size)
    results, agnostic = {}, {}
    for name in models:
        run = work / name
        done = (run / "metrics.json").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) == epochs
        if not (reuse_runs and done):
            if run.exists():
                import shutil

                shutil.rmtree(run)
            cfg = TrainConfig(model=name, data=str(data), output_dir=str(run), image_size=image_size, epochs=epochs,
                              batch_size=batch_size, lr=lr, lr_backbone=lr, lr_drop=max(1, epochs - 1),
                              device=device, num_workers=1, eval_every=1)
            train(cfg)
        log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        results[name] = [{"epoch": r["epoch"], "images_seen": r["epoch"] * num_train, "time_s": round(r["time"], 1),
                          "loss": round(r["loss"], 3), "AP": r["val_AP"], "AP50": r["val_AP50"]} for r in log]
        agnostic[name] = class_agnostic_ap50(run, data, device)
    print(f"\nconvergence on synthetic shapes ({num_train} train / {num_val} val images, {image_size} px, "
          f"batch {batch_size}, lr {lr}), device {device}")
    print(f"{'epoch':>5} " + " ".join(f"{m + ' AP50 / AP':>30}" for m in models))
    for e in range(epochs):
        cells = [
            f"{100 * results[m][e]['AP50']:14.1f} / {100 * results[m][e]['AP']:5.1f} ({results[m][e]['time_s']:5.0f}s)"
            for m in models
        ]
        print(f"{e + 1:>5} " + " ".join(f"{c:>30}" for c in cells))
    print("class-agnostic AP50 (localisation only): "
          + ", ".join(f"{m} {100 * agnostic[m]:.1f}" for m in models))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"device": device, "cpu": platform.processor() or platform.machine(),
                                     "threads": torch.get_num_threads(), "epochs": epochs, "num_train": num_train,
                                     "image_size": image_size, "batch_size": batch_size, "lr": lr,
                                     "results": results, "class_agnostic_AP50": agnostic}, indent=2))
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
