"""Multi-scale deformable attention as fused Triton kernels (forward and backward), no compile step.

The same computation as :func:`detrkit.ops.ms_deform_attn.ms_deform_attn_reference` (Deformable DETR,
section 4.1, equation 3: bilinear samples of each head's value map at a few points per level, weighted by
the attention weights and summed), but each query's samples are read straight from ``value`` and
accumulated in registers (float32 whatever the input dtype; float64 inputs in float64, for tests), so nothing
of size (B, heads, D, Lq, points) is ever materialised: the reference's ``grid_sample`` writes and re-reads
all of them (and keeps them for backward).

One program handles ``BLOCK_Q`` queries of one (image, head): for each level and point it loads the four
neighbouring value rows (head_dim contiguous elements each), weights them bilinearly (pixel centres at
(i + 0.5) / size, zeros outside the map: ``grid_sample(align_corners=False, padding_mode="zeros")``, what
the official CUDA op computes) and by the attention weight, in float32 whatever the input dtype.
Backward recomputes the samples instead of storing them: value gradients are scattered with float32
atomics; location and weight gradients are reductions over head_dim, written once per point.

Triton runs these on CUDA devices; on a CPU the tests run them through Triton's interpreter
(``TRITON_INTERPRET=1``), which is slow but checks the same code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _corner(value_ptr, row_base, xi, yi, w_l, h_l, start, H: tl.constexpr, D: tl.constexpr, d, qmask, dmask,
            ACC: tl.constexpr):
    """Value rows (BLOCK_Q, BLOCK_D) at integer pixel (xi, yi) of one level, zeros outside; and the validity mask."""
    valid = qmask & (xi >= 0) & (xi < w_l) & (yi >= 0) & (yi < h_l)
    s = start + yi * w_l + xi  # position in the flattened levels
    offs = (row_base + s.to(tl.int64) * H) * D  # row of (b, s, h) in value (B, S, H, D)
    v = tl.load(value_ptr + offs[:, None] + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
    return v.to(ACC), valid, offs


@triton.jit
def _program(Lq, S, H: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's queries (BLOCK_Q of one image) and head: query and channel indices with their masks, the
    (b, ., h) row offset into value and the (b, q, h) rows of locations / weights / output."""
    pid, h = tl.program_id(0), tl.program_id(1)
    blocks = tl.cdiv(Lq, BLOCK_Q)
    b, qb = pid // blocks, pid % blocks
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    row_base = b.to(tl.int64) * S * H + h  # value row index = (b * S + s) * H + h
    qh = (b.to(tl.int64) * Lq + q) * H + h  # (b, q, h) index into locations / weights / output
    return q, q < Lq, d, d < D, row_base, qh


@triton.jit
def _point(value_ptr, loc_ptr, attn_ptr, idx, row_base, lvl, shapes_ptr, starts_ptr, H: tl.constexpr,
           D: tl.constexpr, d, qmask, dmask, ACC: tl.constexpr):
    """One sampling point of every query: its attention weight, the fractional position (fx, fy) between its four
    neighbouring pixels, and those pixels' value rows, validity masks and offsets (00, 01 = x+1, 10 = y+1, 11)."""
    h_l = tl.load(shapes_ptr + 2 * lvl)
    w_l = tl.load(shapes_ptr + 2 * lvl + 1)
    start = tl.load(starts_ptr + lvl)
    a = tl.load(attn_ptr + idx, mask=qmask, other=0.0).to(ACC)
    x = tl.load(loc_ptr + 2 * idx, mask=qmask, other=0.0).to(ACC) * w_l - 0.5  # pixel centres at i + 0.5
    y = tl.load(loc_ptr + 2 * idx + 1, mask=qmask, other=0.0).to(ACC) * h_l - 0.5
    x0f, y0f = tl.floor(x), tl.floor(y)
    x0, y0 = x0f.to(tl.int32), y0f.to(tl.int32)
    v00, m00, o00 = _corner(value_ptr, row_base, x0, y0, w_l, h_l, start, H, D, d, qmask, dmask, ACC)
    v01, m01, o01 = _corner(value_ptr, row_base, x0 + 1, y0, w_l, h_l, start, H, D, d, qmask, dmask, ACC)
    v10, m10, o10 = _corner(value_ptr, row_base, x0, y0 + 1, w_l, h_l, start, H, D, d, qmask, dmask, ACC)
    v11, m11, o11 = _corner(value_ptr, row_base, x0 + 1, y0 + 1, w_l, h_l, start, H, D, d, qmask, dmask, ACC)
    return a, x - x0f, y - y0f, v00, v01, v10, v11, m00, m01, m10, m11, o00, o01, o10, o11


