"""Any supported checkpoint -> a detrkit model: read it safely, tell its layout from its keys, rename, load strictly.

``load_pretrained("dino_r50_4scale", "checkpoint0011_4scale.pth")`` is what ``create_model(name, weights=...)``,
``Detector(..., model=...)`` and ``detrkit convert`` call. Nothing is loaded partially: a key the model does
not have, a parameter the checkpoint does not fill, or a shape that differs is an error that lists them.
The one exception is asked for explicitly: a ``num_classes`` different from the checkpoint's re-initialises
the class heads (fine-tuning on another label space) and says so.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

import detrkit.models  # noqa: F401  (importing the models registers their presets)
from detrkit.data.coco_classes import coco_label_space
from detrkit.registry import DEFAULT_NUM_CLASSES, image_size_of, list_models, model_info
from detrkit.weights.d_fine import (
    convert_hf_d_fine,
    convert_official_d_fine,
    hf_d_fine_settings,
    official_d_fine_settings,
)
from detrkit.weights.detrex import convert_detrex, detrex_family
from detrkit.weights.files import WEIGHTS_NAME, CheckpointError, read_meta, resolve_weights_file
from detrkit.weights.hf import convert_hf_dab_detr, convert_hf_deformable_detr, convert_hf_detr
from detrkit.weights.official import (
    convert_official_dab_detr,
    convert_official_deformable_detr,
    convert_official_detr,
    convert_official_dino,
)
from detrkit.weights.rt_detr import RT_DETR_DERIVED, convert_hf_rt_detr, convert_official_rt_detr

# Builder settings renamed since checkpoints were first saved with them: old name -> new name.
RENAMED_MODEL_ARGS = {"activation": "ffn_activation"}  # DAB-DETR's FFN non-linearity, not the score activation


def stored_model_args(meta: dict | None) -> dict:
    """The builder settings a detrkit checkpoint's metadata holds, under today's names."""
    args = dict((meta or {}).get("model_args", {}))
    return {RENAMED_MODEL_ARGS.get(k, k): v for k, v in args.items()}


# Parameters whose shape follows num_classes: re-initialised when fine-tuning on another label space.
CLASS_DEPENDENT = re.compile(r"(^|\.)(class_embed|enc_out_class_embed|label_enc)\.")


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint layout detrkit reads.

    Attributes:
        name: e.g. ``official_dino``.
        source: who writes it (repository or library).
        model_class: the detrkit class it maps onto (None: a detrkit checkpoint, any class).
        convert: state dict in this layout -> detrkit names.
        ignore: source keys that are deliberately not loaded, and why.
        model_args: builder settings the layout implies (detrex DINO's per-layer heads, its sine encoding).
        settings: source state dict -> builder settings the file itself fixes (D-FINE's layers, bins, W(n)).
    """

    name: str
    source: str
    model_class: str | None
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    ignore: tuple[tuple[str, str], ...] = ()
    model_args: dict = field(default_factory=dict)
    settings: Callable[[dict[str, Tensor]], dict] | None = None


