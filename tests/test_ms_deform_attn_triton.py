"""The fused Triton deformable attention against the pure-PyTorch reference, forward and backward.

On a machine without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): the
same kernel code, executed on the CPU. With a GPU they run compiled, on the GPU.
"""

import importlib

import pytest
import torch

pytest.importorskip("triton")

from detrkit.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference  # noqa: E402
from detrkit.ops.ms_deform_attn_triton import ms_deform_attn_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shapes, batch, heads, head_dim, queries, points, locations, dtype, seed=0):
    """value (B, S, heads, D), locations (B, Lq, heads, L, P, 2), weights softmaxed over L x P."""
    g = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=g, dtype=torch.float64)
    if locations == "realistic":  # a reference point per query plus offsets of a few pixels of each level
        ref = torch.rand(batch, queries, 1, 1, 1, 2, generator=g, dtype=torch.float64)
        sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)[None, None, None, :, None, :]
        loc = ref + torch.randn(batch, queries, heads, levels, points, 2, generator=g, dtype=torch.float64) * 2 / sizes
    elif locations == "uniform":
        loc = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=torch.float64)
    else:  # borders and beyond: exactly 0 and 1, half a pixel out, far out, on pixel centres
        choices = torch.tensor([0.0, 1.0, -0.01, 1.01, -0.7, 1.9, 0.5, 1e-9, 1 - 1e-9], dtype=torch.float64)
        loc = choices[torch.randint(len(choices), (batch, queries, heads, levels, points, 2), generator=g)]
    weights = torch.randn(batch, queries, heads, levels * points, generator=g, dtype=torch.float64).softmax(-1)
    weights = weights.view(batch, queries, heads, levels, points)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (value, loc, weights)]


CASES = [  # shapes, batch, heads, head_dim, queries, points, locations
    ([(9, 11), (5, 6), (3, 3), (2, 2)], 2, 2, 32, 13, 4, "realistic"),
    ([(9, 11), (5, 6), (3, 3), (2, 2)], 1, 2, 32, 9, 4, "uniform"),
    ([(7, 5), (4, 3)], 2, 3, 64, 6, 2, "borders"),
    ([(8, 8)], 1, 1, 24, 5, 1, "uniform"),  # one level, one point, head_dim not a power of two
    ([(6, 7), (3, 4), (2, 2)], 1, 2, 32, 70, 3, "realistic"),  # more queries than one block
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[6]}-L{len(c[0])}-P{c[5]}-D{c[3]}" for c in CASES])
def test_float64_forward_and_backward_equal_the_reference(case):
    shapes, batch, heads, head_dim, queries, points, locations = case
    value, loc, weights = _inputs(shapes, batch, heads, head_dim, queries, points, locations, torch.float64)
    out = ms_deform_attn_triton(value, shapes, loc, weights, block_q=16)
    ref = ms_deform_attn_reference(value, shapes, loc, weights)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (value, loc, weights), grad)
    want = torch.autograd.grad(ref, (value, loc, weights), grad)
    for name, g, w in zip(("value", "locations", "weights"), got, want, strict=False):
        if locations == "borders" and name == "locations":
            # exactly on integer pixel positions the bilinear weights have a kink: grid_sample and the kernel
            # pick different one-sided derivatives there; compare away from those points
            pixel = loc.detach() * torch.tensor([[w_, h_] for h_, w_ in shapes], dtype=loc.dtype,
                                                device=loc.device)[None, None, None, :, None, :] - 0.5
            smooth = (pixel - pixel.round()).abs() > 1e-6
            g, w = g[smooth], w[smooth]
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    """The kernel's error stays within float32 accumulation of its terms plus one rounding to the input dtype
    (compared with float64 on the same rounded inputs): half-precision inputs are not summed in half precision."""
    shapes = [(9, 11), (5, 6), (3, 3)]
    value, loc, weights = _inputs(shapes, 2, 2, 32, 11, 4, "realistic", dtype)
    out = ms_deform_attn_triton(value, shapes, loc, weights, block_q=16)
    assert out.dtype == dtype
    exact_inputs = [t.detach().double().requires_grad_() for t in (value, loc, weights)]  # the same rounded inputs
    exact = ms_deform_attn_reference(exact_inputs[0], shapes, *exact_inputs[1:])
    terms = len(shapes) * 4 * 4  # levels x points x bilinear corners
    bound = torch.finfo(dtype).eps + terms * torch.finfo(torch.float32).eps  # relative to the largest magnitude
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=bound * exact.abs().max().item())
    grads = torch.autograd.grad(out, (value, loc, weights), torch.ones_like(out))
    exact_grads = torch.autograd.grad(exact, exact_inputs, torch.ones_like(exact))
    for name, g, w in zip(("value", "locations", "weights"), grads, exact_grads, strict=False):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=0, atol=2 * bound * w.abs().max().item(), msg=name)


def test_backend_switch():
    shapes = [(5, 6), (3, 3)]
    value, loc, weights = _inputs(shapes, 1, 2, 32, 4, 2, "uniform", torch.float64)
    start = torch.tensor([0, 30])
    ref = ms_deform_attn(value, shapes, start, loc, weights, backend="reference")
    torch.testing.assert_close(ms_deform_attn(value, shapes, start, loc, weights, backend="triton"), ref)
    with pytest.raises(ValueError, match="unknown ms_deform_attn backend 'cuda'"):
        ms_deform_attn(value, shapes, start, loc, weights, backend="cuda")


