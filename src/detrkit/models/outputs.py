"""What a detector hands to the losses: the output type every detector returns (in training and in evaluation),
and the loss weights its family trains with."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from detrkit.layers.denoising import DenoisingLayout
from detrkit.layers.heads import LayerOutput


@dataclass
class DetectionOutput:
    """Predictions of a DETR-family detector.

    Attributes:
        pred_logits: (B, Q, K) class logits of the last decoder layer; K = num_classes + 1 for
            softmax models (last column = no-object), K = num_classes for sigmoid / focal models.
        pred_boxes: (B, Q, 4) boxes, normalized (cx, cy, w, h) in [0, 1].
        aux_outputs: one :class:`LayerOutput` per earlier decoder layer, first to second-to-last, for the
            auxiliary losses.
        enc_outputs: two-stage models: the encoder proposals (a :class:`LayerOutput` over every encoder pixel).
        dn_meta: denoising models in training: how the denoising queries were laid out.
        dn_outputs: denoising models in training: one :class:`LayerOutput` per decoder layer, first to last, of the
            denoising queries (B, N, *), which the criterion supervises without matching.
        o2m_outputs: one-to-many supervision in training (hybrid matching, Group DETR): one :class:`LayerOutput`
            per decoder layer, first to last, of the extra queries.
        o2m_k: how many times their targets repeat each object (hybrid matching; 1 for groups).
        o2m_groups: how many groups they form, each matched one-to-one on its own (Group DETR; 1 for hybrid).
        enc_dense: dense one-to-many supervision of the encoder in training (RT-DETR ``enc_o2m_k``): every valid
            encoder proposal (B, S, *), matched to the objects repeated ``enc_dense_k`` times.
        enc_dense_k: how many proposals each object is matched to there.
        pred_corners / anchors: D-FINE: the last layer's edge-distribution logits (B, Q, 4 * (reg_max + 1)) and the
            boxes they are measured from (B, Q, 4); the earlier layers' are on their :class:`LayerOutput`.
        pre_outputs / dn_pre_outputs: D-FINE in training: layer 0's box before FDR (its pre-box head) and class
            logits, of the matching / denoising queries.
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    aux_outputs: list[LayerOutput] = field(default_factory=list)
    enc_outputs: LayerOutput | None = None
    dn_meta: DenoisingLayout | None = None
    dn_outputs: list[LayerOutput] | None = None
    o2m_outputs: list[LayerOutput] | None = None
    o2m_k: int = 0
    o2m_groups: int = 1
    enc_dense: LayerOutput | None = None
    enc_dense_k: int = 0
    pred_corners: Tensor | None = None
    anchors: Tensor | None = None
    pre_outputs: LayerOutput | None = None
    dn_pre_outputs: LayerOutput | None = None


@dataclass(frozen=True)
class LossConfig:
    """A detector family's loss and matching weights (each model class carries its paper's values)."""

    focal: bool = False
    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1  # softmax models: weight of the no-object class
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cost_class: float | None = None  # matching costs; None = the loss weight
    cost_bbox: float | None = None
    cost_giou: float | None = None
    aux_loss: bool = True
    enc_class_agnostic: bool = False  # two-stage Deformable DETR: encoder proposals learn objectness (class 0)
    # The class term: None = "focal" for sigmoid models, "ce" for softmax ones; "varifocal" or "mal" (sigmoid models)
    # train the score of a matched query towards its box's IoU instead of 1 (see detrkit.losses.criterion).
    class_loss: str | None = None
    # D-FINE (Peng et al. ICLR 2025): the fine-grained localization loss on the edge distributions (section 3.2)
    # and GO-LSD's decoupled distillation from the last layer (section 3.3); ``fdr`` = (reg_max, reg_scale, up) of
    # the model's weighting function W(n). Zero / None for every other family.
    fgl_weight: float = 0.0
    ddf_weight: float = 0.0
    ddf_temperature: float = 5.0
    fdr: tuple[int, float, float] | None = None
    # GO-LSD (D-FINE section 3.3): L1 / GIoU / FGL / DDF of every layer on the union of all layers' matches (the
    # class loss keeps each layer's own); HF's D-FINE loss matches each layer on its own (False).
    union_matching: bool = False

    def __post_init__(self) -> None:
        kinds = ("focal", "varifocal", "mal") if self.focal else ("ce",)
        if self.class_loss is not None and self.class_loss not in kinds:
            raise ValueError(f"class_loss={self.class_loss!r} does not fit a {'sigmoid' if self.focal else 'softmax'} "
                             f"model; choose one of {', '.join(kinds)} (or None for {kinds[0]})")

    @property
    def class_loss_kind(self) -> str:
        return self.class_loss or ("focal" if self.focal else "ce")
