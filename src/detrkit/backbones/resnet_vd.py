"""ResNet-vd ("PResNet"), the backbone of RT-DETR.

ResNet-D (He et al., "Bag of Tricks for Image Classification with Convolutional Neural Networks", CVPR 2019,
section 4.1) changes two things in the ResNet of torchvision: the 7x7 stem becomes three 3x3 convolutions (the
first with stride 2), and a block that downsamples takes its shortcut through a 2x2 average pool followed by a
1x1 convolution, instead of a strided 1x1 convolution that skips three quarters of the pixels. RT-DETR (Zhao et
al. 2024, section 5.1) uses it at depths 18 / 34 / 50 / 101; the official code calls it PResNet and gives the
first block of every stage a projection shortcut, even where the channels do not change (ResNet-18 / 34's first
stage). Module names follow the official code (``conv1.conv1_1``, ``res_layers.i.blocks.j.branch2a``, ``short``),
so its checkpoints load with their own keys.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_WIDTHS = (64, 128, 256, 512)


def conv_norm(ch_in: int, ch_out: int, kernel_size: int, stride: int = 1, *, act: nn.Module | None = None,
              norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    """Convolution (no bias, 'same' padding) -> BatchNorm -> optional activation, named ``conv`` / ``norm`` as in
    the official PResNet (the hybrid encoder has its own, in layers/: backbones and layers do not import each other)."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(ch_in, ch_out, kernel_size, stride, (kernel_size - 1) // 2,
                                                    bias=False),
                                     norm=norm(ch_out), act=act if act is not None else nn.Identity()))


