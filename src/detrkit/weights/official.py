"""Official repositories' state dicts -> detrkit: facebookresearch/detr, fundamentalvision/Deformable-DETR,
IDEA-Research DAB-DETR / DN-DETR and DINO.

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


def convert_official_dab_detr(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """IDEA-Research DAB-DETR / DN-DETR (DN-DAB-DETR) state dict -> detrkit :class:`~detrkit.models.DABDETR`.

    Same containers as DETR (``backbone.0.body``, ``transformer.encoder`` / ``decoder``); the decoder keeps its
    reference to the shared box head (``transformer.decoder.bbox_embed``), as detrkit's does. ``label_enc``
    (DN-DETR) passes through.
    """
    return convert_official_detr(state_dict)


def convert_official_dino(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """IDEA-Research DINO state dict -> detrkit :class:`~detrkit.models.DINO` (or DN-Deformable-DETR).

    The deformable transformer keeps Deformable DETR's names, so the Deformable-DETR mapping applies:
    ``transformer.{level_embed, tgt_embed, enc_output(_norm), enc_out_class_embed, enc_out_bbox_embed,
    refpoint_embed}`` and the encoder / decoder move to the top level; the decoder's copies of the class
    heads are dropped (detrkit's decoder only refines boxes).
    """
    return convert_official_deformable_detr(state_dict)
