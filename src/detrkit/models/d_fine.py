"""D-FINE (Peng et al., "D-FINE: Redefine Regression Task in DETRs as Fine-grained Distribution Refinement",
ICLR 2025) and DEIM (Huang et al., "DEIM: DETR with Improved Matching for Fast Convergence", CVPR 2025).

D-FINE is RT-DETR (``models/rt_detr.py``: query selection, contrastive denoising, the hybrid encoder) with a new box
head and lighter parts, each in one place:

- FDR, boxes as distributions over the four edge distances refined layer by layer (section 3.1):
  ``layers/fdr.py`` (W(n), expectations, boxes) and ``layers/dfine_decoder.py`` (the decoder that refines them);
- the fine-grained localization loss and GO-LSD's self-distillation (sections 3.2-3.3): ``losses/distribution.py``,
  applied per layer by :meth:`~detrkit.losses.criterion.SetCriterion._local_losses`;
- the HGNetv2 backbone (``backbones/hgnetv2.py``) and GELAN fusion in the hybrid encoder
  (``HybridEncoder(fusion="gelan")``).

DEIM trains the same network with the matchability-aware loss (``class_loss="mal"``, ``losses/criterion.py``) and
dense one-to-one matching from Mosaic / MixUp (``data/mosaic.py``): its presets here are D-FINE's with that loss.

The model takes pixels in [0, 1] at sizes divisible by 32, as RT-DETR does.
"""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from detrkit.backbones.hgnetv2 import HGNetv2
from detrkit.layers.denoising import DenoisingConfig, DenoisingLayout, as_denoising_config
from detrkit.layers.dfine_decoder import DFineDecoderLayer, FDRDecoder
from detrkit.layers.heads import LayerOutput, focal_class_head, zero_box_head
from detrkit.layers.hybrid_encoder import ConvNormLayer, HybridEncoder
from detrkit.models.deformable_detr import check_query_nms
from detrkit.models.outputs import DetectionOutput, LossConfig
from detrkit.models.rt_detr import RTDETR
from detrkit.registry import Weights, register_model

# D-FINE's denoising (official configs): 100 queries, label noise 0.5, box noise 1.0, contrastive.
DFINE_NOISE = DenoisingConfig(num_dn_pairs=100, label_noise=0.5, box_noise_scale=1.0, contrastive=True)


