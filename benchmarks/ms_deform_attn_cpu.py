"""CPU cost of the pure-PyTorch multi-scale deformable attention, against HF transformers' own
pure-PyTorch version (the official repo's `ms_deform_attn_core_pytorch`, which stacks every level's
samples before weighting them), at Deformable DETR's encoder configuration of a 640x640 image:
4 levels (strides 8-64: 80x80 ... 10x10, 8500 queries), 8 heads, head dim 32, 4 points.

Each case runs in a fresh process so that its peak resident memory (ru_maxrss) is its own.

    python benchmarks/ms_deform_attn_cpu.py   # prints a table, writes benchmarks/results/ms_deform_attn_vs_hf_cpu.json
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import torch

SHAPES = [(80, 80), (40, 40), (20, 20), (10, 10)]
HEADS, HEAD_DIM, POINTS = 8, 32, 4


def _inputs(batch: int):
    g = torch.Generator().manual_seed(0)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, s, HEADS, HEAD_DIM, generator=g, requires_grad=True)
    ref = torch.rand(batch, s, 1, 1, 1, 2, generator=g)
    offsets = torch.randn(batch, s, HEADS, len(SHAPES), POINTS, 2, generator=g) * 0.02
    loc = (ref + offsets).requires_grad_()  # realistic: reference point + small offsets
    attn = torch.rand(batch, s, HEADS, len(SHAPES), POINTS, generator=g).flatten(-2).softmax(-1)
    attn = attn.view(batch, s, HEADS, len(SHAPES), POINTS).requires_grad_()
    return value, torch.tensor(SHAPES), loc, attn


def _run(impl: str, batch: int, repeats: int, queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    value, shapes, loc, attn = _inputs(batch)
    if impl == "detrkit":
        from detrkit.ops import ms_deform_attn

        fn = lambda: ms_deform_attn(value, shapes, None, loc, attn, backend="reference")  # noqa: E731
    else:
        from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

        hf = MultiScaleDeformableAttention()
        fn = lambda: hf(value, shapes, SHAPES, None, loc, attn, 64)  # noqa: E731  (im2col_step is unused on CPU)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn().sum().backward()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        out.sum().backward()
        times.append((t1 - t0, time.perf_counter() - t0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd = sorted(t[0] for t in times)[len(times) // 2]
    total = sorted(t[1] for t in times)[len(times) // 2]
    queue.put({"impl": impl, "batch": batch, "fwd_ms": 1000 * fwd, "fwd_bwd_ms": 1000 * total,
               "peak_extra_mib": (peak - base) / 1024})


def main(batch: int = 1, repeats: int = 5, out: str = "benchmarks/results/ms_deform_attn_vs_hf_cpu.json") -> list[dict]:
    """Measure both implementations; print a table and write JSON."""
    ctx = mp.get_context("spawn")
    rows = []
    for impl in ("detrkit", "hf_transformers"):
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(impl, batch, repeats, q))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"the {impl} case failed (exit code {p.exitcode}); its traceback is above")
        rows.append(q.get(timeout=10))
    ref = rows[1]
    print(f"ms_deform_attn, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"640x640 encoder config: B={batch}, 8500 queries, 8 heads x 32, 4 levels x 4 points")
    print(f"{'impl':<16} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak MiB':>9} {'speed vs HF':>12} {'memory vs HF':>13}")
    for r in rows:
        r["speedup_vs_hf"] = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        r["memory_ratio_vs_hf"] = r["peak_extra_mib"] / max(ref["peak_extra_mib"], 1e-9)
        print(f"{r['impl']:<16} {r['fwd_ms']:8.1f} {r['fwd_bwd_ms']:11.1f} {r['peak_extra_mib']:9.1f} "
              f"{r['speedup_vs_hf']:11.2f}x {r['memory_ratio_vs_hf']:12.2f}x")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                                     "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
