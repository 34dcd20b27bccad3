"""Official Deformable-DETR checkpoints map cleanly onto detrkit's modules.

The key list below is written from the attribute names of fundamentalvision/Deformable-DETR
(models/deformable_detr.py, deformable_transformer.py, ops/modules/ms_deform_attn.py): backbone
`backbone.0.body.*` (torchvision ResNet names), `input_proj.{i}.{0,1}`, `query_embed`, `class_embed.{i}`,
`bbox_embed.{i}.layers.{j}`, and under `transformer.`: `level_embed`, `reference_points` or the two-stage
`enc_output(_norm)` / `pos_trans(_norm)`, encoder layers (self_attn = MSDeformAttn, norm1, linear1, linear2,
norm2), decoder layers (cross_attn = MSDeformAttn, norm1, self_attn = nn.MultiheadAttention, norm2, linear1,
linear2, norm3) and, with refinement, the decoder's own references to the heads.
"""

import pytest
import torch
import torchvision

from detrkit.models import build_deformable_detr
from detrkit.weights import convert_official_deformable_detr

D, FFN, HEADS, LEVELS, POINTS, Q, K, ENC, DEC = 32, 64, 4, 4, 2, 10, 5, 2, 3


def _official_keys(refine: bool, two_stage: bool) -> dict[str, tuple]:
    keys = {}
    resnet = torchvision.models.resnet18()
    for name, t in resnet.state_dict().items():
        if not name.startswith("fc.") and "num_batches_tracked" not in name:
            keys[f"backbone.0.body.{name}"] = tuple(t.shape)
    for i, c in enumerate([128, 256, 512]):
        keys |= {f"input_proj.{i}.0.weight": (D, c, 1, 1), f"input_proj.{i}.0.bias": (D,)}
        keys |= {f"input_proj.{i}.1.weight": (D,), f"input_proj.{i}.1.bias": (D,)}
    keys |= {"input_proj.3.0.weight": (D, 512, 3, 3), "input_proj.3.0.bias": (D,), "input_proj.3.1.weight": (D,),
             "input_proj.3.1.bias": (D,)}

    def msda(prefix):
        return {f"{prefix}.sampling_offsets.weight": (HEADS * LEVELS * POINTS * 2, D),
                f"{prefix}.sampling_offsets.bias": (HEADS * LEVELS * POINTS * 2,),
                f"{prefix}.attention_weights.weight": (HEADS * LEVELS * POINTS, D),
                f"{prefix}.attention_weights.bias": (HEADS * LEVELS * POINTS,),
                f"{prefix}.value_proj.weight": (D, D), f"{prefix}.value_proj.bias": (D,),
                f"{prefix}.output_proj.weight": (D, D), f"{prefix}.output_proj.bias": (D,)}

    def ffn_norms(prefix, norms):
        out = {f"{prefix}.linear1.weight": (FFN, D), f"{prefix}.linear1.bias": (FFN,),
               f"{prefix}.linear2.weight": (D, FFN), f"{prefix}.linear2.bias": (D,)}
        for n in norms:
            out |= {f"{prefix}.{n}.weight": (D,), f"{prefix}.{n}.bias": (D,)}
        return out

    for i in range(ENC):
        p = f"transformer.encoder.layers.{i}"
        keys |= msda(f"{p}.self_attn") | ffn_norms(p, ["norm1", "norm2"])
    for i in range(DEC):
        p = f"transformer.decoder.layers.{i}"
        keys |= msda(f"{p}.cross_attn") | ffn_norms(p, ["norm1", "norm2", "norm3"])
        keys |= {f"{p}.self_attn.in_proj_weight": (3 * D, D), f"{p}.self_attn.in_proj_bias": (3 * D,),
                 f"{p}.self_attn.out_proj.weight": (D, D), f"{p}.self_attn.out_proj.bias": (D,)}
    keys["transformer.level_embed"] = (LEVELS, D)
    if two_stage:
        keys |= {"transformer.enc_output.weight": (D, D), "transformer.enc_output.bias": (D,),
                 "transformer.enc_output_norm.weight": (D,), "transformer.enc_output_norm.bias": (D,),
                 "transformer.pos_trans.weight": (2 * D, 2 * D), "transformer.pos_trans.bias": (2 * D,),
                 "transformer.pos_trans_norm.weight": (2 * D,), "transformer.pos_trans_norm.bias": (2 * D,)}
    else:
        keys |= {"transformer.reference_points.weight": (2, D), "transformer.reference_points.bias": (2,),
                 "query_embed.weight": (Q, 2 * D)}
    num_pred = DEC + int(two_stage)
    heads = {}
    for i in range(num_pred):
        heads |= {f"class_embed.{i}.weight": (K, D), f"class_embed.{i}.bias": (K,)}
        for j, (o, n) in enumerate([(D, D), (D, D), (4, D)]):
            heads |= {f"bbox_embed.{i}.layers.{j}.weight": (o, n), f"bbox_embed.{i}.layers.{j}.bias": (o,)}
    keys |= heads
    if refine:
        keys |= {f"transformer.decoder.{k}": v for k, v in heads.items() if k.startswith("bbox_embed")}
    if two_stage:
        keys |= {f"transformer.decoder.{k}": v for k, v in heads.items() if k.startswith("class_embed")}
    return keys


@pytest.mark.parametrize("refine,two_stage", [(False, False), (True, False), (True, True)])
def test_every_official_key_is_consumed_and_every_parameter_filled(refine, two_stage):
    official = {k: torch.zeros(shape) for k, shape in _official_keys(refine, two_stage).items()}
    model = build_deformable_detr(num_classes=K, backbone="resnet18", d_model=D, nhead=HEADS, n_points=POINTS,
                                  num_encoder_layers=ENC, num_decoder_layers=DEC, dim_feedforward=FFN,
                                  num_queries=Q, refine=refine, two_stage=two_stage)
    converted = convert_official_deformable_detr(official)
    own = model.state_dict()
    assert set(converted) == set(own), (sorted(set(converted) - set(own))[:5], sorted(set(own) - set(converted))[:5])
    assert all(converted[k].shape == own[k].shape for k in own)
