"""What `detrkit train --data DIR` (no other option) and the named recipes reach on real photos at a fixed budget.

The photos: aerial tree crowns from the deepforest wheel (benchmarks/trees.py: 132 training tiles of 400 px from one
Yellowstone image, 14 validation images from other images and sites; one class, ~17 crowns a tile of 8-107 px).
Each row trains with ``--time_limit`` minutes of training (then evaluates), on this machine's cores, and reports
COCO AP50 / AP on the validation images (one class: the class-agnostic AP50 is the AP50), the training time and
images/s. Rows differ from the default in one setting each (an ablation, not tuning on the validation images: the
default's choices were made on the synthetic tuning data; these rows show what the photos change).

    python benchmarks/real_data.py --minutes 5                      # every row at 5 training minutes
    python benchmarks/real_data.py --minutes 15 --rows '["default"]'
    python benchmarks/real_data.py --tuning true --rows '["default", "default, backbone width 0.75"]'   # choose here

``--tuning true`` trains and scores the crowns' tuning copy instead (benchmarks/trees.py: the training image split in
two, never the validation images; written to results/real_data_tuning.json): where a setting is chosen at a fixed
budget before the validation images report it.

Writes benchmarks/results/real_data.json (rows keyed by name and budget; a run adds to the rows already there, and
a row run again keeps the earlier runs' AP50 / AP / steps under ``earlier``).
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trees import make_trees_dataset  # noqa: E402

from detrkit.engine.config import TrainConfig  # noqa: E402
from detrkit.engine.train import train  # noqa: E402

# Each row: TrainConfig fields beside --data / --time_limit. "default" is exactly `detrkit train --data DIR`.
ROWS = {
    "default": {},
    # the training size: the default trains these 400 px tiles at 224 px (crowns of ~21 px there)
    "default, 320 px": {"image_size": 320},
    "default, 416 px": {"image_size": 416},
    # up to ~50 crowns in a tile: rtdetr_lite's 100 queries against the RT-DETR papers' 300
    "default, 300 queries": {"model_args": {"num_queries": 300}},
    # DDQ's distinct-query NMS at IoU 0.5 was chosen on shapes that rarely touch; crowns touch and overlap
    "default, distinct queries off": {"model_args": {"query_nms": None}},
    "default, RT-DETR crops": {"crop": True},
    # YOLO's strongest small-dataset augmentation: four tiles in one (more crowns, more scales per step)
    "default, Mosaic on half the samples": {"mosaic": 0.5},
    # the recipe has no lr drop (still learning fastest at the end on the synthetic data): does a decay help here?
    # 7 epochs fit 5 minutes with room to spare
    "7 epochs, lr / 10 for the last": {"epochs": 7, "lr_drop": 6},
    "7 epochs, cosine to 0": {"epochs": 7, "lr_schedule": "cosine"},
    # DINO's denoising budget is in pairs: groups = pairs // (most objects in an image of the batch). The demo's 50
    # pairs give its shapes (~6 a picture) 8 groups, but a tile of 30-50 crowns 1: a budget that keeps ~8 groups
    "default, 400 denoising pairs": {"model_args": {"denoising": {"num_dn_pairs": 400}}},
    # the step's time is ~60% the backbone's convolutions: at half width a quarter of their work, more images a minute
    "default, half-width backbone": {"model_args": {"backbone_width": 0.5}},
    # one matched query per crown is a sparse signal for 17-42 crowns a tile: every encoder proposal supervised,
    # k = 6 per object (Co-DETR / RT-DETRv3's dense encoder supervision; layers/one_to_many.py)
    "default, dense encoder supervision k = 6": {"model_args": {"enc_o2m_k": 6}},
    # the loss still falls fast at 5 minutes: the schedule ended with a tenth of the lr for its last eighth
    "8 epochs, lr / 10 for the last": {"epochs": 8, "lr_drop": 7},
    # YOLO's geometry: Mosaic windows on every sample (objects keep their size) and YOLO's scale jitter; +1.8 AP50
    # over the average's last five evaluations at equal steps (benchmarks/ema_paired.py), level at 5 minutes
    "default, YOLO's geometry": {"mosaic": 1.0, "mosaic_crop": True, "scale_jitter": 0.5},
    # YOLO's colour changes (HSV gains 0.015 / 0.7 / 0.4 on every image: brightness x 0.6-1.4) instead of RT-DETR's
    # milder distortion (brightness x 0.875-1.125, half the time): the validation images are another stand, another
    # light; on the crowns' tuning copy +3.2 AP50 over the average's last five evaluations (ema_paired.py)
    "default, YOLO's colours": {"photometric": "yolo"},
    # a cheaper step: a 3/4-width backbone (its convolutions are ~60% of the step; 0.80x the step's time, paired,
    # benchmarks/demo_step_paired.py), more steps in the same minutes and fewer weights to fit one image with
    "default, backbone width 0.75": {"model_args": {"backbone_width": 0.75}},
    # ... or one decoder layer fewer (0.93x the step's time)
    "default, 2 decoder layers": {"model_args": {"num_decoder_layers": 2}},
    # on the tuning copy (84 tiles: 42 steps an epoch) 5 minutes are ~20 epochs on a 2-core AMX Xeon, and its AP
    # peaks at ~550 steps then falls at the recipe's constant lr: an lr that decays over the budget instead
    "20 epochs, cosine to 0": {"epochs": 20, "lr_schedule": "cosine"},
    "20 epochs, lr / 10 from the 14th": {"epochs": 20, "lr_drop": 13},
    # regularisation for one training image (it scores 71-94 AP50 on its own tiles, ~1/3 of that elsewhere):
    # DETR's transformer dropout (RT-DETR trains without), and AdamW's decay at 0.05 (the recipe's is DETR's 1e-4)
    "default, dropout 0.1": {"model_args": {"dropout": 0.1}},
    "default, weight decay 0.05": {"weight_decay": 0.05},
    # D-FINE's network at the lite size (HGNetv2-B0, GELAN encoder, FDR decoder with FGL / DDF losses; 3.8M
    # parameters against rtdetr_lite's 13.2M) under the same recipe
    "dfine_lite instead of rtdetr_lite": {"model": "dfine_lite"},
}


def main(minutes: float = 5.0, rows: list[str] | None = None, data: str | None = None, tuning: bool = False,
         work_dir: str = "runs/real_data", out: str | None = None) -> dict:
    data = data or f"runs/real_data/trees{'-tuning' if tuning else ''}"
    out = out or f"benchmarks/results/real_data{'_tuning' if tuning else ''}.json"
    counts = make_trees_dataset(data, tuning=tuning)
    meta = {"data": counts, "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "command": f"python benchmarks/real_data.py --minutes {minutes:g}{' --tuning true' if tuning else ''}"}
    results = json.loads(Path(out).read_text())["rows"] if Path(out).is_file() else {}
    for name in rows or list(ROWS):
        key = f"{name} @ {minutes:g} min"
        run = Path(work_dir) / ("tuning" if tuning else "") / key.replace(" ", "_").replace(",", "").replace("@", "at")
        shutil.rmtree(run, ignore_errors=True)
        cfg = TrainConfig(data=data, output_dir=str(run), time_limit=minutes, progress=False, plots=False,
                          tensorboard=False, **ROWS[name])
        previous = results.get(key)
        t0 = time.perf_counter()
        metrics = train(cfg)
        resolved = (run / "config.yaml").read_text()
        log = run / "steps.jsonl"
        steps = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
        results[key] = {"settings": ROWS[name], "minutes": minutes, "AP50": metrics["AP50"], "AP": metrics["AP"],
                        "AP75": metrics["AP75"], "APs": metrics["APs"], "epochs_done": metrics["epoch"],
                        "train_s": metrics["train_time_s"], "wall_s": round(time.perf_counter() - t0, 1),
                        "steps": steps[-1]["step"] if steps else None, "config": resolved}
        r = results[key]
        if previous is not None:  # the same row run again: keep the earlier runs (the spread between runs matters)
            r["earlier"] = previous.pop("earlier", []) + [{k: previous[k] for k in ("AP50", "AP", "steps", "train_s")}]
        print(f"{key:40s} AP50 {100 * r['AP50']:5.1f}  AP {100 * r['AP']:5.1f}  {r['train_s']:6.0f} s", flush=True)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({**meta, "rows": results}, indent=2))
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