def _shortcut(ch_in: int, ch_out: int, stride: int, norm: type[nn.Module]) -> nn.Module:
    """ResNet-D's shortcut: average-pool then 1x1 conv when the block downsamples, a 1x1 conv otherwise."""
    if stride == 2:
        return nn.Sequential(OrderedDict(pool=nn.AvgPool2d(2, 2, 0, ceil_mode=True),
                                         conv=conv_norm(ch_in, ch_out, 1, 1, norm=norm)))
    return conv_norm(ch_in, ch_out, 1, stride, norm=norm)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18 / 34)."""

    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, project: bool, norm: type[nn.Module]) -> None:
        super().__init__()
        self.short = _shortcut(ch_in, ch_out, stride, norm) if project else nn.Identity()
        self.branch2a = conv_norm(ch_in, ch_out, 3, stride, act=nn.ReLU(), norm=norm)
        self.branch2b = conv_norm(ch_out, ch_out, 3, 1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.branch2b(self.branch2a(x)) + self.short(x))


class BottleNeck(nn.Module):
    """1x1 -> 3x3 (the stride, ResNet-B/D) -> 1x1 with 4x expansion (ResNet-50 / 101)."""

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, project: bool, norm: type[nn.Module]) -> None:
        super().__init__()
        self.short = _shortcut(ch_in, ch_out * 4, stride, norm) if project else nn.Identity()
        self.branch2a = conv_norm(ch_in, ch_out, 1, 1, act=nn.ReLU(), norm=norm)
        self.branch2b = conv_norm(ch_out, ch_out, 3, stride, act=nn.ReLU(), norm=norm)
        self.branch2c = conv_norm(ch_out, ch_out * 4, 1, 1, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.branch2c(self.branch2b(self.branch2a(x))) + self.short(x))


class Blocks(nn.Module):
    """One stage: the first block downsamples (except in the first stage) and projects its shortcut."""

    def __init__(self, block: type[BasicBlock | BottleNeck], ch_in: int, ch_out: int, count: int, stride: int,
                 norm: type[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            self.blocks.append(block(ch_in, ch_out, stride if i == 0 else 1, i == 0, norm))
            ch_in = ch_out * block.expansion

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ResNetVd(nn.Module):
    """ResNet-vd returning the stride-8, 16 and 32 maps (``res3``, ``res4``, ``res5``) with their padding masks.

    Args:
        depth: 18, 34, 50 or 101.
        return_stages: indices of the stages to return (0 = stride 4 ... 3 = stride 32); RT-DETR uses (1, 2, 3).
        norm: ``"frozen"`` (FrozenBatchNorm2d: RT-DETR-R50 / R101, loaded from ImageNet weights) or ``"batch"``
            (trainable BatchNorm2d: RT-DETR-R18 / R34, and training from scratch).
        freeze_at: freeze the stem (0) and the first ``freeze_at`` stages; -1 trains everything (R18 / R34).
        width: multiplies every stage's and the stem's channels (rounded to a multiple of 8); 1.0 is the paper's
            network (and the only width its checkpoints fit), 0.5 a quarter of the compute for training from scratch.
        zero_init_residual: start every block's last BatchNorm at scale 0, so that each residual block begins as
            the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 5.1): for training from
            scratch; pretrained weights overwrite it.
        stem: ``"deep"`` (ResNet-C/D's three 3x3 convolutions, the paper's and its checkpoints') or ``"7x7"`` (the
            original ResNet's one 7x7 convolution with stride 2, He et al. 2016, table 1): the same stride-2 map
            of the same channels at about a fifth of the stem's training time on a CPU, for training from scratch.
    """

    def __init__(self, depth: int = 50, *, return_stages: tuple[int, ...] = (1, 2, 3), norm: str = "frozen",
                 freeze_at: int = -1, width: float = 1.0, zero_init_residual: bool = False,
                 stem: str = "deep") -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"ResNet-vd depth must be one of {sorted(_DEPTHS)}, got {depth}")
        if norm not in ("frozen", "batch"):
            raise ValueError(f"norm must be 'frozen' or 'batch', got {norm!r}")
        if not 0 < width <= 4:
            raise ValueError(f"ResNet-vd width must be in (0, 4], got {width}")
        if stem not in ("deep", "7x7"):
            raise ValueError(f"ResNet-vd stem must be 'deep' (three 3x3 convolutions) or '7x7', got {stem!r}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
        widths = tuple(max(8, round(w * width / 8) * 8) for w in _WIDTHS)
        ch_stem = widths[0]
        if stem == "deep":
            self.conv1 = nn.Sequential(OrderedDict(
                conv1_1=conv_norm(3, ch_stem // 2, 3, 2, act=nn.ReLU(), norm=norm_layer),
                conv1_2=conv_norm(ch_stem // 2, ch_stem // 2, 3, 1, act=nn.ReLU(), norm=norm_layer),
                conv1_3=conv_norm(ch_stem // 2, ch_stem, 3, 1, act=nn.ReLU(), norm=norm_layer),
            ))
        else:
            self.conv1 = nn.Sequential(OrderedDict(conv1_1=conv_norm(3, ch_stem, 7, 2, act=nn.ReLU(),
                                                                     norm=norm_layer)))
        block = BottleNeck if depth >= 50 else BasicBlock
        self.res_layers, ch_in = nn.ModuleList(), ch_stem
        for i, (count, ch_out) in enumerate(zip(_DEPTHS[depth], widths, strict=True)):
            self.res_layers.append(Blocks(block, ch_in, ch_out, count, 1 if i == 0 else 2, norm_layer))
            ch_in = ch_out * block.expansion
        self.return_stages = tuple(return_stages)
        self.channels = {f"res{i + 2}": widths[i] * block.expansion for i in self.return_stages}
        self.strides = {f"res{i + 2}": 2 ** (i + 2) for i in self.return_stages}
        if zero_init_residual:
            if norm != "batch":
                raise ValueError("zero_init_residual needs norm='batch' (trainable BatchNorm, training from scratch)")
            for stage in self.res_layers:
                for blk in stage.blocks:
                    nn.init.zeros_((blk.branch2c if isinstance(blk, BottleNeck) else blk.branch2b).norm.weight)
        if freeze_at >= 0:
            for module in [self.conv1, *self.res_layers[:freeze_at]]:
                module.requires_grad_(False)

    def forward(self, images: Tensor, padding_mask: Tensor | None = None) -> OrderedDict[str, tuple[Tensor, Tensor]]:
        """images (B, 3, H, W) -> {``res3``..``res5``: (features (B, C, h, w), mask (B, h, w))}."""
        x = F.max_pool2d(self.conv1(images), 3, 2, 1)
        out = OrderedDict()
        for i, stage in enumerate(self.res_layers):
            x = stage(x)
            if i in self.return_stages:
                if padding_mask is None:  # RT-DETR's input: no padding, nothing to downsample
                    mask = x.new_zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
                else:
                    mask = F.interpolate(padding_mask[:, None].float(), size=x.shape[-2:])[:, 0].bool()  # (B, h, w)
                out[f"res{i + 2}"] = (x, mask)
        return out
