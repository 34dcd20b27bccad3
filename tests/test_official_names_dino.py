"""Official DAB-DETR / DN-DETR / DINO and detrex DINO checkpoints map onto detrkit's modules.

The key lists are written from the reference code's attribute names (IDEA-Research/DAB-DETR
models/DAB_DETR/{DABDETR,transformer}.py; IDEA-Research/DINO models/dino/{dino,deformable_transformer}.py
and config/DINO/DINO_4scale.py; IDEA-Research/detrex projects/dino/modeling/{dino,dino_transformer}.py,
detrex/layers/mlp.py (FFN), ChannelMapper, detectron2's ResNet). Every official key must be consumed and
every detrkit parameter filled, with the right shape; the parts whose order matters (norms) are checked
by value.
"""

import pytest
import torch
import torchvision

from detrkit.models import build_dab_detr, build_dino
from detrkit.weights import convert_detrex_dino, convert_official_dab_detr, convert_official_dino

D, FFN, HEADS, LEVELS, POINTS, Q, K, ENC, DEC = 32, 64, 4, 4, 2, 10, 5, 2, 3


def _linear(prefix, out, inp):
    return {f"{prefix}.weight": (out, inp), f"{prefix}.bias": (out,)}


def _mlp(prefix, dims):
    keys = {}
    for j, (o, i) in enumerate(dims):
        keys |= _linear(f"{prefix}.layers.{j}", o, i)
    return keys


def _norm(prefix):
    return {f"{prefix}.weight": (D,), f"{prefix}.bias": (D,)}


def _msda(prefix):
    return (_linear(f"{prefix}.sampling_offsets", HEADS * LEVELS * POINTS * 2, D)
            | _linear(f"{prefix}.attention_weights", HEADS * LEVELS * POINTS, D)
            | _linear(f"{prefix}.value_proj", D, D) | _linear(f"{prefix}.output_proj", D, D))


def _mha(prefix):
    return {f"{prefix}.in_proj_weight": (3 * D, D), f"{prefix}.in_proj_bias": (3 * D,)} | _linear(
        f"{prefix}.out_proj", D, D
    )


def _resnet18(prefix, rename=lambda k: k):
    return {prefix + rename(k): tuple(t.shape) for k, t in torchvision.models.resnet18().state_dict().items()
            if not k.startswith("fc.") and "num_batches_tracked" not in k}


BOX_HEAD = [(D, D), (D, D), (4, D)]


def _dab_official_keys(dn: bool) -> dict:
    keys = _resnet18("backbone.0.body.") | {"input_proj.weight": (D, 512, 1, 1), "input_proj.bias": (D,)}
    keys |= {"refpoint_embed.weight": (Q, 4)} | _linear("class_embed", K, D) | _mlp("bbox_embed", BOX_HEAD)
    keys |= _mlp("transformer.decoder.bbox_embed", BOX_HEAD)
    keys |= _mlp("transformer.encoder.query_scale", [(D, D), (D, D)])
    for i in range(ENC):
        p = f"transformer.encoder.layers.{i}"
        keys |= _mha(f"{p}.self_attn") | _linear(f"{p}.linear1", FFN, D) | _linear(f"{p}.linear2", D, FFN)
        keys |= _norm(f"{p}.norm1") | _norm(f"{p}.norm2") | {f"{p}.activation.weight": (1,)}
    for i in range(DEC):
        p = f"transformer.decoder.layers.{i}"
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                     "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj"):
            keys |= _linear(f"{p}.{name}", D, D)
        if i == 0:
            keys |= _linear(f"{p}.ca_qpos_proj", D, D)  # later layers set it to None (keep_query_pos=False)
        keys |= _linear(f"{p}.self_attn.out_proj", D, D) | _linear(f"{p}.cross_attn.out_proj", D, D)
        keys |= _linear(f"{p}.linear1", FFN, D) | _linear(f"{p}.linear2", D, FFN) | {f"{p}.activation.weight": (1,)}
        keys |= _norm(f"{p}.norm1") | _norm(f"{p}.norm2") | _norm(f"{p}.norm3")
    keys |= _norm("transformer.decoder.norm") | _mlp("transformer.decoder.query_scale", [(D, D), (D, D)])
    keys |= _mlp("transformer.decoder.ref_point_head", [(D, 2 * D), (D, D)])
    keys |= _mlp("transformer.decoder.ref_anchor_head", [(D, D), (2, D)])
    if dn:
        keys["label_enc.weight"] = (K + 1, D - 1)
    return keys


