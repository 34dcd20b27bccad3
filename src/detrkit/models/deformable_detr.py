"""Deformable DETR (Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object
Detection", ICLR 2021).

DETR with multi-scale deformable attention (section 4.1) in encoder and decoder over 4 feature
levels (strides 8-64), 300 queries with learned reference points, sigmoid focal loss, and two
variants (section 4.2): iterative bounding box refinement (one box head per decoder layer, each
refining the previous layer's box in inverse-sigmoid space) and two-stage (the encoder proposes
boxes at every pixel; the top-k become the decoder's queries).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, nms

from detrkit.backbones import ResNetBackbone
from detrkit.layers import (
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    MultiScaleProjection,
    PositionEmbeddingSine,
)
from detrkit.layers.heads import aux_outputs, focal_class_head, zero_box_head
from detrkit.layers.one_to_many import OneToMany, check_proposals, one_to_many_branch, separated_self_attn_mask
from detrkit.layers.position_encoding import sine_encode
from detrkit.models.encode import encode_multi_scale
from detrkit.models.outputs import DetectionOutput, LayerOutput, LossConfig
from detrkit.ops import inverse_sigmoid, level_shapes
from detrkit.ops.ms_deform_attn import LevelShapes
from detrkit.registry import Weights, register_model

# Released COCO weights (``create_model(name, weights="coco")``); detrex models use the 80 COCO classes.
_DETREX = "IDEA-Research/detrex model zoo"
_DETREX_URL = "https://github.com/IDEA-Research/detrex-storage/releases/download"
_HF_DEFORMABLE = "https://huggingface.co/SenseTime/deformable-detr/resolve/main/pytorch_model.bin"


def proposal_pos_embed(proposals: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of unnormalized (inverse-sigmoid) boxes (B, K, 4) -> (B, K, 4 * num_pos_feats)."""
    return sine_encode(proposals.sigmoid() * 2 * math.pi, num_pos_feats, temperature).flatten(2)  # (B, K, 4F)


