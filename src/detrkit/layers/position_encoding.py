"""2-D position encodings of a feature map, computed from its padding mask.

DETR (Carion et al. 2020), section 3.2 and appendix A.4: the sine encoding of "Attention is all you
need" generalised to two dimensions, with coordinates counted over valid (unpadded) pixels only and
normalised to [0, 2*pi], so an image padded inside a batch gets the same encoding as alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sine_encode(coords: Tensor, num_pos_feats: int, temperature: float) -> Tensor:
    """The sine kernel of every encoding here ("Attention is all you need", section 3.5, one axis at a time).

    coords (...) already in radians -> (..., num_pos_feats): coords / temperature^(2i / F), sine on even and cosine on
    odd channels, interleaved as the official DETR code does. Computed in float32 at least (float64 for float64).
    """
    dtype = torch.promote_types(coords.dtype, torch.float32)
    dim_t = torch.arange(num_pos_feats, dtype=dtype, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = coords[..., None] / dim_t  # (..., F)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)  # (..., F)


class PositionEmbeddingSine(nn.Module):
    """Sine / cosine encoding of (y, x), ``num_pos_feats`` channels each.

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels.
        temperature: base of the geometric progression of wavelengths.
        normalize: divide the cumulative coordinates by the valid extent of each image.
        scale: the normalised coordinate range (2*pi in DETR); only with ``normalize``.
        offset: added to the cumulative coordinates before normalising: 0 in DETR, -0.5 in Deformable
            DETR and its successors (pixel centres instead of pixel ends).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` only applies with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """mask (B, H, W) bool, True on padding -> encoding (B, 2 * num_pos_feats, H, W) in float32, or float64
        when ``dtype`` (the model's) is float64; never in half precision, where the coordinates would round."""
        dtype = torch.promote_types(dtype, torch.float32)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=dtype)  # (B, H, W): 1..h_valid down each column
        x_embed = not_mask.cumsum(2, dtype=dtype)  # (B, H, W): 1..w_valid along each row
        if self.normalize:
            eps = 1e-6  # keeps fully padded rows / columns finite
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale

        pos_x = sine_encode(x_embed, self.num_pos_feats, self.temperature)  # (B, H, W, F)
        pos_y = sine_encode(y_embed, self.num_pos_feats, self.temperature)  # (B, H, W, F)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: a row and a column embedding table (DETR's ablation, table 3).

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels.
        max_size: the largest feature-map height / width it can encode.
    """

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """mask (B, H, W) bool -> encoding (B, 2 * num_pos_feats, H, W) in the tables' dtype (``dtype`` unused)."""
        b, h, w = mask.shape
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise ValueError(
                f"PositionEmbeddingLearned covers feature maps up to {max_size}x{max_size}, got {h}x{w}; "
                "use smaller images or build the model with a larger `max_size`."
            )
        x_emb = self.col_embed(torch.arange(w, device=mask.device))  # (W, F)
        y_emb = self.row_embed(torch.arange(h, device=mask.device))  # (H, F)
        pos = torch.cat([x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)], dim=-1)  # (H, W, 2F)
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1)  # (B, 2F, H, W)


def anchor_sine_embed(anchors: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of normalized points / anchor boxes (DAB-DETR, Liu et al. 2022, section 4.2, eq. 4).

    Each coordinate in [0, 1] is scaled to [0, 2*pi] and encoded like one axis of
    :class:`PositionEmbeddingSine`; the encodings are concatenated in the order (y, x, w, h), so the
    first half of a 4-D anchor's code is the same layout as a feature map's (y, x) position encoding.

    anchors (..., 2 or 4) -> (..., 2 or 4 * num_pos_feats).
    """
    dtype = torch.promote_types(anchors.dtype, torch.float32)  # float32 under autocast, float64 in a float64 model
    pos = sine_encode(anchors.to(dtype) * (2 * math.pi), num_pos_feats, temperature)  # (..., n, F)
    order = [1, 0, *range(2, anchors.shape[-1])]  # x, y, w, h -> y, x, w, h
    return pos[..., order, :].flatten(-2).to(anchors.dtype)  # (..., n*F)


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10000.0, *, like: Tensor) -> Tensor:
    """RT-DETR's fixed 2-D sine embedding of an (height, width) grid (the AIFI layer's, section 4.2) -> (h*w, dim).

    Row-major positions (index y * width + x), laid out ``[sin(y w), cos(y w), sin(x w), cos(x w)]`` with
    ``w = temperature^(-i / (dim / 4))``: built for the map's actual height and width, so a non-square map gets the
    right code (the official code swaps the axes of non-square maps; HF transformers builds it this way). The
    frequencies are computed in float64 (float32 on MPS, which has none) and cast to ``like``'s dtype.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sine embedding needs a width divisible by 4, got {dim}")
    compute = torch.float32 if like.device.type == "mps" else torch.float64
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=compute, device=like.device) / quarter)  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=compute, device=like.device),
                            torch.arange(width, dtype=compute, device=like.device), indexing="ij")
    y, x = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega  # (h*w, dim/4) each
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], 1).to(like.dtype)  # (h*w, dim)
