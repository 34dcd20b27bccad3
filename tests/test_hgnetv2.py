"""HGNetv2 (backbones/hgnetv2.py), D-FINE's backbone: float64 parity with HF transformers' HGNetV2Backbone from
the same random weights, for a plain and a learnable-affine ("lab") configuration, and the preset sizes."""

from __future__ import annotations

import re

import pytest
import torch
from _float64 import PromoteFloat32

from detrkit.backbones.hgnetv2 import ARCHS, HGNetv2

transformers = pytest.importorskip("transformers")

# a small net of the B0 form: every kind of layer (stem, plain and light blocks, residual blocks, downsampling)
TINY = ((3, 8, 8), ((8, 8, 16, 1, False, False, 3, 2), (16, 8, 32, 2, True, False, 3, 2),
                    (32, 8, 48, 2, True, True, 5, 2), (48, 16, 64, 1, True, True, 5, 2)))


def _hf_backbone(use_lab: bool):
    stem, stages = TINY
    cols = list(zip(*stages, strict=True))
    config = transformers.HGNetV2Config(
        stem_channels=list(stem), stage_in_channels=list(cols[0]), stage_mid_channels=list(cols[1]),
        stage_out_channels=list(cols[2]), stage_num_blocks=list(cols[3]), stage_downsample=list(cols[4]),
        stage_light_block=list(cols[5]), stage_kernel_size=list(cols[6]), stage_numb_of_layers=list(cols[7]),
        use_learnable_affine_block=use_lab, out_features=["stage2", "stage3", "stage4"])
    return transformers.HGNetV2Backbone(config)


def _hf_to_detrkit(state: dict) -> dict:
    rules = [(r"^embedder\.", "stem."), (r"^encoder\.stages\.", "stages."), (r"\.convolution\.", ".conv."),
             (r"\.normalization\.", ".bn.")]
    out = {}
    for key, value in state.items():
        for old, new in rules:
            key = re.sub(old, new, key)
        out[key] = value
    return out


@pytest.mark.parametrize("use_lab", [False, True])
def test_hgnetv2_matches_hf(use_lab):
    torch.manual_seed(0)
    theirs = _hf_backbone(use_lab)
    with torch.no_grad():  # random BatchNorm statistics and affine blocks, so that every parameter matters
        for name, t in theirs.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if ("running_var" in name or name.endswith("scale"))
                        else torch.randn_like(t) * 0.3)
    theirs = theirs.double().eval()
    ours = HGNetv2(TINY, use_lab=use_lab).double().eval()
    ours.load_state_dict(_hf_to_detrkit(theirs.state_dict()))
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)  # non-square
    got = [x for x, _ in ours(images).values()]
    with PromoteFloat32():
        hf = theirs(images).feature_maps
    assert [tuple(x.shape) for x in got] == [(2, 32, 8, 12), (2, 48, 4, 6), (2, 64, 2, 3)]
    for a, b in zip(got, hf, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_presets_build_with_their_papers_widths():
    """B0 / B4 as D-FINE uses them (N, S: B0 with lab; L: B4 without): the widths of the returned stages; an
    unknown arch names the known ones; freeze_at 0 freezes the stem only."""
    for arch, widths in (("B0", [256, 512, 1024]), ("B4", [512, 1024, 2048])):
        net = HGNetv2(arch, use_lab=arch == "B0")
        assert list(net.channels.values()) == widths
    with pytest.raises(ValueError, match="B0"):
        HGNetv2("B9")
    frozen = HGNetv2("B0", freeze_at=0)
    assert not any(p.requires_grad for p in frozen.stem.parameters())
    assert all(p.requires_grad for p in frozen.stages.parameters())
    assert set(ARCHS) == {"B0", "B1", "B2", "B3", "B4", "B5"}
