"""Checkpoint conversion from the reference implementations to detrkit's parameter names."""

from detrkit.convert.official import convert_official_detr

__all__ = ["convert_official_detr"]