class DFINE(RTDETR):
    """The D-FINE detector: RT-DETR's backbone -> hybrid encoder -> query selection -> denoising, with the FDR decoder.

    Args:
        backbone / encoder: as :class:`~detrkit.models.RTDETR` (D-FINE: HGNetv2, ``HybridEncoder(fusion="gelan")``).
        decoder: the :class:`~detrkit.layers.dfine_decoder.FDRDecoder`, which owns the class and distribution heads.
        num_classes / num_queries / d_model / denoising / learn_query / query_nms / enc_o2m_k: as RT-DETR's.
        class_loss: ``"varifocal"`` (D-FINE) or ``"mal"`` (DEIM's matchability-aware loss).
        fgl_weight / ddf_weight: the FGL and DDF loss weights (0.15 and 1.5 in D-FINE).

    The encoder's maps reach the decoder unprojected when their width is the decoder's (the official code's
    identity projections), through a 1x1 conv + BN otherwise (D-FINE-X: 384 -> 256).
    """

    def __init__(self, backbone: nn.Module, encoder: HybridEncoder, decoder: FDRDecoder, *, num_classes: int,
                 num_queries: int = 300, d_model: int = 256, denoising: DenoisingConfig | None = None,
                 learn_query: bool = False, query_nms: float | None = None, enc_o2m_k: int = 0,
                 class_loss: str = "varifocal", fgl_weight: float = 0.15, ddf_weight: float = 1.5) -> None:
        nn.Module.__init__(self)  # RT-DETR's parts, without its per-layer heads (the FDR decoder owns them)
        if enc_o2m_k < 0:
            raise ValueError(f"enc_o2m_k must be >= 1 or 0 for none; got {enc_o2m_k}")
        self.enc_o2m_k, self.query_nms = enc_o2m_k, check_query_nms(query_nms)
        self.num_classes, self.num_queries, self.d_model = num_classes, num_queries, d_model
        self.denoising, self.eps, self.o2m = denoising, decoder.eps, None
        self.backbone, self.encoder, self.decoder = backbone, encoder, decoder
        width = encoder.hidden_dim
        self.input_proj = nn.ModuleList(nn.Identity() if width == d_model else ConvNormLayer(width, d_model, 1)
                                        for _ in encoder.input_proj)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_out_class_embed = focal_class_head(d_model, num_classes)
        self.enc_out_bbox_embed = zero_box_head(d_model)
        self.tgt_embed = nn.Embedding(num_queries, d_model) if learn_query else None
        if denoising is not None:
            self.label_enc = nn.Embedding(num_classes + 1, d_model)
        # D-FINE's losses (official DFINECriterion): VFL 1, L1 5, GIoU 2, FGL 0.15, DDF 1.5; matching costs class 2,
        # L1 5, GIoU 2; box terms on GO-LSD's union of matches; W(n)'s settings go with the model (D-FINE-X has
        # reg_scale 8).
        self.loss_config = LossConfig(focal=True, class_loss=class_loss, class_weight=1.0, bbox_weight=5.0,
                                      giou_weight=2.0, cost_class=2.0, fgl_weight=fgl_weight, ddf_weight=ddf_weight,
                                      fdr=(decoder.reg_max, decoder.reg_scale, decoder.up), union_matching=True)
        nn.init.xavier_uniform_(self.enc_output.weight)
        for proj in self.input_proj:
            if isinstance(proj, ConvNormLayer):
                nn.init.xavier_uniform_(proj.conv.weight)
        if self.tgt_embed is not None:
            nn.init.xavier_uniform_(self.tgt_embed.weight)

    def _decode(self, tgt: Tensor, anchors: Tensor, memory: Tensor, shapes: list[tuple[int, int]], starts: Tensor,
                attn_mask: Tensor | None, enc_outputs: LayerOutput, dn_meta: DenoisingLayout | None,
                extra: int) -> DetectionOutput:
        """The FDR decoder; each layer's logits, boxes, edge distributions and anchors, the denoising queries' apart.
        In training the boxes the losses see are clamped to the image (an FDR box may reach past it, or turn
        inside out early on), as HF's D-FINE loss does; inference returns them as the decoder made them."""
        out = self.decoder(tgt, anchors, memory, shapes, starts, attn_mask)
        n = dn_meta.num_dn if dn_meta is not None else 0
        boxes = out.boxes.clamp(0, 1) if self.training else out.boxes

        def layer(i: int, part: slice) -> LayerOutput:
            return LayerOutput(out.logits[i][:, part], boxes[i][:, part], out.corners[i][:, part],
                               out.anchors[:, part])

        layers = [layer(i, slice(n, None)) for i in range(len(out.logits))]
        pre = dn = dn_pre = None
        if self.training:
            pre_boxes = out.pre_boxes.clamp(0, 1)
            pre = LayerOutput(out.pre_logits[:, n:], pre_boxes[:, n:])
            if dn_meta is not None:
                dn = [layer(i, slice(None, n)) for i in range(len(out.logits))]
                dn_pre = LayerOutput(out.pre_logits[:, :n], pre_boxes[:, :n])
        last = layers[-1]
        return DetectionOutput(pred_logits=last.pred_logits, pred_boxes=last.pred_boxes, aux_outputs=layers[:-1],
                               enc_outputs=enc_outputs, dn_meta=dn_meta, dn_outputs=dn, pred_corners=last.corners,
                               anchors=last.anchors, pre_outputs=pre, dn_pre_outputs=dn_pre)


def build_d_fine(
    *,
    num_classes: int,
    backbone: str = "B0",
    use_lab: bool = True,
    backbone_norm: str = "batch",
    freeze_at: int = -1,
    return_stages: tuple[int, ...] = (1, 2, 3),
    hidden_dim: int = 256,
    encoder_ffn: int = 1024,
    num_encoder_layers: int = 1,
    expansion: float = 1.0,
    depth_mult: float = 1.0,
    d_model: int = 256,
    nhead: int = 8,
    num_decoder_layers: int = 6,
    eval_idx: int = -1,
    dim_feedforward: int = 1024,
    dropout: float = 0.0,
    n_points: int | list[int] = (3, 6, 3),
    num_queries: int = 300,
    reg_max: int = 32,
    reg_scale: float = 4.0,
    up: float = 0.5,
    denoising: DenoisingConfig | dict | None = DFINE_NOISE,
    learn_query: bool = False,
    query_nms: float | None = None,
    enc_o2m_k: int = 0,
    class_loss: str = "varifocal",
    fgl_weight: float = 0.15,
    ddf_weight: float = 1.5,
) -> DFINE:
    """Wire a D-FINE from plain settings (the official config's names where they exist: ``reg_max``, ``reg_scale``,
    ``eval_idx``, ``n_points`` per level). ``return_stages``: the HGNetv2 stages the encoder reads (D-FINE-N: the
    last two, strides 16 / 32, and so two levels everywhere)."""
    net = HGNetv2(backbone, use_lab=use_lab, return_stages=tuple(return_stages), norm=backbone_norm,
                  freeze_at=freeze_at)
    levels = len(net.channels)
    encoder = HybridEncoder(tuple(net.channels.values()), hidden_dim=hidden_dim, nhead=nhead,
                            dim_feedforward=encoder_ffn, num_encoder_layers=num_encoder_layers,
                            use_encoder_idx=(levels - 1,), expansion=expansion, depth_mult=depth_mult,
                            fusion="gelan")
    points = list(n_points) if not isinstance(n_points, int) else n_points
    if isinstance(points, list) and len(points) != levels:
        raise ValueError(f"n_points has {len(points)} counts for {levels} feature levels; give one per level")
    layer = DFineDecoderLayer(d_model, dim_feedforward, dropout, levels, nhead, points)
    decoder = FDRDecoder(layer, num_decoder_layers, d_model, num_classes, reg_max=reg_max, reg_scale=reg_scale,
                         up=up, eval_idx=eval_idx)
    return DFINE(net, encoder, decoder, num_classes=num_classes, num_queries=num_queries, d_model=d_model,
                 denoising=as_denoising_config(denoising, DFINE_NOISE), learn_query=learn_query, query_nms=query_nms,
                 enc_o2m_k=enc_o2m_k, class_loss=class_loss, fgl_weight=fgl_weight, ddf_weight=ddf_weight)


