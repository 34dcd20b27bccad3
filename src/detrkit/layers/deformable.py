"""Deformable DETR's attention and transformer (Zhu et al., ICLR 2021, sections 4.1 and 4.2).

The encoder replaces self-attention over all pixels of all levels by multi-scale deformable
attention: every pixel of every level is a query with its own centre as the reference point and
samples ``points`` locations per head and level. The decoder keeps self-attention among object
queries and uses deformable cross-attention around each query's reference point (a 2-D point, or a
4-D box whose size scales the sampling offsets, as in iterative refinement and two-stage).

Attribute names follow the official code (sampling_offsets, attention_weights, value_proj,
output_proj; encoder norm1/norm2; decoder cross_attn/norm1, self_attn/norm2, linear1/2, norm3).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.layers.mlp import MLP
from detrkit.layers.position_encoding import anchor_sine_embed
from detrkit.ops import inverse_sigmoid, level_shapes, level_shapes_tensor
from detrkit.ops.ms_deform_attn import LevelShapes, ms_deform_attn, ms_deform_attn_discrete


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention with its projections (paper equation 3).

    Args:
        d_model: width of queries and values.
        n_levels: number of feature levels.
        n_heads: attention heads.
        n_points: sampling points per head and level, or one count per level (RT-DETRv2, section 3: fewer points on
            some levels; the levels' points are laid out one level after another, and a level with fewer points than
            the most is padded with zero-weight points for the sampling op).
        offset_scale: around a box reference, offsets are fractions ``offset_scale / n_points`` of its size (0.5;
            RT-DETRv2 makes it a setting).
        sampling: ``"bilinear"`` (the paper's) or ``"discrete"`` (RT-DETRv2's nearest-pixel read,
            :func:`~detrkit.ops.ms_deform_attn.ms_deform_attn_discrete`).
        projections: the value and output projections; D-FINE's decoder drops both (Peng et al. 2025, section 4:
            its lightweight cross-attention samples the encoder's memory directly).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int | Sequence[int] = 4, *,
                 offset_scale: float = 0.5, sampling: str = "bilinear", projections: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if sampling not in ("bilinear", "discrete"):
            raise ValueError(f"sampling must be 'bilinear' or 'discrete', got {sampling!r}")
        points = [int(n_points)] * n_levels if isinstance(n_points, int) else [int(p) for p in n_points]
        if len(points) != n_levels or min(points) < 1:
            raise ValueError(f"n_points must be a positive count or one per level ({n_levels}), got {n_points}")
        self.points_per_level = tuple(points)
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, max(points)
        self.offset_scale, self.sampling = offset_scale, sampling
        self.backend = "auto"
        self.record = False  # keep the last sampling locations and weights in ``self.recorded`` (detrkit explain)
        self.recorded: tuple[Tensor, Tensor] | None = None
        self.sampling_offsets = nn.Linear(d_model, n_heads * sum(points) * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * sum(points))
        self.value_proj = nn.Linear(d_model, d_model) if projections else nn.Identity()
        self.output_proj = nn.Linear(d_model, d_model) if projections else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start on a radial grid: head h looks in direction 2*pi*h/heads, point k at distance k+1
        # (in units of the level's pixels), so heads cover all directions before any training.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (heads, 2)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        distance = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.points_per_level])  # (total,)
        grid = grid[:, None, :] * distance[None, :, None]  # (heads, total points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)  # uniform attention over levels x points at start
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            if isinstance(proj, nn.Linear):
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: LevelShapes,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """query (B, Lq, C); reference_points (B, Lq, levels, 2 or 4) normalized; value (B, S, C);
        spatial_shapes (levels, 2); padding_mask (B, S) True on padding -> (B, Lq, C)."""
        b, lq, _ = query.shape
        heads = self.n_heads
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, -1, heads, self.d_model // heads)  # (B, S, heads, head_dim)
        offsets = self.sampling_offsets(query).view(b, lq, heads, -1, 2)  # (B, Lq, heads, total points, 2)
        weights = self.attention_weights(query).view(b, lq, heads, -1).softmax(-1)  # over every level's points
        offsets, weights = self._per_level(offsets), self._per_level(weights)  # (B, Lq, heads, levels, points, *)
        if reference_points.shape[-1] == 2:  # offsets are in pixels of each level
            normalizer = level_shapes_tensor(level_shapes(spatial_shapes), offsets).flip(-1)  # (levels, 2): w, h
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:  # offsets are fractions of the reference box (refinement / two-stage)
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self._level_points(offsets) * reference_points[:, :, None, :, None, 2:]
                         * self.offset_scale)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        if self.record:
            self.recorded = (locations.detach(), weights.detach())
        if self.sampling == "discrete":
            out = ms_deform_attn_discrete(value, spatial_shapes, locations, weights)  # (B, Lq, C)
        else:
            out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=self.backend)
        return self.output_proj(out)


    def _level_points(self, like: Tensor) -> Tensor | int:
        """Each level's point count, to divide a box's offsets by: (levels, 1, 1), or the common count."""
        if len(set(self.points_per_level)) == 1:
            return self.n_points
        return torch.tensor(self.points_per_level, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def _per_level(self, x: Tensor) -> Tensor:
        """(B, Lq, heads, total points[, 2]) -> (B, Lq, heads, levels, points[, 2]); with per-level counts, the levels
        with fewer points are padded with zeros (a zero attention weight: they add nothing)."""
        b, lq, heads = x.shape[:3]
        if len(set(self.points_per_level)) == 1:
            return x.view(b, lq, heads, self.n_levels, self.n_points, *x.shape[4:])
        levels = []
        for chunk, n in zip(x.split(list(self.points_per_level), dim=3), self.points_per_level, strict=True):
            pad = chunk.new_zeros(*chunk.shape[:3], self.n_points - n, *chunk.shape[4:])
            levels.append(torch.cat([chunk, pad], 3))
        return torch.stack(levels, 3)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, post-norm."""

    def __init__(self, d_model: int = 256, dim_feedforward: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: LevelShapes,
                level_start_index: Tensor, padding_mask: Tensor | None) -> Tensor:
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src = self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(src))))))
        return src