_DEC_CLASS_COPY = (r"^(transformer|model)\.decoder\.class_embed\.", "the decoder's reference to class_embed")
FORMATS = {
    f.name: f
    for f in [
        CheckpointFormat("detrkit", "detrkit", None, dict),
        CheckpointFormat(
            "official_detr",
            "facebookresearch/detr",
            "DETR",
            convert_official_detr,
            ((r"^(detr\.)?(bbox_attention|mask_head)\.", "panoptic segmentation head"),),
        ),
        CheckpointFormat(
            "official_deformable_detr",
            "fundamentalvision/Deformable-DETR",
            "DeformableDETR",
            convert_official_deformable_detr,
            (_DEC_CLASS_COPY,),
        ),
        CheckpointFormat(
            "official_dab_detr", "IDEA-Research/DAB-DETR or DN-DETR", "DABDETR", convert_official_dab_detr
        ),
        CheckpointFormat("official_dino", "IDEA-Research/DINO", "DINO", convert_official_dino, (_DEC_CLASS_COPY,)),
        CheckpointFormat("detrex_detr", "IDEA-Research/detrex", "DETR", convert_detrex),
        CheckpointFormat(
            "detrex_deformable_detr",
            "IDEA-Research/detrex",
            "DeformableDETR",
            convert_detrex,
            (_DEC_CLASS_COPY,),
            {"inverse_sigmoid_eps": 1e-3},
        ),  # detrex's clamp, not Deformable-DETR's
        CheckpointFormat("detrex_dab_detr", "IDEA-Research/detrex", "DABDETR", convert_detrex),
        CheckpointFormat(
            "detrex_dino",
            "IDEA-Research/detrex",
            "DINO",
            convert_detrex,
            (_DEC_CLASS_COPY, (r"^transformer\.decoder\.bbox_embed\.", "the decoder's reference to bbox_embed")),
            {"share_heads": False, "pe_temperature": 10000.0, "pe_offset": -0.5},
        ),
        CheckpointFormat("hf_detr", "HF transformers DetrForObjectDetection", "DETR", convert_hf_detr),
        CheckpointFormat(
            "hf_deformable_detr",
            "HF transformers DeformableDetrForObjectDetection",
            "DeformableDETR",
            convert_hf_deformable_detr,
            (_DEC_CLASS_COPY,),
        ),
        CheckpointFormat(
            "hf_dab_detr",
            "HF transformers DabDetrForObjectDetection",
            "DABDETR",
            convert_hf_dab_detr,
            model_args={"inverse_sigmoid_eps": 1e-5},
        ),  # HF's port clamps at 1e-5, the official code at 1e-3
        CheckpointFormat(
            "hf_rt_detr",
            "HF transformers RTDetrForObjectDetection / RTDetrV2ForObjectDetection",
            "RTDETR",
            convert_hf_rt_detr,
            ((RT_DETR_DERIVED.pattern, "computed by detrkit (anchors, the points' scale)"),),
        ),
        CheckpointFormat(
            "hf_d_fine",
            "HF transformers DFineForObjectDetection",
            "DFINE",
            convert_hf_d_fine,
            ((r"^model\.decoder\.(anchors|valid_mask|up|reg_scale)$|.*\.num_points_scale$",
              "computed by detrkit (W(n)'s up / reg_scale, anchors, the points' scale)"),),
            settings=hf_d_fine_settings,
        ),
        CheckpointFormat(
            "official_d_fine",
            "Peterande/D-FINE (and DEIM's D-FINE)",
            "DFINE",
            convert_official_d_fine,
            ((r"^decoder\.(anchors|valid_mask|decoder\.up|decoder\.reg_scale)$|.*\.num_points_scale$",
              "computed by detrkit (W(n)'s up / reg_scale, anchors, the points' scale)"),),
            settings=official_d_fine_settings,
        ),
        CheckpointFormat(
            "official_rt_detr",
            "lyuwenyu/RT-DETR (rtdetr_pytorch, rtdetrv2_pytorch)",
            "RTDETR",
            convert_official_rt_detr,
            ((RT_DETR_DERIVED.pattern, "computed by detrkit (anchors, the points' scale)"),),
        ),
    ]
}


_DETREX_FORMATS = {"dino": "detrex_dino", "dab": "detrex_dab_detr", "deformable": "detrex_deformable_detr",
                   "detr": "detrex_detr"}


