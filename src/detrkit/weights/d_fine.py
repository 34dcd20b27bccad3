"""D-FINE / DEIM state dicts -> detrkit :class:`~detrkit.models.DFINE`.

HF transformers' ``DFineForObjectDetection`` (``save_pretrained`` folders, Hub files): its HGNetV2 backbone names
(``embedder`` / ``encoder.stages``, ``convolution`` / ``normalization``), separate q/k/v projections, the AIFI layer
under ``aifi``, the MLPs of the transformer layers as ``mlp.layers.0/1``. detrkit's decoder owns its heads, as HF's
decoder does (the top-level ``class_embed`` / ``bbox_embed`` are the same tensors, tied). W(n)'s ``up`` and
``reg_scale`` and the points' 1 / n scale are settings detrkit computes from the preset, not weights.
"""

from __future__ import annotations

import re

from torch import Tensor

from detrkit.weights.hf import _merge_qkv

# Tensors the HF model keeps that detrkit derives from its settings.
D_FINE_DERIVED = re.compile(r"(^decoder\.(anchors|valid_mask|up|reg_scale)$|\.num_points_scale$)")

_HF_RULES = [
    (r"^backbone\.model\.embedder\.", "backbone.stem."),
    (r"^backbone\.model\.encoder\.stages\.", "backbone.stages."),
    (r"^backbone\.(.*)\.convolution\.", r"backbone.\1.conv."),
    (r"^backbone\.(.*)\.normalization\.", r"backbone.\1.bn."),
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
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.mlp\.layers\.0\.", ".linear1."),  # the decoder layers' FFN in memory (transformers 5)
    (r"\.mlp\.layers\.1\.", ".linear2."),
    (r"\.fc1\.", ".linear1."),  # ... and in the file
    (r"\.fc2\.", ".linear2."),
]


def convert_hf_d_fine(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF ``DFineForObjectDetection`` state dict -> detrkit names."""
    out, top_heads = {}, {}
    for key, value in state_dict.items():
        if key.startswith(("class_embed.", "bbox_embed.")):  # tied to the decoder's heads, which the forward uses
            top_heads[f"decoder.{key}"] = value
            continue
        key = key.removeprefix("model.")
        if D_FINE_DERIVED.search(key):
            continue
        for pattern, repl in _HF_RULES:
            key = re.sub(pattern, repl, key)
        if key.startswith("decoder.layers."):  # post-norm: after self-attention, after the FFN
            key = key.replace(".self_attn_layer_norm.", ".norm1.").replace(".final_layer_norm.", ".norm3.")
        else:
            key = key.replace(".self_attn_layer_norm.", ".norm1.").replace(".final_layer_norm.", ".norm2.")
        out[key] = value
    for key, value in top_heads.items():  # files that kept the tied heads at the top level only
        out.setdefault(key, value)
    return _merge_qkv(out)
