"""RT-DETR (Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", CVPR 2024) and RT-DETRv2 (Lv et al.,
"RT-DETRv2: Improved Baseline with Bag-of-Freebies for Real-Time Detection Transformer", 2024).

A ResNet-vd backbone (strides 8 / 16 / 32), the efficient hybrid encoder (section 4.2, ``layers/hybrid_encoder.py``:
attention on the stride-32 level only, then convolutional cross-scale fusion), and a DINO-like decoder, each
mechanism in one visible place:

- uncertainty-minimal query selection (section 4.3): every pixel of every level proposes a box around its anchor;
  the top-300 by class score give the decoder its reference boxes *and* its content queries
  (:meth:`RTDETR._select_queries`); the varifocal loss (``losses/criterion.py``) trains the score towards the box's
  IoU, so that confident proposals are also well localised;
- contrastive denoising in training, DINO's (``layers/denoising.py``, :func:`~detrkit.layers.denoising.add_dn_queries`);
- iterative refinement with look forward twice (``layers/deformable.py``, :class:`~detrkit.layers.RTDETRDecoder`);
- optionally, in training only, one-to-many queries (hybrid matching or Group DETR, ``layers/one_to_many.py``): the
  proposals ranked after the one-to-one queries' (:meth:`RTDETR._select_queries`), hidden from them by the
  self-attention mask. Not in the RT-DETR papers: the switch the other families have, for short schedules.

RT-DETRv2 changes the decoder's deformable cross-attention only: a scale on the offsets and, optionally, discrete
sampling (one pixel per point, no ``grid_sample``: ``ops/ms_deform_attn.py``), plus a longer training recipe.

The model takes pixels in [0, 1] (no ImageNet mean / std) at sizes divisible by 32 and no padding mask, as the
official and HF models do; its class says so (``preprocess = "rtdetr"``) and every path that feeds it follows.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import Tensor, nn

from detrkit.backbones import ResNetVd
from detrkit.layers import DeformableDecoderLayer, HybridEncoder, RTDETRDecoder
from detrkit.layers.denoising import (
    DenoisingConfig,
    DenoisingLayout,
    add_dn_queries,
    as_denoising_config,
    split_dn_outputs,
)
from detrkit.layers.heads import aux_outputs, focal_class_head, refined_predictions, zero_box_head
from detrkit.layers.hybrid_encoder import ConvNormLayer
from detrkit.layers.one_to_many import (
    OneToMany,
    check_proposals,
    hide_after_denoising,
    one_to_many_branch,
    split_o2m_outputs,
)
from detrkit.models.deformable_detr import check_query_nms, encoder_proposals, gather_queries, select_proposals
from detrkit.models.outputs import DetectionOutput, LayerOutput, LossConfig
from detrkit.ops import level_shapes_tensor
from detrkit.registry import Weights, register_model

# RT-DETR's denoising (official rtdetr_pytorch): 100 queries, half the labels noised (flip probability 0.25), box
# noise scale 1.0, contrastive negatives.
RTDETR_NOISE = DenoisingConfig(num_dn_pairs=100, label_noise=0.25, box_noise_scale=1.0, contrastive=True)


def top_valid(scores: Tensor, proposals: Tensor, k: int) -> Tensor:
    """Indices (B, k) of the ``k`` best-scoring proposals among the valid ones (finite before the sigmoid); invalid
    ones come last, taken only if fewer than ``k`` are valid. scores (B, S), proposals (B, S, 4)."""
    return scores.masked_fill(proposals[..., 0].isinf(), float("-inf")).topk(k, dim=1).indices


class RTDETR(nn.Module):
    """The RT-DETR / RT-DETRv2 detector.

    Args:
        backbone: returns ``{stage: (features, mask)}`` for strides 8 / 16 / 32.
        encoder: the :class:`~detrkit.layers.HybridEncoder`.
        decoder: the :class:`~detrkit.layers.RTDETRDecoder`.
        num_classes: object classes (sigmoid outputs).
        num_queries: proposals kept by query selection (300).
        d_model: decoder width.
        num_feature_levels: levels the decoder reads: the encoder's, plus stride-2 convolutions after the last.
        denoising: contrastive denoising settings (RT-DETR: 100 queries); None = none.
        learn_query: learned content queries instead of the selected encoder features (the paper's ablation).
        o2m: one-to-many queries in training (hybrid matching / Group DETR); None = none.
        query_nms: IoU of DDQ's distinct query selection (a class-agnostic NMS on the proposals before the top-k,
            :func:`~detrkit.models.deformable_detr.distinct_topk`); None = the plain top-k of RT-DETR.
        enc_o2m_k: dense one-to-many supervision of the encoder in training: every valid proposal takes part in a
            loss where each object is matched ``enc_o2m_k`` times; 0 = none (RT-DETR's encoder loss sees the top-k
            proposals only, one per object).
    """

    score_activation = "sigmoid"
    preprocess = "rtdetr"  # pixels in [0, 1], fixed square input: what the official and HF models take
    size_divisor = 32  # the hybrid encoder fuses stride 32 into stride 16 by 2x upsampling
    # RT-DETR's losses (section 4.3): varifocal (weight 1), L1 5, GIoU 2; matching costs class 2, L1 5, GIoU 2.
    loss_config = LossConfig(focal=True, class_loss="varifocal", class_weight=1.0, bbox_weight=5.0, giou_weight=2.0,
                             cost_class=2.0)

    def __init__(self, backbone: nn.Module, encoder: HybridEncoder, decoder: RTDETRDecoder, *, num_classes: int,
                 num_queries: int = 300, d_model: int = 256, num_feature_levels: int = 3,
                 denoising: DenoisingConfig | None = None, learn_query: bool = False,
                 o2m: OneToMany | None = None, query_nms: float | None = None, enc_o2m_k: int = 0) -> None:
        super().__init__()
        if enc_o2m_k < 0:
            raise ValueError(f"enc_o2m_k must be >= 1 (objects matched k times among the encoder's proposals) or 0 "
                             f"for none; got {enc_o2m_k}")
        self.enc_o2m_k = enc_o2m_k
        self.query_nms = check_query_nms(query_nms)
        self.num_classes, self.num_queries, self.d_model = num_classes, num_queries, d_model
        self.denoising, self.eps, self.o2m = denoising, decoder.eps, o2m
        self.backbone, self.encoder, self.decoder = backbone, encoder, decoder
        levels = len(encoder.input_proj)
        self.input_proj = nn.ModuleList(ConvNormLayer(encoder.hidden_dim, d_model, 1) for _ in range(levels))
        for i in range(num_feature_levels - levels):  # extra coarser levels, as the official decoder adds them
            self.input_proj.append(ConvNormLayer(encoder.hidden_dim if i == 0 else d_model, d_model, 3, 2))
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        class_head, box_head = focal_class_head(d_model, num_classes), zero_box_head(d_model)
        self.enc_out_class_embed, self.enc_out_bbox_embed = copy.deepcopy(class_head), copy.deepcopy(box_head)
        num_layers = len(decoder.layers)
        self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_layers))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_layers))
        decoder.bbox_embed = self.bbox_embed
        self.tgt_embed = nn.Embedding(num_queries, d_model) if learn_query else None
        if learn_query and o2m is not None:  # the one-to-many queries' own learned content
            self.tgt_embed_o2m = nn.Embedding(o2m.queries, d_model)
        if denoising is not None:
            self.label_enc = nn.Embedding(num_classes + 1, d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official init: Xavier on the projections and the query-position MLP."""
        nn.init.xavier_uniform_(self.enc_output.weight)
        for layer in self.decoder.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj.conv.weight)
        if self.tgt_embed is not None:
            nn.init.xavier_uniform_(self.tgt_embed.weight)
        if hasattr(self, "tgt_embed_o2m"):
            nn.init.xavier_uniform_(self.tgt_embed_o2m.weight)

    def forward(
        self, images: Tensor, padding_mask: Tensor | None = None, targets: list[dict] | None = None
    ) -> DetectionOutput:
        """images (B, 3, H, W), pixels in [0, 1], H and W divisible by 32; ``padding_mask`` is accepted for the
        common signature and ignored (RT-DETR has none: padding is black pixels); targets feed denoising."""
        h, w = images.shape[-2:]
        if not torch.compiler.is_compiling() and (h % self.size_divisor or w % self.size_divisor):
            raise ValueError(f"RT-DETR takes images whose height and width are multiples of {self.size_divisor}; "
                             f"got {h}x{w}. Resize (its preprocessing resizes to a fixed square such as 640x640) "
                             f"or pad to a multiple of {self.size_divisor}.")
        feats = [f for f, _ in self.backbone(images).values()]
        memory, shapes, starts = self._flatten_levels(self.encoder(feats))
        extra = 0  # one-to-many queries, training only (the default count fits the image's proposals)
        if self.training and self.o2m is not None:
            extra = self.o2m.count(self.num_queries, memory.shape[1])
        tgt, anchors, enc_outputs, enc_dense = self._select_queries(memory, shapes, extra)
        tgt, anchors, attn_mask, dn_meta = add_dn_queries(
            tgt, anchors, targets, config=self.denoising, num_classes=self.num_classes,
            label_enc=getattr(self, "label_enc", None), eps=self.eps, training=self.training)
        if extra:  # [denoising, one-to-one, one-to-many]: the last two (and the groups) unable to see each other
            attn_mask = hide_after_denoising(attn_mask, tgt.shape[1], dn_meta.num_dn if dn_meta is not None else 0,
                                             extra, self.o2m.groups, tgt.device)
        out = self._decode(tgt, anchors, memory, shapes, starts, attn_mask, enc_outputs, dn_meta, extra)
        return out if enc_dense is None else replace(out, enc_dense=enc_dense, enc_dense_k=self.enc_o2m_k)

    def _decode(self, tgt: Tensor, anchors: Tensor, memory: Tensor, shapes: list[tuple[int, int]], starts: Tensor,
                attn_mask: Tensor | None, enc_outputs: LayerOutput, dn_meta: DenoisingLayout | None,
                extra: int) -> DetectionOutput:
        """The decoder on the selected (and denoising) queries, then the per-layer heads."""
        hidden, refs = self.decoder(tgt, anchors, memory, shapes, starts, attn_mask)
        return self._heads(hidden, refs, enc_outputs, dn_meta, extra)

    def _flatten_levels(self, maps: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]], Tensor]:
        """The decoder's levels: each encoder map projected (1x1 conv + BN), extra levels by stride-2 convolutions
        of the previous one, flattened one after another. Returns memory (B, S, C), (h, w) per level, starts."""
        srcs = [proj(m) for proj, m in zip(self.input_proj, maps, strict=False)]
        for proj in self.input_proj[len(maps):]:
            srcs.append(proj(maps[-1] if len(srcs) == len(maps) else srcs[-1]))
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        sizes = level_shapes_tensor(shapes, srcs[0].new_zeros((), dtype=torch.long))  # (levels, 2)
        starts = torch.cat([sizes.new_zeros(1), (sizes[:, 0] * sizes[:, 1]).cumsum(0)[:-1]])  # (levels,)
        memory = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, C)
        return memory, shapes, starts

    def _select_queries(self, memory: Tensor, shapes: list[tuple[int, int]], extra: int = 0):
        """Query selection (section 4.3): an anchor at every pixel of every level (side 0.05 * 2^level, invalid
        within 0.01 of the border), scored and refined by the encoder heads; the top-k *valid* anchors by best class
        score become the reference boxes (detached) and their encoder features the content queries. The official
        and HF code score invalid anchors too (on zeroed features) and may select them, with a box at the image
        corner; here they are never selected. Returns tgt (B, Q, C), anchors (B, Q, 4) before the sigmoid and the
        selected proposals for the encoder loss. With ``extra`` one-to-many queries they follow: the next ``extra``
        proposals by score, selected the same way (the encoder loss sees the one-to-one queries' only). Last, with
        ``enc_o2m_k`` in training, every valid proposal for the dense one-to-many loss, else None."""
        no_padding = memory.new_zeros(memory.shape[:2], dtype=torch.bool)
        out_memory, proposals = encoder_proposals(memory, no_padding, shapes)  # zeroed / +inf where invalid
        out_memory = self.enc_output_norm(self.enc_output(out_memory))  # (B, S, C)
        logits = self.enc_out_class_embed(out_memory)  # (B, S, K)
        coords = self.enc_out_bbox_embed(out_memory) + proposals  # (B, S, 4) before the sigmoid
        if extra:
            check_proposals(self.num_queries, extra, memory.shape[1])
        k = min(self.num_queries, memory.shape[1])
        if self.query_nms is None:
            topk = top_valid(logits.max(-1).values, proposals, k + extra)  # (B, k + extra)
        else:  # DDQ: the best distinct proposals (coords are +inf where the proposal is invalid)
            topk = select_proposals(logits.max(-1).values, coords, k + extra, self.query_nms)
        gathered, gathered_logits = gather_queries(coords, topk), gather_queries(logits, topk)  # (B, k, 4), (B, k, K)
        dense = None
        if self.training and self.enc_o2m_k:
            # Dense one-to-many supervision of the encoder: the selection loss above trains one proposal per object
            # (the matched one of the top-k); here every valid proposal (the same for every image: RT-DETR has no
            # padding) is a positive for one of k copies of an object, or a negative, so the backbone and encoder
            # learn class and box from k times the positives and from every pixel's negatives. The idea of Co-DETR's
            # auxiliary heads (Zong et al. ICCV 2023, section 3.2) and RT-DETRv3's one-to-many branch on the encoder
            # (Wang et al. 2024, section 3.2), with hybrid matching's k-fold Hungarian assignment (H-DETR) instead of
            # their ATSS / TAL assigners and no extra head: the encoder's own heads. Training only.
            valid = proposals[0, :, 0].isfinite()
            dense = LayerOutput(logits[:, valid], coords[:, valid].sigmoid())
        if self.tgt_embed is not None:
            tgt = self.tgt_embed.weight
            if extra:
                tgt = torch.cat([tgt, self.tgt_embed_o2m.weight[:extra]])
            tgt = tgt[None].expand(memory.shape[0], -1, -1)
        else:
            tgt = gather_queries(out_memory, topk).detach()  # (B, k, C)
        selected = LayerOutput(gathered_logits[:, :k], gathered[:, :k].sigmoid())
        return tgt, gathered.detach(), selected, dense

    def _heads(self, hidden: Tensor, refs: list[Tensor], enc_outputs: LayerOutput,
               dn_meta: DenoisingLayout | None, extra: int = 0) -> DetectionOutput:
        """hidden (L, B, N, C), the box each layer refines (L, B, N, 4) -> logits and boxes per layer; the last
        ``extra`` queries are the one-to-many ones."""
        logits, boxes = refined_predictions(hidden, refs, self.class_embed, self.bbox_embed, self.eps)
        logits, boxes, dn_outputs = split_dn_outputs(logits, boxes, dn_meta)
        logits, boxes, o2m = split_o2m_outputs(logits, boxes, extra)
        return DetectionOutput(pred_logits=logits[-1], pred_boxes=boxes[-1], aux_outputs=aux_outputs(logits, boxes),
                               enc_outputs=enc_outputs, dn_meta=dn_meta, dn_outputs=dn_outputs, o2m_outputs=o2m,
                               **(self.o2m.output_fields() if extra else {}))


