"""HF transformers state dicts -> detrkit.

transformers names the same modules differently (``fc1`` for ``linear1``, ``self_attn_layer_norm``
for the norm after self-attention, separate q/k/v projections) and builds its ResNet from its own
``ResNetModel`` when the backbone is not a timm one. Each function below maps one model family;
keys that duplicate another key in detrkit (the decoder's copy of the class heads) are dropped.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor


def convert_hf_resnet_key(key: str) -> str:
    """HF ``ResNetModel`` names -> torchvision ResNet names (``embedder.embedder.convolution`` -> ``conv1``...)."""
    key = key.replace("embedder.embedder.convolution.", "conv1.").replace("embedder.embedder.normalization.", "bn1.")
    m = re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)", key)
    if m is None:
        return key
    stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
    rest = rest.replace("shortcut.convolution.", "downsample.0.").replace("shortcut.normalization.", "downsample.1.")
    rest = re.sub(r"layer\.(\d+)\.convolution\.", lambda g: f"conv{int(g.group(1)) + 1}.", rest)
    rest = re.sub(r"layer\.(\d+)\.normalization\.", lambda g: f"bn{int(g.group(1)) + 1}.", rest)
    return f"layer{stage + 1}.{block}.{rest}"


# (HF pattern, detrkit replacement) applied in order to each key after the "model." prefix is removed.
_COMMON_RULES = [
    # timm ResNets: ``conv_encoder.model.*`` (transformers 4), ``conv_encoder.model._backbone.*`` (DabDetr in
    # transformers 5, its TimmBackbone wrapper), ``model.*`` (in-memory names of transformers 5); HF's own ResNet
    # (``embedder`` / ``encoder.stages``) is renamed to torchvision's names, which timm's already are.
    (
        r"^backbone\.(conv_encoder\.)?model\.(_backbone\.)?(.*)$",
        lambda m: "backbone.body." + convert_hf_resnet_key(m.group(3)),
    ),
    (r"\.mlp\.fc1\.", ".linear1."),
    (r"\.mlp\.fc2\.", ".linear2."),
    (r"\.fc1\.", ".linear1."),
    (r"\.fc2\.", ".linear2."),
]
_DEFORMABLE_RULES = _COMMON_RULES + [
    (r"^input_proj\.", "neck.input_proj."),
    (r"^query_position_embeddings\.", "query_embed."),
    (r"\.self_attn_layer_norm\.", ".SA_NORM."),
    (r"\.encoder_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn\.", ".cross_attn."),
]


def _merge_qkv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Separate q/k/v/o projections -> nn.MultiheadAttention's in_proj_weight / in_proj_bias / out_proj."""
    out = {}
    for key, value in state.items():
        m = re.match(r"(.*\.(?:self_attn|multihead_attn))\.(q|k|v|o|out)_proj\.(weight|bias)$", key)
        if m is None:
            out[key] = value
            continue
        prefix, which, kind = m.groups()
        if which in ("o", "out"):
            out[f"{prefix}.out_proj.{kind}"] = value
        elif which == "q":
            out[f"{prefix}.in_proj_{kind}"] = torch.cat([state[f"{prefix}.{p}_proj.{kind}"] for p in "qkv"])
    return out


