"""Multi-scale neck of Deformable DETR and its successors (Zhu et al. 2021, appendix A.2, figure 4).

Each backbone level is projected to ``d_model`` by a 1x1 convolution + GroupNorm; extra, coarser
levels come from 3x3 stride-2 convolutions (+ GroupNorm) on the last backbone map, then on each
other. The padding mask of every level is the image mask resized to it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MultiScaleProjection(nn.Module):
    """Backbone levels -> ``len(in_channels) + num_extra`` maps of ``d_model`` channels with masks.

    The projections live in ``self.input_proj`` (index i = level i), the official layout.
    """

    def __init__(self, in_channels: list[int], d_model: int = 256, num_extra: int = 1, groups: int = 32) -> None:
        super().__init__()
        projs = [
            nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), nn.GroupNorm(groups, d_model)) for c in in_channels
        ]
        c = in_channels[-1]
        for _ in range(num_extra):
            projs.append(
                nn.Sequential(nn.Conv2d(c, d_model, kernel_size=3, stride=2, padding=1), nn.GroupNorm(groups, d_model))
            )
            c = d_model
        self.input_proj = nn.ModuleList(projs)
        self.num_backbone_levels = len(in_channels)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

    def forward(self, features: list[tuple[Tensor, Tensor]], padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """features: [(map (B, C_i, h_i, w_i), mask (B, h_i, w_i))] -> maps and masks of every level."""
        srcs = [proj(feat) for proj, (feat, _) in zip(self.input_proj, features, strict=False)]
        masks = [mask for _, mask in features]
        last = features[-1][0]
        for proj in self.input_proj[self.num_backbone_levels:]:
            last = proj(last)
            srcs.append(last)
            masks.append(F.interpolate(padding_mask[:, None].float(), size=last.shape[-2:])[:, 0].bool())
        return srcs, masks
