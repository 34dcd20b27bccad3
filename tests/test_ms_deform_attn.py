import math

import pytest
import torch

from detrkit.ops import ms_deform_attn

SHAPES = [(6, 8), (3, 4), (1, 2)]


def _naive(value, shapes, loc, attn):
    """Per-sample bilinear interpolation written out: pixel centres at (i + 0.5) / size, zeros outside."""
    b, s, heads, d = value.shape
    _, lq, _, levels, points, _ = loc.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b, lq, heads, d, dtype=value.dtype)

    def pixel(bi, lvl, y, x, hi):
        h, w = shapes[lvl]
        if 0 <= y < h and 0 <= x < w:
            return value[bi, starts[lvl] + y * w + x, hi]
        return torch.zeros(d, dtype=value.dtype)

    for bi in range(b):
        for q in range(lq):
            for hi in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(points):
                        x = loc[bi, q, hi, lvl, p, 0].item() * w - 0.5
                        y = loc[bi, q, hi, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        v = (
                            (1 - fx) * (1 - fy) * pixel(bi, lvl, y0, x0, hi)
                            + fx * (1 - fy) * pixel(bi, lvl, y0, x0 + 1, hi)
                            + (1 - fx) * fy * pixel(bi, lvl, y0 + 1, x0, hi)
                            + fx * fy * pixel(bi, lvl, y0 + 1, x0 + 1, hi)
                        )
                        out[bi, q, hi] += attn[bi, q, hi, lvl, p] * v
    return out.flatten(2)


def _inputs(b=2, lq=5, heads=2, d=3, points=2, dtype=torch.float64, spread=(-0.2, 1.2)):
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, heads, d, dtype=dtype)
    loc = torch.empty(b, lq, heads, len(SHAPES), points, 2, dtype=dtype).uniform_(*spread)
    attn = torch.rand(b, lq, heads, len(SHAPES), points, dtype=dtype)
    attn = (attn.flatten(-2).softmax(-1)).view_as(attn)
    return value, torch.tensor(SHAPES), loc, attn


CPU_BACKENDS = ["reference", "gather"]  # grid_sample, and the same bilinear sampling by gathers (export)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_naive_loop_float64_including_outside_points(backend):
    value, shapes, loc, attn = _inputs()
    expected = _naive(value, SHAPES, loc, attn)
    torch.testing.assert_close(ms_deform_attn(value, shapes, None, loc, attn, backend=backend), expected, atol=1e-10,
                               rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_borders_and_far_outside(backend):
    value, shapes, loc, attn = _inputs(spread=(0, 1))
    loc[..., 0, :, :] = 0.0  # the top-left corner of every map: a quarter of the corner pixel
    loc[..., 1, :, :] = 1.0  # bottom-right corner
    loc[:, 0] = 5.0  # query 0 looks far outside: reads zeros
    loc[:, 1, :, :, :, 0] = -0.5 / 8  # query 1: half a pixel left of level 0's edge (x = -1 exactly)
    out = ms_deform_attn(value, shapes, None, loc, attn, backend=backend)
    torch.testing.assert_close(out, _naive(value, SHAPES, loc, attn), atol=1e-10, rtol=1e-10)
    assert out[:, 0].abs().max() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_value_locations_weights(backend):
    value, shapes, loc, attn = _inputs(b=1, lq=3, heads=2, d=2, points=2, spread=(0.05, 0.95))
    value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, lo, a: ms_deform_attn(v, shapes, None, lo, a, backend=backend),
                                    (value, loc, attn))


def test_gather_gradients_equal_grid_sample_gradients():
    value, shapes, loc, attn = _inputs(b=2, lq=7, heads=2, d=4, points=3, spread=(-0.1, 1.1))
    grads = []
    for backend in CPU_BACKENDS:
        inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = ms_deform_attn(inputs[0], shapes, None, inputs[1], inputs[2], backend=backend)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), inputs))
    for ref, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_levels_of_very_different_sizes(backend):
    shapes = [(64, 80), (1, 1)]
    value = torch.randn(1, 64 * 80 + 1, 1, 4, dtype=torch.float64)
    loc = torch.rand(1, 3, 1, 2, 2, 2, dtype=torch.float64)
    attn = torch.full((1, 3, 1, 2, 2), 0.25, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, None, loc, attn, backend=backend)
    torch.testing.assert_close(out, _naive(value, shapes, loc, attn), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, backend):
    value, shapes, loc, attn = _inputs(dtype=torch.float32, spread=(0, 1))
    ref = ms_deform_attn(value, shapes, None, loc, attn)
    out = ms_deform_attn(value.to(dtype), shapes, None, loc.to(dtype), attn.to(dtype), backend=backend)
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_unknown_backend_is_refused():
    value, shapes, loc, attn = _inputs()
    with pytest.raises(ValueError, match="unknown ms_deform_attn backend"):
        ms_deform_attn(value, shapes, None, loc, attn, backend="cuda_ext")
