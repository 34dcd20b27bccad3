"""Learning-rate schedules, evaluated per optimizer step: linear warm-up, then step / multistep / cosine /
flat-cosine.

DETR, Deformable DETR, DAB-DETR and DINO all train with one step decay (x0.1 at ``lr_drop``); cosine and
multi-step are what users bring from other detectors; DEIM trains with a flat lr, then a cosine decay. The
schedule is a pure function of the step, so a resumed run needs nothing but the step count to be back on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("step", "multistep", "cosine", "flat-cosine")


@dataclass(frozen=True)
class LRSchedule:
    """The learning-rate factor (multiplied into each group's base lr) at every optimizer step.

    Attributes:
        kind: ``step`` (x ``gamma`` every ``lr_drop`` epochs, PyTorch's StepLR), ``multistep`` (x ``gamma`` at
            each epoch in ``milestones``), ``cosine`` (from 1 down to ``min_lr_ratio`` over the whole run),
            ``flat-cosine`` (DEIM, Huang et al. CVPR 2025, section 4.1 and its FlatCosine scheduler: 1 until epoch
            ``lr_drop``, then a half cosine down to ``gamma`` at epoch ``decay_end``, ``gamma`` after it - the
            epochs without augmentation; its warm-up is quadratic, as DEIM's).
        steps_per_epoch, total_steps: optimizer steps.
        warmup_steps: linear ramp from 1 / warmup_steps to 1 over the first steps (0 = none).
        decay_end: flat-cosine's last epoch of decay (None: the end of training).
    """

    kind: str
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int = 0
    lr_drop: int = 1
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    decay_end: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        epoch = step // max(1, self.steps_per_epoch)
        if self.kind == "flat-cosine":
            return warm**2 * self._flat_cosine(step)
        if self.kind == "step":
            decay = self.gamma ** (epoch // max(1, self.lr_drop))
        elif self.kind == "multistep":
            decay = self.gamma ** sum(epoch >= m for m in self.milestones)
        else:
            progress = min(1.0, step / max(1, self.total_steps))
            decay = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return warm * decay

    def _flat_cosine(self, step: int) -> float:
        per_epoch = max(1, self.steps_per_epoch)
        flat_end = self.lr_drop * per_epoch
        end = self.total_steps if self.decay_end is None else min(self.total_steps, self.decay_end * per_epoch)
        if step < flat_end:
            return 1.0
        if step >= end:
            return self.gamma
        progress = (step - flat_end) / max(1, end - flat_end)
        return self.gamma + (1 - self.gamma) * 0.5 * (1 + math.cos(math.pi * progress))
