"""D-FINE / DEIM state dicts -> detrkit :class:`~detrkit.models.DFINE`.

The official code (Peterande/D-FINE; DEIM trains the same modules): detrkit keeps its backbone, encoder-layer and
decoder-layer names; the GELAN blocks' ``cv1`` / ``cv2`` = (CSP, conv) / ``cv3`` / ``cv4`` become ``conv1``,
``csp_rep1`` + ``conv2``, ``csp_rep2`` + ``conv3``, ``conv4``; the decoder's heads move under ``decoder.``.

HF transformers' ``DFineForObjectDetection`` (``save_pretrained`` folders, Hub files): its HGNetV2 backbone names
(``embedder`` / ``encoder.stages``, ``convolution`` / ``normalization``), separate q/k/v projections, the AIFI layer
under ``aifi``, the MLPs of the transformer layers as ``mlp.layers.0/1``. detrkit's decoder owns its heads, as HF's
decoder does (the top-level ``class_embed`` / ``bbox_embed`` are the same tensors, tied). W(n)'s ``up`` and
``reg_scale`` and the points' 1 / n scale are settings detrkit computes from the preset, not weights.
"""

from __future__ import annotations

import re

from torch import Tensor

from detrkit.backbones.hgnetv2 import ARCHS
from detrkit.models.d_fine import d_fine_settings
from detrkit.weights.hf import _merge_qkv
from detrkit.weights.rt_detr import _OFFICIAL_RULES as _RT_DETR_OFFICIAL_RULES
from detrkit.weights.rt_detr import HF_ENGINE_RULES

# Tensors the HF model keeps that detrkit derives from its settings.
D_FINE_DERIVED = re.compile(r"(^decoder\.(anchors|valid_mask|up|reg_scale)$|\.num_points_scale$)")

_HF_RULES = [
    (r"^backbone\.model\.embedder\.", "backbone.stem."),
    (r"^backbone\.model\.encoder\.stages\.", "backbone.stages."),
    (r"^backbone\.(.*)\.convolution\.", r"backbone.\1.conv."),
    (r"^backbone\.(.*)\.normalization\.", r"backbone.\1.bn."),
    *HF_ENGINE_RULES,
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


# The official layout: RT-DETR's decoder-side names, D-FINE's decoder heads kept by the decoder, the GELAN blocks.
_OFFICIAL_DERIVED = re.compile(r"(^decoder\.(anchors|valid_mask|decoder\.up|decoder\.reg_scale)$|\.num_points_scale$)")
_OFFICIAL_RULES = [
    (r"^decoder\.decoder\.lqe_layers\.", "decoder.lqe_layers."),
    (r"^decoder\.dec_score_head\.", "decoder.class_embed."),
    (r"^decoder\.dec_bbox_head\.", "decoder.bbox_embed."),
    *_RT_DETR_OFFICIAL_RULES,
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv1\.", r"encoder.\1_blocks.\2.conv1."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv2\.0\.", r"encoder.\1_blocks.\2.csp_rep1."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv2\.1\.", r"encoder.\1_blocks.\2.conv2."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv3\.0\.", r"encoder.\1_blocks.\2.csp_rep2."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv3\.1\.", r"encoder.\1_blocks.\2.conv3."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv4\.", r"encoder.\1_blocks.\2.conv4."),
    (r"^encoder\.downsample_convs\.(\d+)\.0\.cv(\d)\.", r"encoder.downsample_convs.\1.conv\2."),
]


