"""Images per second of the demo's training step on this machine: the demo's batch of 4 in eager mode (the
baseline, in the same run) against other batch sizes and ``torch.compile``.

The step is the demo's (``rtdetr_lite``, MAL class loss, 224 px synthetic shapes without crop, the trainer's AdamW
(its fused kernel), gradient clipping at 0.1; a row may take another image size, the per-tensor AdamW loop or a
frozen stem); batches come from the demo's data pipeline and are loaded before the clock starts, so the table is
the model's cost alone. Each row: the first ``--warmup`` steps (with
``torch.compile``, the compilation, and a new one for each new padded batch shape), then ``--steps`` timed steps;
a row that runs past ``--max_seconds`` stops and says how far it got.

    python benchmarks/demo_step.py                                   # batch 4, batch 8, batch 4 compiled
    python benchmarks/demo_step.py --rows '["batch 4", "batch 2"]'    # some rows

Prints a table and writes benchmarks/results/demo_step.json.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from detrkit.data import collate, make_synthetic_dataset
from detrkit.engine.config import TrainConfig, build_datasets
from detrkit.engine.train import adamw
from detrkit.losses import build_criterion
from detrkit.registry import model_info

# the fast-cpu recipe's network (engine/recipes.py): DDQ at 0.5, 50 denoising pairs, the 7x7 stem
FAST_CPU_NET = {"query_nms": 0.5, "denoising": {"num_dn_pairs": 50}, "backbone_stem": "7x7"}
ROWS = {"batch 4": (4, False), "batch 2": (2, False), "batch 8": (8, False), "batch 4, torch.compile": (4, True),
        # DDQ's distinct query selection (an NMS over the encoder's proposals before the top-k): what it adds to a step
        "batch 4, distinct queries (DDQ), IoU 0.5": (4, False, {"query_nms": 0.5}),
        # the demo's model (with DDQ) on the same images resized to 192 px: what a smaller image saves
        "batch 4, DDQ, 192 px": (4, False, {"query_nms": 0.5}, 192),
        "batch 2, DDQ": (2, False, {"query_nms": 0.5}),
        # the demo's step (batch 2, DDQ) with AdamW's per-tensor loop instead of its fused kernel (the trainer's)
        "batch 2, DDQ, AdamW loop": (2, False, {"query_nms": 0.5}, 224, False),
        # ... with the backbone's stem (and its first stage) frozen at their random initialisation: no backward there
        "batch 2, DDQ, stem frozen": (2, False, {"query_nms": 0.5, "freeze_at": 0}),
        "batch 2, DDQ, stem + res2 frozen": (2, False, {"query_nms": 0.5, "freeze_at": 1}),
        # twice the optimizer steps again for the same images
        "batch 1, DDQ": (1, False, {"query_nms": 0.5}),
        # the demo's step on channels-last (NHWC) images, as the trainer fed them on every device until it kept
        # them for CUDA
        "batch 2, DDQ, channels last": (2, False, {"query_nms": 0.5}, 224, True, True),
        # the demo's step before 11d1fc3 (AdamW loop, channels-last images) and since e45db32 (50 denoising pairs)
        "batch 2, DDQ, AdamW loop, channels last": (2, False, {"query_nms": 0.5}, 224, False, True),
        "batch 2, DDQ, 50 denoising pairs": (2, False, {"query_nms": 0.5, "denoising": {"num_dn_pairs": 50}}),
        # ... with the original ResNet's 7x7 stem instead of ResNet-vd's three 3x3 convolutions
        "batch 2, DDQ, 50 denoising pairs, 7x7 stem": (2, False, FAST_CPU_NET),
        # ... cheaper variants of that step (the fast-cpu recipe's network): a 3/4-width backbone, 2 decoder layers
        "fast-cpu, backbone width 0.75": (2, False, {**FAST_CPU_NET, "backbone_width": 0.75}),
        "fast-cpu, 2 decoder layers": (2, False, {**FAST_CPU_NET, "num_decoder_layers": 2})}


def build_step(model_args: dict | None, fused: bool, *, num_classes: int):
    """The demo's model, criterion and optimizer (AdamW as the trainer makes it, or its per-tensor loop)."""
    torch.manual_seed(0)
    model = model_info("rtdetr_lite").builder(num_classes=num_classes, **(model_args or {}))
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 2e-4}]
    optimizer = adamw(groups, 1e-4) if fused else torch.optim.AdamW(groups, weight_decay=1e-4)
    return model, build_criterion(model, class_loss="mal"), optimizer