@triton.jit
def _ms_deform_attn_fwd(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr, Lq, S,
                        H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    q, qmask, d, dmask, row_base, qh = _program(Lq, S, H, D, BLOCK_Q, BLOCK_D)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for lvl in tl.static_range(L):
        for pt in tl.static_range(P):
            idx = (qh * L + lvl) * P + pt  # (b, q, h, l, p)
            a, fx, fy, v00, v01, v10, v11, _, _, _, _, _, _, _, _ = _point(
                value_ptr, loc_ptr, attn_ptr, idx, row_base, lvl, shapes_ptr, starts_ptr, H, D, d, qmask, dmask, ACC)
            sample = (v00 * ((1 - fx) * (1 - fy))[:, None] + v01 * (fx * (1 - fy))[:, None]
                      + v10 * ((1 - fx) * fy)[:, None] + v11 * (fx * fy)[:, None])  # (BLOCK_Q, BLOCK_D)
            acc += a[:, None] * sample
    tl.store(out_ptr + qh[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=qmask[:, None] & dmask[None, :])


@triton.jit
def _scatter(grad_value_ptr, offs, valid, d, dmask, contribution):
    tl.atomic_add(grad_value_ptr + offs[:, None] + d[None, :], contribution, mask=valid[:, None] & dmask[None, :])


@triton.jit
def _ms_deform_attn_bwd(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                        grad_value_ptr, grad_loc_ptr, grad_attn_ptr, Lq, S,
                        H: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    q, qmask, d, dmask, row_base, qh = _program(Lq, S, H, D, BLOCK_Q, BLOCK_D)
    g = tl.load(grad_out_ptr + qh[:, None] * D + d[None, :], mask=qmask[:, None] & dmask[None, :],
                other=0.0).to(ACC)  # (BLOCK_Q, BLOCK_D)
    for lvl in tl.static_range(L):
        h_l = tl.load(shapes_ptr + 2 * lvl)
        w_l = tl.load(shapes_ptr + 2 * lvl + 1)
        for pt in tl.static_range(P):
            idx = (qh * L + lvl) * P + pt
            a, fx, fy, v00, v01, v10, v11, m00, m01, m10, m11, o00, o01, o10, o11 = _point(
                value_ptr, loc_ptr, attn_ptr, idx, row_base, lvl, shapes_ptr, starts_ptr, H, D, d, qmask, dmask, ACC)
            # <grad_out, corner value> per query: the sample's gradient w.r.t. each bilinear weight
            g00, g01 = tl.sum(g * v00, axis=1), tl.sum(g * v01, axis=1)
            g10, g11 = tl.sum(g * v10, axis=1), tl.sum(g * v11, axis=1)
            w00, w01, w10, w11 = (1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy
            tl.store(grad_attn_ptr + idx, w00 * g00 + w01 * g01 + w10 * g10 + w11 * g11, mask=qmask)
            # d(sample)/dx and /dy through the bilinear weights; x = loc_x * w - 0.5, so d/d loc_x = w * d/dx
            gx = ((1 - fy) * (g01 - g00) + fy * (g11 - g10)) * a * w_l
            gy = ((1 - fx) * (g10 - g00) + fx * (g11 - g01)) * a * h_l
            tl.store(grad_loc_ptr + 2 * idx, gx, mask=qmask)
            tl.store(grad_loc_ptr + 2 * idx + 1, gy, mask=qmask)
            _scatter(grad_value_ptr, o00, m00, d, dmask, g * (a * w00)[:, None])
            _scatter(grad_value_ptr, o01, m01, d, dmask, g * (a * w01)[:, None])
            _scatter(grad_value_ptr, o10, m10, d, dmask, g * (a * w10)[:, None])
            _scatter(grad_value_ptr, o11, m11, d, dmask, g * (a * w11)[:, None])


def _launch_args(value: Tensor, sampling_locations: Tensor, block_q: int):
    b, s, heads, head_dim = value.shape
    lq, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    grid = (b * triton.cdiv(lq, block_q), heads)
    consts = dict(H=heads, D=head_dim, L=levels, P=points, BLOCK_Q=block_q, BLOCK_D=triton.next_power_of_2(head_dim),
                  ACC=tl.float64 if value.dtype == torch.float64 else tl.float32)  # fp32 for fp32 / bf16 / fp16
    return grid, lq, s, consts


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, shapes, starts, sampling_locations, attention_weights, block_q, fallback):
        value, sampling_locations, attention_weights = (
            t.contiguous() for t in (value, sampling_locations, attention_weights)
        )
        grid, lq, s, consts = _launch_args(value, sampling_locations, block_q)
        out = value.new_empty(value.shape[0], lq, value.shape[2], value.shape[3])  # (B, Lq, heads, D)
        _ms_deform_attn_fwd[grid](value, shapes, starts, sampling_locations, attention_weights, out, lq, s, **consts)
        ctx.save_for_backward(value, shapes, starts, sampling_locations, attention_weights)
        ctx.block_q, ctx.fallback = block_q, fallback
        return out.flatten(2)  # (B, Lq, heads * D)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.fallback is None:
            return _triton_backward(ctx, grad_out)
        try:
            return _triton_backward(ctx, grad_out)
        except Exception as error:  # the backward kernel compiles on its first use
            value, shapes, _, sampling_locations, attention_weights = ctx.saved_tensors
            grads = ctx.fallback(error, value, shapes.tolist(), sampling_locations, attention_weights, grad_out)
            return grads[0], None, None, grads[1], grads[2], None, None


def _triton_backward(ctx, grad_out):
    value, shapes, starts, sampling_locations, attention_weights = ctx.saved_tensors
    grid, lq, s, consts = _launch_args(value, sampling_locations, ctx.block_q)
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32  # half-precision atomics lose too much
    grad_value = torch.zeros(value.shape, dtype=acc, device=value.device)
    grad_loc = torch.empty(sampling_locations.shape, dtype=acc, device=value.device)
    grad_attn = torch.empty(attention_weights.shape, dtype=acc, device=value.device)
    _ms_deform_attn_bwd[grid](value, shapes, starts, sampling_locations, attention_weights, grad_out.contiguous(),
                              grad_value, grad_loc, grad_attn, lq, s, **consts)
    return (grad_value.to(value.dtype), None, None, grad_loc.to(sampling_locations.dtype),
            grad_attn.to(attention_weights.dtype), None, None)


def ms_deform_attn_triton(value: Tensor, spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor,
                          *, level_start_index: Tensor | None = None, block_q: int = 64,
                          fallback: Callable | None = None) -> Tensor:
    """Fused multi-scale deformable attention; arguments and result as :func:`~detrkit.ops.ms_deform_attn`.

    ``level_start_index``: (levels,) offset of each level in the flattened ``value``, which the kernel reads its
    samples at; None computes it from ``spatial_shapes`` (once per image size).

    ``fallback``: called as ``fallback(error, value, shapes, sampling_locations, attention_weights, grad_out)`` when
    the backward kernel fails to compile or launch, it returns the three gradients instead (``ms_deform_attn``'s
    "auto" passes the reference's; without it the failure is raised).
    """
    shapes = tuple((int(h), int(w)) for h, w in (spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor)
                                                 else spatial_shapes))
    shapes_t, starts = _level_tables(shapes, value.device)
    if level_start_index is not None:
        starts = level_start_index.to(device=value.device, dtype=torch.int32)
    return _MSDeformAttnFunction.apply(value, shapes_t, starts, sampling_locations, attention_weights, block_q,
                                       fallback)


@functools.lru_cache(maxsize=64)
def _level_tables(shapes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(levels, 2) int32 (h, w) and (levels,) int32 start offsets on ``device``, made once per image size
    (every attention layer of a forward reuses them instead of copying them to the device again)."""
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    return (torch.tensor(shapes, dtype=torch.int32, device=device),
            torch.tensor(starts, dtype=torch.int32, device=device))
