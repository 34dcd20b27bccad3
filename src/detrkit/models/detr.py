"""DETR: End-to-End Object Detection with Transformers (Carion et al., ECCV 2020).

A CNN backbone, a 1x1 projection, a transformer encoder over the flattened feature map, a decoder
that turns N learned object queries into N predictions in parallel, and two heads: a linear class
head with an extra no-object class and a 3-layer MLP box head with a sigmoid (section 3.2).
Training matches predictions to ground truth with the Hungarian algorithm (losses/matcher.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.backbones import ResNetBackbone
from detrkit.layers import (
    MLP,
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from detrkit.layers.heads import aux_outputs
from detrkit.layers.one_to_many import OneToMany, one_to_many_branch, separated_self_attn_mask, split_o2m_outputs
from detrkit.models.encode import encode_single_scale
from detrkit.models.outputs import DetectionOutput, LossConfig
from detrkit.registry import Weights, register_model

# Released COCO weights (``create_model(name, weights="coco")``), named with their sha256 prefix.
_FB = "facebookresearch/detr"
_FB_URL = "https://dl.fbaipublicfiles.com/detr"


class DETR(nn.Module):
    """The DETR detector.

    Args:
        backbone: returns ``{stage: (features, mask)}``; DETR uses its last stage.
        position_encoding: maps a padding mask (B, h, w) to an encoding (B, d_model, h, w).
        encoder: transformer encoder over the flattened feature map.
        decoder: transformer decoder returning every layer's hidden states (L, B, Q, d_model).
        num_classes: number of object classes (the no-object class is added on top).
        num_queries: number of object queries, the most objects one image can yield.
        d_model: transformer width.
    """

    score_activation = "softmax"  # class scores: softmax over num_classes + 1, last = no-object
    loss_config = LossConfig(focal=False, class_weight=1.0, bbox_weight=5.0, giou_weight=2.0, eos_coef=0.1)

    def __init__(
        self,
        backbone: nn.Module,
        position_encoding: nn.Module,
        encoder: TransformerEncoder,
        decoder: TransformerDecoder,
        *,
        num_classes: int,
        num_queries: int = 100,
        d_model: int = 256,
        o2m: OneToMany | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.backbone = backbone
        self.position_encoding = position_encoding
        (self.feature_name, in_channels), = list(backbone.channels.items())[-1:]
        self.input_proj = nn.Conv2d(in_channels, d_model, kernel_size=1)
        self.encoder = encoder
        self.decoder = decoder
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.o2m = o2m
        if o2m is not None:  # one-to-many queries (hybrid / group), training only
            self.query_embed_o2m = nn.Embedding(o2m.queries, d_model)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        for p in [*encoder.parameters(), *decoder.parameters()]:
            if p.dim() > 1:  # the official transformer's init: Xavier on every matrix
                nn.init.xavier_uniform_(p)

    def forward(
        self, images: Tensor, padding_mask: Tensor | None = None, targets: list[dict] | None = None
    ) -> DetectionOutput:
        """images (B, 3, H, W) normalized; padding_mask (B, H, W) True on padding; targets unused by DETR."""
        memory, mask, pos = self._encode(images, padding_mask)
        extra = self.o2m.queries if self.training and self.o2m is not None else 0  # one-to-many queries
        embed = torch.cat([self.query_embed.weight, self.query_embed_o2m.weight]) if extra else self.query_embed.weight
        query_pos = embed[None].expand(images.shape[0], -1, -1)  # (B, Q, C)
        tgt = torch.zeros_like(query_pos)  # object queries enter as positions; content starts empty
        attn_mask = separated_self_attn_mask(self.num_queries, extra, images.device, self.o2m.groups) if extra else None
        hidden = self.decoder(tgt, memory, pos=pos, query_pos=query_pos, memory_key_padding_mask=mask,
                              self_attn_mask=attn_mask)  # (L, B, Q, C)
        return self._heads(hidden, extra)

    def _encode(self, images: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone -> projection -> encoder. Returns memory (B, S, C), mask (B, S), pos (B, S, C)."""
        return encode_single_scale(images, padding_mask, backbone=self.backbone, feature_name=self.feature_name,
                                   input_proj=self.input_proj, position_encoding=self.position_encoding,
                                   encoder=self.encoder)

    def _heads(self, hidden: Tensor, extra: int = 0) -> DetectionOutput:
        """hidden (L, B, Q, C) -> class logits and sigmoid boxes for every decoder layer; the last ``extra``
        queries are the one-to-many ones (hybrid matching, Group DETR)."""
        logits = self.class_embed(hidden)  # (L, B, Q, K+1)
        boxes = self.bbox_embed(hidden).sigmoid()  # (L, B, Q, 4)
        logits, boxes, o2m = split_o2m_outputs(logits, boxes, extra)
        return DetectionOutput(pred_logits=logits[-1], pred_boxes=boxes[-1], aux_outputs=aux_outputs(logits, boxes),
                               o2m_outputs=o2m, **(self.o2m.output_fields() if extra else {}))