# The official configs (Peterande/D-FINE configs/dfine/*.yml; N from DEIM's): backbone, its training, encoder and
# decoder sizes. S / M / N train the whole backbone with BatchNorm; L / X freeze the stem and the BatchNorms.
_SIZES = {
    "n": dict(backbone="B0", use_lab=True, return_stages=(2, 3), hidden_dim=128, encoder_ffn=512, expansion=0.34,
              depth_mult=0.5, d_model=128, dim_feedforward=512, num_decoder_layers=3, n_points=(6, 6)),
    "s": dict(backbone="B0", use_lab=True, expansion=0.5, depth_mult=0.34, num_decoder_layers=3),
    "m": dict(backbone="B2", use_lab=True, depth_mult=0.67, num_decoder_layers=5, eval_idx=-2),
    "l": dict(backbone="B4", use_lab=False, backbone_norm="frozen", freeze_at=0),
    "x": dict(backbone="B5", use_lab=False, backbone_norm="frozen", freeze_at=0, hidden_dim=384, encoder_ffn=2048,
              reg_scale=8.0),
}
# AdamW lr 2.5e-4, weight decay 1.25e-4, batch 32, EMA 0.9999 (1000-step warm-up), 500-step linear lr warm-up,
# gradient clipping 0.1, no lr drop (its MultiStepLR milestone lies past the end); the backbone's lr and the epochs
# per size, the last 12 (L / X: 8) without augmentation (the configs' stop_epoch). N: S's optimizer (its own config
# not read).
_BASE = {"lr": 2.5e-4, "weight_decay": 1.25e-4, "batch_size": 32, "warmup_steps": 500, "ema": True,
         "ema_decay": 0.9999, "ema_warmup": 1000, "clip_max_norm": 0.1}


def _dfine_recipe(epochs: int, clean: int, lr_backbone: float) -> dict:
    return {**_BASE, "epochs": epochs, "lr_drop": epochs, "aug_stop_epoch": epochs - clean, "lr_backbone": lr_backbone}


_RECIPES = {"n": _dfine_recipe(160, 12, 1.25e-4), "s": _dfine_recipe(132, 12, 1.25e-4),
            "m": _dfine_recipe(132, 12, 2.5e-5), "l": _dfine_recipe(80, 8, 1.25e-5), "x": _dfine_recipe(80, 8, 2.5e-6)}


def _deim_recipe(size: str, stop: int, clean: int, **optimizer) -> dict:
    """DEIM's schedule (Huang et al. CVPR 2025, section 4.1; configs/deim_dfine): Mosaic and MixUp on half the
    samples until the flat lr ends at epoch 4 + stop / 2, then a cosine down to half the lr at ``stop``, after it
    ``clean`` epochs without augmentation at that lr; 2000 quadratic warm-up steps. (DEIM also leaves out the
    augmentation in its first 4 epochs; here it starts at once.)"""
    flat = 4 + stop // 2
    return {**_RECIPES[size], "epochs": stop + clean, "lr_schedule": "flat-cosine", "lr_drop": flat,
            "lr_gamma": 0.5, "mosaic": 0.5, "mixup": 0.5, "mosaic_epochs": flat, "aug_stop_epoch": stop,
            "warmup_steps": 2000, **optimizer}


