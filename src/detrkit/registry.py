"""The flat model registry: preset name -> builder function (the only registry in detrkit)."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
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
    def description(self) -> str:
        return (self.builder.__doc__ or "").strip().splitlines()[0]


_MODELS: dict[str, ModelInfo] = {}


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
    _import_models()
    return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
    _import_models()
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
        return model_info(name).builder(num_classes=91 if num_classes is None else num_classes, **overrides)
    from detrkit.convert.formats import load_pretrained

    return load_pretrained(name, resolve_weights(name, weights, **overrides), num_classes=num_classes, **overrides)[0]


def resolve_weights(name: str, weights: str | Path, **overrides) -> Path:
    """A local file for ``weights``: a path as it is, a URL downloaded, a tag (``"coco"``) fetched and converted."""
    from detrkit.convert.hub import download, is_url, pretrained_file

    if is_url(weights):
        return download(str(weights))
    if isinstance(weights, str) and not Path(weights).exists() and re.fullmatch(r"\w+", weights):
        return pretrained_file(name, weights, **overrides)  # a tag such as "coco"
    return Path(weights)


def _import_models() -> None:
    import detrkit.models  # noqa: F401  (registers the presets)
