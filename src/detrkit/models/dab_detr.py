"""DAB-DETR (Liu et al., ICLR 2022) and DN-DETR (Li et al., CVPR 2022) on top of it.

DETR's single-scale encoder, but the decoder's queries are learned 4-D anchor boxes refined layer by
layer (layers/dab.py), with the sigmoid focal loss. DN-DETR adds denoising training
(layers/denoising.py): noised ground truth enters the decoder as extra queries whose labels are
embedded by ``label_enc`` plus an indicator channel (1 = denoising, 0 = matching query); the
matching queries' content is the embedding of the extra "unknown" class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.backbones import ResNetBackbone
from detrkit.layers import PositionEmbeddingSine, TransformerEncoderLayer
from detrkit.layers.dab import DABDecoder, DABDecoderLayer, DABEncoder
from detrkit.layers.denoising import (
    DN_DETR_NOISE,
    DenoisingConfig,
    DenoisingLayout,
    as_denoising_config,
    build_dn_queries,
    prepend_dn_queries,
    preset_denoising,
    split_dn_outputs,
)
from detrkit.layers.heads import aux_outputs, focal_class_head, zero_box_head
from detrkit.layers.one_to_many import OneToMany, hide_after_denoising, one_to_many_branch, split_o2m_outputs
from detrkit.models.encode import encode_single_scale
from detrkit.models.outputs import DetectionOutput, LossConfig
from detrkit.ops import inverse_sigmoid
from detrkit.registry import Weights, register_model

# Released COCO weights (``create_model(name, weights="coco")``); detrex models use the 80 COCO classes.
_DETREX = "IDEA-Research/detrex model zoo"
_DETREX_URL = "https://github.com/IDEA-Research/detrex-storage/releases/download"


class DABDETR(nn.Module):
    """The DAB-DETR detector, optionally with DN-DETR denoising training.

    Args:
        backbone: returns ``{stage: (features, mask)}``; the last stage is used.
        position_encoding: sine encoding of the feature map's mask.
        encoder: :class:`~detrkit.layers.dab.DABEncoder`.
        decoder: :class:`~detrkit.layers.dab.DABDecoder`.
        num_classes: object classes (sigmoid outputs, no background class).
        num_queries: anchor boxes (300).
        d_model: transformer width.
        denoising: DN-DETR settings; None = plain DAB-DETR.
    """

    score_activation = "sigmoid"
    loss_config = LossConfig(focal=True, class_weight=1.0, bbox_weight=5.0, giou_weight=2.0, cost_class=2.0)

    def __init__(self, backbone: nn.Module, position_encoding: nn.Module, encoder: DABEncoder, decoder: DABDecoder, *,
                 num_classes: int, num_queries: int = 300, d_model: int = 256,
                 denoising: DenoisingConfig | None = None, o2m: OneToMany | None = None) -> None:
        super().__init__()
        self.eps = decoder.eps  # inverse-sigmoid clamp of the anchors, the decoder's (official: 1e-3)
        self.num_classes, self.num_queries, self.d_model = num_classes, num_queries, d_model
        self.backbone, self.position_encoding = backbone, position_encoding
        (self.feature_name, in_channels), = list(backbone.channels.items())[-1:]
        self.input_proj = nn.Conv2d(in_channels, d_model, kernel_size=1)
        self.encoder, self.decoder = encoder, decoder
        self.refpoint_embed = nn.Embedding(num_queries, 4)  # anchors (x, y, w, h) before the sigmoid
        self.o2m = o2m
        if o2m is not None:  # one-to-many anchors (hybrid / group), training only
            self.refpoint_embed_o2m = nn.Embedding(o2m.queries, 4)
        self.class_embed = focal_class_head(d_model, num_classes)
        self.bbox_embed = zero_box_head(d_model)
        decoder.bbox_embed = self.bbox_embed  # one box head for the final boxes and the anchor updates
        self.denoising = denoising
        if denoising is not None:  # class embeddings + the "unknown" class; the last channel is the indicator
            self.label_enc = nn.Embedding(num_classes + 1, d_model - 1)

    def forward(
        self, images: Tensor, padding_mask: Tensor | None = None, targets: list[dict] | None = None
    ) -> DetectionOutput:
        """images (B, 3, H, W) normalized; padding_mask (B, H, W) True on padding; targets feed denoising."""
        memory, mask, pos = self._encode(images, padding_mask)
        extra = self.o2m.queries if self.training and self.o2m is not None else 0  # one-to-many queries
        tgt, anchors, attn_mask, dn_meta = self._build_queries(images.shape[0], targets, extra)
        if extra:  # [denoising, one-to-one, one-to-many]: the last two (and the groups) unable to see each other
            attn_mask = hide_after_denoising(attn_mask, tgt.shape[1], dn_meta.num_dn if dn_meta is not None else 0,
                                             extra, self.o2m.groups, tgt.device)
        hidden, refs = self.decoder(tgt, memory, pos, anchors, mask, attn_mask)
        return self._heads(hidden, refs, dn_meta, extra)

    def _encode(self, images: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """DETR's encode step: backbone -> projection -> encoder. Returns memory, mask (B, S), pos."""
        return encode_single_scale(images, padding_mask, backbone=self.backbone, feature_name=self.feature_name,
                                   input_proj=self.input_proj, position_encoding=self.position_encoding,
                                   encoder=self.encoder)

    def _embed_labels(self, labels: Tensor, indicator: float) -> Tensor:
        """labels (B, N) -> DN-DETR content queries (B, N, C): label embedding + indicator channel."""
        emb = self.label_enc(labels)
        return torch.cat([emb, emb.new_full((*labels.shape, 1), indicator)], -1)

    def _build_queries(self, batch: int, targets: list[dict] | None, extra: int = 0):
        """Content queries (B, N, C), anchors (B, N, 4) before the sigmoid, self-attention mask and denoising
        layout; N = Q matching queries (then ``extra`` one-to-many ones), preceded in DN training by the denoising
        ones."""
        anchors = self.refpoint_embed.weight
        if extra:
            anchors = torch.cat([anchors, self.refpoint_embed_o2m.weight])
        anchors = anchors[None].expand(batch, -1, -1)
        num = self.num_queries + extra
        if self.denoising is None:
            return anchors.new_zeros(batch, num, self.d_model), anchors, None, None
        unknown = torch.full((batch, num), self.num_classes, dtype=torch.int64, device=anchors.device)
        tgt = self._embed_labels(unknown, 0.0)
        dn = (
            build_dn_queries(targets, self.num_classes, num, self.denoising)
            if self.training and targets
            else None
        )
        if dn is None:  # inference (or a batch without objects): no denoising part at all
            return tgt, anchors, None, None
        labels, boxes, attn_mask, meta = dn
        tgt, anchors = prepend_dn_queries(tgt, anchors, self._embed_labels(labels, 1.0), boxes, self.eps)
        return tgt, anchors, attn_mask, meta

    def _heads(self, hidden: Tensor, refs: Tensor, dn_meta: DenoisingLayout | None, extra: int = 0
               ) -> DetectionOutput:
        """hidden (L, B, N, C), anchors each layer received (L, B, N, 4) -> logits and boxes per layer; the last
        ``extra`` queries are the one-to-many ones (hybrid matching, Group DETR)."""
        logits = self.class_embed(hidden)  # (L, B, N, K)
        boxes = (self.bbox_embed(hidden) + inverse_sigmoid(refs, self.eps)).sigmoid()  # (L, B, N, 4)
        logits, boxes, dn_outputs = split_dn_outputs(logits, boxes, dn_meta)
        logits, boxes, o2m = split_o2m_outputs(logits, boxes, extra)
        return DetectionOutput(pred_logits=logits[-1], pred_boxes=boxes[-1], aux_outputs=aux_outputs(logits, boxes),
                               dn_meta=dn_meta, dn_outputs=dn_outputs, o2m_outputs=o2m,
                               **(self.o2m.output_fields() if extra else {}))


