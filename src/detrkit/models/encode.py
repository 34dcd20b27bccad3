"""The encode step, shared by composition: backbone -> projection -> position encoding -> encoder.

DETR and DAB-DETR encode one feature map with full self-attention (:func:`encode_single_scale`); Deformable
DETR and DINO encode several levels with deformable attention (:func:`encode_multi_scale`). Each detector keeps
its parts as its own attributes (their names are the checkpoints' keys) and hands them to these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.ops import level_shapes_tensor


def _full_mask(images: Tensor, padding_mask: Tensor | None) -> Tensor:
    if padding_mask is None:
        return images.new_zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    return padding_mask


def encode_single_scale(images: Tensor, padding_mask: Tensor | None, *, backbone: nn.Module, feature_name: str,
                        input_proj: nn.Module, position_encoding: nn.Module,
                        encoder: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """DETR section 3.2: the backbone's ``feature_name`` map, projected to the model width, with its sine (or
    learned) positions, through the transformer encoder. Returns memory (B, S, C), mask (B, S), pos (B, S, C)."""
    feat, mask = backbone(images, _full_mask(images, padding_mask))[feature_name]
    src = input_proj(feat).flatten(2).transpose(1, 2)  # (B, h*w, C)
    pos = position_encoding(mask, src.dtype).to(src.dtype).flatten(2).transpose(1, 2)  # (B, h*w, C)
    mask = mask.flatten(1)  # (B, h*w)
    return encoder(src, pos=pos, key_padding_mask=mask), mask, pos


def valid_ratios(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """mask (B, h, w) True on padding -> (B, 2): the unpadded fraction of width and height, in ``dtype``."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.to(dtype) / w, valid_h.to(dtype) / h], -1)


def encode_multi_scale(images: Tensor, padding_mask: Tensor | None, *, backbone: nn.Module, neck: nn.Module,
                       position_encoding: nn.Module, level_embed: Tensor, encoder: nn.Module):
    """Deformable DETR section 4.2: every level projected by the neck, flattened one after another, with its sine
    positions plus a learned level embedding, through the deformable encoder.

    Returns memory (B, S, C), mask (B, S), the (h, w) of each level, their start offsets (levels,) in S and the
    valid ratios (B, levels, 2) of each image.
    """
    padding_mask = _full_mask(images, padding_mask)
    srcs, masks = neck(list(backbone(images, padding_mask).values()), padding_mask)
    shapes = [tuple(s.shape[-2:]) for s in srcs]  # (h, w) per level
    sizes = level_shapes_tensor(shapes, images.new_zeros((), dtype=torch.long))  # (levels, 2)
    starts = torch.cat([sizes.new_zeros(1), (sizes[:, 0] * sizes[:, 1]).cumsum(0)[:-1]])  # (levels,)
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, C)
    pos = torch.cat([position_encoding(m, src.dtype).to(src.dtype).flatten(2).transpose(1, 2) + level_embed[lvl]
                     for lvl, m in enumerate(masks)], 1)  # (B, S, C)
    mask = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S)
    ratios = torch.stack([valid_ratios(m, src.dtype) for m in masks], 1)  # (B, levels, 2)
    return encoder(src, pos, shapes, starts, ratios, mask), mask, shapes, starts, ratios