def build_rt_detr(
    *,
    num_classes: int,
    depth: int = 50,
    backbone_norm: str = "frozen",
    freeze_at: int = 0,
    backbone_width: float = 1.0,
    backbone_zero_init_residual: bool = False,
    backbone_stem: str = "deep",
    hidden_dim: int = 256,
    encoder_ffn: int = 1024,
    num_encoder_layers: int = 1,
    expansion: float = 1.0,
    depth_mult: float = 1.0,
    d_model: int = 256,
    nhead: int = 8,
    num_decoder_layers: int = 6,
    dim_feedforward: int = 1024,
    dropout: float = 0.0,
    n_points: int = 4,
    num_feature_levels: int = 3,
    num_queries: int = 300,
    denoising: DenoisingConfig | dict | None = RTDETR_NOISE,
    learn_query: bool = False,
    offset_scale: float = 0.5,
    sampling: str = "bilinear",
    one_to_many: str = "none",
    o2m_queries: int | None = None,
    o2m_k: int = 6,
    o2m_groups: int = 11,
    query_nms: float | None = None,
    enc_o2m_k: int = 0,
) -> RTDETR:
    """Wire an RT-DETR from plain settings; RT-DETRv2 is the same model with its decoder settings
    (``offset_scale``, ``sampling="discrete"``). ``freeze_at``: -1 trains the whole backbone (R18 / R34).
    ``backbone_width`` / ``backbone_zero_init_residual`` / ``backbone_stem``: a narrower ResNet-vd, residual blocks
    that start as the identity, the original ResNet's 7x7 stem, for training from scratch
    (:class:`~detrkit.backbones.resnet_vd.ResNetVd`). ``one_to_many="hybrid"`` /
    ``"group"``: one-to-many queries in training (see :func:`~detrkit.layers.one_to_many.one_to_many_branch`).
    ``query_nms``: DDQ's distinct query selection at this IoU (0.8 in DDQ DETR), in training and inference.
    ``enc_o2m_k``: every encoder proposal supervised, k per object (training only; 0 = none)."""
    backbone = ResNetVd(depth, norm=backbone_norm, freeze_at=freeze_at, width=backbone_width,
                        zero_init_residual=backbone_zero_init_residual, stem=backbone_stem)
    encoder = HybridEncoder(tuple(backbone.channels.values()), hidden_dim=hidden_dim, nhead=nhead,
                            dim_feedforward=encoder_ffn, num_encoder_layers=num_encoder_layers, expansion=expansion,
                            depth_mult=depth_mult)
    layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, n_points,
                                   offset_scale=offset_scale, sampling=sampling)
    decoder = RTDETRDecoder(layer, num_decoder_layers, d_model)
    return RTDETR(backbone, encoder, decoder, num_classes=num_classes, num_queries=num_queries, d_model=d_model,
                  num_feature_levels=num_feature_levels, denoising=as_denoising_config(denoising, RTDETR_NOISE),
                  learn_query=learn_query,
                  o2m=one_to_many_branch(one_to_many, num_queries, o2m_queries, o2m_k, o2m_groups),
                  query_nms=query_nms, enc_o2m_k=enc_o2m_k)


