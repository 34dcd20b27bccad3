"""Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021, section 4.1, equation 3).

Each query attends to a few sampled points per head and per feature level instead of to every pixel:

    out(q) = sum_h W_h [ sum_l sum_k A(h, q, l, k) * V_h,l( p(q, l, k) ) ]

where p are sampling locations (normalized [0, 1] coordinates of level l's map) and A attention
weights that sum to one over levels x points. V_h,l(p) is read with bilinear interpolation, zero
outside the map, pixel centres at (i + 0.5) / size (``align_corners=False``), which is what the
official CUDA op computes. This module holds the operation itself (the projections around it live
in :mod:`detrkit.layers.deformable`) with one entry point and a backend switch: the fused Triton kernels of
:mod:`detrkit.ops.ms_deform_attn_triton` on CUDA, the ``grid_sample`` reference everywhere else, and the same
bilinear sampling written with gathers (:func:`ms_deform_attn_gather`) for exported graphs that must not hold a
GridSample node (TensorRT builds GridSample engines that give wrong detections; some runtimes lack the op).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "reference", "gather", "triton")


LevelShapes = Tensor | Sequence[tuple[int, int]]  # (levels, 2) tensor or list of (h, w)


def level_shapes(spatial_shapes: LevelShapes) -> list[tuple[int, int]]:
    """(h, w) of each level as Python ints (symbolic ints under torch.export, which keeps them dynamic)."""
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def level_shapes_tensor(shapes: Sequence[tuple[int, int]], like: Tensor) -> Tensor:
    """(levels, 2) (h, w) as a tensor of ``like``'s dtype and device.

    Counted with tensor ops rather than ``torch.tensor(shapes)``: under torch.export a tensor built from the
    sizes would freeze them at the traced image size, and the ONNX graph would accept no other.
    """
    return torch.stack([torch.stack([like.new_ones(h).sum(), like.new_ones(w).sum()]) for h, w in shapes])


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Pure-PyTorch multi-scale deformable attention on ``F.grid_sample``; see :func:`ms_deform_attn`.

    Levels are processed one at a time and accumulated, so the peak extra memory is one level's
    samples (B*heads, head_dim, Lq, points) rather than all levels stacked.
    """
    b, s, heads, head_dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    in_dtype = value.dtype
    if in_dtype in (torch.float16, torch.bfloat16):  # grid_sample in half precision loses too much; accumulate in fp32
        value, sampling_locations, attention_weights = (
            value.float(),
            sampling_locations.float(),
            attention_weights.float(),
        )
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    out = value.new_zeros(b * heads, head_dim, lq)
    for lvl, value_l in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        value_l = value_l.permute(0, 2, 3, 1).reshape(b * heads, head_dim, h, w)  # (B*heads, D, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*heads, Lq, P, 2)
        sampled = F.grid_sample(
            value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B*heads, D, Lq, P)
        weights_l = (
            attention_weights[:, :, :, lvl].transpose(1, 2).reshape(b * heads, 1, lq, points)
        )  # (B*heads, 1, Lq, P)
        out = out + (sampled * weights_l).sum(-1)  # (B*heads, D, Lq)
    out = out.view(b, heads * head_dim, lq).transpose(1, 2)  # (B, Lq, heads*D)
    return out.to(in_dtype)


