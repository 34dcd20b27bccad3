"""Where the demo step's convolution time goes on this CPU: each convolution of ``rtdetr_lite``'s ResNet-18-vd
backbone timed forward and backward on its own input (the demo's batch of 2 at 224 px), with PyTorch's oneDNN
(mkldnn) kernels and without them (its native im2col + GEMM path), in the same run.

The backbone's convolutions are ~60% of the demo's training step (their backward ~46%, torch.profiler); this
table says which layers cost what and whether either backend is the better one everywhere.

    python benchmarks/conv_backends.py                  # prints a table, writes results/conv_backends_cpu.json
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from detrkit.registry import model_info


def time_convs(repeats: int = 7) -> dict[str, dict]:
    torch.manual_seed(0)
    backbone = model_info("rtdetr_lite").builder(num_classes=5).backbone.train()
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0].detach()))
             for n, m in backbone.named_modules() if isinstance(m, torch.nn.Conv2d)]
    backbone(torch.randn(2, 3, 224, 224))
    for h in hooks:
        h.remove()
    rows = {}
    for name, conv in backbone.named_modules():
        if not isinstance(conv, torch.nn.Conv2d):
            continue
        row = {"input": list(inputs[name].shape)}
        for backend, enabled in (("onednn", True), ("native", False)):
            fwd, bwd = [], []
            with torch.backends.mkldnn.flags(enabled=enabled):
                for _ in range(repeats):
                    x = inputs[name].clone().requires_grad_(name != "conv1.conv1_1.conv")  # images need no grad
                    t0 = time.perf_counter()
                    y = conv(x)
                    t1 = time.perf_counter()
                    y.backward(torch.ones_like(y))
                    fwd.append(t1 - t0)
                    bwd.append(time.perf_counter() - t1)
            row[backend] = {"fwd_ms": round(1e3 * statistics.median(fwd[1:]), 2),
                            "bwd_ms": round(1e3 * statistics.median(bwd[1:]), 2)}
        rows[name] = row
    return rows


def main(out: str = "benchmarks/results/conv_backends_cpu.json") -> dict:
    rows = time_convs()
    total = {b: round(sum(r[b]["fwd_ms"] + r[b]["bwd_ms"] for r in rows.values()), 1) for b in ("onednn", "native")}
    best = round(sum(min(r[b]["fwd_ms"] + r[b]["bwd_ms"] for b in ("onednn", "native")) for r in rows.values()), 1)
    result = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "command": "python benchmarks/conv_backends.py",
              "total_ms": total, "best_per_layer_ms": best, "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"{'convolution':42s} {'input':>18s} {'oneDNN fwd+bwd':>15s} {'native fwd+bwd':>15s}")
    for name, r in rows.items():
        a, b = r["onednn"], r["native"]
        print(f"{name:42s} {str(tuple(r['input'])):>18s} {a['fwd_ms']:6.2f}+{a['bwd_ms']:6.2f} "
              f"{b['fwd_ms']:6.2f}+{b['bwd_ms']:6.2f}")
    print(f"total ms: oneDNN {total['onednn']}, native {total['native']}, the faster per layer {best}")
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
