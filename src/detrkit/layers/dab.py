"""DAB-DETR's transformer (Liu et al., "DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR", ICLR 2022).

Queries are 4-D anchor boxes (x, y, w, h). In every decoder layer the anchor is sine-encoded
(section 4.2) and an MLP (``ref_point_head``) turns the code into the positional query; the
cross-attention is Conditional DETR's: content and position are *concatenated* per head (not
added), so the content-content and position-position similarities are summed without mixing,
and the positional part is scaled element-wise by a vector predicted from the content
(``query_scale``, identity in the first layer). Width / height-modulated attention (section 4.3)
divides the x and y halves of the code by the anchor's w and h and multiplies them by a learned
reference size (``ref_anchor_head``), so attention spreads with the box. After each layer a box
head refines the anchor in inverse-sigmoid space; the refined anchor is detached before the next
layer (section 4.4).

Attribute names follow the official code (sa_qcontent_proj ... ca_qpos_sine_proj, norm1/2/3), so
its checkpoints load by renaming prefixes only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.layers.mlp import MLP
from detrkit.layers.position_encoding import anchor_sine_embed
from detrkit.layers.transformer import TransformerEncoderLayer, activation_layer
from detrkit.ops import inverse_sigmoid


class ConditionalAttention(nn.Module):
    """Multi-head attention on already projected q, k, v (the projections live in the layer).

    Query / key width may differ from the value width (the cross-attention concatenates content and
    position, so q and k are 2 * d_model wide while v stays d_model). Only the output projection is a
    parameter (``out_proj``).
    """

    def __init__(self, value_dim: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        self.out_proj = nn.Linear(value_dim, value_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, blocked: Tensor | None = None) -> Tensor:
        """q (B, Q, Dk), k (B, S, Dk), v (B, S, Dv); blocked broadcastable to (B, heads, Q, S), True = no attention."""
        b, nq, _ = q.shape
        q = q.view(b, nq, self.nhead, -1).transpose(1, 2)  # (B, heads, Q, Dk/heads)
        k = k.view(b, k.shape[1], self.nhead, -1).transpose(1, 2)  # (B, heads, S, Dk/heads)
        v = v.view(b, v.shape[1], self.nhead, -1).transpose(1, 2)  # (B, heads, S, Dv/heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if blocked is None else ~blocked,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, -1))  # (B, Q, Dv)


class DABEncoder(nn.Module):
    """DETR encoder layers whose position encoding is rescaled from the content before each layer
    (``pos * query_scale(src)``, the official DAB-DETR encoder)."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """src, pos (B, S, C); key_padding_mask (B, S) True on padding -> memory (B, S, C)."""
        for layer in self.layers:
            src = layer(src, pos=pos * self.query_scale(src), key_padding_mask=key_padding_mask)
        return src


class DABDecoderLayer(nn.Module):
    """Self-attention, conditional cross-attention (content and position concatenated), FFN; post-norm.

    Args:
        is_first: the first layer also adds the positional query to the content query in cross-attention
            (``ca_qpos_proj``); later layers rely on the concatenated sine part alone.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "prelu", *, is_first: bool = False) -> None:
        super().__init__()
        self.nhead = nhead
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                     "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj"):
            setattr(self, name, nn.Linear(d_model, d_model))
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if is_first else None
        self.self_attn = ConditionalAttention(d_model, nhead, dropout)
        self.cross_attn = ConditionalAttention(d_model, nhead, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation = activation_layer(activation)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, query_sine_embed: Tensor,
                memory_mask: Tensor | None, self_attn_mask: Tensor | None = None) -> Tensor:
        """tgt, query_pos, query_sine_embed (B, Q, C); memory, pos (B, S, C); memory_mask (B, S) True on padding;
        self_attn_mask (Q, Q) True = blocked (denoising groups) -> (B, Q, C)."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, self.sa_v_proj(tgt), self_attn_mask)))

        b, nq, c = tgt.shape
        q, k_pos = self.ca_qcontent_proj(tgt), self.ca_kpos_proj(pos)
        k = self.ca_kcontent_proj(memory)
        if self.ca_qpos_proj is not None:
            q, k = q + self.ca_qpos_proj(query_pos), k + k_pos
        heads, hd = self.nhead, c // self.nhead
        # Conditional cross-attention: [content | position] per head, so q.k = qc.kc + qp.kp
        q = torch.cat([q.view(b, nq, heads, hd), self.ca_qpos_sine_proj(query_sine_embed).view(b, nq, heads, hd)], -1)
        k = torch.cat([k.view(b, -1, heads, hd), k_pos.view(b, -1, heads, hd)], -1)
        blocked = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, S)
        tgt2 = self.cross_attn(q.flatten(2), k.flatten(2), self.ca_v_proj(memory), blocked)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt = self.norm3(tgt + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(tgt))))))
        return tgt


class DABDecoder(nn.Module):
    """Decoder layers driven by anchor boxes, refined layer by layer with the shared ``bbox_embed``."""

    def __init__(
        self, layer: DABDecoderLayer, num_layers: int, d_model: int, *, inverse_sigmoid_eps: float = 1e-3
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        for later in self.layers[1:]:
            later.ca_qpos_proj = None
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)
        self.bbox_embed: nn.Module | None = None  # set by the detector (shared with its box head)
        self.d_model, self.eps = d_model, inverse_sigmoid_eps

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, anchors: Tensor, memory_mask: Tensor | None,
                self_attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tgt (B, Q, C); anchors (B, Q, 4) in inverse-sigmoid space -> hidden (L, B, Q, C), normed, and the
        anchor each layer received (L, B, Q, 4), sigmoid space."""
        c = self.d_model
        ref = anchors.sigmoid()
        hidden, refs = [], []
        for lid, layer in enumerate(self.layers):
            sine = anchor_sine_embed(ref, c // 2)  # (B, Q, 2C): y, x, w, h codes
            query_pos = self.ref_point_head(sine)  # (B, Q, C)
            # positional query of the cross-attention: the (y, x) code, scaled by the content (identity in layer 0)
            query_sine = sine[..., :c] * (self.query_scale(tgt) if lid > 0 else 1.0)
            # width / height modulation (section 4.3): x code by w_ref / w, y code by h_ref / h
            ref_wh = self.ref_anchor_head(tgt).sigmoid()  # (B, Q, 2)
            query_sine = torch.cat([query_sine[..., : c // 2] * (ref_wh[..., 1] / ref[..., 3])[..., None],
                                    query_sine[..., c // 2 :] * (ref_wh[..., 0] / ref[..., 2])[..., None]], -1)
            refs.append(ref)
            tgt = layer(tgt, memory, pos, query_pos, query_sine, memory_mask, self_attn_mask)
            if self.bbox_embed is not None:  # anchor update, detached between layers (section 4.4)
                ref = (self.bbox_embed(tgt) + inverse_sigmoid(ref, self.eps)).sigmoid().detach()
            hidden.append(self.norm(tgt))
        return torch.stack(hidden), torch.stack(refs)
