"""One-to-many supervision during training: more positive queries per object, with inference left as it is.

Beside the usual queries, matched one-to-one to the ground truth (what inference uses), the decoder runs extra
queries in training only. They share every layer and head; a self-attention mask keeps them apart from the
one-to-one queries (neither sees the other), so the one-to-one queries compute exactly what they would without
them, and at inference they do not exist (no NMS, no change to the exported graph). Two ways to supervise them:

- ``"hybrid"``: hybrid matching (H-DETR, Jia et al., "DETRs with Hybrid Matching", CVPR 2023, section 3.2). The
  extra queries' targets are the ground truth repeated k times, matched by the same Hungarian matcher: each object
  supervises k of them. Paper: H-Deformable-DETR 47.0 -> 48.7 AP at 12 epochs, 300 + 1500 queries, k = 6.
- ``"group"``: Group DETR (Chen et al., "Group DETR: Fast DETR Training with Group-Wise One-to-Many Assignment",
  ICCV 2023, section 3). K - 1 more copies of the query set, each matched one-to-one on its own, and a group-wise
  mask (a group sees only itself). Paper: K = 11 groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detrkit.layers.heads import LayerOutput

ONE_TO_MANY = ("none", "hybrid", "group")


@dataclass(frozen=True)
class OneToMany:
    """The one-to-many branch.

    Attributes:
        kind: ``"hybrid"`` or ``"group"``.
        queries: extra queries in training.
        k: hybrid: how many times each object is repeated for them (the paper: 6); group: 1.
        groups: group: how many groups the extra queries form, each matched one-to-one (K - 1); hybrid: 1.
        fit: hybrid with the default count: a two-stage model uses at most the encoder proposals its one-to-one
            queries leave (small images have few); a count the user gave is used as given, or rejected.
    """

    kind: str
    queries: int
    k: int = 1
    groups: int = 1
    fit: bool = False

    def __post_init__(self) -> None:
        if self.queries < 1:
            raise ValueError(f"o2m_queries must be >= 1 with one_to_many={self.kind!r}, got {self.queries}")
        if self.k < 1:
            raise ValueError(f"o2m_k must be >= 1 (each object repeated k times), got {self.k}")

    def count(self, num_queries: int, proposals: int | None = None) -> int:
        """The one-to-many queries of a training step: ``queries``, or with ``fit`` and ``proposals`` (the top-k pool
        of a two-stage model) at most ``proposals - num_queries``."""
        if self.fit and proposals is not None:
            return max(0, min(self.queries, proposals - num_queries))
        return self.queries

    def output_fields(self) -> dict:
        """What the criterion needs to know of the branch (DetectionOutput's ``o2m_k``, ``o2m_groups``)."""
        return {"o2m_k": self.k, "o2m_groups": self.groups}


def one_to_many_branch(one_to_many: str, num_queries: int, o2m_queries: int | None, o2m_k: int,
                       o2m_groups: int) -> OneToMany | None:
    """A builder's settings -> the branch (None: ``"none"``).

    hybrid: ``o2m_queries`` extra queries (None = 5 x num_queries, the paper's ratio, or fewer where a two-stage
    model's images have fewer encoder proposals), objects repeated ``o2m_k`` times. group: ``o2m_groups`` groups
    in all (the one-to-one set included, so ``o2m_groups`` - 1 extra copies).
    """
    if one_to_many not in ONE_TO_MANY:
        raise ValueError(f"one_to_many must be one of {', '.join(ONE_TO_MANY)}, got {one_to_many!r}")
    if one_to_many == "none":
        return None
    if one_to_many == "group":
        if o2m_groups < 2:
            raise ValueError(f"o2m_groups must be >= 2 with one_to_many='group' (the one-to-one set is group 1), "
                             f"got {o2m_groups}")
        return OneToMany("group", (o2m_groups - 1) * num_queries, 1, o2m_groups - 1)
    if o2m_queries is None:
        return OneToMany("hybrid", 5 * num_queries, o2m_k, fit=True)
    return OneToMany("hybrid", o2m_queries, o2m_k)


def separated_self_attn_mask(num_one2one: int, num_one2many: int, device: torch.device, groups: int = 1) -> Tensor:
    """(N, N) bool self-attention mask, True = may not attend, over [one-to-one queries, one-to-many queries in
    ``groups`` equal groups]: each set sees only itself."""
    n = num_one2one + num_one2many
    return hide_one_to_many(torch.zeros(n, n, dtype=torch.bool, device=device), 0, num_one2one, groups)


def hide_one_to_many(attn_mask: Tensor, start: int, num_one2one: int, groups: int = 1) -> Tensor:
    """``attn_mask`` (N, N, True = may not attend) with the one-to-one queries (``num_one2one`` from ``start``) and
    the one-to-many queries (every one after them, in ``groups`` equal groups) unable to see each other. Queries
    before ``start`` (denoising) keep seeing the one-to-one queries and do not see the one-to-many ones: they
    compute what they would without the branch."""
    mask = attn_mask.clone()
    split = start + num_one2one
    mask[:split, split:] = True
    mask[split:, start:split] = True
    size = (mask.shape[0] - split) // groups
    group = torch.arange(mask.shape[0] - split, device=mask.device) // size
    mask[split:, split:] |= group[:, None] != group[None, :]
    return mask


def hide_after_denoising(attn_mask: Tensor | None, num_queries: int, num_dn: int, extra: int, groups: int,
                         device: torch.device) -> Tensor:
    """The decoder's self-attention mask over [``num_dn`` denoising, one-to-one, ``extra`` one-to-many queries]
    (``num_queries`` in all; ``attn_mask`` the denoising one, or None): the one-to-one and one-to-many queries (and
    the groups) unable to see each other, the denoising queries unable to see the one-to-many ones."""
    full = attn_mask if attn_mask is not None else torch.zeros(num_queries, num_queries, dtype=torch.bool,
                                                                device=device)
    return hide_one_to_many(full, num_dn, num_queries - num_dn - extra, groups)


def check_proposals(num_queries: int, extra: int, proposals: int) -> None:
    """A two-stage model takes its one-to-one and one-to-many queries from the encoder's proposals: refuse a count
    that does not fit them, naming the option to lower."""
    if num_queries + extra > proposals:
        raise ValueError(f"num_queries + o2m_queries = {num_queries + extra} exceeds the {proposals} encoder "
                         f"proposals of this image size; lower o2m_queries (or train on larger images)")


def split_o2m_outputs(logits: Tensor, boxes: Tensor, extra: int
                      ) -> tuple[Tensor, Tensor, list[LayerOutput] | None]:
    """Per-layer outputs (L, B, Q + extra, *) -> the one-to-one queries' (L, B, Q, *) and, per layer, the last
    ``extra`` (one-to-many) queries' :class:`LayerOutput` (None when ``extra`` is 0)."""
    if not extra:
        return logits, boxes, None
    o2m = [LayerOutput(lg, bx) for lg, bx in zip(logits[:, :, -extra:], boxes[:, :, -extra:], strict=True)]
    return logits[:, :, :-extra], boxes[:, :, :-extra], o2m


def repeat_targets(targets: list[dict[str, Tensor]], k: int) -> list[dict[str, Tensor]]:
    """Each image's objects repeated k times: the hybrid branch's targets."""
    return [{**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
