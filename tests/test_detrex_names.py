"""detrex checkpoints of DETR, Deformable-DETR, DAB-DETR and DN-DETR map onto detrkit's modules.

detrex documents its layouts through its converters from the official checkpoints
(IDEA-Research/detrex docs/source/tutorials/Converters.md: convert-detr.py, convert-deformable-detr.py,
convert-dab-detr.py, convert-dn-detr.py). ``_to_detrex`` below restates those renames (official name ->
detrex name); an official-layout state dict taken through it must convert to exactly what the official
converter gives, tensor for tensor.
"""

import re

import pytest
import torch
from test_official_names import _official_keys
from test_official_names_dino import _dab_official_keys, _detectron2_name

from detrkit.models import build_detr
from detrkit.weights import (
    convert_detrex,
    convert_official_dab_detr,
    convert_official_deformable_detr,
    convert_official_detr,
)
from detrkit.weights.detrex import detrex_family

_ENC = {"detr": {"self_attn": "attentions.0.attn"}, "deformable": {"self_attn": "attentions.0"},
        "dab": {"self_attn": "attentions.0.attn", "activation": "ffns.0.layers.0.1"}}
_COMMON = {"linear1": "ffns.0.layers.0.0", "linear2": "ffns.0.layers.1"}
_DEC = {
    "detr": {"norm1": "norms.0", "norm2": "norms.1", "norm3": "norms.2", "self_attn": "attentions.0.attn",
             "multihead_attn": "attentions.1.attn"},
    "deformable": {"norm1": "norms.1", "norm2": "norms.0", "norm3": "norms.2", "self_attn": "attentions.0.attn",
                   "cross_attn": "attentions.1"},
    "dab": {"norm1": "norms.0", "norm2": "norms.1", "norm3": "norms.2", "self_attn.out_proj": "attentions.0.out_proj",
            "cross_attn.out_proj": "attentions.1.out_proj", "activation": "ffns.0.layers.0.1",
            **{f"{a}_{b}_proj": f"attentions.{i}.{c}_proj" for a, i in (("sa", 0), ("ca", 1))
               for b, c in (("qcontent", "query_content"), ("qpos", "query_pos"), ("kcontent", "key_content"),
                            ("kpos", "key_pos"), ("v", "value"), ("qpos_sine", "query_pos_sine"))}},
}


def _to_detrex(key: str, family: str) -> str:
    if key.startswith("backbone.0.body."):
        return "backbone." + _detectron2_name(key.removeprefix("backbone.0.body."))
    if m := re.match(r"input_proj\.(\d)\.(\d)\.(.*)$", key):
        level, part, rest = int(m.group(1)), ("conv", "norm")[int(m.group(2))], m.group(3)
        return f"neck.convs.{level}.{part}.{rest}" if level < 3 else f"neck.extra_convs.{level - 3}.{part}.{rest}"
    key = key.replace("level_embed", "level_embeds").replace("query_embed.", "query_embedding.")
    key = key.replace("label_enc.", "label_encoder.").replace("decoder.norm.", "decoder.post_norm_layer.")
    if m := re.match(r"(transformer\.(encoder|decoder)\.layers\.\d+\.)(.*)$", key):
        prefix, part, rest = m.groups()
        table = {**_COMMON, **(_ENC if part == "encoder" else _DEC)[family]}
        for old in sorted(table, key=len, reverse=True):  # longest first: sa_qpos_proj before sa_qpos_sine_proj
            if rest.startswith(old + "."):
                return prefix + table[old] + rest[len(old):]
    return key


def official_detr_state(model) -> dict:
    """A detrkit DETR's state dict in facebookresearch/detr's names (the Joiner's ``backbone.0``, ``transformer.``)."""
    renames = (("backbone.body.", "backbone.0.body."), ("encoder.", "transformer.encoder."),
               ("decoder.", "transformer.decoder."))
    out = {}
    for k, v in model.state_dict().items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def _official_detr_keys() -> dict:
    model = build_detr(num_classes=5, backbone="resnet18", d_model=32, nhead=4, num_encoder_layers=2,
                       num_decoder_layers=3, dim_feedforward=64, num_queries=10)
    return {k: tuple(v.shape) for k, v in official_detr_state(model).items()}


CASES = {
    "detr": (_official_detr_keys, convert_official_detr),
    "deformable": (lambda: _official_keys(refine=True, two_stage=False), convert_official_deformable_detr),
    "deformable_two_stage": (lambda: _official_keys(refine=True, two_stage=True), convert_official_deformable_detr),
    "dab": (lambda: _dab_official_keys(dn=False), convert_official_dab_detr),
    "dn_dab": (lambda: _dab_official_keys(dn=True), convert_official_dab_detr),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_detrex_layout_converts_like_the_official_one(case):
    keys, convert_official = CASES[case]
    family = case.split("_")[0].replace("dn", "dab")
    torch.manual_seed(0)
    official = {k: torch.randn(shape) for k, shape in keys().items()}
    detrex = {_to_detrex(k, family): v for k, v in official.items()}
    assert len(detrex) == len(official)
    assert detrex_family(detrex) == family
    expected, converted = convert_official(official), convert_detrex(detrex, num_decoder_layers=3)
    assert sorted(converted) == sorted(expected), (sorted(set(converted) - set(expected))[:5],
                                                   sorted(set(expected) - set(converted))[:5])
    for k in expected:
        assert torch.equal(converted[k], expected[k]), k
