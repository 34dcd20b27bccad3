"""DINO (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes for End-to-End Object Detection", ICLR 2023).

Deformable DETR's 4-scale encoder with DAB-style anchor-box queries and three improvements, each in
one visible place:

- contrastive denoising (section 3.3): positive and negative noised ground truth as extra queries,
  ``layers/denoising.py`` (:func:`~detrkit.layers.denoising.add_dn_queries`, losses in ``losses/criterion.py``);
- mixed query selection (section 3.2): the positional queries (anchor boxes) are the top-k encoder
  proposals, the content queries stay learned embeddings (:meth:`DINO._select_queries`);
- look forward twice (section 3.4): each layer's box prediction refines the previous layer's undetached
  box (``layers/deformable.py``, :class:`~detrkit.layers.DeformableAnchorDecoder`).

With ``two_stage=False``, ``look_forward_twice=False`` and DN-DETR's non-contrastive noise, the same
class is DN-Deformable-DETR (DAB-Deformable-DETR trained with denoising).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from detrkit.backbones import ResNetBackbone
from detrkit.layers import (
    DeformableAnchorDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    MultiScaleProjection,
    PositionEmbeddingSine,
)
from detrkit.layers.denoising import (
    DINO_NOISE,
    DN_DETR_NOISE,
    DenoisingConfig,
    DenoisingLayout,
    add_dn_queries,
    as_denoising_config,
    preset_denoising,
    split_dn_outputs,
)
from detrkit.layers.heads import aux_outputs, focal_class_head, refined_predictions, zero_box_head
from detrkit.layers.one_to_many import (
    OneToMany,
    check_proposals,
    hide_after_denoising,
    one_to_many_branch,
    split_o2m_outputs,
)
from detrkit.models.deformable_detr import (
    check_query_nms,
    gather_queries,
    init_deformable_transformer,
    score_proposals,
    select_proposals,
)
from detrkit.models.encode import encode_multi_scale
from detrkit.models.outputs import DetectionOutput, LayerOutput, LossConfig
from detrkit.registry import Weights, register_model

# Released COCO weights (``create_model(name, weights="coco")``); detrex models use the 80 COCO classes.
_DETREX = "IDEA-Research/detrex model zoo"
_DETREX_URL = "https://github.com/IDEA-Research/detrex-storage/releases/download"


class DINO(nn.Module):
    """The DINO detector.

    Args:
        backbone: returns ``{stage: (features, mask)}`` for the levels it feeds the neck.
        position_encoding: sine encoding of each level's mask.
        encoder: deformable encoder.
        decoder: :class:`~detrkit.layers.DeformableAnchorDecoder`.
        num_classes: object classes (sigmoid outputs).
        num_queries: matching queries (900).
        d_model: transformer width.
        num_feature_levels: backbone levels + extra stride-2 levels.
        two_stage: mixed query selection from encoder proposals; False = learned anchors (``refpoint_embed``).
        denoising: denoising settings (DINO: contrastive, 100 queries); None = no denoising.
        share_heads: one class head and one box head for all decoder layers (official DINO); False = one per
            layer (detrex's DINO).
        o2m: one-to-many queries in training (hybrid matching, Group DETR; :mod:`detrkit.layers.one_to_many`).
        query_nms: two-stage only: DDQ's distinct query selection at this IoU
            (:func:`~detrkit.models.deformable_detr.distinct_topk`); None = DINO's plain top-k.
    """

    score_activation = "sigmoid"
    loss_config = LossConfig(focal=True, class_weight=1.0, bbox_weight=5.0, giou_weight=2.0, cost_class=2.0)
    slow_params = ("sampling_offsets",)  # trained at slow_lr_factor x lr, as in the official recipe
    slow_lr_factor = 0.1

    def __init__(self, backbone: nn.Module, position_encoding: nn.Module, encoder: DeformableEncoder,
                 decoder: DeformableAnchorDecoder, *, num_classes: int, num_queries: int = 900, d_model: int = 256,
                 num_feature_levels: int = 4, two_stage: bool = True, denoising: DenoisingConfig | None = None,
                 share_heads: bool = True, o2m: OneToMany | None = None, query_nms: float | None = None) -> None:
        super().__init__()
        self.num_classes, self.num_queries, self.d_model = num_classes, num_queries, d_model
        self.query_nms = check_query_nms(query_nms, two_stage)
        self.two_stage, self.denoising, self.o2m = two_stage, denoising, o2m
        self.eps = decoder.eps  # inverse-sigmoid clamp of the boxes, the decoder's (official: 1e-3)
        self.backbone, self.position_encoding = backbone, position_encoding
        channels = list(backbone.channels.values())
        self.neck = MultiScaleProjection(channels, d_model, num_extra=num_feature_levels - len(channels))
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model).normal_())
        self.encoder, self.decoder = encoder, decoder
        self.tgt_embed = nn.Embedding(num_queries, d_model)  # learned content queries
        nn.init.normal_(self.tgt_embed.weight)
        if o2m is not None:  # one-to-many queries (hybrid / group), training only
            self.tgt_embed_o2m = nn.Embedding(o2m.queries, d_model)
            nn.init.normal_(self.tgt_embed_o2m.weight)
            if not two_stage:
                self.refpoint_embed_o2m = nn.Embedding(o2m.queries, 4)
        class_head, box_head = focal_class_head(d_model, num_classes), zero_box_head(d_model)
        num_layers = len(decoder.layers)
        if share_heads:  # the same module at every index
            self.class_embed = nn.ModuleList([class_head] * num_layers)
            self.bbox_embed = nn.ModuleList([box_head] * num_layers)
        else:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_layers))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_layers))
        decoder.bbox_embed = self.bbox_embed
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.enc_out_class_embed = copy.deepcopy(class_head)  # the encoder's own heads
            self.enc_out_bbox_embed = copy.deepcopy(box_head)
        else:
            self.refpoint_embed = nn.Embedding(num_queries, 4)  # learned anchors before the sigmoid
        if denoising is not None:
            self.label_enc = nn.Embedding(num_classes + 1, d_model)

    def _encode(self, images: Tensor, padding_mask: Tensor | None):
        """Deformable DETR's encode step: backbone -> neck -> levels with positions -> deformable encoder."""
        return encode_multi_scale(images, padding_mask, backbone=self.backbone, neck=self.neck,
                                  position_encoding=self.position_encoding, level_embed=self.level_embed,
                                  encoder=self.encoder)

    def forward(
        self, images: Tensor, padding_mask: Tensor | None = None, targets: list[dict] | None = None
    ) -> DetectionOutput:
        """images (B, 3, H, W) normalized; padding_mask (B, H, W) True on padding; targets feed denoising."""
        memory, mask, shapes, starts, ratios = self._encode(images, padding_mask)
        extra = 0  # one-to-many queries, training only (a two-stage model's default count fits its proposals)
        if self.training and self.o2m is not None:
            extra = self.o2m.count(self.num_queries, memory.shape[1] if self.two_stage else None)
        tgt, anchors, enc_outputs = self._select_queries(memory, mask, shapes, extra)
        tgt, anchors, attn_mask, dn_meta = add_dn_queries(
            tgt, anchors, targets, config=self.denoising, num_classes=self.num_classes,
            label_enc=getattr(self, "label_enc", None), eps=self.eps, training=self.training)
        if extra:  # [denoising, one-to-one, one-to-many]: the last two (and the groups) unable to see each other
            attn_mask = hide_after_denoising(attn_mask, tgt.shape[1], dn_meta.num_dn if dn_meta is not None else 0,
                                             extra, self.o2m.groups, tgt.device)
        hidden, refs = self.decoder(tgt, anchors, memory, shapes, starts, ratios, mask, attn_mask)
        return self._heads(hidden, refs, enc_outputs, dn_meta, extra)

    def _select_queries(self, memory: Tensor, mask: Tensor, shapes: Tensor, extra: int = 0):
        """Mixed query selection (section 3.2): anchors = the top-k encoder proposals (by best class score),
        detached; content = the learned ``tgt_embed``. Returns tgt (B, Q, C), anchors (B, Q, 4) before the
        sigmoid and the encoder outputs of the selected proposals for the two-stage loss. With ``extra``
        one-to-many queries they follow: the next proposals, their own content embeddings."""
        b = memory.shape[0]
        tgt_embed = torch.cat([self.tgt_embed.weight, self.tgt_embed_o2m.weight]) if extra else self.tgt_embed.weight
        if not self.two_stage:
            anchors = self.refpoint_embed.weight
            if extra:
                anchors = torch.cat([anchors, self.refpoint_embed_o2m.weight])
            return tgt_embed[None].expand(b, -1, -1), anchors[None].expand(b, -1, -1), None
        enc_logits, enc_coords = score_proposals(memory, mask, shapes, enc_output=self.enc_output,
                                                 enc_output_norm=self.enc_output_norm,
                                                 class_head=self.enc_out_class_embed, box_head=self.enc_out_bbox_embed)
        if extra:
            check_proposals(self.num_queries, extra, memory.shape[1])
        k = min(self.num_queries, memory.shape[1])
        # (B, k): by the best class score; with query_nms, DDQ's distinct proposals
        topk = select_proposals(enc_logits.max(-1).values, enc_coords, k + extra, self.query_nms)
        coords, logits = gather_queries(enc_coords, topk), gather_queries(enc_logits, topk)  # (B, k, 4), (B, k, K)
        tgt = torch.cat([tgt_embed[:k], tgt_embed[self.num_queries:self.num_queries + extra]])[None].expand(b, -1, -1)
        return tgt, coords.detach(), LayerOutput(logits[:, :k], coords[:, :k].sigmoid())

    def _heads(self, hidden: Tensor, refs: list[Tensor], enc_outputs: LayerOutput | None,
               dn_meta: DenoisingLayout | None, extra: int = 0) -> DetectionOutput:
        """hidden (L, B, N, C), boxes each layer refines (L, B, N, 4) -> logits and boxes per layer; the last
        ``extra`` queries are the one-to-many ones (hybrid matching, Group DETR)."""
        logits, boxes = refined_predictions(hidden, refs, self.class_embed, self.bbox_embed, self.eps)
        logits, boxes, dn_outputs = split_dn_outputs(logits, boxes, dn_meta)
        logits, boxes, o2m = split_o2m_outputs(logits, boxes, extra)
        return DetectionOutput(pred_logits=logits[-1], pred_boxes=boxes[-1], aux_outputs=aux_outputs(logits, boxes),
                               enc_outputs=enc_outputs, dn_meta=dn_meta, dn_outputs=dn_outputs, o2m_outputs=o2m,
                               **(self.o2m.output_fields() if extra else {}))


def build_dino(
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
    dim_feedforward: int = 2048,
    dropout: float = 0.0,
    n_points: int = 4,
    num_queries: int = 900,
    pe_temperature: float = 20.0,
    pe_offset: float = 0.0,
    two_stage: bool = True,
    look_forward_twice: bool = True,
    denoising: DenoisingConfig | dict | None = None,
    share_heads: bool = True,
    inverse_sigmoid_eps: float = 1e-3,
    one_to_many: str = "none",
    o2m_queries: int | None = None,
    o2m_k: int = 6,
    o2m_groups: int = 11,
    query_nms: float | None = None,
) -> DINO:
    """Wire a DINO (or, with the flags off, DN-Deformable-DETR) from plain settings.

    The official DINO encodes positions with temperature 20 and no offset; detrex's DINO with 10000 and -0.5
    (``pe_temperature=10000, pe_offset=-0.5, share_heads=False`` reproduce a detrex model).
    ``one_to_many="hybrid"`` / ``"group"``: one-to-many queries in training (see :func:`build_deformable_detr`).
    ``query_nms`` (two-stage only): DDQ's distinct query selection at this IoU, in training and inference.
    """
    body = ResNetBackbone(backbone, return_layers=tuple(feature_stages), pretrained=pretrained_backbone,
                          norm=backbone_norm, trainable_layers=trainable_layers)
    pos = PositionEmbeddingSine(d_model // 2, temperature=pe_temperature, normalize=True, offset=pe_offset)
    enc_layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, n_points)
    dec_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, n_points)
    encoder = DeformableEncoder(enc_layer, num_encoder_layers)
    decoder = DeformableAnchorDecoder(dec_layer, num_decoder_layers, d_model, look_forward_twice=look_forward_twice,
                                      inverse_sigmoid_eps=inverse_sigmoid_eps)
    init_deformable_transformer(encoder, decoder)
    return DINO(body, pos, encoder, decoder, num_classes=num_classes, num_queries=num_queries, d_model=d_model,
                num_feature_levels=num_feature_levels, two_stage=two_stage, denoising=as_denoising_config(denoising),
                share_heads=share_heads,
                o2m=one_to_many_branch(one_to_many, num_queries, o2m_queries, o2m_k, o2m_groups),
                query_nms=query_nms)


