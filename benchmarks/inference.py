"""Inference speed: detrkit (eager and torch.compile) against HF transformers, same architecture and weights.

For DETR-R50 and Deformable-DETR two-stage + refine, a random-weight HF model is built and converted into
detrkit (the parity tests' path), so both libraries run the same network on the same input in this process;
DINO-4scale has no HF implementation and is timed for detrkit alone. Each case: warm-up calls (for
torch.compile, the compilation), then the median of timed calls; peak CUDA memory on GPU.

    python benchmarks/inference.py                                   # GPU: 800x1333, batch 1 and 4
    python benchmarks/inference.py --height 384 --width 640 --iters 3 --models detr_r50,deformable_detr_r50_two_stage
                                                                     # a CPU-sized run

Prints a table and writes benchmarks/results/inference_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from detrkit import create_model


def hf_pair(name: str, **hf_config):
    """(HF model, detrkit model) with the same random weights, or (None, detrkit model) without an HF peer.
    ``hf_config``: HF config overrides (e.g. dropout rates, which do not change the weights)."""
    from transformers import (
        DeformableDetrConfig,
        DeformableDetrForObjectDetection,
        DetrConfig,
        DetrForObjectDetection,
        ResNetConfig,
    )

    from detrkit.weights import convert_hf_deformable_detr, convert_hf_detr

    torch.manual_seed(0)
    if name == "detr_r50":
        hf = DetrForObjectDetection(DetrConfig(backbone_config=ResNetConfig(out_features=["stage4"]),
                                               use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91,
                                               **hf_config))
        convert = convert_hf_detr
    elif name == "deformable_detr_r50_two_stage":
        config = DeformableDetrConfig(backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]),
                                      use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91,
                                      with_box_refine=True, two_stage=True, **hf_config)
        hf = DeformableDetrForObjectDetection(config)
        convert = convert_hf_deformable_detr
    else:
        return None, create_model(name).eval()
    model = create_model(name).eval()
    model.load_state_dict(convert(hf.state_dict()), strict=True)
    return hf.eval(), model


def time_call(fn, warmup: int, iters: int, device: torch.device) -> tuple[float, float]:
    """(median seconds per call, first-call seconds)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_result(result: dict, name: str, device: torch.device, out: str | None) -> Path:
    path = Path(out or Path(__file__).parent / "results" / f"{name}_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="detr_r50,deformable_detr_r50_two_stage,dino_r50_4scale")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", default="true", help="also time torch.compile (true/false)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in args.models.split(","):
        hf, model = hf_pair(name)
        model.to(device)
        variants = [("detrkit eager", model)]
        if args.compile == "true":
            variants.append(("detrkit compile", torch.compile(model)))
        if hf is not None:
            variants.append(("HF transformers", hf.to(device)))
        for batch in map(int, args.batches.split(",")):
            images = torch.randn(batch, 3, args.height, args.width, device=device)
            mask = torch.zeros(batch, args.height, args.width, dtype=torch.bool, device=device)
            base = None
            for label, net in variants:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                if label == "HF transformers":
                    kwargs = {"pixel_values": images, "pixel_mask": (~mask).long()}  # HF: 1 = real pixel
                    call = lambda net=net, kwargs=kwargs: net(**kwargs)  # noqa: E731
                else:
                    call = lambda net=net, images=images, mask=mask: net(images, mask)  # noqa: E731
                with torch.inference_mode():
                    sec, first = time_call(call, args.warmup, args.iters, device)
                mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
                base = base or sec
                rows.append({"model": name, "impl": label, "batch": batch, "images_per_s": batch / sec,
                             "ms_per_batch": 1000 * sec, "first_call_s": first, "peak_mem_mib": mem,
                             "speedup_vs_detrkit_eager": base / sec})
                print(f"{name:<30} {label:<16} batch {batch}: {batch / sec:7.2f} img/s  {1000 * sec:8.1f} ms  "
                      f"first call {first:6.1f} s  x{base / sec:.2f} vs detrkit eager"
                      + (f"  peak {mem:.0f} MiB" if mem else ""))
    where = device_name(device)
    result = {"device": where, "torch": torch.__version__, "image": [args.height, args.width], "rows": rows}
    out = write_result(result, "inference", device, args.out)
    print(f"device: {where}; results in {out}")


if __name__ == "__main__":
    main()
