"""HGNetv2 (PP-HGNetV2, PaddleClas), the backbone of D-FINE and DEIM.

A GPU-friendly CNN of "HG blocks": each block runs ``layer_num`` convolutions one after another (plain 3x3, or in
the deeper stages a "light" 1x1 then depthwise kxk) and concatenates the input with every intermediate output,
then aggregates them with a 1x1 squeeze to half the output width and a 1x1 excitation to the full width (an
aggregation in the manner of VoVNet's one-shot aggregation). A stage downsamples with a depthwise 3x3 stride-2
convolution; blocks after the first are residual. The stem halves the resolution twice, with a 2x2-conv branch
beside a 2x2 max pool. The light presets (D-FINE N / S / M) add a learnable scale and bias after each activation
(``use_lab``, PP-LCNetV3's learnable affine block). D-FINE (Peng et al., ICLR 2025, section 5.1) uses B0 (N, S),
B2 (M), B4 (L) and B5 (X), stages 2-4 (strides 8, 16, 32) as the feature pyramid.

Module names follow D-FINE's code (``stem.stem1``, ``stages.i.blocks.j.layers.k``, ``aggregation``, ``conv`` /
``bn`` / ``lab``), so its checkpoints load with their own keys.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

# name: (stem channels in / mid / out, stages: in, mid, out, blocks, downsample, light, kernel, layers per block)
ARCHS: dict[str, tuple[tuple[int, int, int], tuple[tuple, ...]]] = {
    "B0": ((3, 16, 16), ((16, 16, 64, 1, False, False, 3, 3), (64, 32, 256, 1, True, False, 3, 3),
                         (256, 64, 512, 2, True, True, 5, 3), (512, 128, 1024, 1, True, True, 5, 3))),
    "B1": ((3, 24, 32), ((32, 32, 64, 1, False, False, 3, 3), (64, 48, 256, 1, True, False, 3, 3),
                         (256, 96, 512, 2, True, True, 5, 3), (512, 192, 1024, 1, True, True, 5, 3))),
    "B2": ((3, 24, 32), ((32, 32, 96, 1, False, False, 3, 4), (96, 64, 384, 1, True, False, 3, 4),
                         (384, 128, 768, 3, True, True, 5, 4), (768, 256, 1536, 1, True, True, 5, 4))),
    "B3": ((3, 24, 32), ((32, 32, 128, 1, False, False, 3, 5), (128, 64, 512, 1, True, False, 3, 5),
                         (512, 128, 1024, 3, True, True, 5, 5), (1024, 256, 2048, 1, True, True, 5, 5))),
    "B4": ((3, 32, 48), ((48, 48, 128, 1, False, False, 3, 6), (128, 96, 512, 1, True, False, 3, 6),
                         (512, 192, 1024, 3, True, True, 5, 6), (1024, 384, 2048, 1, True, True, 5, 6))),
    "B5": ((3, 32, 64), ((64, 64, 128, 1, False, False, 3, 6), (128, 128, 512, 2, True, False, 3, 6),
                         (512, 256, 1024, 5, True, True, 5, 6), (1024, 512, 2048, 2, True, True, 5, 6))),
}


class LearnableAffine(nn.Module):
    """``scale * x + bias`` with two learned scalars (PP-LCNetV3's learnable affine block)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """Conv (no bias, 'same' padding for odd kernels) -> BatchNorm -> ReLU (optional) -> learnable affine
    (``use_lab``, only after an activation)."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int = 1, groups: int = 1, *,
                 act: bool = True, use_lab: bool = False, norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups,
                              bias=False)
        self.bn = norm(ch_out)
        self.act = nn.ReLU() if act else nn.Identity()
        self.lab = LearnableAffine() if act and use_lab else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.lab(self.act(self.bn(self.conv(x))))