def test_the_kernel_reads_each_level_at_level_start_index():
    shapes = [(5, 6), (3, 3), (2, 2)]
    value, loc, weights = _inputs(shapes, 1, 2, 32, 4, 2, "uniform", torch.float64)
    ref = ms_deform_attn_reference(value, shapes, loc, weights)
    starts = torch.tensor([0, 30, 39])
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, weights, backend="triton"), ref)
    # negative control: offsets that point the second level one row early read other values
    shifted = ms_deform_attn(value, shapes, torch.tensor([0, 24, 39]), loc, weights, backend="triton")
    assert (shifted - ref).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_backend_is_the_kernel_on_cuda_and_models_agree():
    """On CUDA the deformable models run the kernel; a whole DINO forward matches the reference backend."""
    from unittest import mock

    from conftest import TINY

    from detrkit import create_model

    model = create_model("dino_lite", num_classes=3, **TINY).cuda().eval()
    images = torch.randn(2, 3, 128, 160, device="cuda")
    with mock.patch("detrkit.ops.ms_deform_attn_triton.ms_deform_attn_triton", wraps=ms_deform_attn_triton) as spy:
        out = model(images)
    assert spy.call_count > 0
    with mock.patch("detrkit.ops.ms_deform_attn._triton_available", return_value=False):
        ref = model(images)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, rtol=1e-4, atol=1e-4)


@pytest.fixture
def fresh_failures(monkeypatch):
    """An empty record of failed configurations, and "auto" picking the kernel on this device (as on CUDA)."""
    msda = importlib.import_module("detrkit.ops.ms_deform_attn")  # the module (the package exports the function)
    saved = dict(msda.TRITON_FAILED)
    msda.TRITON_FAILED.clear()
    monkeypatch.setattr(msda, "_auto_uses_triton", lambda value: True)
    monkeypatch.delenv(msda.ENV_BACKEND, raising=False)
    yield msda
    msda.TRITON_FAILED.clear()
    msda.TRITON_FAILED.update(saved)


def _broken(*args, **kwargs):
    raise RuntimeError("simulated Triton compile failure")


def test_a_kernel_that_fails_to_compile_falls_back_to_the_reference_with_one_warning(fresh_failures, monkeypatch):
    import detrkit.ops.ms_deform_attn_triton as mst

    shapes = [(6, 7), (3, 4)]
    value, loc, weights = _inputs(shapes, 1, 2, 16, 5, 2, "realistic", torch.float64)
    want = ms_deform_attn_reference(value, shapes, loc, weights)
    torch.testing.assert_close(ms_deform_attn(value, shapes, None, loc, weights), want, rtol=1e-12, atol=1e-12)
    assert not fresh_failures.TRITON_FAILED  # the kernel works here; now break its launch
    monkeypatch.setattr(mst._MSDeformAttnFunction, "apply", _broken)
    with pytest.warns(RuntimeWarning, match="failed for .*using the PyTorch reference"):
        got = ms_deform_attn(value, shapes, None, loc, weights)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(fresh_failures.TRITON_FAILED) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per configuration: the second call is silent
        ms_deform_attn(value, shapes, None, loc, weights)
    with pytest.raises(RuntimeError, match="simulated"):  # asked for by name, a failure is not hidden
        ms_deform_attn(value, shapes, None, loc, weights, backend="triton")


def test_a_backward_kernel_that_fails_falls_back_to_the_reference_gradients(fresh_failures, monkeypatch):
    import detrkit.ops.ms_deform_attn_triton as mst

    shapes = [(6, 7), (3, 4)]
    value, loc, weights = _inputs(shapes, 1, 2, 16, 5, 2, "realistic", torch.float64)
    grad = torch.randn(1, 5, 32, dtype=torch.float64)
    want = torch.autograd.grad(ms_deform_attn_reference(value, shapes, loc, weights), (value, loc, weights), grad)
    monkeypatch.setattr(mst, "_triton_backward", _broken)
    out = ms_deform_attn(value, shapes, None, loc, weights)  # the forward kernel works
    with pytest.warns(RuntimeWarning, match="using the PyTorch reference"):
        got = torch.autograd.grad(out, (value, loc, weights), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_environment_variable_overrides_auto(fresh_failures, monkeypatch):
    import detrkit.ops.ms_deform_attn_triton as mst

    shapes = [(6, 7)]
    value, loc, weights = _inputs(shapes, 1, 2, 16, 5, 2, "uniform", torch.float64)
    monkeypatch.setattr(mst._MSDeformAttnFunction, "apply", _broken)
    monkeypatch.setenv(fresh_failures.ENV_BACKEND, "reference")
    ms_deform_attn(value, shapes, None, loc, weights)  # the reference: the broken kernel is never tried
    assert not fresh_failures.TRITON_FAILED
    monkeypatch.setenv(fresh_failures.ENV_BACKEND, "triton")
    with pytest.raises(RuntimeError, match="simulated"):
        ms_deform_attn(value, shapes, None, loc, weights)
    monkeypatch.setenv(fresh_failures.ENV_BACKEND, "cuda")
    with pytest.raises(ValueError, match="DETRKIT_MSDA_BACKEND='cuda' is not a backend"):
        ms_deform_attn(value, shapes, None, loc, weights)