class DeformableEncoder(nn.Module):
    """A stack of deformable encoder layers; every pixel centre of every level is a reference point."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: LevelShapes, valid_ratios: Tensor) -> Tensor:
        """Pixel centres normalized by each image's valid extent: (B, S, levels, 2), as (x, y)."""
        points = []
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            ys, xs = torch.meshgrid(  # pixel centres 0.5 .. h - 0.5 (arange, unlike linspace, exports with dynamic h)
                torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                indexing="ij",
            )
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # (B, h*w)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)  # (B, h*w)
            points.append(torch.stack([xs, ys], -1))  # (B, h*w, 2)
        ref = torch.cat(points, 1)  # (B, S, 2)
        return ref[:, :, None] * valid_ratios[:, None]  # (B, S, levels, 2): the same point seen on every level

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: LevelShapes, level_start_index: Tensor,
                valid_ratios: Tensor, padding_mask: Tensor | None) -> Tensor:
        """src, pos (B, S, C); valid_ratios (B, levels, 2); padding_mask (B, S) -> memory (B, S, C)."""
        ref = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention around each reference, FFN; post-norm.
    ``offset_scale`` and ``sampling`` are the cross-attention's (:class:`MultiScaleDeformableAttention`)."""

    def __init__(self, d_model: int = 256, dim_feedforward: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4, *, offset_scale: float = 0.5,
                 sampling: str = "bilinear") -> None:
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points,
                                                        offset_scale=offset_scale, sampling=sampling)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: LevelShapes,
        level_start_index: Tensor,
        padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm2(
            tgt + self.dropout2(self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0])
        )
        tgt2 = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt = self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))
        return tgt


class DeformableDecoder(nn.Module):
    """Decoder layers with reference points; with ``bbox_embed`` set (one head per layer) each layer refines
    the reference box in inverse-sigmoid space and passes it on detached (iterative bounding box refinement,
    paper section 4.2 and appendix A.4)."""

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, *, inverse_sigmoid_eps: float = 1e-5) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.bbox_embed: nn.ModuleList | None = None  # set by the detector when refining
        self.eps = inverse_sigmoid_eps

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: LevelShapes,
                level_start_index: Tensor, valid_ratios: Tensor, query_pos: Tensor,
                padding_mask: Tensor | None, self_attn_mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """tgt, query_pos (B, Q, C); reference_points (B, Q, 2 or 4) -> hidden (L, B, Q, C) and, per layer, the
        reference its prediction refines, sigmoid space: [(B, Q, 2 or 4)] * L (the contract of both decoders; with
        refinement a 2-d reference point becomes a 4-d box after the first layer)."""
        hidden, references = [], []
        for lid, layer in enumerate(self.layers):
            scale = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            ref_input = reference_points[:, :, None] * scale[:, None]  # (B, Q, levels, 2 or 4)
            tgt = layer(
                tgt, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask, self_attn_mask
            )
            references.append(reference_points)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](tgt)
                if reference_points.shape[-1] == 4:
                    new_ref = (delta + inverse_sigmoid(reference_points, self.eps)).sigmoid()
                else:
                    new_ref = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points, self.eps), delta[..., 2:]],
                                        -1).sigmoid()
                reference_points = new_ref.detach()  # gradients do not flow through the chain of references
            hidden.append(tgt)
        return torch.stack(hidden), references