def build_dab_detr(
    *,
    num_classes: int,
    backbone: str = "resnet50",
    dilation: bool = False,
    feature_stage: str = "layer4",
    pretrained_backbone: bool = False,
    backbone_norm: str = "frozen",
    trainable_layers: int = 3,
    d_model: int = 256,
    nhead: int = 8,
    num_encoder_layers: int = 6,
    num_decoder_layers: int = 6,
    dim_feedforward: int = 2048,
    dropout: float = 0.1,
    ffn_activation: str = "prelu",
    num_queries: int = 300,
    pe_temperature: float = 20.0,
    denoising: DenoisingConfig | dict | None = None,
    inverse_sigmoid_eps: float = 1e-3,
    one_to_many: str = "none",
    o2m_queries: int | None = None,
    o2m_k: int = 6,
    o2m_groups: int = 11,
) -> DABDETR:
    """Wire a DAB-DETR (DN-DETR with ``denoising``) from plain settings; the presets pass the papers' values.
    ``one_to_many="hybrid"`` / ``"group"``: one-to-many queries in training (see ``build_deformable_detr``)."""
    body = ResNetBackbone(backbone, return_layers=(feature_stage,), dilation=dilation, pretrained=pretrained_backbone,
                          norm=backbone_norm, trainable_layers=trainable_layers)
    pos = PositionEmbeddingSine(d_model // 2, temperature=pe_temperature, normalize=True)
    encoder = DABEncoder(
        TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, ffn_activation), num_encoder_layers, d_model
    )
    decoder = DABDecoder(DABDecoderLayer(d_model, nhead, dim_feedforward, dropout, ffn_activation, is_first=True),
                         num_decoder_layers, d_model, inverse_sigmoid_eps=inverse_sigmoid_eps)
    for p in [*encoder.parameters(), *decoder.parameters()]:
        if p.dim() > 1:  # the official transformer's init: Xavier on every matrix
            nn.init.xavier_uniform_(p)
    return DABDETR(body, pos, encoder, decoder, num_classes=num_classes, num_queries=num_queries, d_model=d_model,
                   denoising=as_denoising_config(denoising),
                   o2m=one_to_many_branch(one_to_many, num_queries, o2m_queries, o2m_k, o2m_groups))