# The sizes of the official configs: R18 / R34 train every backbone layer with BatchNorm and use half-width CSP
# blocks; R50 / R101 freeze the stem and BatchNorm; R101 widens the encoder to 384 (feed-forward 2048).
_SIZES = {
    18: dict(depth=18, backbone_norm="batch", freeze_at=-1, expansion=0.5, num_decoder_layers=3),
    34: dict(depth=34, backbone_norm="batch", freeze_at=-1, expansion=0.5, num_decoder_layers=4),
    50: dict(depth=50, backbone_norm="frozen", freeze_at=0, expansion=1.0, num_decoder_layers=6),
    101: dict(depth=101, backbone_norm="frozen", freeze_at=0, expansion=1.0, num_decoder_layers=6, hidden_dim=384,
              encoder_ffn=2048),
}
_V1, _V2 = "RT-DETR (Zhao et al. 2024)", "RT-DETRv2 (Lv et al. 2024)"
# AdamW lr 1e-4 (backbone 1e-5), weight decay 1e-4, batch 16, EMA 0.9999, 2000-step linear warm-up; 72 epochs
# (the "6x" schedule); RT-DETRv2 trains R18 / R34 for 120.
_RECIPE = {"epochs": 72, "lr": 1e-4, "lr_backbone": 1e-5, "weight_decay": 1e-4, "batch_size": 16,
           "warmup_steps": 2000, "ema": True, "ema_decay": 0.9999, "ema_warmup": 2000, "clip_max_norm": 0.1}


