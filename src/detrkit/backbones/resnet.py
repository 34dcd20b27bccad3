"""torchvision ResNet as a DETR backbone.

DETR (Carion et al. 2020, section 4 "Technical details") trains ResNet-50/101 from ImageNet weights
with frozen BatchNorm statistics and the stem + first stage frozen; DC5 replaces the stride of the
last stage by a dilation, doubling the resolution of the final feature map.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

_RESNETS = {
    "resnet18": ("ResNet18_Weights", 512),
    "resnet34": ("ResNet34_Weights", 512),
    "resnet50": ("ResNet50_Weights", 2048),
    "resnet101": ("ResNet101_Weights", 2048),
}
_STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet that returns selected stages and their downsampled padding masks.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        return_layers: stages to return, e.g. ``("layer4",)`` for DETR, ``("layer2", "layer3", "layer4")``
            for multi-scale models.
        dilation: DC5: dilate the last stage instead of striding it.
        pretrained: load torchvision's ImageNet weights (downloads on first use).
        norm: ``"frozen"`` (FrozenBatchNorm2d, for pretrained weights) or ``"batch"`` (trainable BatchNorm2d,
            for training from scratch, as the CPU lite presets do).
        trainable_layers: how many of the last stages train; 3 freezes the stem and layer1 as DETR does,
            5 trains everything.
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        return_layers: tuple[str, ...] = ("layer4",),
        dilation: bool = False,
        pretrained: bool = False,
        norm: str = "frozen",
        trainable_layers: int = 3,
    ) -> None:
        super().__init__()
        if name not in _RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_RESNETS)}")
        if norm not in ("frozen", "batch"):
            raise ValueError(f"norm must be 'frozen' or 'batch', got {norm!r}")
        weights_enum, last_channels = _RESNETS[name]
        if dilation and last_channels == 512:
            raise ValueError(f"DC5 (dilation=True) needs a bottleneck ResNet (resnet50 / resnet101), not {name}")
        weights = getattr(torchvision.models, weights_enum).IMAGENET1K_V1 if pretrained else None
        resnet = getattr(torchvision.models, name)(
            weights=weights,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d,
        )
        trainable = set(_STAGES[::-1][: max(0, min(trainable_layers, 4))])
        if trainable_layers >= 5:
            trainable.add("stem")
        for pname, param in resnet.named_parameters():
            stage = pname.split(".")[0]
            stage = stage if stage in _STAGES else "stem"
            param.requires_grad_(stage in trainable)

        self.body = IntermediateLayerGetter(resnet, return_layers={layer: layer for layer in return_layers})
        first = last_channels // 8 if last_channels == 2048 else 64
        channels = {stage: first * 2**i for i, stage in enumerate(_STAGES)}
        strides = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16 if dilation else 32}
        self.channels = {layer: channels[layer] for layer in return_layers}
        self.strides = {layer: strides[layer] for layer in return_layers}

    def forward(self, images: Tensor, padding_mask: Tensor) -> OrderedDict[str, tuple[Tensor, Tensor]]:
        """images (B, 3, H, W), padding_mask (B, H, W) -> {stage: (features (B, C, h, w), mask (B, h, w))}."""
        out = OrderedDict()
        for stage, feat in self.body(images).items():
            # Nearest-neighbour downsampling of the mask, as the official code does.
            mask = F.interpolate(padding_mask[:, None].float(), size=feat.shape[-2:])[:, 0].bool()  # (B, h, w)
            out[stage] = (feat, mask)
        return out
