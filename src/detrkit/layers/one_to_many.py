"""One-to-many supervision during training: hybrid matching (H-DETR, Jia et al., "DETRs with Hybrid Matching",
CVPR 2023, section 3.2).

Beside the usual queries, matched one-to-one to the ground truth (what inference uses), the decoder runs an extra
set of queries in training whose targets are the ground truth repeated k times, matched by the same Hungarian
matcher: each object then supervises k queries, many more positives per image, which is what speeds up
convergence. A self-attention mask keeps the two sets apart (neither sees the other), so the one-to-one queries
compute exactly what they would without the extra ones; the extra queries share every layer and head, and do not
exist at inference (no NMS, no change to the exported graph). Paper: H-Deformable-DETR 47.0 -> 48.7 AP at
12 epochs with 300 one-to-one queries, 1500 one-to-many, k = 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ONE_TO_MANY = ("none", "hybrid")


@dataclass(frozen=True)
class HybridMatching:
    """The one-to-many branch's size.

    Attributes:
        queries: extra queries trained one-to-many (the paper: 1500 beside 300, five times as many).
        k: how many times each ground-truth object is repeated for them (the paper: 6).
    """

    queries: int
    k: int = 6

    def __post_init__(self) -> None:
        if self.queries < 1:
            raise ValueError(f"o2m_queries must be >= 1 with one_to_many='hybrid', got {self.queries}")
        if self.k < 1:
            raise ValueError(f"o2m_k must be >= 1 (each object repeated k times), got {self.k}")


def hybrid_matching(one_to_many: str, num_queries: int, o2m_queries: int | None, o2m_k: int) -> HybridMatching | None:
    """A builder's ``one_to_many`` settings -> the branch (None: "none"). ``o2m_queries`` None = 5 x num_queries."""
    if one_to_many not in ONE_TO_MANY:
        raise ValueError(f"one_to_many must be one of {', '.join(ONE_TO_MANY)}, got {one_to_many!r}")
    if one_to_many == "none":
        return None
    return HybridMatching(5 * num_queries if o2m_queries is None else o2m_queries, o2m_k)


def separated_self_attn_mask(num_one2one: int, num_one2many: int, device: torch.device) -> Tensor:
    """(N, N) bool self-attention mask, True = may not attend, over [one-to-one queries, one-to-many queries]:
    each set sees only itself."""
    n = num_one2one + num_one2many
    return hide_one_to_many(torch.zeros(n, n, dtype=torch.bool, device=device), 0, num_one2one)


def hide_one_to_many(attn_mask: Tensor, start: int, num_one2one: int) -> Tensor:
    """``attn_mask`` (N, N, True = may not attend) with the one-to-one queries (``num_one2one`` from ``start``) and
    the one-to-many queries (every one after them) unable to see each other. Queries before ``start`` (denoising)
    keep seeing the one-to-one queries and do not see the one-to-many ones: they compute what they would without
    the branch."""
    mask = attn_mask.clone()
    split = start + num_one2one
    mask[:split, split:] = True
    mask[split:, start:split] = True
    return mask


def repeat_targets(targets: list[dict[str, Tensor]], k: int) -> list[dict[str, Tensor]]:
    """Each image's objects repeated k times: the one-to-many branch's targets."""
    return [{**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
