"""Inference speed: detrkit (eager and torch.compile) against HF transformers, same architecture and weights.

For DETR-R50, Deformable-DETR two-stage + refine, RT-DETR-R18 / R50 and D-FINE-N / S / L / X, a random-weight HF
model is built and converted into detrkit (the parity tests' path), so both libraries run the same network on the
same input in this process; DINO-4scale has no HF implementation and is timed for detrkit alone. RT-DETR and D-FINE
run on pixels in [0, 1] at the given size rounded down to multiples of 32 (their own input). Each case: warm-up
calls (for torch.compile, the compilation), then the median of timed calls; peak CUDA memory on GPU.

    python benchmarks/inference.py                                   # GPU: 800x1333, batch 1 and 4
    python benchmarks/inference.py --height 384 --width 640 --iters 3 --models detr_r50,deformable_detr_r50_two_stage
                                                                     # a CPU-sized run
    python benchmarks/inference.py --models rtdetr_r18vd,rtdetr_r50vd --height 640 --width 640 --batches 1 \
        --iters 5 --compile false                                    # RT-DETR at its 640x640, CPU
    python benchmarks/inference.py --models dfine_n,dfine_s,dfine_l --height 640 --width 640 --batches 1 \
        --iters 5 --compile false --out benchmarks/results/inference_dfine_cpu.json   # D-FINE, CPU

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
    elif name.startswith("rtdetr"):
        return _rt_detr_pair(name)
    elif name.startswith("dfine_"):
        return _d_fine_pair(name)
    else:
        return None, create_model(name).eval()
    model = create_model(name).eval()
    model.load_state_dict(convert(hf.state_dict()), strict=True)
    return hf.eval(), model


def _rt_detr_pair(name: str):
    """HF RTDetr / RTDetrV2 at the preset's size (ResNet-18-vd or -50-vd), 80 classes, converted into the preset.
    Both run without dropout, as RT-DETR trains."""
    import transformers
    from transformers import RTDetrResNetConfig

    from detrkit.weights.rt_detr import convert_hf_rt_detr

    v2 = name.startswith("rtdetrv2")
    config_cls = transformers.RTDetrV2Config if v2 else transformers.RTDetrConfig
    model_cls = transformers.RTDetrV2ForObjectDetection if v2 else transformers.RTDetrForObjectDetection
    small = "r18" in name
    if not (small or "r50" in name):
        raise ValueError(f"{name}: the benchmark pairs R18 and R50 RT-DETR presets with HF")
    backbone = RTDetrResNetConfig(**(dict(hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic")
                                     if small else {}), out_features=["stage2", "stage3", "stage4"])
    hf = model_cls(config_cls(backbone_config=backbone, num_labels=80, freeze_backbone_batch_norms=not small,
                              encoder_in_channels=[128, 256, 512] if small else [512, 1024, 2048],
                              hidden_expansion=0.5 if small else 1.0, decoder_layers=3 if small else 6))
    model = create_model(name, num_classes=80).eval()
    state = convert_hf_rt_detr(hf.state_dict())
    state.update({f"decoder.{k}": v for k, v in state.items() if k.startswith("bbox_embed.")})  # the decoder's alias
    model.load_state_dict(state, strict=True)
    return hf.eval(), model


def _d_fine_pair(name: str):
    """HF DFineForObjectDetection built from the preset's settings (hf_d_fine_config), 80 classes, converted into
    the preset (D-FINE-M is not: HF builds its decoder differently)."""
    from transformers import DFineForObjectDetection

    from detrkit.weights.d_fine import convert_hf_d_fine, hf_d_fine_config

    hf = DFineForObjectDetection(hf_d_fine_config(name.removeprefix("dfine_"), num_classes=80))
    model = create_model(name, num_classes=80).eval()
    model.load_state_dict(convert_hf_d_fine(hf.state_dict()), strict=True)
    return hf.eval(), model


def model_input(model, batch: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, padding mask) as the model takes them: RT-DETR pixels in [0, 1], sides multiples of 32."""
    if getattr(model, "preprocess", "detr") == "rtdetr":
        height, width = height // 32 * 32, width // 32 * 32
        images = torch.rand(batch, 3, height, width, device=device)
    else:
        images = torch.randn(batch, 3, height, width, device=device)
    return images, torch.zeros(batch, height, width, dtype=torch.bool, device=device)


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
            images, mask = model_input(model, batch, args.height, args.width, device)
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
                rows.append({"model": name, "impl": label, "batch": batch, "image": list(images.shape[-2:]),
                             "images_per_s": batch / sec,
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