def encoder_proposals(memory: Tensor, mask: Tensor, spatial_shapes: LevelShapes) -> tuple[Tensor, Tensor]:
    """Two-stage (section 4.2): a box proposal at every encoder pixel, centred on it, of side 0.05 * 2^level.

    Returns the memory with padded / border pixels zeroed (B, S, C) and the proposals in
    inverse-sigmoid space (B, S, 4), +inf where invalid so that they are never selected.
    """
    b = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        mask_l = mask[:, start : start + h * w].view(b, h, w)
        valid_h, valid_w = (~mask_l[:, :, 0]).sum(1), (~mask_l[:, 0, :]).sum(1)
        gy, gx = torch.meshgrid(torch.arange(h, dtype=memory.dtype, device=memory.device),
                                torch.arange(w, dtype=memory.dtype, device=memory.device), indexing="ij")
        grid = torch.stack([gx, gy], -1)  # (h, w, 2)
        scale = torch.stack([valid_w, valid_h], -1).view(b, 1, 1, 2).to(memory.dtype)
        centres = (grid[None] + 0.5) / scale  # (B, h, w, 2)
        wh = torch.full_like(centres, 0.05 * 2.0**lvl)
        proposals.append(torch.cat([centres, wh], -1).view(b, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)  # (B, S, 4)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)  # (B, S, 1)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = mask[..., None] | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    return memory.masked_fill(invalid, 0.0), proposals


def score_proposals(memory: Tensor, mask: Tensor, shapes: LevelShapes, *, enc_output: nn.Module,
                    enc_output_norm: nn.Module, class_head: nn.Module, box_head: nn.Module) -> tuple[Tensor, Tensor]:
    """Two-stage (section 4.2): every encoder pixel's proposal scored and refined by the encoder's own heads.

    Returns logits (B, S, K) and boxes (B, S, 4) in inverse-sigmoid space (+inf at padded / border pixels).
    """
    out_memory, proposals = encoder_proposals(memory, mask, shapes)
    out_memory = enc_output_norm(enc_output(out_memory))
    return class_head(out_memory), box_head(out_memory) + proposals


def gather_queries(x: Tensor, index: Tensor) -> Tensor:
    """x (B, S, C), index (B, k) -> the selected rows (B, k, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def distinct_topk(scores: Tensor, boxes: Tensor, k: int, iou: float, pool: int = 4) -> Tensor:
    """Distinct query selection (DDQ, Zhang et al. CVPR 2023, section 3.2): indices (B, k) of the ``k`` best
    proposals after a class-agnostic NMS at IoU ``iou`` (DDQ DETR: 0.8), so that one object does not start several
    queries that the one-to-one matching must then teach apart. Proposals it suppresses follow the distinct ones,
    best first, so the count stays ``k`` (taken only when fewer than ``k`` are distinct). The decoder's output stays
    one box per object with no NMS after it. scores (B, S), -inf where never to be selected; boxes (B, S, 4) cxcywh
    in [0, 1].

    The NMS runs over the ``pool * k`` best proposals only (its cost grows with the square of the boxes): greedy NMS
    suppresses a box only through better ones, so within them the result is the NMS over all, unless fewer than
    ``k`` of them are distinct (on the demo's trained model the 100 distinct ones are within the best 164)."""
    b, s = scores.shape
    candidates = scores.topk(min(s, pool * k), dim=1).indices  # (B, M)
    cand_scores = scores.gather(1, candidates)
    xyxy = box_convert(gather_queries(boxes, candidates).detach().float(), "cxcywh", "xyxy")  # within [-0.5, 1.5]
    apart = torch.arange(b, device=scores.device, dtype=xyxy.dtype)[:, None, None] * 4  # images never overlap
    keep = nms((xyxy + apart).flatten(0, 1), cand_scores.detach().flatten().float(), iou)  # one NMS for the batch
    distinct = torch.zeros(cand_scores.numel(), dtype=torch.bool, device=scores.device).index_fill(0, keep, True)
    # the suppressed ones rank after every distinct one (logits stay far above -1e4; -inf stays -inf)
    ranked = torch.where(distinct.view_as(cand_scores), cand_scores, cand_scores - 1e4).topk(k, dim=1).indices
    return candidates.gather(1, ranked)


def check_query_nms(query_nms: float | None, two_stage: bool = True) -> float | None:
    """``query_nms`` as the models take it: an IoU in (0, 1] or None (the paper's plain top-k); it selects among
    the encoder's proposals, so a model without them (``two_stage`` False) takes None only."""
    if query_nms is not None and not 0 < query_nms <= 1:
        raise ValueError(f"query_nms must be an IoU in (0, 1] (DDQ uses 0.8) or None for none; got {query_nms}")
    if query_nms is not None and not two_stage:
        raise ValueError("query_nms (DDQ's distinct query selection) selects among the encoder's proposals: it "
                         "needs two_stage=True")
    return query_nms


def select_proposals(scores: Tensor, coords: Tensor, k: int, query_nms: float | None) -> Tensor:
    """Two-stage query selection: indices (B, k) of the best proposals by ``scores`` (B, S), the plain top-k of
    the papers; with ``query_nms``, DDQ's best *distinct* ones (:func:`distinct_topk`) among the valid proposals
    (``coords`` (B, S, 4) before the sigmoid, +inf where invalid)."""
    if query_nms is None:
        return scores.topk(k, dim=1).indices
    valid_scores = scores.masked_fill(coords[..., 0].isinf(), float("-inf"))
    return distinct_topk(valid_scores, coords.sigmoid(), k, query_nms)


class DeformableDETR(nn.Module):
    """The Deformable DETR detector.

    Args:
        backbone: returns ``{stage: (features, mask)}`` for the levels it feeds the neck.
        position_encoding: sine encoding of each level's mask (with Deformable DETR's -0.5 offset).
        encoder, decoder: the deformable transformer.
        num_classes: number of object classes (sigmoid outputs, no background class).
        num_queries: object queries (300); in two-stage, the number of proposals kept.
        d_model: transformer width.
        num_feature_levels: backbone levels + extra stride-2 levels (4 = strides 8, 16, 32, 64).
        refine: iterative bounding box refinement.
        two_stage: encoder proposals as queries (implies per-layer heads plus one for the encoder).
        o2m: one-to-many queries in training (hybrid matching, Group DETR; :mod:`detrkit.layers.one_to_many`).
        query_nms: two-stage only: DDQ's distinct query selection at this IoU (:func:`distinct_topk`); None = the
            paper's plain top-k.
    """

    score_activation = "sigmoid"
    loss_config = LossConfig(focal=True, class_weight=2.0, bbox_weight=5.0, giou_weight=2.0, enc_class_agnostic=True)
    slow_params = ("sampling_offsets", "reference_points")  # trained at slow_lr_factor x lr, as in the official recipe
    slow_lr_factor = 0.1

    def __init__(self, backbone: nn.Module, position_encoding: nn.Module, encoder: DeformableEncoder,
                 decoder: DeformableDecoder, *, num_classes: int, num_queries: int = 300, d_model: int = 256,
                 num_feature_levels: int = 4, refine: bool = False, two_stage: bool = False,
                 o2m: OneToMany | None = None, query_nms: float | None = None) -> None:
        super().__init__()
        self.num_classes, self.num_queries, self.d_model = num_classes, num_queries, d_model
        self.refine, self.two_stage, self.o2m = refine, two_stage, o2m
        self.query_nms = check_query_nms(query_nms, two_stage)
        self.eps = decoder.eps  # inverse-sigmoid clamp of the references, the decoder's (official: 1e-5)
        self.backbone = backbone
        self.position_encoding = position_encoding
        channels = list(backbone.channels.values())
        self.neck = MultiScaleProjection(channels, d_model, num_extra=num_feature_levels - len(channels))
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model).normal_())
        self.encoder, self.decoder = encoder, decoder
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)  # positional half + content half
            if o2m is not None:  # the one-to-many queries, used in training only
                self.query_embed_o2m = nn.Embedding(o2m.queries, 2 * d_model)
            self.reference_points = nn.Linear(d_model, 2)
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        self.class_embed, self.bbox_embed = self._build_heads(len(decoder.layers) + int(two_stage))
        if refine:
            decoder.bbox_embed = self.bbox_embed

    def _build_heads(self, num_pred: int) -> tuple[nn.ModuleList, nn.ModuleList]:
        class_embed, bbox_embed = focal_class_head(self.d_model, self.num_classes), zero_box_head(self.d_model)
        nn.init.constant_(bbox_embed.layers[-1].bias[2:], 0.0 if self.two_stage else -2.0)  # small boxes at start
        if self.refine or self.two_stage:  # one head per prediction
            return (nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred)),
                    nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred)))
        # plain Deformable DETR shares one head across layers (the same module at every index)
        return nn.ModuleList([class_embed] * num_pred), nn.ModuleList([bbox_embed] * num_pred)

    def forward(
        self, images: Tensor, padding_mask: Tensor | None = None, targets: list[dict] | None = None
    ) -> DetectionOutput:
        """images (B, 3, H, W) normalized; padding_mask (B, H, W) True on padding; targets unused."""
        memory, mask, shapes, starts, ratios = self._encode(images, padding_mask)
        extra = 0  # one-to-many queries, training only (a two-stage model's default count fits its proposals)
        if self.training and self.o2m is not None:
            extra = self.o2m.count(self.num_queries, memory.shape[1] if self.two_stage else None)
        if self.two_stage:
            tgt, query_pos, reference, enc_outputs = self._select_topk_proposals(memory, mask, shapes, extra)
        else:
            embed = self.query_embed.weight
            if extra:
                embed = torch.cat([embed, self.query_embed_o2m.weight])
            query_pos, tgt = embed[None].expand(images.shape[0], -1, -1).split(self.d_model, -1)
            reference, enc_outputs = self.reference_points(query_pos).sigmoid(), None  # (B, Q, 2)
        attn_mask = separated_self_attn_mask(self.num_queries, extra, images.device, self.o2m.groups) if extra else None
        hidden, references = self.decoder(tgt, reference, memory, shapes, starts, ratios, query_pos, mask, attn_mask)
        if not extra:
            return self._heads(hidden, references, enc_outputs)
        q = self.num_queries  # the first q queries are the one-to-one ones
        out = self._heads(hidden[:, :, :q], [r[:, :q] for r in references], enc_outputs)
        o2m = self._heads(hidden[:, :, q:], [r[:, q:] for r in references], None)
        return replace(out, o2m_outputs=[*o2m.aux_outputs, LayerOutput(o2m.pred_logits, o2m.pred_boxes)],
                       **self.o2m.output_fields())

    def _encode(self, images: Tensor, padding_mask: Tensor | None):
        """Backbone -> neck -> flattened levels with position + level embeddings -> deformable encoder."""
        return encode_multi_scale(images, padding_mask, backbone=self.backbone, neck=self.neck,
                                  position_encoding=self.position_encoding, level_embed=self.level_embed,
                                  encoder=self.encoder)

    def _select_topk_proposals(self, memory: Tensor, mask: Tensor, shapes: Tensor, extra: int = 0):
        """Two-stage: score every encoder proposal with the extra head, keep the top-k as reference boxes (and the
        next ``extra`` for the one-to-many queries)."""
        enc_logits, enc_coords = score_proposals(memory, mask, shapes, enc_output=self.enc_output,
                                                 enc_output_norm=self.enc_output_norm,
                                                 class_head=self.class_embed[-1], box_head=self.bbox_embed[-1])
        check_proposals(self.num_queries, extra, enc_logits.shape[1])
        # class-agnostic objectness: channel 0; with query_nms, DDQ's distinct proposals
        topk = select_proposals(enc_logits[..., 0], enc_coords, self.num_queries + extra, self.query_nms)
        coords = gather_queries(enc_coords, topk).detach()  # (B, Q, 4)
        query = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(coords, self.d_model // 2)))  # (B, Q, 2C)
        query_pos, tgt = query.split(self.d_model, -1)
        return tgt, query_pos, coords.sigmoid(), LayerOutput(enc_logits, enc_coords.sigmoid())

    def _heads(self, hidden: Tensor, references: list[Tensor], enc_outputs: LayerOutput | None) -> DetectionOutput:
        """hidden (L, B, Q, C), each layer's input reference [(B, Q, 2 or 4)] * L -> logits and boxes per layer."""
        logits, boxes = [], []
        for lvl in range(hidden.shape[0]):
            ref = inverse_sigmoid(references[lvl], self.eps)
            delta = self.bbox_embed[lvl](hidden[lvl])  # (B, Q, 4)
            d = ref.shape[-1]
            boxes.append(torch.cat([delta[..., :d] + ref, delta[..., d:]], -1).sigmoid())
            logits.append(self.class_embed[lvl](hidden[lvl]))
        aux = aux_outputs(logits, boxes)
        return DetectionOutput(pred_logits=logits[-1], pred_boxes=boxes[-1], aux_outputs=aux, enc_outputs=enc_outputs)


def init_deformable_transformer(*modules: nn.Module) -> None:
    """The official init: Xavier on every matrix, then each deformable attention's own (radial offsets)."""
    for module in modules:
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in module.modules():
            if hasattr(m, "sampling_offsets"):
                m.reset_parameters()


def build_deformable_detr(
    *,
    num_classes: int,
    backbone: str = "resnet50",
    feature_stages: tuple[str, ...] = ("layer2", "layer3", "layer4"),
    num_feature_levels: int = 4,
    pretrained_backbone: bool = False,
    backbone_norm: str = "frozen",
    trainable_layers: int = 3,
    d_model: int = 256,
    nhead: int = 8,
    num_encoder_layers: int = 6,
    num_decoder_layers: int = 6,
    dim_feedforward: int = 1024,
    dropout: float = 0.1,
    n_points: int = 4,
    num_queries: int = 300,
    refine: bool = False,
    two_stage: bool = False,
    inverse_sigmoid_eps: float = 1e-5,
    one_to_many: str = "none",
    o2m_queries: int | None = None,
    o2m_k: int = 6,
    o2m_groups: int = 11,
    query_nms: float | None = None,
) -> DeformableDETR:
    """Wire a Deformable DETR from plain settings; the presets call this with the paper's values.

    ``one_to_many="hybrid"`` adds H-DETR's one-to-many queries in training: ``o2m_queries`` of them (default five
    times ``num_queries``, the paper's 1500 beside 300, or the proposals left on small images), matched to the
    ground truth repeated ``o2m_k`` times;
    ``"group"`` adds Group DETR's ``o2m_groups`` - 1 extra copies of the queries (:mod:`detrkit.layers.one_to_many`).
    ``query_nms`` (two-stage only): DDQ's distinct query selection at this IoU, in training and inference."""
    body = ResNetBackbone(backbone, return_layers=tuple(feature_stages), pretrained=pretrained_backbone,
                          norm=backbone_norm, trainable_layers=trainable_layers)
    pos = PositionEmbeddingSine(d_model // 2, normalize=True, offset=-0.5)
    enc_layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, n_points)
    dec_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, n_points)
    encoder, decoder = DeformableEncoder(enc_layer, num_encoder_layers), DeformableDecoder(
        dec_layer, num_decoder_layers, inverse_sigmoid_eps=inverse_sigmoid_eps)
    init_deformable_transformer(encoder, decoder)
    return DeformableDETR(
        body,
        pos,
        encoder,
        decoder,
        num_classes=num_classes,
        num_queries=num_queries,
        d_model=d_model,
        num_feature_levels=num_feature_levels,
        refine=refine,
        two_stage=two_stage,
        o2m=one_to_many_branch(one_to_many, num_queries, o2m_queries, o2m_k, o2m_groups),
        query_nms=query_nms,
    )


