"""facebookresearch/detr state dicts -> detrkit DETR.

detrkit keeps the official module names inside each part, so the mapping is a handful of prefix
renames: the official ``Joiner`` nests the backbone as ``backbone.0`` and the position encoding as
``backbone.1``, and the encoder / decoder live under ``transformer``.
"""

from __future__ import annotations

from torch import Tensor

_DETR_PREFIXES = (
    ("backbone.0.body.", "backbone.body."),
    ("backbone.1.", "position_encoding."),
    ("transformer.encoder.", "encoder."),
    ("transformer.decoder.", "decoder."),
)


def convert_official_detr(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official DETR state dict (``checkpoint["model"]``) to detrkit's DETR names.

    Segmentation-head keys (``bbox_attention``, ``mask_head``) are not part of the detector and are
    dropped; any other key passes through unchanged, so a strict load reports what does not fit.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("detr.bbox_attention", "detr.mask_head", "bbox_attention", "mask_head")):
            continue
        key = key.removeprefix("detr.")  # checkpoints of the panoptic wrapper
        for old, new in _DETR_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


_DEFORMABLE_PREFIXES = (
    ("backbone.0.body.", "backbone.body."),
    ("input_proj.", "neck.input_proj."),
    ("transformer.decoder.class_embed.", None),  # the same modules as the top-level class heads
    ("transformer.", ""),  # encoder, decoder, level_embed, reference_points, enc_output(_norm), pos_trans(_norm)
)


def convert_official_deformable_detr(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a fundamentalvision/Deformable-DETR state dict to detrkit's DeformableDETR names.

    Inside the encoder and decoder layers the official names are kept as they are (self_attn,
    cross_attn, norm1-3, linear1/2), so only the containers move.
    """
    out = {}
    for key, value in state_dict.items():
        for old, new in _DEFORMABLE_PREFIXES:
            if key.startswith(old):
                key = None if new is None else new + key[len(old):]
                break
        if key is not None:
            out[key] = value
    return out
