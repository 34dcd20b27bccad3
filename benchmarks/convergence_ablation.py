"""Which training-only technique buys AP at the demo's budget: each one on and off, same data, seed and schedule.

Rows: the preset as it is; the IoU-aware class losses (varifocal, as RT-DETR uses it; DEIM's MAL); hybrid
matching's one-to-many queries (H-DETR) and Group DETR's query groups; Mosaic on half the training samples (DEIM's
dense one-to-one, off for the last epoch); and combinations. Every row trains the same images for the same epochs
(so the same images seen) with the same batch, learning rate and seed, and is evaluated on the held-out split:
AP50 / AP, class-agnostic AP50 (localisation alone), training images per second and wall time. Defaults are the
demo's budget (`detrkit demo`):

    python benchmarks/convergence_ablation.py                          # deformable_detr_lite, 4 x 1000 images
    python benchmarks/convergence_ablation.py --num_train 400 --epochs 2   # a quick ranking (about 5 min a row)

Prints a table and writes benchmarks/results/convergence_ablation.json (a run of some ``--rows`` at the budget the
file holds keeps its other rows).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import torch
from convergence import class_agnostic_ap50

from detrkit.data import make_synthetic_dataset
from detrkit.engine.config import TrainConfig
from detrkit.engine.train import train

HYBRID = {"one_to_many": "hybrid"}
ROWS = {  # name: TrainConfig fields that differ from the preset as it is
    "baseline": {},
    "varifocal": {"class_loss": "varifocal"},
    "mal": {"class_loss": "mal"},
    "hybrid": {"model_args": HYBRID},
    "group": {"model_args": {"one_to_many": "group"}},
    # Group DETR at about hybrid's cost: 4 extra groups of the one-to-one queries instead of the paper's 10
    "group, 5 groups": {"model_args": {"one_to_many": "group", "o2m_groups": 5}},
    "mosaic": {"mosaic": 0.5},
    "hybrid + varifocal": {"model_args": HYBRID, "class_loss": "varifocal"},
    "hybrid + mal": {"model_args": HYBRID, "class_loss": "mal"},
    "hybrid + varifocal + mosaic": {"model_args": HYBRID, "class_loss": "varifocal", "mosaic": 0.5},
    # DDQ's distinct query selection (two-stage models: dino_lite; it changes inference too), at the demo's IoU
    "distinct queries": {"model_args": {"query_nms": 0.5}},
    "hybrid + distinct queries": {"model_args": {**HYBRID, "query_nms": 0.5}},
    # a cheaper step, not a training technique: only the stride-16 map and one extra stride-32 level
    "no stride-8 level": {"model_args": {"feature_stages": ["layer3"], "num_feature_levels": 2}},
}


def main(model: str = "deformable_detr_lite", rows: list[str] = list(ROWS), epochs: int = 4,  # noqa: B006
         num_train: int = 1000, num_val: int = 200, image_size: int = 224, batch_size: int = 4, lr: float = 2e-4,
         device: str = "auto", num_workers: int = 1, work_dir: str = "runs/ablation",
         out: str = "benchmarks/results/convergence_ablation.json") -> dict:
    """Train ``model`` once per row of :data:`ROWS`; print the table and write JSON."""
    work = Path(work_dir)
    data = work / f"data-{num_train}-{num_val}-{image_size}"
    if not (data / "annotations" / "instances_val.json").is_file():
        make_synthetic_dataset(data, num_train=num_train, num_val=num_val, image_size=image_size)
    budget = {"model": model, "device": device, "cpu": platform.processor() or platform.machine(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "threads": torch.get_num_threads(), "epochs": epochs, "num_train": num_train, "num_val": num_val,
              "image_size": image_size, "batch_size": batch_size, "lr": lr}
    # rows of an earlier run at the same budget are kept (a run of some --rows adds to them); another budget's go
    before = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
    same = {k: before.get(k) for k in budget} == budget
    table = before.get("rows", {}) if same else {}
    notes = {k: v for k, v in before.items() if k not in budget and k != "rows"} if same else {}  # e.g. a caveat

    def write(rows_done: dict) -> None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({**budget, **notes, "rows": rows_done}, indent=2))

    for row in rows:
        run = work / f"{model}-{row.replace(' + ', '+')}"
        shutil.rmtree(run, ignore_errors=True)
        cfg = TrainConfig(model=model, data=str(data), output_dir=str(run), image_size=image_size, epochs=epochs,
                          batch_size=batch_size, lr=lr, lr_backbone=lr, lr_drop=max(1, epochs - 1), device=device,
                          num_workers=num_workers, eval_every=epochs, progress=False, **ROWS[row])
        t0 = time.perf_counter()
        metrics = train(cfg)
        wall = time.perf_counter() - t0
        log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train_time = log[-1]["time"]  # seconds of training (taken before the evaluation)
        table[row] = {"AP50": metrics["AP50"], "AP": metrics["AP"], "class_agnostic_AP50":
                      class_agnostic_ap50(run, data, device), "train_images_per_s": epochs * num_train / train_time,
                      "wall_s": round(wall, 1), **ROWS[row]}
        print(f"{row}: {json.dumps(table[row])}", flush=True)
        write(table)  # after every row: a run cut short by a time limit keeps the rows it finished
    print(f"\n{model} on synthetic shapes: {num_train} train / {num_val} val images, {image_size} px, {epochs} epochs, "
          f"batch {batch_size}, lr {lr}, device {device}, {torch.get_num_threads()} threads")
    print(f"{'row':<28} {'AP50':>6} {'AP':>6} {'agn AP50':>9} {'img/s':>6} {'wall s':>7}")
    for row, r in table.items():
        print(f"{row:<28} {100 * r['AP50']:6.1f} {100 * r['AP']:6.1f} {100 * r['class_agnostic_AP50']:9.1f} "
              f"{r['train_images_per_s']:6.2f} {r['wall_s'] or float('nan'):7.0f}")  # a resumed row has no wall time
    return table


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