_PAPER = "DINO (Zhang et al. 2022)"
_RECIPE = {"epochs": 12, "lr": 1e-4, "lr_backbone": 1e-5, "lr_drop": 11}  # DINO's 12-epoch (1x) schedule


@register_model(paper=_PAPER, input_size=(800, 1333), coco_ap=0.490, recipe=_RECIPE,
                weights={"coco": Weights(f"{_DETREX_URL}/v0.2.0/dino_r50_4scale_12ep_49_2AP.pth", 0.492, _DETREX)})
def dino_r50_4scale(*, num_classes: int = 91, **overrides) -> DINO:
    """DINO-4scale, ResNet-50: 900 queries, contrastive denoising, 12-epoch recipe (lr 1e-4, backbone 1e-5, drop 11)."""
    return build_dino(**{"num_classes": num_classes, **overrides,
                         "denoising": preset_denoising(overrides, DINO_NOISE)})


@register_model(paper=_PAPER, input_size=(800, 1333), coco_ap=0.494, recipe=_RECIPE,
                weights={"coco": Weights(f"{_DETREX_URL}/v0.2.1/dino_r50_5scale_12ep.pth", 0.496, _DETREX)})
def dino_r50_5scale(*, num_classes: int = 91, **overrides) -> DINO:
    """DINO-5scale, ResNet-50: adds the stride-4 level (layer1), 12-epoch recipe."""
    return build_dino(**{"num_classes": num_classes, "feature_stages": ("layer1", "layer2", "layer3", "layer4"),
                         "num_feature_levels": 5, **overrides, "denoising": preset_denoising(overrides, DINO_NOISE)})