# Released COCO weights (``create_model(name, weights="coco")``): lyuwenyu/RT-DETR's training files, 80 classes.
_OFFICIAL = "lyuwenyu/RT-DETR"
_STORAGE = "https://github.com/lyuwenyu/storage/releases/download"


def _coco(file: str, ap: float, release: str = "v0.1") -> dict[str, Weights]:
    return {"coco": Weights(f"{_STORAGE}/{release}/{file}", ap, _OFFICIAL)}


def _build(size: int, num_classes: int, overrides: dict, **extra) -> RTDETR:
    return build_rt_detr(**{"num_classes": num_classes, **_SIZES[size], **extra, **overrides})


@register_model(paper=_V1, input_size=(640, 640), coco_ap=0.465, recipe=_RECIPE,
                weights=_coco("rtdetr_r18vd_dec3_6x_coco_from_paddle.pth", 0.464))
def rtdetr_r18vd(*, num_classes: int = 91, **overrides) -> RTDETR:
    """RT-DETR-R18: ResNet-18-vd, hybrid encoder (expansion 0.5), 3 decoder layers, 300 queries."""
    return _build(18, num_classes, overrides)


@register_model(paper=_V1, input_size=(640, 640), coco_ap=0.489, recipe=_RECIPE,
                weights=_coco("rtdetr_r34vd_dec4_6x_coco_from_paddle.pth", 0.489))