# S: deim_hgnetv2_s (lr 4e-4, backbone 2e-4, weight decay 1e-4); N: lr 4e-4 / 2e-4, the lr kept flat (lr_gamma 1).
# M / L / X: the epochs of the released files (90 / 50 / 50 + the clean ones), D-FINE's optimizer: DEIM's own
# optimizer settings for these sizes were not read here.
_DEIM_RECIPES = {
    "n": _deim_recipe("n", 148, 12, lr=4e-4, lr_backbone=2e-4, weight_decay=1e-4, lr_gamma=1.0),
    "s": _deim_recipe("s", 120, 12, lr=4e-4, lr_backbone=2e-4, weight_decay=1e-4),
    "m": _deim_recipe("m", 90, 12), "l": _deim_recipe("l", 50, 8), "x": _deim_recipe("x", 50, 8),
}
_PAPER, _DEIM = "D-FINE (Peng et al. ICLR 2025)", "DEIM (Huang et al. CVPR 2025)"
# COCO val2017 AP: D-FINE's table 1 (N: its README), DEIM-D-FINE's table 1.
_DFINE_AP = {"n": 0.428, "s": 0.485, "m": 0.523, "l": 0.540, "x": 0.558}
_DEIM_AP = {"n": 0.430, "s": 0.490, "m": 0.527, "l": 0.547, "x": 0.565}
# The official releases (D-FINE's README): COCO-trained files of every size, read by the official_d_fine layout.
_STORAGE = "https://github.com/Peterande/storage/releases/download/dfinev1.0"


def d_fine_settings(size: str) -> dict:
    """Every builder setting of D-FINE size ``size`` (n, s, m, l, x): the official config's values on top of
    :func:`build_d_fine`'s defaults (what another implementation needs to build the same network)."""
    defaults = {p.name: p.default for p in inspect.signature(build_d_fine).parameters.values()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **_SIZES[size]}


def _build(size: str, num_classes: int, overrides: dict, **extra) -> DFINE:
    config = {"num_classes": num_classes, **_SIZES[size], **extra, **overrides}
    # A size's eval_idx belongs to its own layer count (D-FINE-M: 5 layers, inference stops at the 4th). Another
    # count without an eval_idx - the released M file, whose deployed model kept the 4 layers inference runs -
    # evaluates at its last layer.
    if "num_decoder_layers" in overrides and "eval_idx" not in overrides:
        if overrides["num_decoder_layers"] != _SIZES[size].get("num_decoder_layers", 6):
            config["eval_idx"] = -1
    return build_d_fine(**config)


def _register(size: str) -> None:
    """dfine_<size> and deim_dfine_<size>: the same network; DEIM trains it with MAL and its schedule."""
    def dfine(*, num_classes: int = 80, **overrides) -> DFINE:
        return _build(size, num_classes, overrides)

    def deim(*, num_classes: int = 80, **overrides) -> DFINE:
        return _build(size, num_classes, overrides, class_loss="mal")

    s = _SIZES[size]
    what = f"HGNetv2-{s['backbone']}, GELAN hybrid encoder, {s.get('num_decoder_layers', 6)} FDR decoder layers"
    dfine.__doc__ = f"D-FINE-{size.upper()}: {what}."
    deim.__doc__ = (f"DEIM-D-FINE-{size.upper()}: D-FINE-{size.upper()} trained with DEIM's matchability-aware loss "
                    "(its schedule, dense one-to-one with Mosaic / MixUp: --recipe paper).")
    dfine.__name__, deim.__name__ = f"dfine_{size}", f"deim_dfine_{size}"
    register_model(paper=_PAPER, input_size=(640, 640), coco_ap=_DFINE_AP[size], recipe=_RECIPES[size],
                   weights={"coco": Weights(f"{_STORAGE}/dfine_{size}_coco.pth", _DFINE_AP[size],
                                            "Peterande/D-FINE")})(dfine)
    register_model(paper=_DEIM, input_size=(640, 640), coco_ap=_DEIM_AP[size], recipe=_DEIM_RECIPES[size])(deim)


for _size in _SIZES:
    _register(_size)


@register_model(paper=f"{_PAPER}, lite preset", input_size=(640, 640), coco_ap=None)
def dfine_lite(*, num_classes: int = 80, **overrides) -> DFINE:
    """D-FINE-Lite: D-FINE-N's network (HGNetv2-B0, width 128, 3 FDR layers, two levels) with 100 queries."""
    return _build("n", num_classes, overrides, num_queries=100)


__all__ = ["DFINE", "DFINE_NOISE", "build_d_fine", "d_fine_settings", "dfine_lite"]