def ms_deform_attn_gather(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with the bilinear interpolation written out: the four neighbours of each
    sampling point are gathered from the flattened level and weighted explicitly (ONNX Gather / GatherElements and
    arithmetic, no GridSample). Same maths as ``grid_sample(mode="bilinear", padding_mode="zeros",
    align_corners=False)``: pixel centres at (i + 0.5) / size, and a neighbour outside the map reads zero (its
    weight is kept, the value is zero), so points near and beyond the border match the reference exactly.
    """
    b, s, heads, head_dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    in_dtype = value.dtype
    if in_dtype in (torch.float16, torch.bfloat16):  # as the reference: interpolate and accumulate in fp32
        value, sampling_locations, attention_weights = (
            value.float(),
            sampling_locations.float(),
            attention_weights.float(),
        )
    out = value.new_zeros(b * heads, lq * points, head_dim)
    for lvl, value_l in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        value_l = value_l.permute(0, 2, 1, 3).reshape(b * heads * h * w, head_dim)  # (B*heads*h*w, D): one row a pixel
        loc = sampling_locations[:, :, :, lvl].transpose(1, 2).reshape(b * heads, lq * points, 2)  # (B*heads, LqP, 2)
        weight = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(b * heads, lq * points)  # (B*heads, LqP)
        x = loc[..., 0] * w - 0.5  # pixel coordinates, centres at integers (align_corners=False)
        y = loc[..., 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        # the four neighbours, in one gather: (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)
        xs = torch.stack([x0, x0 + 1, x0, x0 + 1], -1)  # (B*heads, LqP, 4)
        ys = torch.stack([y0, y0, y0 + 1, y0 + 1], -1)
        bilinear = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
        inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)  # outside the map: zero padding
        index = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).long()  # (B*heads, LqP, 4) pixel in the map
        index = index + torch.arange(b * heads, device=index.device).view(-1, 1, 1) * (h * w)  # row in value_l
        # whole rows of D channels (ONNX Gather on axis 0), not element-wise indices expanded over the channels
        sampled = value_l.index_select(0, index.flatten()).view(b * heads, lq * points, 4, head_dim)
        corner_weights = bilinear * inside * weight.unsqueeze(-1)  # (B*heads, LqP, 4)
        out = out + (corner_weights.unsqueeze(-2) @ sampled).squeeze(-2)  # (B*heads, LqP, D)
    out = out.view(b, heads, lq, points, head_dim).sum(3)  # (B, heads, Lq, D)
    return out.permute(0, 2, 1, 3).reshape(b, lq, heads * head_dim).to(in_dtype)  # (B, Lq, heads*D)


def ms_deform_attn_discrete(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """RT-DETRv2's discrete sampling (Lv et al. 2024, section 3, "discrete sampling operator"): each point reads one
    pixel, ``floor(x * w + 0.5)`` clamped into the map, instead of interpolating four, so the exported graph needs
    neither GridSample nor bilinear arithmetic. As in the official code, the rounding point is ``x * w + 0.5`` (not
    the pixel centre convention of the bilinear op), and no gradient reaches the sampling locations.
    """
    b, s, heads, head_dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    rows = value.permute(0, 2, 1, 3).reshape(b * heads * s, head_dim)  # (B*heads*S, D): one row a pixel
    index, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        loc = sampling_locations[:, :, :, lvl].detach()  # (B, Lq, heads, points, 2)
        x = (loc[..., 0] * w + 0.5).floor().clamp(0, w - 1)
        y = (loc[..., 1] * h + 0.5).floor().clamp(0, h - 1)
        index.append(start + (y * w + x).long())  # (B, Lq, heads, points): pixel in S
        start += h * w
    index = torch.stack(index, 3).permute(0, 2, 1, 3, 4).reshape(b * heads, lq * levels * points)  # (B*heads, LqLP)
    index = index + torch.arange(b * heads, device=index.device).view(-1, 1) * s  # row in ``rows``
    sampled = rows.index_select(0, index.flatten()).view(b * heads, lq, levels * points, head_dim)
    weight = attention_weights.permute(0, 2, 1, 3, 4).reshape(b * heads, lq, 1, levels * points)
    out = (weight @ sampled).view(b, heads, lq, head_dim)  # (B, heads, Lq, D)
    return out.permute(0, 2, 1, 3).reshape(b, lq, heads * head_dim)  # (B, Lq, heads*D)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention.

    Args:
        value: (B, S, heads, head_dim), the flattened levels one after another (S = sum of h*w).
        spatial_shapes: (levels, 2) int (h, w) of each level.
        level_start_index: (levels,) offset of each level in S: where the Triton kernel reads each level (None:
            computed from ``spatial_shapes``). The reference splits ``value`` by ``spatial_shapes`` instead.
        sampling_locations: (B, Lq, heads, levels, points, 2) normalized (x, y) in [0, 1]; points outside read zeros.
        attention_weights: (B, Lq, heads, levels, points), normally softmaxed over levels x points.
        backend: ``"auto"`` (the fused Triton kernel on CUDA when Triton is installed, the pure-PyTorch reference
            everywhere else, and for any configuration whose kernel failed to compile or launch: warned once),
            ``"reference"`` (``grid_sample``), ``"gather"`` (:func:`ms_deform_attn_gather`: no GridSample in an
            exported graph) or ``"triton"`` (also on CPU under ``TRITON_INTERPRET=1``, for tests; failures raise).
            The environment variable ``DETRKIT_MSDA_BACKEND=reference|gather|triton`` overrides ``"auto"``.

    Returns:
        (B, Lq, heads * head_dim), in the dtype of ``value``.
    """
    backend = _resolve_backend(backend)
    if backend == "triton":  # asked for by name: a failure is the caller's to see
        from detrkit.ops.ms_deform_attn_triton import ms_deform_attn_triton

        return ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights,
                                     level_start_index=level_start_index)
    if backend == "auto" and _auto_uses_triton(value):
        return _triton_or_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if backend == "gather":
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


