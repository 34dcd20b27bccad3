"""Denoising training: noised ground truth as extra decoder queries (DN-DETR and DINO).

DN-DETR (Li et al. 2022, section 3): besides the matching queries, the decoder receives the
ground-truth boxes and labels of the batch, noised, in several groups, and learns to reconstruct
the originals. Those queries need no Hungarian matching (query k of a group is object k), which
stabilises the early bipartite matching and speeds up convergence. An attention mask (section 3.4)
keeps the matching queries from seeing any denoising query (they would read the answers) and keeps
the groups from seeing each other.

DINO (Zhang et al. 2022, section 3.3), contrastive denoising: each group holds a positive and a
negative query per object; positives are noised by less than lambda1 and reconstruct the object,
negatives are noised by between lambda1 and lambda2 (here lambda2 = 2 * lambda1) and learn to
predict "no object", which teaches the model to reject anchors near, but not on, an object.

Layout of the ``N`` denoising queries (placed before the matching queries): ``num_groups`` groups
of ``group_size`` slots; with ``M`` the batch's largest object count, slot ``j < M`` of a group is
object ``j``'s positive and (contrastive) slot ``M + j`` its negative. Images with fewer objects
leave slots empty; empty slots are not supervised.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from detrkit.layers.heads import LayerOutput
from detrkit.ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@dataclass(frozen=True)
class DenoisingLayout:
    """Where a training batch's denoising queries sit (see the module docstring).

    Attributes:
        num_dn: denoising queries, placed before the matching queries (``num_groups * group_size``).
        num_groups: groups of noised copies of the ground truth.
        group_size: slots per group: ``max_objects`` (DN-DETR) or ``2 * max_objects`` (contrastive, DINO).
        max_objects: the batch's largest object count ``M``.
        contrastive: each group also holds a negative per object, in slots ``M .. 2M - 1``.
    """

    num_dn: int
    num_groups: int
    group_size: int
    max_objects: int
    contrastive: bool


@dataclass(frozen=True)
class DenoisingConfig:
    """How ground truth is noised into denoising queries.

    Args:
        num_dn_pairs: DINO's budget of denoising pairs: groups = max(1, num_dn_pairs // M) for the batch's largest
            object count M (each group then holds M positive and, contrastive, M negative queries).
        num_groups: DN-DETR's fixed number of groups (overrides ``num_dn_pairs``).
        label_noise: probability that a label is replaced by a random class (DN-DETR 0.2; DINO 0.5 * 0.5).
        box_noise_scale: lambda (DN-DETR 0.4: centre shift up to lambda * w / 2, size scaled by 1 +- lambda;
            DINO 0.4 = lambda1: corners moved by up to lambda1 * w / 2 for positives, by lambda1..2*lambda1 for
            negatives).
        contrastive: add DINO's negative queries.
    """

    num_dn_pairs: int = 100
    num_groups: int | None = None
    label_noise: float = 0.25
    box_noise_scale: float = 0.4
    contrastive: bool = True


# The papers' settings. DN-DETR: 5 groups, 20% of labels flipped, box noise 0.4, no negatives.
DN_DETR_NOISE = DenoisingConfig(num_groups=5, label_noise=0.2, box_noise_scale=0.4, contrastive=False)
# DINO: 100 denoising pairs, half the labels noised (flip probability 0.25), lambda1 = 0.4, negatives.
DINO_NOISE = DenoisingConfig(num_dn_pairs=100, label_noise=0.25, box_noise_scale=0.4, contrastive=True)


def as_denoising_config(value, base: DenoisingConfig | None = None) -> DenoisingConfig | None:
    """A builder's ``denoising`` argument: None / False (none), a DenoisingConfig, or a dict (YAML / CLI) that
    changes the fields it names of ``base``, the model family's own setting (``{num_dn_pairs: 50}`` on RT-DETR keeps
    RT-DETR's box noise), or of DenoisingConfig's defaults where there is none."""
    if value is None or value is False:
        return None
    if isinstance(value, DenoisingConfig):
        return value
    if isinstance(value, dict):
        if "num_queries" in value:  # the field's name in checkpoints saved before it was renamed
            value = {"num_dn_pairs": value["num_queries"], **{k: v for k, v in value.items() if k != "num_queries"}}
        return replace(base or DenoisingConfig(), **value)
    raise TypeError(f"denoising must be None, a DenoisingConfig or a dict of its fields, got {value!r}")


def preset_denoising(overrides: dict, base: DenoisingConfig) -> DenoisingConfig | None:
    """A preset's denoising: its own ``base``, or the user's ``denoising`` override of it (a dict changes only the
    fields it names: ``{num_dn_pairs: 50}`` keeps the preset's noise)."""
    return as_denoising_config(overrides.get("denoising", base), base)


def _noise_boxes(boxes: Tensor, scale: float, negative: Tensor | None) -> Tensor:
    """boxes (n, 4) cxcywh -> noised boxes (n, 4) cxcywh in [0, 1]."""
    if scale <= 0:
        return boxes
    wh = boxes[:, 2:]
    if negative is None:  # DN-DETR: shift the centre by up to scale * wh / 2, rescale w, h by up to 1 +- scale
        diff = torch.cat([wh / 2, wh], -1)
        noised = boxes + (torch.rand_like(boxes) * 2 - 1) * diff * scale
        return noised.clamp(0.0, 1.0)
    # DINO: move each corner by a fraction of half the box size: [0, 1) for positives, [1, 2) for negatives
    magnitude = torch.rand_like(boxes) + negative[:, None].to(boxes.dtype)
    sign = torch.randint_like(boxes, 0, 2) * 2 - 1
    xyxy = box_cxcywh_to_xyxy(boxes) + sign * magnitude * torch.cat([wh, wh], -1) / 2 * scale
    return box_xyxy_to_cxcywh(xyxy.clamp(0.0, 1.0))


def build_dn_queries(targets: list[dict[str, Tensor]], num_classes: int, num_matching: int, cfg: DenoisingConfig):
    """Noise the batch's ground truth into denoising queries.

    Args:
        targets: per image ``{"labels": (n,), "boxes": (n, 4) cxcywh}``.
        num_classes: labels are flipped to a random class in [0, num_classes).
        num_matching: number of matching queries that follow the denoising ones (for the mask).
        cfg: the noise settings.

    Returns:
        ``labels`` (B, N) int64 noised labels (``num_classes`` on empty slots), ``boxes`` (B, N, 4) noised cxcywh
        boxes (0.5 on empty slots), ``attn_mask`` (N + Q, N + Q) bool, True where attention is blocked, and
        the :class:`DenoisingLayout`.
        Returns None when the batch has no object.
    """
    counts = [len(t["labels"]) for t in targets]
    m = max(counts, default=0)
    if m == 0:
        return None
    device = targets[0]["boxes"].device
    groups = cfg.num_groups or max(1, cfg.num_dn_pairs // m)
    group_size = 2 * m if cfg.contrastive else m
    n, b = groups * group_size, len(targets)

    layout = DenoisingLayout(num_dn=n, num_groups=groups, group_size=group_size, max_objects=m,
                             contrastive=cfg.contrastive)
    labels = torch.full((b, n), num_classes, dtype=torch.int64, device=device)
    boxes = torch.full((b, n, 4), 0.5, device=device)
    _, slots, objects, positive = dn_slots(layout, targets)  # the layout, image after image
    sizes = [groups * (2 if cfg.contrastive else 1) * k for k in counts]
    for i, (slot, obj, pos) in enumerate(
        zip(slots.split(sizes), objects.split(sizes), positive.split(sizes), strict=False)
    ):
        if len(slot) == 0:
            continue
        slot, obj, pos = slot.to(device), obj.to(device), pos.to(device)
        gt_labels, gt_boxes = targets[i]["labels"][obj], targets[i]["boxes"].float()[obj]
        flip = torch.rand(len(gt_labels), device=device) < cfg.label_noise
        labels[i, slot] = torch.where(flip, torch.randint_like(gt_labels, 0, num_classes), gt_labels)
        boxes[i, slot] = _noise_boxes(gt_boxes, cfg.box_noise_scale, ~pos if cfg.contrastive else None)

    # Section 3.4 of DN-DETR: matching queries must not see denoising queries, groups must not see each other.
    total = n + num_matching
    attn_mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    attn_mask[n:, :n] = True
    group_id = torch.arange(n, device=device) // group_size
    attn_mask[:n, :n] = group_id[:, None] != group_id[None, :]
    return labels, boxes, attn_mask, layout


def prepend_dn_queries(tgt: Tensor, anchors: Tensor, dn_tgt: Tensor, dn_boxes: Tensor,
                       eps: float) -> tuple[Tensor, Tensor]:
    """Denoising queries go first: content (B, N, C) before ``tgt`` (B, Q, C), their noised boxes (B, N, 4, cxcywh)
    as anchors in inverse-sigmoid space (clamped at the model's ``eps``) before ``anchors`` (B, Q, 4)."""
    tgt = torch.cat([dn_tgt.to(tgt.dtype), tgt], 1)
    anchors = torch.cat([inverse_sigmoid(dn_boxes, eps).to(anchors.dtype), anchors], 1)
    return tgt, anchors


def add_dn_queries(tgt: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]] | None, *,
                   config: DenoisingConfig | None, num_classes: int, label_enc: nn.Module, eps: float,
                   training: bool) -> tuple[Tensor, Tensor, Tensor | None, DenoisingLayout | None]:
    """A detector's denoising step (DINO, RT-DETR): in training, with targets, prepend the denoising queries (label
    embeddings ``label_enc`` at noised boxes) to ``tgt`` (B, Q, C) and ``anchors`` (B, Q, 4, before the sigmoid) and
    return the self-attention mask that hides them from the matching queries, with their layout. Otherwise (or
    without ``config``) the queries unchanged and None, None: the denoising part is absent at inference."""
    if config is None or not training or not targets:
        return tgt, anchors, None, None
    dn = build_dn_queries(targets, num_classes, tgt.shape[1], config)
    if dn is None:
        return tgt, anchors, None, None
    labels, boxes, attn_mask, layout = dn
    tgt, anchors = prepend_dn_queries(tgt, anchors, label_enc(labels), boxes, eps)
    return tgt, anchors, attn_mask, layout


