"""Feature extractors that return a dict of feature maps with their padding masks."""

from detrkit.backbones.resnet import ResNetBackbone

__all__ = ["ResNetBackbone"]
