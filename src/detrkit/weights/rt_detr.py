"""RT-DETR / RT-DETRv2 state dicts -> detrkit :class:`~detrkit.models.RTDETR`.

Two layouts: HF transformers' ``RTDetrForObjectDetection`` / ``RTDetrV2ForObjectDetection`` (its own ResNet-vd
naming, separate q/k/v projections) and the official lyuwenyu/RT-DETR training checkpoints (``rtdetr_pytorch``
and ``rtdetrv2_pytorch``: PResNet, ``encoder.*``, ``decoder.*``), whose module names detrkit's backbone and
hybrid encoder keep. In both, the decoder's norm after self-attention is renamed to ``norm2`` and the one after
cross-attention to ``norm1`` (Deformable DETR's order, which detrkit's decoder layer uses).
"""

from __future__ import annotations

import re

from torch import Tensor

from detrkit.weights.hf import _merge_qkv

# Buffers the official and HF models keep that detrkit computes: anchors for a fixed eval size, the v2 attention's
# 1 / n_points scale.
RT_DETR_DERIVED = re.compile(r"(^decoder\.(anchors|valid_mask)$|\.(n_points_scale|num_points_scale)$)")

# HF's names around RT-DETR's engine (input projections, AIFI, query selection, denoising), D-FINE's too.
HF_ENGINE_RULES = [
    (r"^encoder_input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv."),
    (r"^encoder_input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.norm."),
    (r"^decoder_input_proj\.(\d+)\.0\.", r"input_proj.\1.conv."),
    (r"^decoder_input_proj\.(\d+)\.1\.", r"input_proj.\1.norm."),
    (r"^encoder\.aifi\.", "encoder.encoder."),
    (r"^denoising_class_embed\.", "label_enc."),
    (r"^enc_output\.0\.", "enc_output."),
    (r"^enc_output\.1\.", "enc_output_norm."),
    (r"^enc_score_head\.", "enc_out_class_embed."),
    (r"^enc_bbox_head\.", "enc_out_bbox_embed."),
    (r"^weight_embedding\.", "tgt_embed."),
]
_HF_RULES = [
    (r"^backbone\.model\.embedder\.embedder\.(\d)\.convolution\.",
     lambda m: f"backbone.conv1.conv1_{int(m[1]) + 1}.conv."),
    (r"^backbone\.model\.embedder\.embedder\.(\d)\.normalization\.",
     lambda m: f"backbone.conv1.conv1_{int(m[1]) + 1}.norm."),
    (r"^backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"backbone.res_layers.\1.blocks.\2."),
    (r"\.shortcut\.1\.convolution\.", ".short.conv.conv."),  # average pool (index 0) then conv
    (r"\.shortcut\.1\.normalization\.", ".short.conv.norm."),
    (r"\.shortcut\.convolution\.", ".short.conv."),
    (r"\.shortcut\.normalization\.", ".short.norm."),
    (r"\.layer\.(\d)\.convolution\.", lambda m: f".branch2{'abc'[int(m[1])]}.conv."),
    (r"\.layer\.(\d)\.normalization\.", lambda m: f".branch2{'abc'[int(m[1])]}.norm."),
    *HF_ENGINE_RULES,
    (r"^decoder\.(class_embed|bbox_embed)\.", r"\1."),  # the decoder's heads are the ones its forward uses
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),  # transformers 5 nests them under ``mlp`` in memory, not in the file
    (r"\.(mlp\.)?fc2\.", ".linear2."),
]


def convert_hf_rt_detr(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF ``RTDetrForObjectDetection`` / ``RTDetrV2ForObjectDetection`` (``save_pretrained`` folders, Hub files)."""
    out, top_heads = {}, {}
    for key, value in state_dict.items():
        if key.startswith(("class_embed.", "bbox_embed.")):  # v2's top-level copies of the decoder's heads
            top_heads[key] = value
            continue
        key = key.removeprefix("model.")
        if RT_DETR_DERIVED.search(key):
            continue
        for pattern, repl in _HF_RULES:
            key = re.sub(pattern, repl, key)
        if key.startswith("decoder.layers."):
            key = key.replace(".self_attn_layer_norm.", ".norm2.").replace(".encoder_attn_layer_norm.", ".norm1.")
            key = key.replace(".final_layer_norm.", ".norm3.")
        else:
            key = key.replace(".self_attn_layer_norm.", ".norm1.").replace(".final_layer_norm.", ".norm2.")
        out[key] = value
    for key, value in top_heads.items():  # files that stored the tied heads only at the top level
        out.setdefault(key, value)
    return _merge_qkv(out)


_OFFICIAL_RULES = [
    (r"^encoder\.input_proj\.(\d+)\.(0|conv)\.", r"encoder.input_proj.\1.conv."),  # v1: Sequential; v2: named
    (r"^encoder\.input_proj\.(\d+)\.(1|norm)\.", r"encoder.input_proj.\1.norm."),
    (r"^decoder\.input_proj\.(\d+)\.", r"input_proj.\1."),
    (r"^decoder\.decoder\.layers\.", "decoder.layers."),
    (r"^decoder\.denoising_class_embed\.", "label_enc."),
    (r"^decoder\.enc_output\.(0|proj)\.", "enc_output."),
    (r"^decoder\.enc_output\.(1|norm)\.", "enc_output_norm."),
    (r"^decoder\.enc_score_head\.", "enc_out_class_embed."),
    (r"^decoder\.enc_bbox_head\.", "enc_out_bbox_embed."),
    (r"^decoder\.dec_score_head\.", "class_embed."),
    (r"^decoder\.dec_bbox_head\.", "bbox_embed."),
    (r"^decoder\.tgt_embed\.", "tgt_embed."),
]


def convert_official_rt_detr(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """lyuwenyu/RT-DETR ``rtdetr_pytorch`` / ``rtdetrv2_pytorch`` checkpoints (the ``ema`` module or ``model``)."""
    out = {}
    for key, value in state_dict.items():
        if RT_DETR_DERIVED.search(key):
            continue
        for pattern, repl in _OFFICIAL_RULES:
            key = re.sub(pattern, repl, key)
        if key.startswith("decoder.layers."):  # official: norm1 after self-attention, norm2 after cross-attention
            key = re.sub(r"\.norm([12])\.", lambda m: f".norm{3 - int(m[1])}.", key)
        out[key] = value
    return out
