"""The public Python surface: build a preset, with any supported weights, or load a detrkit checkpoint."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from detrkit.registry import DEFAULT_NUM_CLASSES, list_models, model_info
from detrkit.weights.formats import load_checkpoint, load_pretrained
from detrkit.weights.hub import resolve_weights

__all__ = ["create_model", "list_models", "load_checkpoint", "model_info"]


def create_model(name: str, *, num_classes: int | None = None, weights: str | Path | None = None,
                 **overrides) -> nn.Module:
    """Build a registered detector, optionally with weights.

    Args:
        name: a preset from :func:`list_models`, e.g. ``"detr_r50"``.
        num_classes: number of object classes. Default: the checkpoint's when loading weights, else 91
            (COCO's id space). Loading weights with a different number re-initialises the class heads
            (fine-tuning) and warns.
        weights: any of
            - a checkpoint file or folder: detrkit, official (DETR, Deformable-DETR, DAB-DETR, DN-DETR, DINO),
              detrex, or HF transformers (``model.safetensors`` / ``pytorch_model.bin`` / their folder); the
              layout is detected from the keys;
            - an ``http(s)://`` or ``file://`` URL of such a file (downloaded to the cache);
            - a released-weights tag such as ``"coco"`` (see :attr:`ModelInfo.weights`): downloaded, verified,
              converted and cached on first use.
        **overrides: builder settings, e.g. ``num_queries=50`` or ``pretrained_backbone=True``.
    """
    if weights is None:
        return model_info(name).builder(num_classes=num_classes or DEFAULT_NUM_CLASSES, **overrides)
    return load_pretrained(name, resolve_weights(name, weights, **overrides), num_classes=num_classes, **overrides)[0]
