"""The weights layer: checkpoint files, layout detection, converters, strict loading, downloads and the cache.

- :mod:`~detrkit.weights.files`: detrkit's safetensors files (weights + model description) and where runs keep them;
- :mod:`~detrkit.weights.official`, :mod:`~detrkit.weights.detrex`, :mod:`~detrkit.weights.hf`: key renaming from
  the reference implementations;
- :mod:`~detrkit.weights.formats`: read any supported file safely, tell its layout, load it strictly;
- :mod:`~detrkit.weights.hub`: released weights (``weights="coco"``) and URLs, downloaded, verified and cached;
- :mod:`~detrkit.weights.convert`: ``detrkit convert`` as a call, with a report of what was mapped and ignored.

It sits above the models and below the engine, inference and the API; it imports none of them.
"""

from detrkit.weights.convert import ConversionReport, convert_checkpoint
from detrkit.weights.detrex import convert_detectron2_resnet_key, convert_detrex, convert_detrex_dino
from detrkit.weights.files import CheckpointError, read_meta, resolve_weights_file, save_weights
from detrkit.weights.formats import load_checkpoint, load_pretrained, load_weights, read_checkpoint
from detrkit.weights.hf import convert_hf_dab_detr, convert_hf_deformable_detr, convert_hf_detr, convert_hf_resnet_key
from detrkit.weights.hub import resolve_weights
from detrkit.weights.official import (
    convert_official_dab_detr,
    convert_official_deformable_detr,
    convert_official_detr,
    convert_official_dino,
)

__all__ = [
    "CheckpointError",
    "ConversionReport",
    "convert_checkpoint",
    "convert_detectron2_resnet_key",
    "convert_detrex",
    "convert_detrex_dino",
    "convert_hf_dab_detr",
    "convert_hf_deformable_detr",
    "convert_hf_detr",
    "convert_hf_resnet_key",
    "convert_official_dab_detr",
    "convert_official_deformable_detr",
    "convert_official_detr",
    "convert_official_dino",
    "load_checkpoint",
    "load_pretrained",
    "load_weights",
    "read_checkpoint",
    "read_meta",
    "resolve_weights",
    "resolve_weights_file",
    "save_weights",
]