def rtdetr_r34vd(*, num_classes: int = 91, **overrides) -> RTDETR:
    """RT-DETR-R34: ResNet-34-vd, hybrid encoder (expansion 0.5), 4 decoder layers."""
    return _build(34, num_classes, overrides)


@register_model(paper=_V1, input_size=(640, 640), coco_ap=0.531, recipe=_RECIPE,
                weights=_coco("rtdetr_r50vd_6x_coco_from_paddle.pth", 0.531))
def rtdetr_r50vd(*, num_classes: int = 91, **overrides) -> RTDETR:
    """RT-DETR-R50: ResNet-50-vd (frozen BatchNorm), hybrid encoder, 6 decoder layers."""
    return _build(50, num_classes, overrides)


@register_model(paper=_V1, input_size=(640, 640), coco_ap=0.543, recipe=_RECIPE,
                weights=_coco("rtdetr_r101vd_6x_coco_from_paddle.pth", 0.543))
def rtdetr_r101vd(*, num_classes: int = 91, **overrides) -> RTDETR:
    """RT-DETR-R101: ResNet-101-vd, hybrid encoder of width 384, 6 decoder layers."""
    return _build(101, num_classes, overrides)


@register_model(paper=_V2, input_size=(640, 640), coco_ap=0.479, recipe={**_RECIPE, "epochs": 120},
                weights=_coco("rtdetrv2_r18vd_120e_coco_rerun_48.1.pth", 0.481, "v0.2"))
