"""Training throughput: one optimizer step (forward, losses with matching, backward, AdamW) of detrkit against
HF transformers, same architecture and weights, in the same process.

DETR-R50, Deformable-DETR two-stage + refine and RT-DETR-R18 / R50 are built as random-weight HF models and converted
into detrkit (benchmarks/inference.py's path); DINO-4scale has no HF implementation and is timed for detrkit alone.
RT-DETR trains on its own input (pixels in [0, 1], sides rounded down to multiples of 32), both sides with its
contrastive denoising (100 queries) and without dropout. Every
image gets the same random targets (10 boxes). Each case: warm-up steps, then the median of timed steps; peak
CUDA memory on GPU.

    python benchmarks/train_step.py                                          # GPU: 800x1333, batch 2, bf16 autocast
    python benchmarks/train_step.py --height 384 --width 640 --batch 1 --iters 2 --warmup 1 --amp none --compile false
                                                                             # a CPU-sized run
    python benchmarks/train_step.py --models rtdetr_r18vd,rtdetr_r50vd --height 640 --width 640 --batch 2 \
        --iters 3 --warmup 1 --amp none --compile false                      # RT-DETR, CPU

Prints a table and writes benchmarks/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse

import torch
from inference import device_name, hf_pair, model_input, time_call, write_result

from detrkit.losses import build_criterion


def _targets(batch: int, num_classes: int, device, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        centre, size = torch.rand(10, 2, generator=g) * 0.6 + 0.2, torch.rand(10, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(num_classes, (10,), generator=g).to(device),
                    "boxes": torch.cat([centre, size], 1).to(device)})
    return out


def align_trainable(hf, model) -> int:
    """Train the same parameters in both: HF's non-timm ResNet path freezes the whole backbone (its name filter looks
    for "stage.1" in names spelled "stages.1"), DETR trains all but the stem and the first stage; HF's RT-DETR trains
    its whole backbone, detrkit's R50 / R101 presets freeze the stem (the official freeze_at=0). Returns the count."""
    rt_detr = getattr(model, "preprocess", "detr") == "rtdetr"
    stem_frozen = rt_detr and not any(p.requires_grad for p in model.backbone.conv1.parameters())
    for name, p in hf.named_parameters():
        if rt_detr:
            if "backbone" in name:
                p.requires_grad_(not (stem_frozen and ".embedder." in name))
        elif "conv_encoder" in name or "backbone" in name:
            p.requires_grad_(any(f"stages.{i}." in name for i in (1, 2, 3)))
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hf_count = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    if count != hf_count:
        raise RuntimeError(f"detrkit trains {count} parameters, HF {hf_count}: not the same step")
    return count


def _detrkit_step(model, forward, criterion, optimizer, images, mask, targets, amp):
    images = images.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            out = forward(images, mask, targets)
        loss = sum(criterion(out, targets).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _hf_step(hf, optimizer, images, mask, targets, amp):
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    def step():
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            out = hf(pixel_values=images, pixel_mask=(~mask).long(), labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="detr_r50,deformable_detr_r50_two_stage,dino_r50_4scale")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", default="bf16", help="bf16, fp16 or none (autocast on CUDA; CPU runs fp32)")
    parser.add_argument("--compile", default="true", help="also time detrkit under torch.compile (true/false)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp) if device.type == "cuda" else None
    rows = []
    for name in args.models.split(","):
        # HF's configs default to no attention and no FFN-activation dropout; the papers' recipes (and detrkit's
        # presets) train with 0.1 in both: give HF the same, so that both run the same training step
        hf, model = hf_pair(name, attention_dropout=0.1, activation_dropout=0.1)
        images, mask = model_input(model, args.batch, args.height, args.width, device)
        model.to(device).train()
        model.to(memory_format=torch.channels_last)  # as detrkit's Trainer runs it (faster convolutions)
        targets = _targets(args.batch, model.num_classes, device)
        criterion = build_criterion(model).to(device)
        variants = [
            (
                "detrkit eager",
                _detrkit_step(
                    model, model, criterion, torch.optim.AdamW(model.parameters(), 1e-5), images, mask, targets, amp
                ),
            )
        ]
        if args.compile == "true":
            variants.append(("detrkit compile", _detrkit_step(model, torch.compile(model), criterion,
                                                              torch.optim.AdamW(model.parameters(), 1e-5),
                                                              images, mask, targets, amp)))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if hf is not None:
            trainable = align_trainable(hf, model)
            hf.to(device).train()
            variants.append(("HF transformers", _hf_step(hf, torch.optim.AdamW(hf.parameters(), 1e-5), images, mask,
                                                         targets, amp)))
        base = None
        for label, step in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sec, first = time_call(step, args.warmup, args.iters, device)
            mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
            base = base or sec
            rows.append({"model": name, "impl": label, "batch": args.batch, "image": list(images.shape[-2:]),
                         "trainable_params": trainable,
                         "images_per_s": args.batch / sec,
                         "ms_per_step": 1000 * sec, "first_step_s": first, "peak_mem_mib": mem,
                         "speedup_vs_detrkit_eager": base / sec})
            print(
                f"{name:<30} {label:<16} {args.batch / sec:7.2f} img/s  {1000 * sec:8.1f} ms/step  "
                f"first {first:6.1f} s  x{base / sec:.2f} vs detrkit eager" + (f"  peak {mem:.0f} MiB" if mem else "")
            )
        del hf, model
    where = device_name(device)
    result = {"device": where, "torch": torch.__version__, "image": [args.height, args.width], "amp": str(amp),
              "rows": rows}
    print(f"device: {where}; results in {write_result(result, 'train_step', device, args.out)}")


if __name__ == "__main__":
    main()
