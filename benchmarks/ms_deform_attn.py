"""Multi-scale deformable attention: the fused Triton kernel against the pure-PyTorch reference (eager and under
torch.compile), forward and forward+backward time, peak memory, and effective bandwidth.

Configurations (8 heads, head dim 32, 4 levels of an 800x1333 image at strides 8-64 = 22,223 positions,
4 points): the encoder (every position is a query; batch 2 and 4) and DINO's decoder (900 queries + 200
denoising queries; batch 2 and 4), in float32 and bfloat16. Effective bandwidth counts the bytes the operation
must touch at least once (value, locations, weights, output; gradients of each for backward) over the time,
next to the device's measured copy bandwidth.

    python benchmarks/ms_deform_attn.py              # GPU: all backends
    python benchmarks/ms_deform_attn.py --scale 0.5  # on CPU: the reference backends only, on a half-size image

Prints a table and writes benchmarks/results/ms_deform_attn_<device>.json.
"""

from __future__ import annotations

import argparse

import torch
from inference import device_name, time_call, write_result

from detrkit.ops.ms_deform_attn import ms_deform_attn_reference


def _configs(scale: float) -> list[dict]:
    shapes = [(round(100 * scale), round(167 * scale)), (round(50 * scale), round(84 * scale)),
              (round(25 * scale), round(42 * scale)), (max(1, round(13 * scale)), max(1, round(21 * scale)))]
    s = sum(h * w for h, w in shapes)
    return [dict(name=f"encoder B={b}", batch=b, queries=s, shapes=shapes) for b in (2, 4)] + \
           [dict(name=f"DINO decoder B={b}", batch=b, queries=1100, shapes=shapes) for b in (2, 4)]


def _inputs(cfg: dict, dtype, device, heads=8, head_dim=32, points=4):
    g = torch.Generator(device=device).manual_seed(0)
    b, lq, levels = cfg["batch"], cfg["queries"], len(cfg["shapes"])
    s = sum(h * w for h, w in cfg["shapes"])
    value = torch.randn(b, s, heads, head_dim, device=device, generator=g).to(dtype)
    ref = torch.rand(b, lq, 1, 1, 1, 2, device=device, generator=g)
    loc = (ref + 0.02 * torch.randn(b, lq, heads, levels, points, 2, device=device, generator=g)).to(dtype)
    weights = torch.rand(b, lq, heads, levels * points, device=device, generator=g).softmax(-1)
    weights = weights.view(b, lq, heads, levels, points).to(dtype)
    return value, loc, weights


def _time(fn, device, iters: int) -> tuple[float, float | None]:
    """(median seconds after 2 warm-up calls, peak extra memory MiB on CUDA) of ``fn``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sec, _ = time_call(fn, 2, iters, device)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return sec, peak


def copy_bandwidth(device) -> float | None:
    """GB/s of a large device-to-device copy (read + write), the ceiling of a memory-bound kernel."""
    if device.type != "cuda":
        return None
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    sec, _ = _time(lambda: y.copy_(x), device, 20)
    return 2 * x.numel() / sec / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="image size relative to 800x1333")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--compile", default="true", help="also time the reference under torch.compile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = {"reference": ms_deform_attn_reference}
    if args.compile == "true":
        backends["reference compiled"] = torch.compile(ms_deform_attn_reference, dynamic=False)
    if device.type == "cuda":
        from detrkit.ops.ms_deform_attn_triton import ms_deform_attn_triton

        backends = {"triton": ms_deform_attn_triton, **backends}
    else:
        print("no CUDA device: the Triton kernel is not timed (it runs compiled on CUDA only)")
    bandwidth = copy_bandwidth(device)
    rows = []
    for cfg in _configs(args.scale):
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            value, loc, weights = _inputs(cfg, dtype, device)
            touched = sum(t.numel() * t.element_size() for t in (value, loc, weights))
            touched += cfg["batch"] * cfg["queries"] * value.shape[2] * value.shape[3] * value.element_size()
            base = {}
            for name, fn in backends.items():
                def fwd(fn=fn, inputs=(value, loc, weights), shapes=cfg["shapes"]):
                    with torch.no_grad():
                        fn(inputs[0], shapes, inputs[1], inputs[2])

                leaves = [t.detach().requires_grad_() for t in (value, loc, weights)]

                def fwd_bwd(fn=fn, leaves=leaves, shapes=cfg["shapes"]):
                    fn(leaves[0], shapes, leaves[1], leaves[2]).float().sum().backward()

                t_f, m_f = _time(fwd, device, args.iters)
                t_fb, m_fb = _time(fwd_bwd, device, args.iters)
                base.setdefault("f", t_f)
                base.setdefault("fb", t_fb)
                base.setdefault("m", m_fb)
                row = {"config": cfg["name"], "queries": cfg["queries"], "dtype": str(dtype).split(".")[-1],
                       "backend": name, "fwd_ms": 1000 * t_f, "fwd_bwd_ms": 1000 * t_fb, "fwd_bwd_peak_mib": m_fb,
                       "fwd_GBps": touched / t_f / 1e9, "copy_GBps": bandwidth,
                       "fwd_bwd_speedup_vs_first": base["fb"] / t_fb}
                rows.append(row)
                print(f"{cfg['name']:<18} {row['dtype']:<8} {name:<19} fwd {1000 * t_f:8.2f} ms  fwd+bwd "
                      f"{1000 * t_fb:8.2f} ms" + (f"  peak {m_fb:7.0f} MiB" if m_fb is not None else "")
                      + f"  {touched / t_f / 1e9:6.1f} GB/s" + (f" of {bandwidth:.0f}" if bandwidth else ""))
    where = device_name(device)
    result = {"device": where, "torch": torch.__version__, "scale": args.scale, "rows": rows}
    print(f"device: {where}; results in {write_result(result, 'ms_deform_attn', device, args.out)}")


if __name__ == "__main__":
    main()