@pytest.mark.parametrize("dn", [False, True])
def test_official_dab_and_dn_detr_keys(dn):
    official = {k: torch.randn(shape) for k, shape in _dab_official_keys(dn).items()}
    model = build_dab_detr(num_classes=K, backbone="resnet18", d_model=D, nhead=HEADS,
                           num_encoder_layers=ENC, num_decoder_layers=DEC, dim_feedforward=FFN, num_queries=Q,
                           denoising={"num_groups": 5, "contrastive": False} if dn else None)
    converted = convert_official_dab_detr(official)
    own = model.state_dict()
    assert set(converted) == set(own), (sorted(set(converted) - set(own))[:5], sorted(set(own) - set(converted))[:5])
    assert all(converted[k].shape == own[k].shape for k in own)
    model.load_state_dict(converted, strict=True)


def _dino_official_keys() -> dict:
    keys = _resnet18("backbone.0.body.")
    for i, c in enumerate([128, 256, 512]):
        keys |= {f"input_proj.{i}.0.weight": (D, c, 1, 1), f"input_proj.{i}.0.bias": (D,)} | _norm(f"input_proj.{i}.1")
    keys |= {"input_proj.3.0.weight": (D, 512, 3, 3), "input_proj.3.0.bias": (D,)} | _norm("input_proj.3.1")
    t = "transformer"
    keys |= {f"{t}.level_embed": (LEVELS, D), f"{t}.tgt_embed.weight": (Q, D)}
    keys |= _linear(f"{t}.enc_output", D, D) | _norm(f"{t}.enc_output_norm")
    keys |= _linear(f"{t}.enc_out_class_embed", K, D) | _mlp(f"{t}.enc_out_bbox_embed", BOX_HEAD)
    for i in range(ENC):
        p = f"{t}.encoder.layers.{i}"
        keys |= _msda(f"{p}.self_attn") | _linear(f"{p}.linear1", FFN, D) | _linear(f"{p}.linear2", D, FFN)
        keys |= _norm(f"{p}.norm1") | _norm(f"{p}.norm2")
    for i in range(DEC):
        p = f"{t}.decoder.layers.{i}"
        keys |= _msda(f"{p}.cross_attn") | _mha(f"{p}.self_attn")
        keys |= _linear(f"{p}.linear1", FFN, D) | _linear(f"{p}.linear2", D, FFN)
        keys |= _norm(f"{p}.norm1") | _norm(f"{p}.norm2") | _norm(f"{p}.norm3")
    keys |= _norm(f"{t}.decoder.norm") | _mlp(f"{t}.decoder.ref_point_head", [(D, 2 * D), (D, D)])
    for i in range(DEC):  # dec_pred_{class,bbox}_embed_share: the same head at every index
        for prefix in ("", f"{t}.decoder."):
            keys |= _linear(f"{prefix}class_embed.{i}", K, D) | _mlp(f"{prefix}bbox_embed.{i}", BOX_HEAD)
    keys["label_enc.weight"] = (K + 1, D)  # dn_labelbook_size + 1
    return keys


def _build_dino(**kw):
    return build_dino(num_classes=K, backbone="resnet18", d_model=D, nhead=HEADS, n_points=POINTS,
                      num_encoder_layers=ENC, num_decoder_layers=DEC, dim_feedforward=FFN, num_queries=Q,
                      denoising={"num_dn_pairs": 100}, **kw)


def test_official_dino_keys():
    official = {k: torch.randn(shape) for k, shape in _dino_official_keys().items()}
    converted = convert_official_dino(official)
    model = _build_dino()
    own = model.state_dict()
    assert set(converted) == set(own), (sorted(set(converted) - set(own))[:5], sorted(set(own) - set(converted))[:5])
    assert all(converted[k].shape == own[k].shape for k in own)


