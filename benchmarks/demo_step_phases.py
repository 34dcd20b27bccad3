"""Where the demo's training step spends its time: forward by module, losses, backward, clipping, AdamW.

The demo's step (``rtdetr_lite`` with the fast-cpu recipe's model settings, MAL, batch 2 at 224 px, channels-last
weights as the trainer makes them) on batches of the demo's data loaded before the clock starts; forward hooks
mark the end of the backbone and of the hybrid encoder. The median of ``--steps`` steps after ``--warmup``, per
phase, and the backbone's forward + backward alone (a mean of its features as the loss), which says how much of
the backward pass is the backbone's.

    python benchmarks/demo_step_phases.py

Prints a table and writes benchmarks/results/demo_step_phases.json.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from demo_step import build_step
from torch.utils.data import DataLoader

from detrkit.data import collate, make_synthetic_dataset
from detrkit.engine.config import TrainConfig, build_datasets
from detrkit.engine.recipes import FAST_CPU

MODEL_ARGS = FAST_CPU.model_settings["model_args"]  # the fast-cpu recipe's


def main(warmup: int = 4, steps: int = 20, work_dir: str = "runs/demo_step",
         out: str = "benchmarks/results/demo_step_phases.json") -> dict:
    data = Path(work_dir) / "data"
    if not (data / "annotations" / "instances_val.json").is_file():
        make_synthetic_dataset(data, num_train=64, num_val=1, image_size=224, progress=False)
    cfg = TrainConfig(model="rtdetr_lite", data=str(data), output_dir=str(data.parent / "unused"), image_size=224,
                      batch_size=2, num_workers=0, crop=False, class_loss="mal")
    train_set, _ = build_datasets(cfg, progress=False)
    loader = iter(DataLoader(train_set, batch_size=2, collate_fn=collate, shuffle=True,
                             generator=torch.Generator().manual_seed(0)))
    batches = [next(loader) for _ in range(warmup + steps)]
    model, criterion, optimizer = build_step(MODEL_ARGS, True, num_classes=train_set.num_classes)
    model.to(memory_format=torch.channels_last)  # as the trainer does
    marks: dict[str, float] = {}
    model.backbone.register_forward_hook(lambda *_: marks.__setitem__("backbone", time.perf_counter()))
    model.encoder.register_forward_hook(lambda *_: marks.__setitem__("encoder", time.perf_counter()))
    phases: dict[str, list[float]] = {k: [] for k in ("backbone forward", "hybrid encoder forward",
                                                      "decoder, query selection, heads forward", "losses (matching)",
                                                      "backward", "gradient clipping", "AdamW")}
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        outputs = model(b.images, b.padding_mask, b.targets)
        t1 = time.perf_counter()
        loss = sum(criterion(outputs, b.targets).values())
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if i >= warmup:
            for name, t in zip(phases, (marks["backbone"] - t0, marks["encoder"] - marks["backbone"],
                                        t1 - marks["encoder"], t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                phases[name].append(t)
    ms = {k: 1000 * sorted(v)[len(v) // 2] for k, v in phases.items()}
    total = sum(ms.values())

    def backbone_step() -> None:
        feats = model.backbone(batches[0].images)
        sum(f[0].float().mean() if isinstance(f, tuple) else f.float().mean()
            for f in (feats.values() if isinstance(feats, dict) else feats)).backward()

    alone = []
    for i in range(warmup + steps // 2):
        t0 = time.perf_counter()
        backbone_step()
        if i >= warmup:
            alone.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    table = {k: {"ms": round(v, 1), "share": round(v / total, 3)} for k, v in ms.items()}
    result = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "batch": 2, "image_size": 224, "steps": steps,
              "command": "python benchmarks/demo_step_phases.py", "phases": table,
              "sum_of_medians_ms": round(total, 1),
              "backbone_forward_backward_alone_ms": round(1000 * sorted(alone)[len(alone) // 2], 1)}
    for k, v in table.items():
        print(f"{k:42s} {v['ms']:7.1f} ms  {100 * v['share']:5.1f}%")
    print(f"{'sum':42s} {total:7.1f} ms")
    print(f"backbone forward + backward alone: {result['backbone_forward_backward_alone_ms']} ms")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