def detect_format(state_dict: dict[str, Tensor]) -> CheckpointFormat:
    """Tell a checkpoint's layout from its keys (see :data:`FORMATS`)."""
    keys = set(state_dict)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("model.backbone."):  # HF transformers
        if has("model.decoder.lqe_layers."):
            return FORMATS["hf_d_fine"]
        if has("model.encoder_input_proj."):
            return FORMATS["hf_rt_detr"]
        if "class_labels_classifier.weight" in keys:
            return FORMATS["hf_detr"]
        if "model.query_refpoint_embeddings.weight" in keys:
            return FORMATS["hf_dab_detr"]
        if "model.level_embed" in keys:
            return FORMATS["hf_deformable_detr"]
    elif has("decoder.decoder.lqe_layers."):  # Peterande/D-FINE: the FDR decoder's quality estimators
        return FORMATS["official_d_fine"]
    elif has("backbone.stages.") and has("decoder.lqe_layers."):  # HGNetv2 + FDR decoder: detrkit's D-FINE
        return FORMATS["detrkit"]
    elif has("backbone.stem.") or has("backbone.res2."):  # detectron2 ResNet: detrex
        return FORMATS[_DETREX_FORMATS[detrex_family(state_dict)]]
    elif has("backbone.0.body.") or has("detr.backbone.0.body."):  # the official repositories' Joiner
        if "transformer.tgt_embed.weight" in keys or has("transformer.enc_out_class_embed."):
            return FORMATS["official_dino"]
        if "transformer.level_embed" in keys:
            return FORMATS["official_deformable_detr"]
        if "refpoint_embed.weight" in keys:
            return FORMATS["official_dab_detr"]
        return FORMATS["official_detr"]
    elif has("decoder.dec_score_head.") and has("backbone.res_layers."):  # lyuwenyu/RT-DETR: PResNet + decoder heads
        return FORMATS["official_rt_detr"]
    elif has("backbone.body.") or has("backbone.res_layers."):  # torchvision ResNet / ResNet-vd
        return FORMATS["detrkit"]
    sample = ", ".join(sorted(keys)[:6])
    raise CheckpointError(f"unrecognised checkpoint layout (keys: {sample}, ...). detrkit reads detrkit, official "
                          f"DETR / Deformable-DETR / DAB-DETR / DN-DETR / DINO / RT-DETR(v2) / D-FINE, detrex and HF "
                          f"transformers (Detr, DeformableDetr, DabDetr, RTDetr, RTDetrV2, DFine) "
                          f"checkpoints.")


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict | None]:
    """The tensors of a checkpoint file (or folder) and its detrkit metadata, if any. Never runs pickled code.

    Reads ``.safetensors`` directly and anything else with ``torch.load(weights_only=True)`` (argparse
    namespaces, which the official repositories store their settings in, are allowed as plain data).
    Unwraps ``{"model": state_dict, ...}`` and DDP's ``module.`` prefix.
    """
    file = _resolve_file(Path(path))
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = (f.metadata() or {}).get("detrkit")
            return load_file(str(file)), json.loads(meta) if meta else None
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read {file}: {e}") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file} holds Python objects besides tensors, and detrkit never unpickles code from a checkpoint "
            f"(torch.load weights_only=True said: {str(e).splitlines()[0]}). If you trust the file, save its weights "
            f"alone once: python -c \"import torch; c = torch.load('{file}', weights_only=False); "
            f"torch.save(c.get('model', c), 'weights.pth')\" and load weights.pth.") from None
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    return _unwrap(obj, file), None


def _resolve_file(path: Path) -> Path:
    """A detrkit checkpoint / run folder's weights (``resolve_weights_file``), else an HF folder's pytorch_model.bin."""
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file() and (path / "pytorch_model.bin").is_file():
        return path / "pytorch_model.bin"
    try:
        return resolve_weights_file(path)
    except CheckpointError:
        if not path.exists():
            raise CheckpointError(f"no such checkpoint: {path}") from None
        raise CheckpointError(f"no weights in {path}: expected a checkpoint file, a folder with {WEIGHTS_NAME} or "
                              f"pytorch_model.bin, or a detrkit training run folder") from None


