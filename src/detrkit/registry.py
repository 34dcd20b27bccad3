"""The flat model registry: preset name -> builder function (the only registry in detrkit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ModelInfo:
    """What the model table shows about a preset."""

    name: str
    builder: Callable[..., nn.Module]
    paper: str
    input_size: tuple[int, int]
    coco_ap: float | None  # box AP on COCO val2017 reported by the paper, if any
    recipe: dict | None = None  # the paper's schedule as TrainConfig fields (``detrkit train --recipe true``)

    @property
    def description(self) -> str:
        return (self.builder.__doc__ or "").strip().splitlines()[0]


_MODELS: dict[str, ModelInfo] = {}


class UnknownModelError(KeyError):
    """A model name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_model(*, paper: str, input_size: tuple[int, int], coco_ap: float | None = None, recipe: dict | None = None):
    """Decorator: add a builder ``fn(*, num_classes, **overrides) -> nn.Module`` under its function name.

    ``recipe``: the paper's training schedule as :class:`~detrkit.config.TrainConfig` fields, e.g.
    ``{"epochs": 12, "lr": 1e-4, "lr_backbone": 1e-5, "lr_drop": 11}``.
    """

    def wrap(fn):
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _MODELS[fn.__name__] = ModelInfo(fn.__name__, fn, paper, input_size, coco_ap, recipe)
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


def create_model(name: str, *, num_classes: int = 91, weights: str | None = None, **overrides) -> nn.Module:
    """Build a registered detector, optionally loading weights from a detrkit checkpoint.

    Args:
        name: a preset from :func:`list_models`, e.g. ``"detr_r50"``.
        num_classes: number of object classes (91 = COCO's id space).
        weights: path to a detrkit checkpoint folder or ``.safetensors`` file.
        **overrides: builder settings, e.g. ``num_queries=50`` or ``pretrained_backbone=True``.
    """
    model = model_info(name).builder(num_classes=num_classes, **overrides)
    if weights is not None:
        from detrkit.engine.checkpoint import load_weights

        load_weights(model, weights)
    return model


def _import_models() -> None:
    import detrkit.models  # noqa: F401  (registers the presets)