_PAPER = "Deformable DETR (Zhu et al. 2021)"
_RECIPE = {"epochs": 50, "lr": 2e-4, "lr_backbone": 2e-5, "lr_drop": 40}  # the paper's 50-epoch schedule


@register_model(paper=_PAPER, input_size=(800, 1333), coco_ap=0.445, recipe=_RECIPE,
                weights={"coco": Weights(_HF_DEFORMABLE, 0.445, "SenseTime/deformable-detr (HF Hub)")})
def deformable_detr_r50(*, num_classes: int = 91, **overrides) -> DeformableDETR:
    """Deformable DETR, ResNet-50, 4 levels, 6+6 layers, 300 queries, focal loss."""
    return build_deformable_detr(**{"num_classes": num_classes, **overrides})


@register_model(
    paper=_PAPER,
    input_size=(800, 1333),
    coco_ap=0.462,
    recipe=_RECIPE,
    weights={"coco": Weights(f"{_DETREX_URL}/v0.1.1/deformable_detr_with_box_refinement_50ep_new.pth", 0.470, _DETREX)},
)
def deformable_detr_r50_refine(*, num_classes: int = 91, **overrides) -> DeformableDETR:
    """Deformable DETR with iterative bounding box refinement."""
    return build_deformable_detr(**{"num_classes": num_classes, "refine": True, **overrides})