def _unwrap(obj, file: Path) -> dict[str, Tensor]:
    # lyuwenyu/RT-DETR's training checkpoints: the EMA weights (what its evaluation loads) before the raw ones
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict) and isinstance(obj["ema"].get("module"), dict):
        return _unwrap(obj["ema"]["module"], file)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{file} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{file} holds no tensors under its keys ({', '.join(list(obj)[:6])}, ...)")
    if all(k.startswith("module.") for k in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


@dataclass
class Conversion:
    """A checkpoint renamed to detrkit's names.

    Attributes:
        file: where it was read from.
        format: its detected layout.
        state_dict: the tensors under detrkit names.
        ignored: ``(source key, reason)`` for keys deliberately not loaded.
        meta: detrkit metadata, for detrkit checkpoints.
    """

    file: str
    format: CheckpointFormat
    state_dict: dict[str, Tensor]
    ignored: list[tuple[str, str]]
    meta: dict | None = None
    num_source_keys: int = 0
    model_args: dict = field(default_factory=dict)

    def num_classes(self, softmax: bool) -> int | None:
        """Classes of the checkpoint's head; ``softmax``: the head has one more output, DETR's no-object."""
        if self.meta is not None:
            return self.meta["num_classes"]
        for key in ("class_embed.weight", "class_embed.0.weight", "decoder.class_embed.0.weight"):  # D-FINE: decoder
            if key in self.state_dict:
                return self.state_dict[key].shape[0] - softmax
        return None


def read_checkpoint(path: str | Path) -> Conversion:
    """Read a checkpoint of any supported layout and rename it to detrkit's names."""
    file = _resolve_file(Path(path))
    state, meta = read_state_dict(file)
    fmt = detect_format(state)
    ignored = [(k, reason) for k in state for pattern, reason in fmt.ignore if re.match(pattern, k)]
    settings = fmt.settings(state) if fmt.settings is not None else {}
    return Conversion(str(file), fmt, fmt.convert(state), ignored, meta, len(state), settings)


def load_converted(model: nn.Module, conv: Conversion, *, reinit_classes: bool = False) -> list[str]:
    """Load ``conv`` into ``model`` strictly; returns the class-head keys left re-initialised (``reinit_classes``)."""
    state, own = dict(conv.state_dict), model.state_dict()
    # Parameters the model holds under several names (heads shared with the decoder): files that store a
    # tied tensor once (HF save_pretrained, safetensors) fill the other names from the one they keep.
    tied: dict[tuple, list[str]] = {}
    for k, v in own.items():
        tied.setdefault((v.data_ptr(), tuple(v.shape), v.stride()), []).append(k)
    shared = [names for names in tied.values() if len(names) > 1]
    for names in shared:
        present = [n for n in names if n in state]
        for n in names if present else ():
            state.setdefault(n, state[present[0]])
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    reinit = [k for k in wrong if CLASS_DEPENDENT.search(k)] if reinit_classes else []
    for k in reinit:
        del state[k]
    # BatchNorm's step counter (used only with momentum=None): absent from files of frozen-BN models (HF's RT-DETR
    # backbone), present in others; it decides nothing, so it is filled from the model or dropped.
    for k in set(own) - set(state):
        if k.endswith(".num_batches_tracked"):
            state[k] = own[k]
    for k in [k for k in set(state) - set(own) if k.endswith(".num_batches_tracked")]:
        del state[k]
    missing = sorted(set(own) - set(state) - set(reinit))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in wrong if k not in reinit]
    if missing or unexpected or wrong:
        lines = [f"{conv.file} ({conv.format.source}, layout {conv.format.name}) does not fit {type(model).__name__}:"]
        for title, keys in (("missing (in the model, not in the checkpoint)", missing),
                            ("unexpected (in the checkpoint, not in the model)", unexpected)):
            if keys:
                lines.append(f"  {title}, {len(keys)}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        for k in wrong[:8]:
            lines.append(f"  shape of {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        lines.append("  Pick the preset the checkpoint was trained as (e.g. with or without refinement / two-stage, "
                     "the same backbone, num_queries and number of levels); `detrkit models` lists them.")
        raise CheckpointError("\n".join(lines))
    for names in shared:  # one parameter under several names: loading differing values would keep the last
        present = [n for n in names if n in state]
        differ = [n for n in present[1:] if not torch.equal(state[n], state[present[0]])]
        if differ:
            raise CheckpointError(
                f"{conv.file} ({conv.format.source}) holds different values for {present[0]} and "
                f"{', '.join(differ[:3])}, "
                f"which {type(model).__name__} shares as one parameter: the checkpoint is of a model with separate "
                "heads per decoder layer. Pick the preset it was trained as (e.g. with refinement); `detrkit models` "
                "lists them."
            )
    model.load_state_dict(state, strict=not reinit)
    return reinit


def label_space(conv: Conversion, num_classes: int, checkpoint_classes: int | None) -> tuple[list[int], list[str]]:
    """(label_to_cat, class_names) for a model with ``num_classes`` loaded from ``conv``."""
    if conv.meta is not None and conv.meta["num_classes"] == num_classes:
        return conv.meta["label_to_cat"], conv.meta["class_names"]
    if conv.format.model_class and checkpoint_classes == num_classes and (coco := coco_label_space(num_classes)):
        return coco  # the reference checkpoints are COCO models: 91 ids (official, HF) or 80 (detrex)
    return list(range(num_classes)), [f"class_{i}" for i in range(num_classes)]


def load_pretrained(name: str, weights: str | Path | Conversion, *, num_classes: int | None = None,
                    **overrides) -> tuple[nn.Module, dict]:
    """Build preset ``name`` and load a checkpoint of any supported layout into it. Returns (model, meta).

    Args:
        name: a registered preset of the checkpoint's architecture.
        weights: a checkpoint file or folder (detrkit, official, detrex or HF transformers), or what
            :func:`read_checkpoint` made of one.
        num_classes: None keeps the checkpoint's classes (and names: COCO's for the reference checkpoints);
            another number re-initialises the class heads for fine-tuning, with a warning.
        **overrides: builder settings, on top of what the layout implies.
    """
    info = model_info(name)
    conv = weights if isinstance(weights, Conversion) else read_checkpoint(weights)
    fmt = conv.format
    if fmt.model_class is not None and info.model_class.__name__ != fmt.model_class:
        fits = [n for n in list_models() if model_info(n).model_class.__name__ == fmt.model_class]
        raise CheckpointError(f"{conv.file} is a {fmt.source} {fmt.model_class} checkpoint (layout {fmt.name}); "
                              f"{name} is not a {fmt.model_class} preset. Presets that fit: {', '.join(fits)}")
    for key, value in conv.model_args.items():  # settings the file fixes (D-FINE's bins, layers, W(n)) cannot change
        if key in overrides and _as_list(overrides[key]) != _as_list(value):
            raise CheckpointError(f"{conv.file} was trained with {key}={value!r}; {key}={overrides[key]!r} does not "
                                  f"fit it. Leave {key} out: detrkit reads it from the file")
    args = {**fmt.model_args, **conv.model_args, **stored_model_args(conv.meta), **overrides}
    ckpt_classes = conv.num_classes(softmax=info.model_class.score_activation == "softmax")  # DETR: + no-object
    n = num_classes or ckpt_classes or DEFAULT_NUM_CLASSES
    model = info.builder(num_classes=n, **args)
    try:
        reinit = load_converted(model, conv, reinit_classes=ckpt_classes is not None and n != ckpt_classes)
    except CheckpointError as e:
        fits = _presets_that_fit(conv, name, n, args) if fmt.model_class is not None else []
        if fits:  # e.g. an RT-DETR-R50 file given to rtdetr_r18vd: say which preset it is
            raise CheckpointError(f"{e}\n  This checkpoint loads into: {', '.join(fits)}") from None
        saved_from = (conv.meta or {}).get("model")
        if saved_from not in (None, name):  # a detrkit file names the preset it was saved from
            raise CheckpointError(f"{e}\n  This checkpoint was saved from {saved_from}: "
                                  f"create_model({saved_from!r}, weights=...) loads it") from None
        raise
    if reinit:
        warnings.warn(f"{conv.file} has {ckpt_classes} classes, the model {n}: the class-dependent parameters "
                      f"({', '.join(sorted({k.rsplit('.', 1)[0] for k in reinit})[:6])}) are re-initialised for "
                      f"fine-tuning; everything else is loaded.", stacklevel=2)
    label_to_cat, class_names = label_space(conv, n, ckpt_classes)
    meta = {"model": name, "num_classes": n, "model_args": args, "class_names": class_names,
            "label_to_cat": label_to_cat, "image_size": image_size_of(conv.meta or name),
            "source": {"file": conv.file, "format": fmt.name, "reinitialised": reinit}}
    return model, meta


def _as_list(value):
    return list(value) if isinstance(value, tuple | list) else value


def _presets_that_fit(conv: Conversion, name: str, num_classes: int, args: dict) -> list[str]:
    """The other presets of the checkpoint's family that load it strictly (built with the same settings)."""
    family = model_info(name).model_class
    fits = []
    for other in list_models():
        if other == name or model_info(other).model_class is not family:
            continue
        try:
            load_converted(model_info(other).builder(num_classes=num_classes, **args), conv)
        except (CheckpointError, TypeError, ValueError, RuntimeError):
            continue
        fits.append(other)
    return fits


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a detrkit checkpoint into ``model`` strictly; mismatches are listed in a :class:`CheckpointError`."""
    load_converted(model, read_checkpoint(resolve_weights_file(path)))
    return model


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model a detrkit checkpoint describes and load its weights. Returns (model, meta)."""
    meta = read_meta(path)
    model = model_info(meta["model"]).builder(num_classes=meta["num_classes"], **stored_model_args(meta))
    load_weights(model, path)
    return model, meta
