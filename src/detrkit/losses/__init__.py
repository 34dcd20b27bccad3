"""Set prediction losses: Hungarian matching and the DETR-family criterion."""

from detrkit.losses.criterion import LossConfig, SetCriterion, build_criterion
from detrkit.losses.matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "LossConfig", "SetCriterion", "build_criterion"]
