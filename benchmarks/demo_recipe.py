"""How the demo's recipe was chosen: rtdetr_lite's training settings, one change at a time, on a tuning copy of data.

The demo's own held-out images must not choose its settings, so every row here trains and evaluates on a second
draw of the same generator (``make_synthetic_dataset(seed=1)``: other images, its own 200 held-out ones). The
budget is the demo's (3 epochs of 800 images at 224 px, batch 4, lr / 10 for the last epoch, 2 CPU cores);
each row changes the settings named in it, relative to the row it names as its base. The last rows start from the
demo's recipe as it is now (no crop, no lr drop) and switch one training technique of issue 16 off or on:

    python benchmarks/demo_recipe.py                           # all rows (about 10 min each on 2 cores)
    python benchmarks/demo_recipe.py --rows '["no crop"]'      # one row

Prints AP50 / AP, class-agnostic AP50 and the training time of each row, and writes
benchmarks/results/demo_recipe.json (a run of some rows replaces those rows and keeps the others).
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

NO_CROP = {"crop": False}
DEMO = {**NO_CROP, "lr_drop": 3}  # the demo's recipe (detrkit.cli.train.demo_config) before it took MAL
MAL = {**DEMO, "class_loss": "mal"}  # the demo's recipe since it took MAL
DDQ = {**MAL, "model_args": {"query_nms": 0.5}}  # the demo's recipe since it took distinct queries
BATCH2 = {**DDQ, "batch_size": 2}  # the demo's recipe since it took batches of 2
DN50 = {**BATCH2, "model_args": {"query_nms": 0.5, "denoising": {"num_dn_pairs": 50, "box_noise_scale": 1.0}}}
DEIM = {"mosaic": 0.5, "mixup": 0.5, "mosaic_epochs": 2, "lr_schedule": "flat-cosine", "lr_drop": 2, "lr_gamma": 0.5}
ROWS = {  # name: TrainConfig fields that differ from the budget below
    "RT-DETR augmentation (zoom-out + IoU crop)": {},
    "no crop": NO_CROP,
    "no crop, lr 1e-3, 100 warm-up steps": {**NO_CROP, "lr": 1e-3, "lr_backbone": 1e-3, "warmup_steps": 100},
    "no crop, lr 5e-4, 100 warm-up steps": {**NO_CROP, "lr": 5e-4, "lr_backbone": 5e-4, "warmup_steps": 100},
    "no crop, backbone lr 5e-4": {**NO_CROP, "lr_backbone": 5e-4},
    "no crop, EMA 0.999": {**NO_CROP, "ema": True, "ema_decay": 0.999, "ema_warmup": 100},
    "no crop, no lr drop": {**NO_CROP, "lr_drop": 3},
    "no crop, 192 px, 1000 images per epoch": {**NO_CROP, "image_size": 192, "max_train_images": 1000},
    # the demo (no crop, no lr drop) with one training technique of issue 16 switched off or on; RT-DETR's class
    # loss is the varifocal one already, so "focal" is that technique off
    "demo, focal loss instead of varifocal": {**DEMO, "class_loss": "focal"},
    "demo, MAL instead of varifocal": {**DEMO, "class_loss": "mal"},
    "demo, Mosaic on half the samples": {**DEMO, "mosaic": 0.5},
    "demo (MAL), Mosaic on half the samples": {**MAL, "mosaic": 0.5},
    # a from-scratch backbone stalls above lr 2e-4 (rows 3-5); residual blocks that start as the identity may not
    "demo (MAL), zero-init residual, lr 4e-4": {**MAL, "lr": 4e-4, "lr_backbone": 4e-4,
                                               "model_args": {"backbone_zero_init_residual": True}},
    # a narrower from-scratch backbone: ResNet-18-vd at half width, a quarter of the convolutions' work
    "demo (MAL), backbone width 0.5": {**MAL, "model_args": {"backbone_width": 0.5}},
    "demo (MAL), backbone width 0.75": {**MAL, "model_args": {"backbone_width": 0.75}},
    # the from-scratch backbone stalls above 2e-4, the transformer (encoder, decoder, heads) might not
    "demo (MAL), lr 4e-4 for all but the backbone": {**MAL, "lr": 4e-4},
    # one-to-many supervision on RT-DETR (the next-ranked proposals as extra queries, training only); at 20 objects
    # an image, 200 queries hold each object 3 times with room to spare. Each costs step time (the decoder's self-
    # attention grows with the square of the queries), so the question is AP per CPU-minute
    "demo (MAL), hybrid matching, 200 queries, k = 3": {**MAL, "model_args": {"one_to_many": "hybrid",
                                                                               "o2m_queries": 200, "o2m_k": 3}},
    "demo (MAL), Group DETR, 3 groups": {**MAL, "model_args": {"one_to_many": "group", "o2m_groups": 3}},
    # at this budget the one-to-one queries still emit duplicates (NMS lifts AP50: benchmarks/duplicate_boxes.py);
    # the decoder's self-attention is where DETR learns to suppress them, so: twice its layers
    "demo (MAL), 6 decoder layers": {**MAL, "model_args": {"num_decoder_layers": 6}},
    # fewer queries, fewer candidates for a second box on an object (at most 20 objects an image)
    "demo (MAL), 50 queries": {**MAL, "model_args": {"num_queries": 50}},
    "demo (MAL), 300 queries (the RT-DETR papers' count)": {**MAL, "model_args": {"num_queries": 300}},
    # DDQ's distinct queries: a class-agnostic NMS on the encoder's proposals before the top-k (DDQ DETR: IoU 0.8;
    # on the demo-recipe run above 3.5% of the selected queries overlap a better one by more than 0.8, 32% by 0.5)
    "demo (MAL), distinct queries (DDQ), IoU 0.5": {**MAL, "model_args": {"query_nms": 0.5}},
    "demo (MAL), distinct queries (DDQ), IoU 0.8": {**MAL, "model_args": {"query_nms": 0.8}},
    "demo (MAL), distinct queries (DDQ), IoU 0.4": {**MAL, "model_args": {"query_nms": 0.4}},
    "demo (MAL), distinct queries (DDQ), IoU 0.6": {**MAL, "model_args": {"query_nms": 0.6}},
    # the encoder's loss trains one proposal per object (the matched one of the top-k); dense one-to-many
    # supervision trains every proposal, k per object (H-DETR's k), for the classification the demo lacks most
    "demo (MAL), dense encoder supervision, k = 6": {**MAL, "model_args": {"enc_o2m_k": 6}},
    # the demo's step costs ~1.5 s for 4 images at 224 px, ~60% of it the backbone's convolutions (their backward
    # three times their forward); convolutions cost in proportion to the pixels: 192 px is 0.73 of 224 px's
    "demo (DDQ 0.5), 192 px": {**DDQ, "image_size": 192},
    # the model is still learning fastest at the end; a batch of 2 runs at 0.96x the images/s of a batch of 4
    # (demo_step_192.json) for twice the optimizer steps
    "demo (DDQ 0.5), batch 2": {**DDQ, "batch_size": 2},
    "demo (DDQ 0.5), batch 2, 2 epochs": {**DDQ, "batch_size": 2, "epochs": 2},
    # the row above again (the same settings) since the trainer's AdamW is the fused kernel: the same update up to
    # rounding, 0.91x the step time (demo_step_fused.json); what rounding alone moves the AP by
    "demo (batch 2), fused AdamW": BATCH2,
    # no backward through the backbone's stem, frozen at its random initialisation: 0.94x the step time
    # (demo_step_fused.json); random convolutions still pass on edges and colours
    "demo (batch 2), stem frozen": {**BATCH2, "model_args": {"query_nms": 0.5, "freeze_at": 0}},
    # RT-DETR's contrastive denoising (DINO's) with 100 pairs: at ~10-15 objects in a batch's fullest image that is
    # ~200 denoising queries beside the 100 matched ones, most of the decoder's work; 50 pairs: 0.92x the step time
    # (paired A/B); none: what the denoising queries buy at this budget
    "demo (batch 2), 50 denoising pairs": {**BATCH2, "model_args": {
        "query_nms": 0.5, "denoising": {"num_dn_pairs": 50, "box_noise_scale": 1.0}}},  # RT-DETR's noise otherwise
    "demo (batch 2), no denoising": {**BATCH2, "model_args": {"query_nms": 0.5, "denoising": None}},
    # the demo's recipe as it is (the row before last but one) on D-FINE's network at the lite size (issue 33):
    # HGNetv2-B0, GELAN encoder, the FDR decoder with its FGL / DDF losses; run in the same call as that row
    "demo (batch 2, 50 denoising pairs), dfine_lite": {**BATCH2, "model": "dfine_lite", "model_args": {
        "query_nms": 0.5, "denoising": {"num_dn_pairs": 50, "box_noise_scale": 1.0}}},
    # DEIM's schedule (issue 33) shrunk to the demo's 3 epochs: dense one-to-one from Mosaic and MixUp on half the
    # samples while the lr is flat (epochs 1-2), then a cosine down to half the lr in epoch 3 (DEIM's clean epochs
    # are its last 9%: here a quarter of an epoch, so none); on rtdetr_lite and on dfine_lite
    "demo (batch 2, 50 denoising pairs), DEIM schedule": {**DN50, **DEIM},
    "demo (batch 2, 50 denoising pairs), DEIM schedule, dfine_lite": {**DN50, **DEIM, "model": "dfine_lite"},
    # why dfine_lite learns slowly here: D-FINE-N reads only strides 16 / 32 (the demo's objects are 16-60 px at
    # 224 px: 1-4 cells of the stride-16 map), and its official lr is twice the demo's
    "demo (batch 2, 50 denoising pairs), dfine_lite, 3 levels (strides 8-32)": {**DN50, "model": "dfine_lite",
        "model_args": {**DN50["model_args"], "return_stages": [1, 2, 3], "n_points": [3, 6, 3]}},
    "demo (batch 2, 50 denoising pairs), dfine_lite, lr 4e-4": {**DN50, "model": "dfine_lite", "lr": 4e-4,
                                                                "lr_backbone": 4e-4},
}


def main(rows: list[str] | None = None, model: str = "rtdetr_lite", epochs: int = 3, num_train: int = 800,
         image_size: int = 224, batch_size: int = 4, lr: float = 2e-4, device: str = "auto",
         work_dir: str = "runs/demo_recipe", out: str = "benchmarks/results/demo_recipe.json") -> dict:
    work = Path(work_dir)
    meta = {"model": model, "data": "make_synthetic_dataset(seed=1): 1000 train / 200 held-out images (not the demo's)",
            "epochs": epochs, "num_train": num_train, "image_size": image_size, "batch_size": batch_size, "lr": lr,
            "device": device, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    # rows run before (a run of some --rows adds to or replaces its rows, and keeps the others)
    results = json.loads(Path(out).read_text())["rows"] if Path(out).is_file() else {}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for name in rows or list(ROWS):
        over = dict(ROWS[name])
        size = over.pop("image_size", image_size)
        data = work / f"data-seed1-{size}"  # 1000 train images: rows may use more per epoch than the budget's
        if not (data / "annotations" / "instances_val.json").is_file():
            make_synthetic_dataset(data, num_train=1000, num_val=200, image_size=size, seed=1)
        run = work / name.replace(" ", "_").replace(",", "").replace("/", "-")
        shutil.rmtree(run, ignore_errors=True)
        cfg = TrainConfig(**{
            "model": model, "data": str(data), "output_dir": str(run), "image_size": size, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "lr_backbone": lr, "lr_drop": max(1, epochs - 1), "device": device,
            "num_workers": 1, "eval_every": epochs, "max_train_images": num_train, "progress": False,
            "plots": False, "tensorboard": False, **over})
        t0 = time.perf_counter()
        metrics = train(cfg)
        results[name] = {"settings": ROWS[name], "AP50": metrics["AP50"], "AP": metrics["AP"],
                         "class_agnostic_AP50": class_agnostic_ap50(run, data, device),
                         "train_s": round(time.perf_counter() - t0, 1)}
        r = results[name]
        print(f"{name:45s} AP50 {100 * r['AP50']:5.1f}  AP {100 * r['AP']:5.1f}  "
              f"class-agnostic AP50 {100 * r['class_agnostic_AP50']:5.1f}  {r['train_s']:6.0f} s", flush=True)
        # after every row, in ROWS order: a run cut short keeps the rows it finished
        Path(out).write_text(json.dumps({**meta, "rows": {k: results[k] for k in ROWS if k in results}}, indent=2))
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