_RECIPE = {"epochs": 50, "lr": 1e-4, "lr_backbone": 1e-5, "lr_drop": 40}  # DAB-DETR / DN-DETR: 50 epochs
_LITE = dict(backbone="resnet18", feature_stage="layer3", backbone_norm="batch", trainable_layers=5, d_model=128,
             nhead=8, num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=512, dropout=0.0, num_queries=100)


@register_model(paper="DAB-DETR (Liu et al. 2022)", input_size=(800, 1333), coco_ap=0.422, recipe=_RECIPE,
                weights={"coco": Weights(f"{_DETREX_URL}/v0.1.0/dab_detr_r50_50ep.pth", 0.433, _DETREX)})
def dab_detr_r50(*, num_classes: int = 91, **overrides) -> DABDETR:
    """DAB-DETR, ResNet-50: 300 anchor queries, 6+6 layers, PReLU FFN, focal loss."""
    return build_dab_detr(**{"num_classes": num_classes, **overrides})


@register_model(paper="DAB-DETR (Liu et al. 2022)", input_size=(800, 1333), coco_ap=0.445, recipe=_RECIPE,
                weights={"coco": Weights(f"{_DETREX_URL}/v0.3.0/converted_dab_detr_r50_dc5.pth", 0.446, _DETREX)})
def dab_detr_r50_dc5(*, num_classes: int = 91, **overrides) -> DABDETR:
    """DAB-DETR with a dilated last ResNet-50 stage (stride 16)."""
    return build_dab_detr(**{"num_classes": num_classes, "dilation": True, **overrides})


@register_model(paper="DAB-DETR (Liu et al. 2022), lite preset", input_size=(640, 640), coco_ap=None)
def dab_detr_lite(*, num_classes: int = 91, **overrides) -> DABDETR:
    """DAB-DETR-Lite: ResNet-18 to stride 16, width 128, 3+3 layers, FFN 512, 100 anchors (as detr_lite)."""
    return build_dab_detr(num_classes=num_classes, **{**_LITE, **overrides})


@register_model(paper="DN-DETR (Li et al. 2022)", input_size=(800, 1333), coco_ap=0.444, recipe=_RECIPE,
                weights={"coco": Weights(f"{_DETREX_URL}/v0.1.0/dn_detr_r50_50ep.pth", 0.447, _DETREX)})
def dn_dab_detr_r50(*, num_classes: int = 91, **overrides) -> DABDETR:
    """DN-DAB-DETR, ResNet-50: DAB-DETR trained with 5 denoising groups."""
    return build_dab_detr(**{"num_classes": num_classes, **overrides,
                             "denoising": preset_denoising(overrides, DN_DETR_NOISE)})


@register_model(paper="DN-DETR (Li et al. 2022), lite preset", input_size=(640, 640), coco_ap=None)
def dn_dab_detr_lite(*, num_classes: int = 91, **overrides) -> DABDETR:
    """DN-DAB-DETR-Lite: dab_detr_lite trained with 5 denoising groups."""
    return build_dab_detr(num_classes=num_classes, **{**_LITE, **overrides,
                                                      "denoising": preset_denoising(overrides, DN_DETR_NOISE)})