@register_model(paper=f"{_PAPER}, lite preset", input_size=(640, 640), coco_ap=None)
def dino_lite(*, num_classes: int = 91, **overrides) -> DINO:
    """DINO-Lite: ResNet-18 (strides 8/16 + one extra level), width 128, 3+3 layers, 100 queries, 100 DN queries."""
    defaults = dict(backbone="resnet18", feature_stages=("layer2", "layer3"), num_feature_levels=3,
                    backbone_norm="batch", trainable_layers=5, d_model=128, nhead=8, num_encoder_layers=3,
                    num_decoder_layers=3, dim_feedforward=512, num_queries=100)
    return build_dino(num_classes=num_classes, **{**defaults, **overrides,
                                                  "denoising": preset_denoising(overrides, DINO_NOISE)})


@register_model(paper="DN-DETR (Li et al. 2022), DN-Deformable-DETR", input_size=(800, 1333), coco_ap=None,
                recipe={"epochs": 50, "lr": 1e-4, "lr_backbone": 1e-5, "lr_drop": 40})
def dn_deformable_detr_r50(*, num_classes: int = 91, **overrides) -> DINO:
    """DN-Deformable-DETR, ResNet-50: Deformable DETR with 300 learned anchor boxes, refinement, 5 denoising groups."""
    return build_dino(**{"num_classes": num_classes, "num_queries": 300, "dim_feedforward": 1024, "dropout": 0.1,
                         "two_stage": False, "look_forward_twice": False, **overrides,
                         "denoising": preset_denoising(overrides, DN_DETR_NOISE)})
