"""DETR's encoder-decoder transformer, batch first and post-norm (Carion et al. 2020, section 3.2).

Differences from a text transformer that matter here: the position encoding is added to queries
and keys of every attention layer (not once at the input), the decoder's object queries are
positional embeddings added to a zero-initialised target, and the decoder returns the normalised
output of every layer so that the auxiliary losses (section 3.2, "Auxiliary decoding losses") can
supervise all of them.

Attribute names follow the official code (self_attn, multihead_attn, linear1/2, norm1/2/3), so its
checkpoints load by renaming prefixes only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def activation_layer(name: str) -> nn.Module:
    """The FFN non-linearity: ``"relu"`` (DETR, Deformable DETR, DINO), ``"prelu"`` (DAB-DETR, DN-DETR) or ``"gelu"``
    (RT-DETR's AIFI layer; the exact erf form)."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "prelu":  # one learned negative slope per layer (a parameter: `activation.weight`)
        return nn.PReLU()
    raise ValueError(f"activation must be 'relu', 'prelu' or 'gelu', got {name!r}")


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN, each followed by residual and LayerNorm (post-norm)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu") -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation_layer(activation)

    def forward(self, src: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        """src, pos (B, S, C); key_padding_mask (B, S) True on padding -> (B, S, C)."""
        q = k = _with_pos(src, pos)
        src = self.norm1(
            src + self.dropout1(self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False)[0])
        )
        src = self.norm2(src + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(src))))))
        return src


class TransformerDecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the encoder memory, FFN; post-norm."""

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt, query_pos (B, Q, C); memory, pos (B, S, C); memory_key_padding_mask (B, S) -> (B, Q, C).

        ``self_attn_mask`` (Q, Q) or (B*heads, Q, Q), True = blocked, is where denoising variants
        keep groups of queries apart.
        """
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.multihead_attn(
            _with_pos(tgt, query_pos), _with_pos(memory, pos), memory,
            key_padding_mask=memory_key_padding_mask, need_weights=False,
        )[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt = self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return tgt


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` copies of ``layer`` (post-norm: no final norm)."""

    def __init__(self, layer: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        """src, pos (B, S, C); key_padding_mask (B, S) -> memory (B, S, C)."""
        for layer in self.layers:
            src = layer(src, pos=pos, key_padding_mask=key_padding_mask)
        return src


class TransformerDecoder(nn.Module):
    """A stack of decoder layers that returns every layer's output, each through the shared final norm."""

    def __init__(self, layer: nn.Module, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt, query_pos (B, Q, C); memory, pos (B, S, C) -> hidden states (L, B, Q, C), one per layer."""
        hidden = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos=pos, query_pos=query_pos,
                        memory_key_padding_mask=memory_key_padding_mask, self_attn_mask=self_attn_mask)
            hidden.append(self.norm(tgt))
        return torch.stack(hidden)  # (L, B, Q, C)
