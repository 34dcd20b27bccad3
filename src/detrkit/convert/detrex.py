"""detrex (IDEA-Research/detrex) state dicts -> detrkit.

detrex builds its detectors from detectron2 parts and generic layers, so every name differs from the
official code: a detectron2 ResNet (``stem``, ``res2``-``res5``, ``conv{k}.norm``, ``shortcut``), a
``ChannelMapper`` neck (``convs`` + ``extra_convs``, each ``conv`` + ``norm``), and transformer layers
whose parts are numbered in their operation order (``attentions.{i}``, ``norms.{i}``, ``ffns.0``).
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


# detrex's layer parts in operation order -> detrkit (= official Deformable DETR) names
_ENCODER_PARTS = {"attentions.0.": "self_attn.", "norms.0.": "norm1.", "norms.1.": "norm2."}
_DECODER_PARTS = {"attentions.0.attn.": "self_attn.", "attentions.1.": "cross_attn.",
                  "norms.0.": "norm2.", "norms.1.": "norm1.", "norms.2.": "norm3."}
_FFN_PARTS = {"ffns.0.layers.0.0.": "linear1.", "ffns.0.layers.1.": "linear2."}


def convert_detrex_dino(state_dict: dict[str, Tensor], *, num_decoder_layers: int = 6) -> dict[str, Tensor]:
    """A detrex DINO state dict -> detrkit :class:`~detrkit.models.DINO` built with ``share_heads=False``,
    ``pe_temperature=10000, pe_offset=-0.5`` and detrex's ``num_classes`` (80 for its COCO models).

    detrex keeps one class / box head per decoder layer plus one more for the encoder proposals (index
    ``num_decoder_layers``), which become ``enc_out_class_embed`` / ``enc_out_bbox_embed``. Its label embedding
    has ``num_classes`` rows; detrkit's has one more (the official layout's unused "unknown" row), appended as zeros.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("transformer.decoder.class_embed.") or key.startswith("transformer.decoder.bbox_embed."):
            continue  # references to the top-level heads
        if key.startswith("backbone."):
            key = "backbone.body." + convert_detectron2_resnet_key(key.removeprefix("backbone."))
        elif m := re.match(r"neck\.(convs|extra_convs)\.(\d+)\.(conv|norm)\.(.*)$", key):
            kind, idx, part, rest = m.groups()
            level = int(idx) if kind == "convs" else sum(k.startswith("neck.convs.") and k.endswith(".conv.weight")
                                                         for k in state_dict) + int(idx)
            key = f"neck.input_proj.{level}.{0 if part == 'conv' else 1}.{rest}"
        elif m := re.match(r"(class_embed|bbox_embed)\.(\d+)\.(.*)$", key):
            head, idx, rest = m.groups()
            if int(idx) == num_decoder_layers:
                key = f"enc_out_{head}.{rest}"
        elif key.startswith("transformer."):
            key = key.removeprefix("transformer.").replace("level_embeds", "level_embed")
            if m := re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)$", key):
                part, idx, rest = m.groups()
                for old, new in {**(_ENCODER_PARTS if part == "encoder" else _DECODER_PARTS), **_FFN_PARTS}.items():
                    if rest.startswith(old):
                        rest = new + rest[len(old):]
                        break
                key = f"{part}.layers.{idx}.{rest}"
        if key == "label_enc.weight":
            value = torch.cat([value, value.new_zeros(1, value.shape[1])])
        out[key] = value
    for key in [k for k in out if k.startswith("bbox_embed.")]:
        out["decoder." + key] = out[key]  # the decoder refines with the same heads
    return out