def convert_official_d_fine(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Peterande/D-FINE (and DEIM's D-FINE) checkpoints (the ``ema`` module or ``model``) -> detrkit names."""
    out = {}
    for key, value in state_dict.items():
        if _OFFICIAL_DERIVED.search(key):
            continue
        for pattern, repl in _OFFICIAL_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _d_fine_settings(state_dict: dict[str, Tensor], decoder: str, heads: str) -> dict:
    """The builder settings a D-FINE file fixes: its decoder layers (released files keep only the layers inference
    runs: D-FINE-M trains 5 and ships 4), the distributions' bins (the box heads' width), W(n)'s ``up`` and
    ``reg_scale`` (D-FINE-X: 8) and the points per level (from the 1 / n scales)."""
    args = {}
    layers = {int(m[1]) for k in state_dict if (m := re.match(rf"{re.escape(decoder)}layers\.(\d+)\.", k))}
    if layers:
        args["num_decoder_layers"] = max(layers) + 1
    head = sorted(k for k in state_dict if re.match(rf"{re.escape(heads)}0\.layers\.\d+\.weight$", k))
    if head:
        args["reg_max"] = state_dict[head[-1]].shape[0] // 4 - 1
    for name in ("up", "reg_scale"):
        if (t := state_dict.get(f"{decoder}{name}")) is not None:
            args[name] = round(float(t.reshape(-1)[0]), 6)
    scales = next((v for k, v in state_dict.items() if k.startswith(f"{decoder}layers.0.")
                   and k.endswith("num_points_scale")), None)
    if scales is not None:
        points, i = [], 0
        while i < scales.numel():
            points.append(round(1 / float(scales[i])))
            i += points[-1]
        args["n_points"] = points
    return args


def official_d_fine_settings(state_dict: dict[str, Tensor]) -> dict:
    return _d_fine_settings(state_dict, "decoder.decoder.", "decoder.dec_bbox_head.")


def hf_d_fine_settings(state_dict: dict[str, Tensor]) -> dict:
    return _d_fine_settings(state_dict, "model.decoder.", "model.decoder.bbox_embed.")


def hf_d_fine_config(size: str, num_classes: int = 80, **overrides):
    """HF transformers' ``DFineConfig`` of detrkit's ``dfine_<size>`` (n, s, m, l, x): the same backbone, encoder,
    decoder and W(n), so that a random-weight ``DFineForObjectDetection(config)`` converts into the preset strictly
    (the parity tests and benchmarks/inference.py compare the two). ``overrides``: DFineConfig fields. Needs
    transformers >= 4.52."""
    try:
        from transformers import DFineConfig, HGNetV2Config
    except ImportError as e:
        raise ImportError("hf_d_fine_config needs HF transformers with D-FINE (>= 4.52): pip install "
                          "'detrkit[test]'") from e
    s = d_fine_settings(size)
    if s["eval_idx"] != -1:  # D-FINE-M: inference at its 4th of 5 layers
        raise ValueError(f"dfine_{size} evaluates at decoder layer {s['eval_idx']}; HF's DFine builds "
                         "decoder_layers - eval_idx - 1 extra layers for that (the official code builds none), so "
                         "no HF model has the same network: compare another size")
    stem, stages = ARCHS[s["backbone"]]
    cols = list(zip(*stages, strict=True))  # in, mid, out, blocks, downsample, light, kernel, layers
    used = list(s["return_stages"])
    backbone = HGNetV2Config(
        stem_channels=list(stem), stage_in_channels=list(cols[0]), stage_mid_channels=list(cols[1]),
        stage_out_channels=list(cols[2]), stage_num_blocks=list(cols[3]), stage_downsample=list(cols[4]),
        stage_light_block=list(cols[5]), stage_kernel_size=list(cols[6]), stage_numb_of_layers=list(cols[7]),
        use_learnable_affine_block=s["use_lab"], hidden_sizes=list(cols[2]),
        out_features=[f"stage{i + 1}" for i in used])
    levels = len(used)
    points = s["n_points"]
    return DFineConfig(
        backbone_config=backbone, num_labels=num_classes, freeze_backbone_batch_norms=s["backbone_norm"] == "frozen",
        encoder_in_channels=[cols[2][i] for i in used], feat_strides=[2 ** (i + 2) for i in used],
        encoder_hidden_dim=s["hidden_dim"], encoder_ffn_dim=s["encoder_ffn"], encoder_attention_heads=s["nhead"],
        encoder_layers=s["num_encoder_layers"], encode_proj_layers=[levels - 1], hidden_expansion=s["expansion"],
        depth_mult=s["depth_mult"], d_model=s["d_model"], decoder_in_channels=[s["hidden_dim"]] * levels,
        num_feature_levels=levels, decoder_ffn_dim=s["dim_feedforward"], decoder_layers=s["num_decoder_layers"],
        decoder_attention_heads=s["nhead"], eval_idx=s["eval_idx"], num_queries=s["num_queries"],
        decoder_n_points=list(points) if isinstance(points, list | tuple) else points, max_num_bins=s["reg_max"],
        reg_scale=s["reg_scale"], up=s["up"], **overrides)
