"""The Hungarian matcher's share of a DINO training step, and what matching all decoder layers at once saves.

One training step of ``--model`` (forward with denoising, losses, backward) on random images with 10 random
boxes each; the time spent in the matcher (cost matrices on the device, one transfer, scipy's assignment per
layer and image) is measured inside that step, with device syncs around it. The peer is the per-layer matcher
the reference implementations use (one cost pass, transfer and sync per decoder layer), timed on the same outputs.

    python benchmarks/matcher.py                                        # GPU: DINO-4scale, 800x1333, batch 2
    python benchmarks/matcher.py --height 384 --width 640 --batch 1 --iters 2   # a CPU-sized run

Prints a table and writes benchmarks/results/matcher_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from inference import device_name, write_result
from train_step import _targets

from detrkit import create_model
from detrkit.losses import build_criterion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dino_r50_4scale")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = create_model(args.model).to(device).train()
    criterion = build_criterion(model).to(device)
    matcher = criterion.matcher
    images = torch.randn(args.batch, 3, args.height, args.width, device=device)
    targets = _targets(args.batch, model.num_classes, device)
    spent, real_match = [], matcher.match_layers

    def timed_match(*a, **kw):
        sync()
        t0 = time.perf_counter()
        out = real_match(*a, **kw)
        sync()
        spent.append(time.perf_counter() - t0)
        return out

    matcher.match_layers = timed_match
    steps, batched, per_layer = [], [], []
    for i in range(args.iters + 1):  # the first step warms up
        spent.clear()
        sync()
        t0 = time.perf_counter()
        out = model(images, None, targets)
        loss = sum(criterion(out, targets).values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        step = time.perf_counter() - t0
        layers = [(out.pred_logits.detach(), out.pred_boxes.detach())] + \
                 [(a.pred_logits.detach(), a.pred_boxes.detach()) for a in out.aux_outputs]
        sync()
        t0 = time.perf_counter()
        for lg, bx in layers:  # the peer: one pass, one transfer and one sync per decoder layer
            real_match([lg], [bx], targets)
        sync()
        if i:
            steps.append(step)
            batched.append(sum(spent))
            per_layer.append(time.perf_counter() - t0)
    step, match, peer = statistics.median(steps), statistics.median(batched), statistics.median(per_layer)
    where = device_name(device)
    result = {"device": where, "torch": torch.__version__, "model": args.model, "batch": args.batch,
              "image": [args.height, args.width], "step_ms": 1000 * step, "matcher_ms": 1000 * match,
              "matcher_share": match / step, "per_layer_matcher_ms": 1000 * peer, "speedup_vs_per_layer": peer / match}
    print(f"{args.model}, batch {args.batch}, {args.height}x{args.width} on {where}")
    print(f"training step {1000 * step:9.1f} ms | matcher (all layers at once) {1000 * match:7.1f} ms = "
          f"{100 * match / step:.2f}% of the step | per-layer matcher {1000 * peer:7.1f} ms ({peer / match:.2f}x)")
    print(f"results in {write_result(result, 'matcher', device, args.out)}")


if __name__ == "__main__":
    main()