class LightConvBNAct(nn.Module):
    """A 1x1 conv without activation, then a depthwise kxk conv with one: a light stand-in for a dense kxk conv."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, *, use_lab: bool, norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(ch_in, ch_out, 1, act=False, use_lab=use_lab, norm=norm)
        self.conv2 = ConvBNAct(ch_out, ch_out, kernel_size, groups=ch_out, use_lab=use_lab, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    """3x3 stride 2; then a 2x2-conv pair beside a 2x2 max pool (each on the input padded right and bottom by one
    pixel), concatenated; 3x3 stride 2; 1x1. Stride 4 in all."""

    def __init__(self, ch_in: int, mid: int, ch_out: int, *, use_lab: bool, norm: type[nn.Module]) -> None:
        super().__init__()
        kw = dict(use_lab=use_lab, norm=norm)
        self.stem1 = ConvBNAct(ch_in, mid, 3, 2, **kw)
        self.stem2a = ConvBNAct(mid, mid // 2, 2, **kw)
        self.stem2b = ConvBNAct(mid // 2, mid, 2, **kw)
        self.stem3 = ConvBNAct(mid * 2, mid, 3, 2, **kw)
        self.stem4 = ConvBNAct(mid, ch_out, 1, **kw)
        self.pool = nn.MaxPool2d(2, 1, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(self.stem1(x), (0, 1, 0, 1))  # 2x2 kernels keep the size on a map padded by one
        branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        return self.stem4(self.stem3(torch.cat([self.pool(x), branch], 1)))


class HGBlock(nn.Module):
    """``layer_num`` convolutions in sequence; the input and every output concatenated, squeezed (1x1 to
    ``ch_out / 2``) and excited (1x1 to ``ch_out``); residual when the shapes allow (every block but a stage's
    first)."""

    def __init__(self, ch_in: int, mid: int, ch_out: int, layer_num: int, kernel_size: int, *, residual: bool,
                 light: bool, use_lab: bool, norm: type[nn.Module]) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList(
            LightConvBNAct(ch_in if i == 0 else mid, mid, kernel_size, use_lab=use_lab, norm=norm) if light
            else ConvBNAct(ch_in if i == 0 else mid, mid, kernel_size, use_lab=use_lab, norm=norm)
            for i in range(layer_num))
        total = ch_in + layer_num * mid
        self.aggregation = nn.Sequential(ConvBNAct(total, ch_out // 2, 1, use_lab=use_lab, norm=norm),
                                         ConvBNAct(ch_out // 2, ch_out, 1, use_lab=use_lab, norm=norm))

    def forward(self, x: Tensor) -> Tensor:
        outs = [x]
        for layer in self.layers:
            outs.append(layer(outs[-1]))
        y = self.aggregation(torch.cat(outs, 1))
        return y + x if self.residual else y


class HGStage(nn.Module):
    """An optional depthwise 3x3 stride-2 downsampling (no activation), then ``blocks`` HG blocks."""

    def __init__(self, ch_in: int, mid: int, ch_out: int, blocks: int, downsample: bool, light: bool,
                 kernel_size: int, layer_num: int, *, use_lab: bool, norm: type[nn.Module]) -> None:
        super().__init__()
        self.downsample = (ConvBNAct(ch_in, ch_in, 3, 2, groups=ch_in, act=False, norm=norm) if downsample
                           else nn.Identity())
        self.blocks = nn.Sequential(*[HGBlock(ch_in if i == 0 else ch_out, mid, ch_out, layer_num, kernel_size,
                                              residual=i > 0, light=light, use_lab=use_lab, norm=norm)
                                      for i in range(blocks)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class HGNetv2(nn.Module):
    """HGNetv2 returning the stride-8, 16 and 32 maps (``res3``..``res5``, as ResNet-vd) with their padding masks.

    Args:
        arch: ``B0``..``B5`` (:data:`ARCHS`), or a ``(stem, stages)`` tuple of the same form.
        use_lab: the learnable affine after each activation (D-FINE N / S / M: True; L / X: False).
        return_stages: stage indices to return (0 = stride 4 ... 3 = stride 32).
        norm: ``"batch"`` (trainable BatchNorm, training from scratch) or ``"frozen"`` (D-FINE's pretrained setting).
        freeze_at: -1 trains everything; 0 freezes the stem (D-FINE's ``freeze_stem_only``), k > 0 the stem and
            the first k stages.
    """

    def __init__(self, arch: str | tuple = "B0", *, use_lab: bool = False, return_stages: tuple[int, ...] = (1, 2, 3),
                 norm: str = "batch", freeze_at: int = -1) -> None:
        super().__init__()
        if isinstance(arch, str) and arch not in ARCHS:
            raise ValueError(f"HGNetv2 arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        if norm not in ("frozen", "batch"):
            raise ValueError(f"norm must be 'frozen' or 'batch', got {norm!r}")
        (c_in, c_mid, c_out), stages = ARCHS[arch] if isinstance(arch, str) else arch
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
        self.stem = StemBlock(c_in, c_mid, c_out, use_lab=use_lab, norm=norm_layer)
        self.stages = nn.ModuleList(HGStage(*cfg, use_lab=use_lab, norm=norm_layer) for cfg in stages)
        self.return_stages = tuple(return_stages)
        self.channels = {f"res{i + 2}": stages[i][2] for i in self.return_stages}
        self.strides = {f"res{i + 2}": 2 ** (i + 2) for i in self.return_stages}
        if freeze_at >= 0:
            for module in [self.stem, *self.stages[:freeze_at]]:
                module.requires_grad_(False)

    def forward(self, images: Tensor, padding_mask: Tensor | None = None) -> OrderedDict[str, tuple[Tensor, Tensor]]:
        """images (B, 3, H, W) -> {``res3``..``res5``: (features (B, C, h, w), mask (B, h, w))}."""
        x = self.stem(images)
        out = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.return_stages:
                if padding_mask is None:
                    mask = x.new_zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
                else:
                    mask = F.interpolate(padding_mask[:, None].float(), size=x.shape[-2:])[:, 0].bool()  # (B, h, w)
                out[f"res{i + 2}"] = (x, mask)
        return out