def timed_step(forward, model, criterion, optimizer, channels_last: bool, b) -> float:
    """Seconds for one training step (forward, losses, backward, clipping at 0.1, AdamW) on batch ``b``."""
    t0 = time.perf_counter()
    images = b.images.contiguous(memory_format=torch.channels_last) if channels_last else b.images
    loss = sum(criterion(forward(images, b.padding_mask, b.targets), b.targets).values())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run_row(batch: int, compile_model: bool, model_args: dict | None = None, image_size: int = 224,
            fused: bool = True, channels_last: bool = False, *, data: Path,
            warmup: int, steps: int, max_seconds: float) -> dict:
    cfg = TrainConfig(model="rtdetr_lite", data=str(data), output_dir=str(data.parent / "unused"),
                      image_size=image_size, batch_size=batch, num_workers=0, crop=False, class_loss="mal")
    train_set, _ = build_datasets(cfg, progress=False)
    loader = iter(DataLoader(train_set, batch_size=batch, collate_fn=collate, shuffle=True,
                             generator=torch.Generator().manual_seed(0)))
    batches = [next(loader) for _ in range(warmup + steps)]
    model, criterion, optimizer = build_step(model_args, fused, num_classes=train_set.num_classes)
    forward = torch.compile(model) if compile_model else model
    start, times = time.perf_counter(), []
    for i, b in enumerate(batches):
        t = timed_step(forward, model, criterion, optimizer, channels_last, b)
        if i >= warmup:
            times.append(t)
        if time.perf_counter() - start > max_seconds:
            break
    warm = time.perf_counter() - start - sum(times)
    done = len(times) == steps
    row = {"batch": batch, "image_size": image_size, "compile": compile_model, "fused_adamw": fused,
           "channels_last": channels_last, "warmup_s": round(warm, 1), "timed_steps": len(times)}
    if times:
        per_step = sorted(times)[len(times) // 2]
        row |= {"ms_per_step": round(1000 * per_step, 1), "images_per_s": round(batch / per_step, 2)}
    if not done:
        row["stopped"] = f"past --max_seconds {max_seconds:.0f} after {len(times)} of {steps} timed steps"
    return row


def main(rows: list[str] = ["batch 4", "batch 8", "batch 4, torch.compile"],  # noqa: B006
         warmup: int = 3, steps: int = 5, max_seconds: float = 600, work_dir: str = "runs/demo_step",
         out: str = "benchmarks/results/demo_step.json") -> dict:
    data = Path(work_dir) / "data"
    if not (data / "annotations" / "instances_val.json").is_file():
        make_synthetic_dataset(data, num_train=64, num_val=1, image_size=224, progress=False)
    torch.manual_seed(0)
    table = {}
    for name in rows:
        table[name] = run_row(*ROWS[name], data=data, warmup=warmup, steps=steps, max_seconds=max_seconds)
        print(f"{name}: {json.dumps(table[name])}", flush=True)
    base = table.get("batch 4", {}).get("images_per_s")
    for row in table.values():
        if base and "images_per_s" in row:
            row["vs_batch_4"] = round(row["images_per_s"] / base, 2)
    meta = {"model": "rtdetr_lite", "image_size": 224, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "warmup": warmup, "steps": steps}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({**meta, "rows": table}, indent=2))
    print(f"\nrtdetr_lite training step, 224 px, {torch.get_num_threads()} threads ({meta['cpu']})")
    width = max(24, *map(len, table))
    print(f"{'row':<{width}} {'warm-up s':>9} {'ms/step':>8} {'img/s':>6} {'vs b4':>6}")
    for name, r in table.items():
        print(f"{name:<{width}} {r['warmup_s']:9.1f} {r.get('ms_per_step', float('nan')):8.0f} "
              f"{r.get('images_per_s', float('nan')):6.2f} {r.get('vs_batch_4', float('nan')):6.2f}"
              + (f"  ({r['stopped']})" if "stopped" in r else ""))
    return table


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
