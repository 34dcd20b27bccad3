"""detrex (IDEA-Research/detrex) state dicts -> detrkit.

detrex builds its detectors from detectron2 parts and generic layers, so every name differs from the
official code: a detectron2 ResNet (``stem``, ``res2``-``res5``, ``conv{k}.norm``, ``shortcut``), a
``ChannelMapper`` neck (``convs`` + ``extra_convs``, each ``conv`` + ``norm``), and transformer layers
whose parts are numbered in their operation order (``attentions.{i}``, ``norms.{i}``, ``ffns.0``).
The layouts follow detrex's own converters from the official checkpoints (docs/tutorials/Converters.md).
detrex trains on COCO's 80 categories compacted to 0..79 (DETR: + no-object), not the 91-id space.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor


def convert_detectron2_resnet_key(key: str) -> str:
    """detectron2 ResNet names (after ``backbone.``) -> torchvision ResNet names."""
    key = re.sub(r"^stem\.conv1\.norm\.", "bn1.", key)
    key = re.sub(r"^stem\.conv1\.", "conv1.", key)
    m = re.match(r"res(\d)\.(\d+)\.(.*)$", key)
    if m is None:
        return key
    stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
    rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
    return f"layer{stage - 1}.{block}.{rest}"


_FFN = {"ffns.0.layers.0.0.": "linear1.", "ffns.0.layers.0.1.": "activation.", "ffns.0.layers.1.": "linear2."}
# detrex's layer parts in operation order -> detrkit (= official) names, per family and part
_LAYER_PARTS = {
    ("detr", "encoder"): {"attentions.0.attn.": "self_attn.", "norms.0.": "norm1.", "norms.1.": "norm2."},
    ("detr", "decoder"): {"attentions.0.attn.": "self_attn.", "attentions.1.attn.": "multihead_attn.",
                          "norms.0.": "norm1.", "norms.1.": "norm2.", "norms.2.": "norm3."},
    ("deformable", "encoder"): {"attentions.0.": "self_attn.", "norms.0.": "norm1.", "norms.1.": "norm2."},
    ("deformable", "decoder"): {"attentions.0.attn.": "self_attn.", "attentions.1.": "cross_attn.",
                                "norms.0.": "norm2.", "norms.1.": "norm1.", "norms.2.": "norm3."},
    ("dab", "decoder"): {"norms.0.": "norm1.", "norms.1.": "norm2.", "norms.2.": "norm3.",
                         "attentions.0.out_proj.": "self_attn.out_proj.",
                         "attentions.1.out_proj.": "cross_attn.out_proj."},
}
_LAYER_PARTS[("dab", "encoder")] = _LAYER_PARTS[("detr", "encoder")]
# DAB-DETR's conditional attention projections: detrex spells out what the official code abbreviates
_DAB_PROJ = {"query_content": "qcontent", "query_pos": "qpos", "key_content": "kcontent", "key_pos": "kpos",
             "value": "v", "query_pos_sine": "qpos_sine"}


def detrex_family(state_dict: dict[str, Tensor]) -> str:
    """Which detrex model a state dict holds: ``detr``, ``deformable``, ``dab`` (DAB / DN-DETR) or ``dino``."""
    if "transformer.tgt_embed.weight" in state_dict:
        return "dino"
    if "refpoint_embed.weight" in state_dict:
        return "dab"
    if any(k.startswith("neck.") for k in state_dict):
        return "deformable"
    return "detr"


def _layer_key(family: str, part: str, rest: str) -> str:
    if family == "dab" and part == "decoder":
        m = re.match(r"attentions\.([01])\.(\w+?)_proj\.(.*)$", rest)
        if m and m.group(2) in _DAB_PROJ:
            return f"{'sa' if m.group(1) == '0' else 'ca'}_{_DAB_PROJ[m.group(2)]}_proj.{m.group(3)}"
    table = {**_LAYER_PARTS[("deformable" if family == "dino" else family, part)], **_FFN}
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _neck_level(kind: str, idx: str, state_dict: dict[str, Tensor]) -> int:
    """ChannelMapper ``convs.{i}`` are the backbone levels, ``extra_convs.{i}`` the levels added after them."""
    if kind == "convs":
        return int(idx)
    return sum(k.startswith("neck.convs.") and k.endswith(".conv.weight") for k in state_dict) + int(idx)


def convert_detrex(state_dict: dict[str, Tensor], *, num_decoder_layers: int | None = None) -> dict[str, Tensor]:
    """A detrex DETR, Deformable-DETR, DAB-DETR, DN-DETR or DINO state dict -> detrkit names.

    Build the detrkit model with detrex's ``num_classes`` (80 for its COCO models). DINO additionally needs
    ``share_heads=False, pe_temperature=10000, pe_offset=-0.5``: detrex keeps one class / box head per decoder
    layer plus the encoder proposals' head at index ``num_decoder_layers`` (-> ``enc_out_class_embed`` /
    ``enc_out_bbox_embed``), and its label embedding lacks the official layout's unused last row (appended as
    zeros). DN-DETR's ``label_encoder`` becomes ``label_enc``. ``num_decoder_layers``: None = counted from the keys.
    """
    family = detrex_family(state_dict)
    if num_decoder_layers is None:
        layers = [int(m.group(1)) for k in state_dict if (m := re.match(r"transformer\.decoder\.layers\.(\d+)\.", k))]
        num_decoder_layers = max(layers, default=5) + 1
    out = {}
    for key, value in state_dict.items():
        if key.startswith("transformer.decoder.class_embed.") or (
                family == "dino" and key.startswith("transformer.decoder.bbox_embed.")):
            continue  # references to the top-level heads (DINO's box heads are restored below)
        if key.startswith("backbone."):
            key = "backbone.body." + convert_detectron2_resnet_key(key.removeprefix("backbone."))
        elif m := re.match(r"neck\.(convs|extra_convs)\.(\d+)\.(conv|norm)\.(.*)$", key):
            kind, idx, part, rest = m.groups()
            key = f"neck.input_proj.{_neck_level(kind, idx, state_dict)}.{0 if part == 'conv' else 1}.{rest}"
        elif family == "dino" and (m := re.match(r"(class_embed|bbox_embed)\.(\d+)\.(.*)$", key)):
            head, idx, rest = m.groups()
            if int(idx) == num_decoder_layers:
                key = f"enc_out_{head}.{rest}"
        elif key.startswith("transformer."):
            key = key.removeprefix("transformer.").replace("level_embeds", "level_embed")
            key = key.replace("decoder.post_norm_layer.", "decoder.norm.")
            if m := re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)$", key):
                part, idx, rest = m.groups()
                key = f"{part}.layers.{idx}.{_layer_key(family, part, rest)}"
        elif key.startswith("query_embedding."):
            key = key.replace("query_embedding.", "query_embed.")
        elif key.startswith("label_encoder."):
            key = key.replace("label_encoder.", "label_enc.")
        if family == "dino" and key == "label_enc.weight":
            value = torch.cat([value, value.new_zeros(1, value.shape[1])])
        out[key] = value
    if family == "dino":
        for key in [k for k in out if k.startswith("bbox_embed.")]:
            out["decoder." + key] = out[key]  # the decoder refines with the same heads
    return out


def convert_detrex_dino(state_dict: dict[str, Tensor], *, num_decoder_layers: int | None = None) -> dict[str, Tensor]:
    """A detrex DINO state dict -> detrkit :class:`~detrkit.models.DINO` (see :func:`convert_detrex`)."""
    if detrex_family(state_dict) != "dino":
        raise ValueError("not a detrex DINO state dict (no transformer.tgt_embed.weight)")
    return convert_detrex(state_dict, num_decoder_layers=num_decoder_layers)