def build_detr(
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
    num_queries: int = 100,
    position_embedding: str = "sine",
    one_to_many: str = "none",
    o2m_queries: int | None = None,
    o2m_k: int = 6,
    o2m_groups: int = 11,
) -> DETR:
    """Wire a DETR from plain settings; the presets below call this with the paper's values.
    ``one_to_many="hybrid"`` / ``"group"``: one-to-many queries in training (see ``build_deformable_detr``)."""
    body = ResNetBackbone(
        backbone, return_layers=(feature_stage,), dilation=dilation, pretrained=pretrained_backbone,
        norm=backbone_norm, trainable_layers=trainable_layers,
    )
    if position_embedding == "sine":
        pos = PositionEmbeddingSine(d_model // 2, normalize=True)
    elif position_embedding == "learned":
        pos = PositionEmbeddingLearned(d_model // 2)
    else:
        raise ValueError(f"position_embedding must be 'sine' or 'learned', got {position_embedding!r}")
    encoder = TransformerEncoder(TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout), num_encoder_layers)
    decoder = TransformerDecoder(
        TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout), num_decoder_layers, d_model
    )
    return DETR(body, pos, encoder, decoder, num_classes=num_classes, num_queries=num_queries, d_model=d_model,
                o2m=one_to_many_branch(one_to_many, num_queries, o2m_queries, o2m_k, o2m_groups))


# the paper's schedule (section 4): 500 epochs, lr drop after 400, backbone at 1e-5
DETR_RECIPE = {"epochs": 500, "lr": 1e-4, "lr_backbone": 1e-5, "lr_drop": 400}


@register_model(paper="DETR (Carion et al. 2020)", input_size=(800, 1333), coco_ap=0.420, recipe=DETR_RECIPE,
                weights={"coco": Weights(f"{_FB_URL}/detr-r50-e632da11.pth", 0.420, _FB, "e632da11")})
def detr_r50(*, num_classes: int = 91, **overrides) -> DETR:
    """DETR with a ResNet-50: 6+6 layers, 8 heads, width 256, FFN 2048, 100 queries."""
    return build_detr(**{"num_classes": num_classes, "backbone": "resnet50", **overrides})


@register_model(paper="DETR (Carion et al. 2020)", input_size=(800, 1333), coco_ap=0.435, recipe=DETR_RECIPE,
                weights={"coco": Weights(f"{_FB_URL}/detr-r101-2c7b67e5.pth", 0.435, _FB, "2c7b67e5")})
def detr_r101(*, num_classes: int = 91, **overrides) -> DETR:
    """DETR with a ResNet-101."""
    return build_detr(**{"num_classes": num_classes, "backbone": "resnet101", **overrides})


@register_model(paper="DETR (Carion et al. 2020)", input_size=(800, 1333), coco_ap=0.433, recipe=DETR_RECIPE,
                weights={"coco": Weights(f"{_FB_URL}/detr-r50-dc5-f0fb7ef5.pth", 0.433, _FB, "f0fb7ef5")})
def detr_r50_dc5(*, num_classes: int = 91, **overrides) -> DETR:
    """DETR-DC5: ResNet-50 with a dilated last stage (stride 16 features)."""
    return build_detr(**{"num_classes": num_classes, "backbone": "resnet50", "dilation": True, **overrides})


@register_model(paper="DETR (Carion et al. 2020), lite preset", input_size=(640, 640), coco_ap=None)
def detr_lite(*, num_classes: int = 91, **overrides) -> DETR:
    """DETR-Lite: ResNet-18 up to stride 16, width 128, 3+3 layers, FFN 512, 50 queries.

    Sized to learn on a CPU from scratch (no ImageNet weights needed): trainable BatchNorm, every
    backbone stage trained, and the stride-16 stage (layer3) as the feature map so that small objects
    survive at ~640 px or less while the costly last stage is skipped.
    """
    defaults = dict(
        backbone="resnet18", feature_stage="layer3", backbone_norm="batch", trainable_layers=5,
        d_model=128, nhead=8, num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=512,
        dropout=0.0, num_queries=50,
    )
    return build_detr(num_classes=num_classes, **{**defaults, **overrides})
