"""Exponential moving average of the weights (Polyak averaging), evaluated and saved in place of the raw ones.

The averaged weights are smoother than any single step's and usually score higher; DINO's and RT-DETR's
training code keeps such an average. The decay ramps up as ``decay * (1 - exp(-updates / warmup))`` so that
the first updates, when the raw weights move fast, are not averaged with the random initialisation for long.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """``ema = ModelEMA(model)``; after each optimizer step ``ema.update(model)``; evaluate ``ema.module``."""

    def __init__(self, model: nn.Module, decay: float = 0.9997, warmup: int = 2000) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def decay_now(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.warmup)) if self.warmup > 0 else self.decay

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(average's tensor, model's tensor) of each state entry, each storage once (heads shared across layers).
        Built once per model and reused: parameters and buffers are updated in place, so the pairs stay valid."""
        if getattr(self, "_paired", None) is None or self._paired[0] is not model:
            pairs, seen, source = [], set(), model.state_dict()
            for k, v in self.module.state_dict().items():
                if v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    pairs.append((v, source[k].detach()))
            self._paired = (model, pairs)
        return self._paired[1]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_now()
        pairs = self._pairs(model)
        floats = [(e, m) for e, m in pairs if e.dtype.is_floating_point]
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - d)  # ema = d * ema + (1 - d) * m
        for e, m in pairs:
            if not e.dtype.is_floating_point:  # integer buffers (BatchNorm's num_batches_tracked): copy
                e.copy_(m)
