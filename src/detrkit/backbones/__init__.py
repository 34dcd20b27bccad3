"""Feature extractors that return a dict of feature maps with their padding masks."""

from detrkit.backbones.resnet import ResNetBackbone
from detrkit.backbones.resnet_vd import ResNetVd

__all__ = ["ResNetBackbone", "ResNetVd"]