ENV_BACKEND = "DETRKIT_MSDA_BACKEND"  # reference | gather | triton: overrides "auto" (benchmarks, debugging a GPU run)
# Configurations whose Triton kernel failed to compile or launch -> the error; "auto" uses the reference for them.
TRITON_FAILED: dict[tuple, str] = {}


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown ms_deform_attn backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto" and (env := os.environ.get(ENV_BACKEND)):
        if env not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={env!r} is not a backend; use one of {', '.join(BACKENDS)}")
        return env
    return backend


def _auto_uses_triton(value: Tensor) -> bool:
    return value.is_cuda and _triton_available()


def triton_config(value: Tensor, sampling_locations: Tensor) -> tuple:
    """What a compiled kernel is specialised on: device type, dtype, heads, head_dim, levels, points."""
    return (value.device.type, value.dtype, *value.shape[2:], *sampling_locations.shape[3:5])


def triton_failed(config: tuple, error: BaseException) -> None:
    """Record a configuration whose kernel failed and warn once for it: the run goes on with the reference."""
    if config not in TRITON_FAILED:
        TRITON_FAILED[config] = repr(error)
        warnings.warn(f"the fused Triton kernel of ms_deform_attn failed for {config} ({error!r:.300}); using the "
                      f"PyTorch reference for this configuration (slower, same result). Set {ENV_BACKEND}=reference "
                      f"to silence this, or {ENV_BACKEND}=triton to see the failure.", RuntimeWarning, stacklevel=3)


def _triton_or_reference(value: Tensor, spatial_shapes: LevelShapes, level_start_index: Tensor | None,
                         sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The fused kernel, or the reference for a configuration whose kernel failed to compile or launch (forward here;
    backward through :func:`_reference_gradients`, which the kernel's autograd function calls on a failure)."""
    config = triton_config(value, sampling_locations)
    if config not in TRITON_FAILED:
        from detrkit.ops.ms_deform_attn_triton import ms_deform_attn_triton

        try:
            return ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights,
                                         level_start_index=level_start_index, fallback=_reference_gradients)
        except Exception as error:  # any compile or launch error: Triton raises many kinds
            triton_failed(config, error)
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)


def _reference_gradients(error: BaseException, value: Tensor, spatial_shapes: LevelShapes, sampling_locations: Tensor,
                         attention_weights: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fused backward kernel failed: record it, and return the reference's gradients (autograd through it)."""
    triton_failed(triton_config(value, sampling_locations), error)
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (value, sampling_locations, attention_weights)]
        out = ms_deform_attn_reference(inputs[0], spatial_shapes, inputs[1], inputs[2])
        return torch.autograd.grad(out, inputs, grad_out.reshape(out.shape))


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