def convert_hf_deformable_detr(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``DeformableDetrForObjectDetection`` state dict -> detrkit :class:`~detrkit.models.DeformableDETR`.

    Also reads files written by ``save_pretrained``, which store each tied tensor once: transformers 5 ties the
    class (and, without refinement, box) heads of every decoder layer to the first, and keeps the decoder's
    copies (``model.decoder.{class,bbox}_embed``) rather than the top-level heads. Missing heads are restored
    from what was kept, as transformers does when it loads the file.
    """
    out, decoder_heads = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.")
        if key.startswith(("decoder.class_embed.", "decoder.bbox_embed.")):
            decoder_heads[key.removeprefix("decoder.")] = value  # the same modules as the top-level heads
            if key.startswith("decoder.class_embed."):
                continue  # detrkit's decoder refines boxes only
        for pattern, repl in _DEFORMABLE_RULES:
            key = re.sub(pattern, repl, key)
        # In encoder layers the norm after self-attention is norm1 and the last is norm2; in decoder
        # layers the official order is norm2 (self-attention), norm1 (cross-attention), norm3 (FFN).
        is_decoder = key.startswith("decoder.")
        key = key.replace(".SA_NORM.", ".norm2." if is_decoder else ".norm1.")
        key = key.replace(".final_layer_norm.", ".norm3." if is_decoder else ".norm2.")
        out[key] = value
    for key, value in decoder_heads.items():
        out.setdefault(key, value)
    layers = 1 + max((int(m.group(1)) for k in out if (m := re.match(r"decoder\.layers\.(\d+)\.", k))), default=-1)
    num_pred = layers + ("enc_output.weight" in out)  # two-stage: one more head, for the encoder proposals
    for head in ("class_embed", "bbox_embed"):
        first = {k.removeprefix(f"{head}.0."): v for k, v in out.items() if k.startswith(f"{head}.0.")}
        for i in range(1, num_pred):
            if not any(k.startswith(f"{head}.{i}.") for k in out):
                out.update({f"{head}.{i}.{rest}": v for rest, v in first.items()})
    return _merge_qkv(out)


_DETR_RULES = _COMMON_RULES + [
    (r"^input_projection\.", "input_proj."),
    (r"^query_position_embeddings\.", "query_embed."),
    (r"^decoder\.layernorm\.", "decoder.norm."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"\.encoder_attn_layer_norm\.", ".norm2."),
    (r"\.encoder_attn\.", ".multihead_attn."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
]


def convert_hf_detr(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``DetrForObjectDetection`` state dict (HF ResNet backbone) -> detrkit :class:`~detrkit.models.DETR`."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.")
        for pattern, repl in _DETR_RULES:
            key = re.sub(pattern, repl, key)
        # the last norm of a layer: norm2 in the encoder, norm3 in the decoder (official names)
        key = key.replace(".final_layer_norm.", ".norm3." if key.startswith("decoder.") else ".norm2.")
        out[key] = value
    return _merge_qkv(out)


_DAB_RULES = _COMMON_RULES + [
    (r"^query_refpoint_embeddings\.", "refpoint_embed."),
    (r"^input_projection\.", "input_proj."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"^decoder\.layernorm\.", "decoder.norm."),
    (r"\.activation_fn\.", ".activation."),
    # decoder layers: HF nests the official flat names one level deeper
    (r"\.self_attn\.self_attn_(query|key)_(content|pos)_proj\.",
     lambda m: f".sa_{m.group(1)[0]}{m.group(2)}_proj."),
    (r"\.self_attn\.self_attn_value_proj\.", ".sa_v_proj."),
    (r"\.self_attn\.self_attn\.output_proj\.", ".self_attn.out_proj."),
    (r"\.self_attn\.self_attn_layer_norm\.", ".norm1."),
    (r"\.cross_attn\.cross_attn_(query|key)_(content|pos)_proj\.",
     lambda m: f".ca_{m.group(1)[0]}{m.group(2)}_proj."),
    (r"\.cross_attn\.cross_attn_value_proj\.", ".ca_v_proj."),
    (r"\.cross_attn\.cross_attn_query_pos_sine_proj\.", ".ca_qpos_sine_proj."),
    (r"\.cross_attn\.cross_attn\.output_proj\.", ".cross_attn.out_proj."),
    (r"\.cross_attn\.cross_attn_layer_norm\.", ".norm2."),
    (r"\.mlp\.final_layer_norm\.", ".norm3."),
    (r"\.mlp\.activation\.", ".activation."),
    (r"^encoder\.(layers\.\d+)\.self_attn_layer_norm\.", r"encoder.\1.norm1."),
    (r"^encoder\.(layers\.\d+)\.final_layer_norm\.", r"encoder.\1.norm2."),
]


def convert_hf_dab_detr(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``DabDetrForObjectDetection`` state dict (HF ResNet backbone) -> detrkit :class:`~detrkit.models.DABDETR`.

    HF keeps the box head twice (``bbox_predictor`` and the decoder's tied copy); detrkit's decoder holds the
    same module, so both names map onto it.
    """
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.")
        for pattern, repl in _DAB_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if "bbox_embed.layers.0.weight" in out:
        out.update({f"decoder.{k}": v for k, v in out.items() if k.startswith("bbox_embed.")})
    return _merge_qkv(out)