def _detectron2_name(torchvision_name: str) -> str:
    """torchvision ResNet name -> detectron2 ResNet name (stem / res2-5 / conv{k}.norm / shortcut)."""
    name = torchvision_name
    if name.startswith("conv1."):
        return "stem.conv1." + name[6:]
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name[4:]
    stage, rest = name.split(".", 1)
    block, rest = rest.split(".", 1)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    for j in (1, 2, 3):
        rest = rest.replace(f"bn{j}.", f"conv{j}.norm.")
    return f"res{int(stage[-1]) + 1}.{block}.{rest}"


def _detrex_dino_keys() -> dict:
    keys = _resnet18("backbone.", _detectron2_name)
    for i, c in enumerate([128, 256, 512]):
        keys |= {f"neck.convs.{i}.conv.weight": (D, c, 1, 1), f"neck.convs.{i}.conv.bias": (D,)}
        keys |= _norm(f"neck.convs.{i}.norm")
    keys |= {"neck.extra_convs.0.conv.weight": (D, 512, 3, 3), "neck.extra_convs.0.conv.bias": (D,)}
    keys |= _norm("neck.extra_convs.0.norm")
    t = "transformer"
    keys |= {f"{t}.level_embeds": (LEVELS, D), f"{t}.tgt_embed.weight": (Q, D)}
    keys |= _linear(f"{t}.enc_output", D, D) | _norm(f"{t}.enc_output_norm")

    def ffn(p):
        return _linear(f"{p}.ffns.0.layers.0.0", FFN, D) | _linear(f"{p}.ffns.0.layers.1", D, FFN)

    for i in range(ENC):
        p = f"{t}.encoder.layers.{i}"
        keys |= _msda(f"{p}.attentions.0") | ffn(p) | _norm(f"{p}.norms.0") | _norm(f"{p}.norms.1")
    for i in range(DEC):
        p = f"{t}.decoder.layers.{i}"
        keys |= _mha(f"{p}.attentions.0.attn") | _msda(f"{p}.attentions.1") | ffn(p)
        keys |= _norm(f"{p}.norms.0") | _norm(f"{p}.norms.1") | _norm(f"{p}.norms.2")
    keys |= _norm(f"{t}.decoder.norm") | _mlp(f"{t}.decoder.ref_point_head", [(D, 2 * D), (D, D)])
    for i in range(DEC + 1):  # one head per decoder layer + the encoder's
        for prefix in ("", f"{t}.decoder."):
            keys |= _linear(f"{prefix}class_embed.{i}", K, D) | _mlp(f"{prefix}bbox_embed.{i}", BOX_HEAD)
    keys["label_enc.weight"] = (K, D)
    return keys


def test_detrex_dino_keys():
    detrex = {k: torch.randn(shape) for k, shape in _detrex_dino_keys().items()}
    converted = convert_detrex_dino(detrex, num_decoder_layers=DEC)
    model = _build_dino(share_heads=False, pe_temperature=10000.0, pe_offset=-0.5)
    own = model.state_dict()
    assert set(converted) == set(own), (sorted(set(converted) - set(own))[:5], sorted(set(own) - set(converted))[:5])
    assert all(converted[k].shape == own[k].shape for k in own)
    model.load_state_dict(converted, strict=True)
    # parts of equal shape whose order matters
    dec = "transformer.decoder.layers.1"
    for theirs, mine in [
        (f"{dec}.norms.0.weight", "decoder.layers.1.norm2.weight"),
        (f"{dec}.norms.1.weight", "decoder.layers.1.norm1.weight"),
        (f"{dec}.norms.2.weight", "decoder.layers.1.norm3.weight"),
        ("neck.extra_convs.0.norm.weight", "neck.input_proj.3.1.weight"),
        (f"class_embed.{DEC}.weight", "enc_out_class_embed.weight"),
        ("class_embed.1.weight", "class_embed.1.weight"),
        ("backbone.res3.0.shortcut.norm.running_var", "backbone.body.layer2.0.downsample.1.running_var"),
    ]:
        assert torch.equal(model.state_dict()[mine], detrex[theirs]), mine
    assert torch.equal(model.label_enc.weight[:K], detrex["label_enc.weight"])