@register_model(
    paper=_PAPER,
    input_size=(800, 1333),
    coco_ap=0.469,
    recipe=_RECIPE,
    weights={"coco": Weights(f"{_DETREX_URL}/v0.1.1/deformable_detr_r50_two_stage_50ep_new.pth", 0.482, _DETREX)},
)
def deformable_detr_r50_two_stage(*, num_classes: int = 91, **overrides) -> DeformableDETR:
    """Two-stage Deformable DETR (with refinement): encoder proposals become the queries."""
    return build_deformable_detr(**{"num_classes": num_classes, "refine": True, "two_stage": True, **overrides})


@register_model(paper=_PAPER, input_size=(800, 1333), coco_ap=0.394, recipe=_RECIPE)
def deformable_detr_r50_single_scale(*, num_classes: int = 91, **overrides) -> DeformableDETR:
    """Single-scale Deformable DETR: only the stride-32 map, deformable attention on one level."""
    return build_deformable_detr(**{"num_classes": num_classes, "feature_stages": ("layer4",), "num_feature_levels": 1,
                                    **overrides})


@register_model(paper=f"{_PAPER}, lite preset", input_size=(640, 640), coco_ap=None)
def deformable_detr_lite(*, num_classes: int = 91, **overrides) -> DeformableDETR:
    """Deformable-DETR-Lite: ResNet-18 (strides 8/16 + one extra level), width 128, 3+3 layers, 100 queries, refine."""
    defaults = dict(backbone="resnet18", feature_stages=("layer2", "layer3"), num_feature_levels=3,
                    backbone_norm="batch", trainable_layers=5, d_model=128, nhead=8, num_encoder_layers=3,
                    num_decoder_layers=3, dim_feedforward=512, dropout=0.0, num_queries=100, refine=True)
    return build_deformable_detr(num_classes=num_classes, **{**defaults, **overrides})