class DeformableAnchorDecoder(nn.Module):
    """The decoder of DAB-Deformable-DETR, DN-Deformable-DETR and DINO: 4-D anchor boxes as queries.

    Each layer sine-encodes its anchor box (scaled to the valid image area) and turns the code into the
    positional query with ``ref_point_head`` (DAB-DETR section 4.2); deformable cross-attention samples
    around the box; the layer's box head (``bbox_embed``, set by the detector) refines the box in
    inverse-sigmoid space, and the refined box is passed on detached.

    Look forward twice (DINO, Zhang et al. 2022, section 3.4): the box that layer i + 1's prediction
    refines is the *undetached* box of layer i, so layer i + 1's box loss also trains layer i's
    parameters, while the chain of references itself stays detached. Without it, the references used
    for the predictions are the detached ones (Deformable DETR's "look forward once").
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, d_model: int, *, look_forward_twice: bool = True,
                 inverse_sigmoid_eps: float = 1e-3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed: nn.ModuleList | None = None  # one box head per layer, set by the detector
        self.d_model, self.look_forward_twice, self.eps = d_model, look_forward_twice, inverse_sigmoid_eps

    def forward(
        self,
        tgt: Tensor,
        anchors: Tensor,
        memory: Tensor,
        spatial_shapes: LevelShapes,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """tgt (B, Q, C); anchors (B, Q, 4) before the sigmoid -> hidden (L, B, Q, C), normed, and, per layer, the
        box its prediction refines, sigmoid space: [(B, Q, 4)] * L (undetached after layer 0 with look forward
        twice). The same contract as :class:`DeformableDecoder`."""
        ref = anchors.sigmoid()
        hidden, refs = [], [ref]
        for lid, layer in enumerate(self.layers):
            ref_input = ref[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, Q, levels, 4)
            query_pos = self.ref_point_head(anchor_sine_embed(ref_input[:, :, 0], self.d_model // 2))  # (B, Q, C)
            tgt = layer(
                tgt, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask, self_attn_mask
            )
            new_ref = (self.bbox_embed[lid](tgt) + inverse_sigmoid(ref, self.eps)).sigmoid()
            ref = new_ref.detach()
            refs.append(new_ref if self.look_forward_twice else ref)
            hidden.append(self.norm(tgt))
        return torch.stack(hidden), refs[:-1]


class RTDETRDecoder(nn.Module):
    """RT-DETR's decoder (Zhao et al. 2024, section 4.3 and its official code): Deformable DETR decoder layers over
    4-D reference boxes, whose positional query is an MLP of the box itself (``query_pos_head``, no sine code),
    with iterative refinement: each layer's box head (``bbox_embed``, set by the detector) refines the box in
    inverse-sigmoid space and passes it on detached; in training the prediction of layer i + 1 refines layer i's
    undetached box (DINO's look forward twice). No padding mask and no valid ratios: the input has no padding.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, d_model: int, *,
                 inverse_sigmoid_eps: float = 1e-5) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.query_pos_head = MLP(4, 2 * d_model, d_model, 2)
        self.bbox_embed: nn.ModuleList | None = None  # one box head per layer, set by the detector
        self.eps = inverse_sigmoid_eps

    def forward(self, tgt: Tensor, anchors: Tensor, memory: Tensor, spatial_shapes: LevelShapes,
                level_start_index: Tensor, self_attn_mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """tgt (B, Q, C); anchors (B, Q, 4) before the sigmoid, detached -> hidden (L, B, Q, C) and, per layer, the
        box its prediction refines, sigmoid space: [(B, Q, 4)] * L (:class:`DeformableAnchorDecoder`'s contract)."""
        ref = anchors.sigmoid()
        hidden, refs = [], [ref]
        for lid, layer in enumerate(self.layers):
            query_pos = self.query_pos_head(ref)  # (B, Q, C)
            tgt = layer(tgt, query_pos, ref[:, :, None], memory, spatial_shapes, level_start_index, None,
                        self_attn_mask)  # the same box on every level: (B, Q, 1, 4) broadcast
            new_ref = (self.bbox_embed[lid](tgt) + inverse_sigmoid(ref, self.eps)).sigmoid()
            ref = new_ref.detach()
            refs.append(new_ref if self.training else ref)
            hidden.append(tgt)
        return torch.stack(hidden), refs[:-1]
