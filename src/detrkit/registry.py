"""The flat model registry: preset name -> builder function (the only registry in detrkit).

The model files register their presets when they are imported (torchvision's pattern); this module imports
nothing of detrkit, so every layer above the models can read it. ``import detrkit`` imports every model.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Weights:
    """Weights released by a reference implementation, for ``create_model(name, weights="coco")``.

    Attributes:
        url: the release's own download address.
        coco_ap: box AP on COCO val2017 that the release reports for this file.
        source: who released it.
        sha256: the file's sha256, or the prefix its release names the file with; None when not published.
    """

    url: str
    coco_ap: float
    source: str
    sha256: str | None = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ModelInfo:
    """What the model table shows about a preset."""

    name: str
    builder: Callable[..., nn.Module]
    model_class: type[nn.Module]  # what the builder returns (its return annotation): the family
    paper: str
    input_size: tuple[int, int]
    coco_ap: float | None  # box AP on COCO val2017 reported by the paper, if any
    recipe: dict | None = None  # the paper's schedule as TrainConfig fields (``detrkit train --recipe true``)
    weights: dict[str, Weights] = field(default_factory=dict)  # released weights by tag ("coco")

    @property
    def preprocess(self) -> str:
        """How images become this model's input, as its class declares it (``preprocess``): ``"detr"`` = ImageNet
        mean / std, shorter side resized (the DETR family, the default); ``"rtdetr"`` = pixels in [0, 1], resized
        to a fixed square (RT-DETR's official and HF preprocessing). Training, evaluation, the Detector and export
        all feed a model this way."""
        return getattr(self.model_class, "preprocess", "detr")

    @property
    def description(self) -> str:
        return (self.builder.__doc__ or "").strip().splitlines()[0]


_MODELS: dict[str, ModelInfo] = {}
# Classes of a model built without a dataset or a checkpoint to say: COCO's id space (ids 1..90, + 0), which the
# papers' heads and the released checkpoints use.
DEFAULT_NUM_CLASSES = 91


class UnknownModelError(KeyError):
    """A model name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_model(*, paper: str, input_size: tuple[int, int], coco_ap: float | None = None, recipe: dict | None = None,
                   weights: dict[str, Weights] | None = None):
    """Decorator: add a builder ``fn(*, num_classes, **overrides) -> nn.Module`` under its function name.

    ``recipe``: the paper's training schedule as :class:`~detrkit.config.TrainConfig` fields, e.g.
    ``{"epochs": 12, "lr": 1e-4, "lr_backbone": 1e-5, "lr_drop": 11}``.
    ``weights``: released checkpoints of this architecture by tag, e.g. ``{"coco": Weights(...)}``.
    """

    def wrap(fn):
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        model_class = typing.get_type_hints(fn)["return"]  # the class the builder is annotated to return
        _MODELS[fn.__name__] = ModelInfo(fn.__name__, fn, model_class, paper, input_size, coco_ap, recipe,
                                         dict(weights or {}))
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of every registered preset, sorted."""
    return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
    if name not in _MODELS:
        raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def image_size_of(meta_or_name: dict | str) -> int:
    """The one default input size: a checkpoint's ``image_size`` (what it was trained at), else its preset's short
    side (800 for the papers' models, 640 for the lite presets). Training, evaluation, prediction and export use it."""
    if isinstance(meta_or_name, dict):
        if meta_or_name.get("image_size"):
            return int(meta_or_name["image_size"])
        meta_or_name = meta_or_name["model"]
    return int(model_info(meta_or_name).input_size[0])


def preprocess_of(meta_or_name: dict | str) -> str:
    """The input preprocessing of a checkpoint (its ``meta``) or preset: ``"detr"`` or ``"rtdetr"``."""
    name = meta_or_name["model"] if isinstance(meta_or_name, dict) else meta_or_name
    return model_info(name).preprocess
