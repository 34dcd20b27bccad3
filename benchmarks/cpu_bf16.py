"""bf16 autocast on a CPU with native bf16 (AVX512-BF16 / AMX): the default's training step, paired against fp32.

The default's network (``rtdetr_lite`` under the fast-cpu recipe: 7x7 stem, DDQ, 50 denoising pairs, MAL), as the
trainer builds it (channels-last weights, fused AdamW, clipping at 0.1), two copies from the same initial weights:
one steps in fp32, one under ``torch.autocast("cpu", torch.bfloat16)`` (the losses outside it, in fp32, as in the
trainer), on the same batches, the order alternating every step so that the shared machine's drift hits both.
With ``--run DIR`` it also evaluates that run's saved weights on its validation set in fp32 and under bf16: the AP
and seconds of each (what evaluating inside a bf16 training run costs or changes).

    python benchmarks/cpu_bf16.py
    python benchmarks/cpu_bf16.py --run runs/ema_paired/tuning-run-amp_bf16

Prints a table and writes benchmarks/results/cpu_bf16.json. Whether the AP holds when training in bf16 is
measured at equal steps by ``python benchmarks/ema_paired.py --dataset tuning --settings '{amp: bf16}'``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml
from demo_step import build_step
from demo_step_paired import demo_batches

from detrkit.engine.config import TrainConfig, dataset_split
from detrkit.engine.evaluate import evaluate_checkpoint
from detrkit.engine.recipes import FAST_CPU
from detrkit.runtime import cpu_has_bf16

MODEL_ARGS = {**FAST_CPU.model_settings["model_args"], **FAST_CPU.network}


def paired_steps(warmup: int, steps: int, work_dir: Path) -> dict:
    batches, num_classes = demo_batches(2, warmup + steps, work_dir)
    copies = {}
    for name in ("fp32", "bf16"):
        model, criterion, optimizer = build_step(MODEL_ARGS, True, num_classes=num_classes)
        copies[name] = (model.to(memory_format=torch.channels_last), criterion, optimizer)
    times = {name: [] for name in copies}
    for i, b in enumerate(batches):
        for name in (("fp32", "bf16") if i % 2 else ("bf16", "fp32")):
            model, criterion, optimizer = copies[name]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                outputs = model(b.images, b.padding_mask, b.targets)
            loss = sum(criterion(outputs, b.targets).values())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    ratio = statistics.median(b / f for b, f in zip(times["bf16"], times["fp32"], strict=True))
    return {name: {"ms_per_step": round(1000 * statistics.median(ts), 1),
                   "images_per_s": round(2 / statistics.median(ts), 2),
                   "vs_fp32": 1.0 if name == "fp32" else round(ratio, 3)} for name, ts in times.items()}


def evaluate_both(run: Path) -> dict:
    """``run``'s saved weights on its validation split, in fp32 and under bf16."""
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    images, ann, source = dataset_split(TrainConfig(data=data, output_dir=str(run)), "val")
    rows = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        t0 = time.perf_counter()
        m = evaluate_checkpoint(run, images, ann, source=source, device="cpu", amp_dtype=dtype, progress=False)
        rows[name] = {"AP50": round(100 * m["AP50"], 2), "AP": round(100 * m["AP"], 2),
                      "seconds": round(time.perf_counter() - t0, 1)}
    return rows


def main(warmup: int = 4, steps: int = 30, run: str | None = None, work_dir: str = "runs/cpu_bf16",
         out: str = "benchmarks/results/cpu_bf16.json") -> dict:
    if not cpu_has_bf16():
        print("note: this CPU has no native bf16 (AVX512-BF16 / AMX): bf16 is emulated here, and `--amp auto` "
              "trains in fp32 on it")
    result = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "native_bf16": cpu_has_bf16(), "torch": torch.__version__, "model_args": MODEL_ARGS,
              "batch": 2, "image_size": 224, "warmup": warmup, "steps": steps,
              "training_step": paired_steps(warmup, steps, Path(work_dir))}
    print(f"\nthe default's training step, paired, batch 2, 224 px, {torch.get_num_threads()} threads")
    print(f"{'precision':<10} {'ms/step':>8} {'img/s':>6} {'vs fp32':>8}")
    for name, r in result["training_step"].items():
        print(f"{name:<10} {r['ms_per_step']:8.0f} {r['images_per_s']:6.2f} {r['vs_fp32']:8.3f}")
    if run:
        result["evaluation"] = {"run": run, **evaluate_both(Path(run))}
        print(f"\n{run}'s weights evaluated on its validation set")
        for name in ("fp32", "bf16"):
            r = result["evaluation"][name]
            print(f"{name:<10} AP50 {r['AP50']:6.2f}  AP {r['AP']:6.2f}  {r['seconds']:6.1f} s")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
