"""Run a peer implementation in float64 for a parity test whose bound reflects the maths, not the CPU's kernels."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class PromoteFloat32(TorchFunctionMode):
    """Run float32 requests as float64, inside ``with PromoteFloat32():``.

    The reference implementations (the official repositories, HF transformers) build some tensors in float32
    whatever the model's dtype: proposal grids, valid ratios and position encodings (``dtype=torch.float32``,
    ``.float()``). Run in float64 as they are, they would carry float32 rounding into a float64 comparison.
    detrkit needs no such help: a float64 model computes in float64 throughout.
    """

    def __enter__(self):
        self._default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # tensors made without a dtype (torch.ones(...), torch.tensor(0.5))
        return super().__enter__()

    def __exit__(self, *exc):
        torch.set_default_dtype(self._default)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        elif func is torch.Tensor.to:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.double() - b.double()).abs().max().item()
