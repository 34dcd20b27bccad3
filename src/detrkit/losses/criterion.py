"""The set criterion: Hungarian matching, then classification + L1 + GIoU on the matched pairs.

DETR (Carion et al. 2020, section 3.1): cross-entropy over K + 1 classes with the no-object class
down-weighted by ``eos_coef`` = 0.1, L1 (weight 5) and GIoU (weight 2) on matched boxes, every loss
normalised by the number of target boxes in the global batch, and the same losses on every decoder
layer's output ("auxiliary decoding losses"). Deformable DETR and its successors switch the class
term to the sigmoid focal loss (``focal=True``).

Returned losses are already weighted; their sum is the training objective. Keys: ``loss_class``,
``loss_bbox``, ``loss_giou``, with ``_aux{i}`` for decoder layer i, ``_enc`` for two-stage proposals,
``_dn`` / ``_dn_aux{i}`` for the denoising queries of the last / i-th decoder layer (DN-DETR, DINO), ``_o2m`` /
``_o2m_aux{i}`` for hybrid matching's one-to-many queries (H-DETR), ``_enc_o2m`` for the dense one-to-many
supervision of the encoder's proposals. D-FINE adds ``loss_fgl`` / ``loss_ddf`` (its edge distributions: the
fine-grained localization loss and GO-LSD's distillation from the last layer, :meth:`SetCriterion._local_losses`)
and ``_pre`` / ``_dn_pre`` for layer 0's box before FDR; with ``union_matching`` (GO-LSD) every layer's box and
localization terms use the union of all layers' matches (:func:`~detrkit.losses.matcher.union_matches`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from detrkit.layers.denoising import DenoisingLayout, dn_slots
from detrkit.layers.fdr import bin_targets, boxes_to_distances, weighting_function
from detrkit.layers.one_to_many import repeat_targets
from detrkit.losses.distribution import decoupled_distillation_loss, fine_grained_localization_loss
from detrkit.losses.matcher import HungarianMatcher, union_matches
from detrkit.models.outputs import LayerOutput, LossConfig
from detrkit.ops import box_cxcywh_to_xyxy, generalized_box_iou

LOSS_CLASS, LOSS_BBOX, LOSS_GIOU = "loss_class", "loss_bbox", "loss_giou"
LOSS_FGL, LOSS_DDF = "loss_fgl", "loss_ddf"
VARIFOCAL_ALPHA, VARIFOCAL_GAMMA = 0.75, 2.0  # RT-DETR's settings of the varifocal loss
MAL_GAMMA = 1.5  # DEIM's


def iou_aware_class_loss(logits: Tensor, onehot: Tensor, quality: Tensor, kind: str) -> Tensor:
    """IoU-aware classification, summed: the score of a matched query learns how well its box fits.

    logits, onehot (..., K): the hard class targets; quality (...,): IoU of each query's box with its matched object
    (ignored where ``onehot`` is 0). With p = sigmoid(logit), q the IoU, and a binary cross-entropy towards a soft
    target t weighted by w (weights detached, so the gradient w * (p - t) vanishes exactly where p = t):

    - ``"varifocal"`` (VarifocalNet, Zhang et al. CVPR 2021, eq. 2; RT-DETR, Zhao et al. CVPR 2024, section 4.3):
      t = q at the object's class, 0 elsewhere; w = q there, alpha * p^gamma elsewhere (alpha 0.75, gamma 2).
    - ``"mal"`` (matchability-aware loss, DEIM, Huang et al. CVPR 2025, section 3.3): t = q^gamma at the object's
      class (gamma 1.5), w = 1 there, so low-IoU matches still get a loss to learn from; p^gamma elsewhere.
    """
    prob = logits.sigmoid().detach()
    if kind == "varifocal":
        target = onehot * quality[..., None]
        weight = VARIFOCAL_ALPHA * prob.pow(VARIFOCAL_GAMMA) * (1 - onehot) + target
    elif kind == "mal":
        target = onehot * quality[..., None].pow(MAL_GAMMA)
        weight = prob.pow(MAL_GAMMA) * (1 - onehot) + onehot
    else:
        raise ValueError(f"unknown IoU-aware class loss {kind!r}; choose varifocal or mal")
    return F.binary_cross_entropy_with_logits(logits, target.detach(), weight=weight.detach(), reduction="sum")


class SetCriterion(nn.Module):
    """Computes the weighted DETR-family losses of a :class:`~detrkit.models.DetectionOutput`.

    Args:
        num_classes: number of object classes (without no-object).
        config: weights and loss type.
    """

    def __init__(self, num_classes: int, config: LossConfig | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.config = c = config or LossConfig()
        self.matcher = HungarianMatcher(
            c.class_weight if c.cost_class is None else c.cost_class,
            c.bbox_weight if c.cost_bbox is None else c.cost_bbox,
            c.giou_weight if c.cost_giou is None else c.cost_giou,
            focal=c.focal, alpha=c.focal_alpha, gamma=c.focal_gamma,
        )
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = c.eos_coef
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, outputs, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """outputs: DetectionOutput; targets: per image {"labels": (n,) int64 in [0, K), "boxes": (n, 4) cxcywh}."""
        num_boxes = self._num_boxes(sum(len(t["labels"]) for t in targets), outputs.pred_boxes.device)
        last = LayerOutput(outputs.pred_logits, outputs.pred_boxes, outputs.pred_corners, outputs.anchors)
        layers = [("", last)]
        if self.config.aux_loss:
            layers += [(f"_aux{i}", aux) for i, aux in enumerate(outputs.aux_outputs)]
            if outputs.pre_outputs is not None:  # D-FINE: layer 0's box before FDR
                layers.append(("_pre", outputs.pre_outputs))
        # every decoder layer is matched in one pass (one device -> host transfer), then each gets its losses
        matches = self.matcher.match_layers([o.pred_logits for _, o in layers], [o.pred_boxes for _, o in layers],
                                            targets)
        enc, enc_targets, enc_match = outputs.enc_outputs, targets, None
        if enc is not None:
            if self.config.enc_class_agnostic:
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_match = self.matcher(enc.pred_logits, enc.pred_boxes, enc_targets)
        box_match, box_norm = None, num_boxes
        if self.config.union_matching:  # D-FINE's GO-LSD: box losses on the union of every layer's matches
            box_match = union_matches(matches + ([enc_match] if enc_match is not None else []))
            box_norm = self._num_boxes(sum(len(q) for q, _ in box_match), outputs.pred_boxes.device)
        losses = {}
        for (suffix, out), indices in zip(layers, matches, strict=False):
            losses.update(self._layer_losses(out.pred_logits, out.pred_boxes, targets, num_boxes, suffix, indices,
                                             box_match, box_norm))
            if out.corners is not None and self.config.fdr is not None:
                local = box_match or indices
                b, q = _flat_indices(local, out.pred_logits.device)
                tgt = _matched_targets(targets, local).to(out.pred_boxes.device)
                losses.update(self._local_losses(out, last, b, q, tgt, box_norm, suffix))
        if enc is not None:
            losses.update(self._layer_losses(enc.pred_logits, enc.pred_boxes, enc_targets, num_boxes, "_enc",
                                             enc_match, box_match, box_norm))
        if outputs.dn_meta is not None and outputs.dn_outputs is not None:
            losses.update(self._dn_losses(outputs.dn_meta, outputs.dn_outputs, targets, num_boxes))
            if outputs.dn_pre_outputs is not None and self.config.aux_loss:
                losses.update(self._dn_losses(outputs.dn_meta, [outputs.dn_pre_outputs], targets, num_boxes,
                                              "_dn_pre"))
        if outputs.enc_dense is not None:  # every encoder proposal, k per object (see RTDETR's enc_o2m_k)
            k, dense = outputs.enc_dense_k, outputs.enc_dense
            losses.update(self._layer_losses(dense.pred_logits, dense.pred_boxes, repeat_targets(targets, k),
                                             num_boxes * k, "_enc_o2m"))
        if outputs.o2m_outputs:
            losses.update(self._o2m_losses(outputs.o2m_outputs, targets, outputs.o2m_k, outputs.o2m_groups,
                                           num_boxes))
        return losses

    def _o2m_losses(self, o2m_outputs: list[LayerOutput], targets: list[dict], k: int, groups: int,
                    num_boxes: float) -> dict[str, Tensor]:
        """One-to-many supervision of the extra queries of every decoder layer, with the same losses. Hybrid
        matching (H-DETR section 3.2): matched to the ground truth repeated k times. Group DETR (section 3): each
        of the groups matched one-to-one on its own. Normalised by the number of objects times k x groups."""
        last = len(o2m_outputs) - 1
        layers = [(i, out) for i, out in enumerate(o2m_outputs) if i == last or self.config.aux_loss]
        repeated = repeat_targets(targets, k) if k > 1 else targets
        matches = self._match_groups([o.pred_logits for _, o in layers], [o.pred_boxes for _, o in layers],
                                     repeated, groups)
        num_boxes = num_boxes * k * groups
        losses = {}
        for (lid, out), indices in zip(layers, matches, strict=True):
            suffix = "_o2m" if lid == last else f"_o2m_aux{lid}"
            losses.update(self._layer_losses(out.pred_logits, out.pred_boxes, repeated, num_boxes, suffix, indices))
        return losses

    def _match_groups(self, logits: list[Tensor], boxes: list[Tensor], targets: list[dict], groups: int
                      ) -> list[list[tuple[Tensor, Tensor]]]:
        """Each layer's queries (B, G * n, *) matched group by group (G = ``groups``), one-to-one within each;
        indices[layer][image] over all G * n queries, as :meth:`HungarianMatcher.match_layers` returns them."""
        if groups == 1:
            return self.matcher.match_layers(logits, boxes, targets)
        n = logits[0].shape[1] // groups
        per_group = [self.matcher.match_layers([lg[:, g * n:(g + 1) * n] for lg in logits],
                                               [bx[:, g * n:(g + 1) * n] for bx in boxes], targets)
                     for g in range(groups)]
        return [[(torch.cat([per_group[g][layer][i][0] + g * n for g in range(groups)]),
                  torch.cat([per_group[g][layer][i][1] for g in range(groups)])) for i in range(len(targets))]
                for layer in range(len(logits))]

    def _dn_losses(self, layout: DenoisingLayout, dn_outputs: list[LayerOutput], targets: list[dict],
                   num_boxes: float, name: str = "_dn") -> dict[str, Tensor]:
        """Denoising losses (DN-DETR section 3.1, DINO section 3.3): no matching, slot k of a group reconstructs
        object k. Positives: focal loss towards the true class + L1 + GIoU; DINO's negatives: focal loss towards
        no-object only. Empty slots (images with fewer objects than the batch maximum) are not supervised.
        Normalised by the number of objects times the number of groups."""
        if not self.config.focal:
            raise ValueError("denoising losses are defined for focal-loss (sigmoid) models")
        b_idx, slot, t_idx, positive = dn_slots(layout, targets)
        if len(slot) == 0:
            return {}
        device = dn_outputs[-1].pred_logits.device
        offsets = torch.tensor([0] + [len(t["labels"]) for t in targets]).cumsum(0)
        flat = offsets[b_idx] + t_idx
        labels = torch.cat([t["labels"] for t in targets]).to(device)[flat.to(device)]
        boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()[flat.to(device)]
        b_idx, slot, positive = b_idx.to(device), slot.to(device), positive.to(device)
        norm = num_boxes * layout.num_groups
        losses = {}
        for lid, out in enumerate(dn_outputs):
            last = lid == len(dn_outputs) - 1
            if not (last or self.config.aux_loss):
                continue
            logits = out.pred_logits[b_idx, slot].float()  # (P, K)
            onehot = torch.zeros_like(logits)
            onehot[positive, labels[positive]] = 1.0  # negatives keep an all-zero target: "no object"
            pred = out.pred_boxes[b_idx[positive], slot[positive]].float()
            loss_class = self._class_loss(logits, onehot, positive, pred, boxes[positive]) / norm
            suffix = name if last else f"{name}_aux{lid}"
            losses.update(self._weighted(loss_class, pred, boxes[positive], norm, suffix))
            if out.corners is not None and self.config.fdr is not None:  # D-FINE: the last dn layer teaches
                losses.update(self._local_losses(out, dn_outputs[-1], b_idx[positive], slot[positive],
                                                 boxes[positive], norm, suffix))
        return losses

    def _local_losses(self, out: LayerOutput, teacher: LayerOutput, b: Tensor, q: Tensor, tgt_boxes: Tensor,
                      num_boxes: float, suffix: str) -> dict[str, Tensor]:
        """D-FINE's losses on a layer's edge distributions (``out.corners``), for its matched queries (image ``b``,
        query ``q``) and their objects' boxes (M, 4) cxcywh:

        - FGL (section 3.2, :func:`~detrkit.losses.distribution.fine_grained_localization_loss`): each edge's
          distribution towards the two bins around the object's edge, measured from the layer's anchor, weighted by
          the IoU of the layer's box;
        - DDF (GO-LSD, section 3.3, :func:`~detrkit.losses.distribution.decoupled_distillation_loss`): every query's
          distributions towards ``teacher``'s (the last layer's), weighted by the IoU where matched and by the
          teacher's confidence elsewhere; zero for the teacher itself.
        """
        c = self.config
        reg_max, reg_scale, up = c.fdr
        corners = out.corners.float()
        project = weighting_function(reg_max, up, reg_scale, device=corners.device)
        with torch.no_grad():
            distances = boxes_to_distances(out.anchors[b, q].float(), box_cxcywh_to_xyxy(tgt_boxes), reg_scale)
            index, w_left, w_right = bin_targets(distances, project)
            iou = _matched_iou(out.pred_boxes[b, q].float(), tgt_boxes)
        fgl = fine_grained_localization_loss(corners[b, q], index, w_left, w_right, iou, num_boxes)
        with torch.no_grad():
            weight = teacher.pred_logits.float().sigmoid().max(-1).values  # (B, N) unmatched: the teacher's confidence
            weight[b, q] = iou.to(weight.dtype)
            matched = torch.zeros_like(weight, dtype=torch.bool)
            matched[b, q] = True
        ddf = decoupled_distillation_loss(corners, teacher.corners.float(), weight, matched, c.ddf_temperature)
        return {LOSS_FGL + suffix: c.fgl_weight * fgl, LOSS_DDF + suffix: c.ddf_weight * ddf}

    def _weighted(
        self, loss_class: Tensor, src_boxes: Tensor, tgt_boxes: Tensor, num_boxes: float, suffix: str
    ) -> dict[str, Tensor]:
        """The class loss plus L1 and GIoU of matched box pairs (M, 4) divided by ``num_boxes``, each times its
        weight."""
        c = self.config
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {
            LOSS_CLASS + suffix: c.class_weight * loss_class,
            LOSS_BBOX + suffix: c.bbox_weight * loss_bbox,
            LOSS_GIOU + suffix: c.giou_weight * loss_giou,
        }

    def _layer_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict], num_boxes: float, suffix: str,
                      indices: list[tuple[Tensor, Tensor]] | None = None,
                      box_indices: list[tuple[Tensor, Tensor]] | None = None,
                      box_norm: float | None = None) -> dict[str, Tensor]:
        """Class loss on the layer's own matches ``indices`` (matched here when None); L1 / GIoU on the same pairs,
        or on ``box_indices`` normalised by ``box_norm`` (D-FINE's union set, :func:`union_matches`)."""
        if indices is None:
            indices = self.matcher(logits, boxes, targets)
        batch_idx, src_idx = _flat_indices(indices, logits.device)
        matched_labels = torch.cat(
            [t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices, strict=False)]
        )
        matched_tgt_boxes = _matched_targets(targets, indices)

        # Every unmatched query is trained towards "no object": class index num_classes.
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )  # (B, Q)
        target_classes[batch_idx, src_idx] = matched_labels.to(logits.device)
        src_boxes = boxes[batch_idx, src_idx].float()
        if self.config.focal:
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()  # (B, Q, K)
            loss_class = self._class_loss(logits.float(), onehot, (batch_idx, src_idx), src_boxes,
                                          matched_tgt_boxes) / num_boxes
        else:
            loss_class = F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight=self.class_weights)
        if box_indices is not None:
            src_boxes = boxes[_flat_indices(box_indices, logits.device)].float()
            matched_tgt_boxes, num_boxes = _matched_targets(targets, box_indices), box_norm
        return self._weighted(loss_class, src_boxes, matched_tgt_boxes, num_boxes, suffix)

    def _class_loss(self, logits: Tensor, onehot: Tensor, matched, src_boxes: Tensor, tgt_boxes: Tensor) -> Tensor:
        """The sigmoid models' class term, summed: focal loss towards ``onehot``, or an IoU-aware loss whose targets
        are the IoUs of the matched pairs (``src_boxes`` at ``matched`` positions of ``logits[..., 0]``), computed
        only then."""
        c = self.config
        if c.class_loss_kind == "focal":
            return sigmoid_focal_loss(logits, onehot, alpha=c.focal_alpha, gamma=c.focal_gamma, reduction="sum")
        quality = logits.new_zeros(logits.shape[:-1])  # IoU of each matched query, 0 for the rest
        quality[matched] = _matched_iou(src_boxes, tgt_boxes).to(quality.dtype)
        return iou_aware_class_loss(logits, onehot, quality, c.class_loss_kind)

    @staticmethod
    def _num_boxes(count: int, device: torch.device) -> float:
        """``count`` (target boxes, or matched pairs, of this process) averaged over all processes (DDP), at least
        1: the normaliser of the losses."""
        n = torch.tensor([float(count)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return max(n.item(), 1.0)


def _flat_indices(indices: list[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-image (query, object) matches -> (image index, query index) of every matched query, each (M,)."""
    b = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
    return b, torch.cat([src for src, _ in indices]).to(device)


def _matched_targets(targets: list[dict], indices: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The boxes (M, 4) of the objects that ``indices`` matched, image after image."""
    return torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices, strict=False)]
                     ).float()


def _matched_iou(src_boxes: Tensor, tgt_boxes: Tensor) -> Tensor:
    """IoU of matched pairs of cxcywh boxes (M, 4) -> (M,), without gradient (a target, not a prediction)."""
    with torch.no_grad():
        a, b = box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)
        inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
        union = (a[:, 2:] - a[:, :2]).prod(-1) + (b[:, 2:] - b[:, :2]).prod(-1) - inter
        return inter / union.clamp(min=1e-12)


def build_criterion(model: nn.Module, **overrides) -> SetCriterion:
    """The criterion with ``model``'s family defaults (``model.loss_config``), optionally overridden, on the device
    of ``model``'s parameters (its class-weight buffer must sit with the logits)."""
    config = replace(model.loss_config, **overrides)
    device = next(model.parameters()).device
    return SetCriterion(model.num_classes, config).to(device)