def rtdetrv2_r18vd(*, num_classes: int = 91, **overrides) -> RTDETR:
    """RT-DETRv2-S: RT-DETR-R18 with the v2 decoder (offset scale 0.5, optional discrete sampling), 120 epochs."""
    return _build(18, num_classes, overrides)


@register_model(paper=_V2, input_size=(640, 640), coco_ap=0.499, recipe={**_RECIPE, "epochs": 120},
                weights=_coco("rtdetrv2_r34vd_120e_coco_ema.pth", 0.499))
def rtdetrv2_r34vd(*, num_classes: int = 91, **overrides) -> RTDETR:
    """RT-DETRv2-M*: ResNet-34-vd, 4 decoder layers, 120 epochs."""
    return _build(34, num_classes, overrides)


@register_model(paper=_V2, input_size=(640, 640), coco_ap=0.534, recipe=_RECIPE,
                weights=_coco("rtdetrv2_r50vd_6x_coco_ema.pth", 0.534))
def rtdetrv2_r50vd(*, num_classes: int = 91, **overrides) -> RTDETR:
    """RT-DETRv2-L: ResNet-50-vd, 6 decoder layers."""
    return _build(50, num_classes, overrides)


@register_model(paper=_V2, input_size=(640, 640), coco_ap=0.543, recipe=_RECIPE,
                weights=_coco("rtdetrv2_r101vd_6x_coco_from_paddle.pth", 0.543))
def rtdetrv2_r101vd(*, num_classes: int = 91, **overrides) -> RTDETR:
    """RT-DETRv2-X: ResNet-101-vd, encoder width 384, 6 decoder layers."""
    return _build(101, num_classes, overrides)


@register_model(paper=f"{_V1}, lite preset", input_size=(640, 640), coco_ap=None)
def rtdetr_lite(*, num_classes: int = 91, **overrides) -> RTDETR:
    """RT-DETR-Lite: ResNet-18-vd, width 128, CSP expansion 0.5 with one RepVGG block, 3 decoder layers, 100 queries."""
    defaults = dict(hidden_dim=128, encoder_ffn=512, depth_mult=1 / 3, d_model=128, dim_feedforward=512,
                    num_queries=100)
    return _build(18, num_classes, overrides, **defaults)
