"""RT-DETR's efficient hybrid encoder (Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", CVPR 2024,
section 4.2).

Deformable DETR's encoder spends most of a detector's time running attention over every pixel of every level.
RT-DETR decouples the two things it does:

- AIFI, attention-based intra-scale feature interaction: one transformer encoder layer over the stride-32 level
  only (the level with rich semantics and few pixels), with a fixed 2-D sine position embedding;
- CCFF, CNN-based cross-scale feature fusion: a top-down then bottom-up path (FPN + PAN) whose fusion blocks are
  CSP layers of RepVGG-style blocks (a 3x3 and a 1x1 convolution summed, Ding et al. CVPR 2021).

D-FINE (Peng et al., ICLR 2025, section 4, "lightweight optimizations") keeps AIFI and swaps CCFF's blocks for
lighter ones (``fusion="gelan"``): GELAN blocks (YOLOv9's RepNCSPELAN4, Wang et al. 2024, section 4.2) in place of
the CSP layers, and ``SCDown`` (a 1x1 then a depthwise 3x3 stride-2 convolution, YOLOv10's spatial-channel
decoupled downsampling) in place of the dense 3x3 stride-2 convolutions.

Module names follow the official code (``input_proj``, ``encoder``, ``lateral_convs``, ``fpn_blocks``,
``downsample_convs``, ``pan_blocks``) so its checkpoints load with their own keys.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.layers.position_encoding import sincos_2d
from detrkit.layers.transformer import TransformerEncoderLayer


class ConvNormLayer(nn.Module):
    """Convolution (no bias, 'same' padding) -> BatchNorm -> optional activation (ResNet-vd and the encoder)."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int = 1, *, act: nn.Module | None = None,
                 norm: type[nn.Module] = nn.BatchNorm2d, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups,
                              bias=False)
        self.norm = norm(ch_out)
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class RepVggBlock(nn.Module):
    """RepVGG (Ding et al. 2021): a 3x3 and a 1x1 conv-BN in parallel, summed, then SiLU. In training the two
    branches are separate; they could be folded into one 3x3 convolution for deployment (not done here: the
    exported graph keeps both, which costs one extra 1x1 convolution per block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNormLayer(channels, channels, 3)
        self.conv2 = ConvNormLayer(channels, channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """The CCFF fusion block (RT-DETR figure 5): a cross-stage-partial split, one half through ``num_blocks``
    RepVGG blocks, the other a 1x1 projection, summed (and projected to ``ch_out`` when the expansion is not 1)."""

    def __init__(self, ch_in: int, ch_out: int, num_blocks: int = 3, expansion: float = 1.0) -> None:
        super().__init__()
        hidden = int(ch_out * expansion)
        self.conv1 = ConvNormLayer(ch_in, hidden, 1, act=nn.SiLU())
        self.conv2 = ConvNormLayer(ch_in, hidden, 1, act=nn.SiLU())
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden) for _ in range(num_blocks)])
        self.conv3 = ConvNormLayer(hidden, ch_out, 1, act=nn.SiLU()) if hidden != ch_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class RepNCSPELAN4(nn.Module):
    """D-FINE's fusion block, YOLOv9's GELAN (RepNCSPELAN4): a 1x1 conv to ``2 * ch_out`` split in halves; the
    second half runs through two (CSP layer -> 3x3 conv) stages, and the two halves plus both stages' outputs are
    concatenated and projected to ``ch_out`` (every intermediate feeds the output: a generalized ELAN)."""

    def __init__(self, ch_in: int, ch_out: int, num_blocks: int = 3, expansion: float = 1.0) -> None:
        super().__init__()
        mid = round(expansion * ch_out // 2)
        self.half = ch_out
        self.conv1 = ConvNormLayer(ch_in, 2 * ch_out, 1, act=nn.SiLU())
        self.csp_rep1 = CSPRepLayer(ch_out, mid, num_blocks)
        self.conv2 = ConvNormLayer(mid, mid, 3, act=nn.SiLU())
        self.csp_rep2 = CSPRepLayer(mid, mid, num_blocks)
        self.conv3 = ConvNormLayer(mid, mid, 3, act=nn.SiLU())
        self.conv4 = ConvNormLayer(2 * ch_out + 2 * mid, ch_out, 1, act=nn.SiLU())

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.conv1(x).split((self.half, self.half), 1)
        b1 = self.conv2(self.csp_rep1(b))
        b2 = self.conv3(self.csp_rep2(b1))
        return self.conv4(torch.cat([a, b, b1, b2], 1))


class SCDown(nn.Module):
    """D-FINE's downsampling (YOLOv10's spatial-channel decoupled downsampling): a 1x1 conv mixes channels, then a
    depthwise 3x3 stride-2 conv halves the resolution; no activations. ~1/C of a dense 3x3 stride-2 conv's work."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNormLayer(channels, channels, 1)
        self.conv2 = ConvNormLayer(channels, channels, 3, 2, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class AIFIEncoder(nn.Module):
    """AIFI (section 4.2): transformer encoder layers over one flattened level, sine positions added to q and k."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.temperature = temperature

    def forward(self, feat: Tensor) -> Tensor:
        """feat (B, C, h, w) -> (B, C, h, w)."""
        b, c, h, w = feat.shape
        src = feat.flatten(2).transpose(1, 2)  # (B, h*w, C)
        pos = sincos_2d(h, w, c, self.temperature, like=src)[None]  # (1, h*w, C)
        for layer in self.layers:
            src = layer(src, pos)
        return src.transpose(1, 2).reshape(b, c, h, w)


class HybridEncoder(nn.Module):
    """Project each backbone level to ``hidden_dim``, AIFI on the levels in ``use_encoder_idx`` (the last one),
    then CCFF: top-down fusion (lateral 1x1 conv, 2x nearest upsampling, concat, CSP block) and bottom-up fusion
    (3x3 stride-2 conv, concat, CSP block). Returns one map per level, strides unchanged.

    Args:
        in_channels: channels of the backbone levels (strides 8, 16, 32).
        hidden_dim: the encoder's width (256; 384 for R101).
        nhead, dim_feedforward, dropout: the AIFI layer (8, 1024, 0.0; feed-forward 2048 for R101).
        num_encoder_layers: AIFI layers (1).
        use_encoder_idx: levels AIFI runs on (the stride-32 one).
        expansion: CSP hidden width as a fraction of ``hidden_dim`` (0.5 for R18 / R34, 1.0 for R50 / R101).
        depth_mult: scales the three RepVGG blocks of each CSP layer.
        pe_temperature: of the sine position embedding.
        fusion: ``"csp"`` (RT-DETR's CCFF) or ``"gelan"`` (D-FINE's: GELAN blocks, SCDown, lateral convs without
            activation); with ``"gelan"``, ``expansion`` sizes the GELAN block's inner CSP layers.
    """

    def __init__(self, in_channels: tuple[int, ...] = (512, 1024, 2048), *, hidden_dim: int = 256, nhead: int = 8,
                 dim_feedforward: int = 1024, dropout: float = 0.0, num_encoder_layers: int = 1,
                 use_encoder_idx: tuple[int, ...] = (2,), expansion: float = 1.0, depth_mult: float = 1.0,
                 pe_temperature: float = 10000.0, fusion: str = "csp") -> None:
        super().__init__()
        if fusion not in ("csp", "gelan"):
            raise ValueError(f"fusion must be 'csp' (RT-DETR) or 'gelan' (D-FINE), got {fusion!r}")
        self.hidden_dim, self.use_encoder_idx = hidden_dim, tuple(use_encoder_idx)
        self.input_proj = nn.ModuleList(ConvNormLayer(c, hidden_dim, 1) for c in in_channels)
        layer = TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation="gelu")
        self.encoder = nn.ModuleList(AIFIEncoder(layer, num_encoder_layers, pe_temperature)
                                     for _ in self.use_encoder_idx)
        blocks, n = round(3 * depth_mult), len(in_channels) - 1
        gelan = fusion == "gelan"
        block = RepNCSPELAN4 if gelan else CSPRepLayer
        self.lateral_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 1, act=None if gelan else nn.SiLU())
                                           for _ in range(n))
        self.fpn_blocks = nn.ModuleList(block(2 * hidden_dim, hidden_dim, blocks, expansion) for _ in range(n))
        self.downsample_convs = nn.ModuleList(SCDown(hidden_dim) if gelan else
                                              ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=nn.SiLU())
                                              for _ in range(n))
        self.pan_blocks = nn.ModuleList(block(2 * hidden_dim, hidden_dim, blocks, expansion) for _ in range(n))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """Backbone maps [(B, C_l, h_l, w_l)], strides 8 / 16 / 32 -> fused maps [(B, hidden_dim, h_l, w_l)]."""
        proj = [p(f) for p, f in zip(self.input_proj, feats, strict=True)]
        for encoder, idx in zip(self.encoder, self.use_encoder_idx, strict=True):
            proj[idx] = encoder(proj[idx])
        return self._bottom_up(self._top_down(proj))

    def _top_down(self, proj: list[Tensor]) -> list[Tensor]:
        """CCFF's FPN path, coarse to fine; each coarser map is replaced by its lateral projection."""
        inner = [proj[-1]]
        for i, idx in enumerate(range(len(proj) - 1, 0, -1)):
            high = self.lateral_convs[i](inner[0])
            inner[0] = high
            up = F.interpolate(high, scale_factor=2.0, mode="nearest")  # needs inputs divisible by the top stride
            inner.insert(0, self.fpn_blocks[i](torch.cat([up, proj[idx - 1]], 1)))
        return inner

    def _bottom_up(self, inner: list[Tensor]) -> list[Tensor]:
        """CCFF's PAN path, fine to coarse."""
        outs = [inner[0]]
        for i in range(len(inner) - 1):
            down = self.downsample_convs[i](outs[-1])
            outs.append(self.pan_blocks[i](torch.cat([down, inner[i + 1]], 1)))
        return outs
