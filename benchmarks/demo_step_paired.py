"""Paired A/B of the demo's training step: rows of ``demo_step.py`` (one batch size, eager) timed on the same
batches, step by step in turn (the order rotating every step), so that the shared machine's drift, which moves
absolute times by 25% or more between runs, hits every row alike. Each row's median step time, and the median of
its per-step ratio to the first row's.

    python benchmarks/demo_step_paired.py                      # the demo's step before and after 11d1fc3 / e45db32
    python benchmarks/demo_step_paired.py --rows '["batch 2, DDQ", "batch 2, DDQ, channels last"]'

Prints a table and writes benchmarks/results/demo_step_paired.json.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from demo_step import ROWS, build_step, timed_step
from torch.utils.data import DataLoader

from detrkit.data import collate, make_synthetic_dataset
from detrkit.engine.config import TrainConfig, build_datasets


def setup(batch: int, compile_model: bool, model_args: dict | None = None, image_size: int = 224,
          fused: bool = True, channels_last: bool = False, *, num_classes: int):
    if compile_model or image_size != 224:
        raise ValueError("paired rows run eager at 224 px (the batches are shared)")
    model, criterion, optimizer = build_step(model_args, fused, num_classes=num_classes)
    return model, model, criterion, optimizer, channels_last


def main(rows: list[str] = ["batch 2, DDQ, AdamW loop, channels last", "batch 2, DDQ",  # noqa: B006
                            "batch 2, DDQ, 50 denoising pairs"],
         warmup: int = 3, steps: int = 28, work_dir: str = "runs/demo_step",
         out: str = "benchmarks/results/demo_step_paired.json") -> dict:
    batch = {ROWS[name][0] for name in rows}
    if len(batch) != 1:
        raise ValueError(f"paired rows need one batch size, got {sorted(batch)}")
    batch = batch.pop()
    batches, num_classes = demo_batches(batch, warmup + steps, Path(work_dir))
    setups = {name: setup(*ROWS[name], num_classes=num_classes) for name in rows}
    times = {name: [] for name in rows}
    for i, b in enumerate(batches):
        order = rows[i % len(rows):] + rows[:i % len(rows)]  # who goes first rotates
        for name in order:
            t = timed_step(*setups[name], b)
            if i >= warmup:
                times[name].append(t)
    first = times[rows[0]]
    table = {}
    for name, ts in times.items():
        ratios = sorted(t / f for t, f in zip(ts, first, strict=True))
        table[name] = {"ms_per_step": round(1000 * sorted(ts)[len(ts) // 2], 1),
                       "images_per_s": round(batch / sorted(ts)[len(ts) // 2], 2),
                       f"vs_{rows[0]}": round(ratios[len(ratios) // 2], 3)}
    meta = {"model": "rtdetr_lite", "image_size": 224, "batch": batch,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "warmup": warmup, "steps": steps}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({**meta, "rows": table}, indent=2))
    width = max(24, *map(len, table))
    print(f"\nrtdetr_lite training step, paired, batch {batch}, 224 px, {torch.get_num_threads()} threads")
    print(f"{'row':<{width}} {'ms/step':>8} {'img/s':>6} {'vs first':>8}")
    for name, r in table.items():
        print(f"{name:<{width}} {r['ms_per_step']:8.0f} {r['images_per_s']:6.2f} {r[f'vs_{rows[0]}']:8.3f}")
    return table


def demo_batches(batch: int, count: int, work_dir: Path) -> tuple[list, int]:
    """``count`` training batches of ``batch`` demo-like images at 224 px (the same ones on every call: a fixed
    shuffle of a small synthetic set under ``work_dir``), and the number of classes."""
    data = work_dir / "data"
    if not (data / "annotations" / "instances_val.json").is_file():
        make_synthetic_dataset(data, num_train=64, num_val=1, image_size=224, progress=False)
    cfg = TrainConfig(model="rtdetr_lite", data=str(data), output_dir=str(data.parent / "unused"), image_size=224,
                      batch_size=batch, num_workers=0, crop=False, class_loss="mal")
    train_set, _ = build_datasets(cfg, progress=False)
    loader = DataLoader(train_set, batch_size=batch, collate_fn=collate, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    return [b for _, b in zip(range(count), _cycle(loader), strict=False)], train_set.num_classes


def _cycle(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