def split_dn_outputs(logits: Tensor, boxes: Tensor, layout: DenoisingLayout | None
                     ) -> tuple[Tensor, Tensor, list[LayerOutput] | None]:
    """Per-layer outputs (L, B, N + Q, *) -> the matching queries' (L, B, Q, *) and, per layer, the denoising
    queries' :class:`LayerOutput` (None without denoising)."""
    if layout is None:
        return logits, boxes, None
    n = layout.num_dn
    dn_outputs = [LayerOutput(lg[:, :n], bx[:, :n]) for lg, bx in zip(logits, boxes, strict=True)]
    return logits[:, :, n:], boxes[:, :, n:], dn_outputs


def dn_slots(layout: DenoisingLayout, targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Which denoising slot reconstructs which object: (batch index, slot, target index, is positive), each (P,)."""
    groups, group_size, m = layout.num_groups, layout.group_size, layout.max_objects
    copies = 2 if layout.contrastive else 1
    out = [], [], [], []
    for i, t in enumerate(targets):
        k = len(t["labels"])
        g = torch.arange(groups)[:, None, None]
        c = torch.arange(copies)[None, :, None]
        j = torch.arange(k)[None, None, :]
        slot = (g * group_size + c * m + j).flatten()
        out[0].append(torch.full_like(slot, i))
        out[1].append(slot)
        out[2].append(j.expand(groups, copies, k).flatten())
        out[3].append((c == 0).expand(groups, copies, k).flatten())
    return tuple(torch.cat(x) for x in out)
