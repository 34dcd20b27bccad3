"""Comparing two libraries' postprocessed detections."""

import torch


def assert_same_detections(mine: dict, theirs: dict, box_tol: float, score_tol: float = 1e-4) -> None:
    """Every detection of ``mine`` (labels, scores, boxes) has its own equal in ``theirs``, and the counts agree.

    Matched one to one rather than by position: random-weight models give many exactly tied scores, whose
    order is unspecified.
    """
    assert len(mine["scores"]) == len(theirs["scores"]) > 0
    free = torch.ones(len(theirs["scores"]), dtype=torch.bool)
    for label, score, box in zip(mine["labels"], mine["scores"], mine["boxes"], strict=False):
        same = (free & (theirs["labels"] == label) & ((theirs["scores"] - score).abs() <= score_tol)
                & ((theirs["boxes"] - box).abs().amax(-1) <= box_tol))
        assert same.any(), (label, score, box)
        free[same.nonzero()[0, 0]] = False
