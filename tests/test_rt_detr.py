"""RT-DETR / RT-DETRv2: the official checkpoint layout, and the paper's mechanisms, each with a negative control.

Parity with HF transformers is in test_parity_hf.py; parity with the official code (run from a checkout) in
test_parity_official_repos.py.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from detrkit import create_model
from detrkit.data.transforms import val_transforms
from detrkit.models.deformable_detr import distinct_topk
from detrkit.models.rt_detr import top_valid
from detrkit.ops.ms_deform_attn import ms_deform_attn_discrete
from detrkit.weights.formats import read_checkpoint

# Key names and shapes of lyuwenyu/RT-DETR's own models (R18 / R50, rtdetr_pytorch and rtdetrv2_pytorch), as
# tests/official_rtdetr_runner.py wrote them from the official code: names only, no values.
KEYS = json.loads(gzip.decompress((Path(__file__).parent / "data" / "official_rtdetr_keys.json.gz").read_bytes()))
SMALL = dict(hidden_dim=32, encoder_ffn=64, nhead=4, d_model=32, dim_feedforward=64, num_decoder_layers=2,
             num_queries=20)


@pytest.mark.parametrize("variant,preset", [("v1_r18", "rtdetr_r18vd"), ("v1_r50", "rtdetr_r50vd"),
                                            ("v2_r18", "rtdetrv2_r18vd"), ("v2_r50", "rtdetrv2_r50vd")])
def test_official_layout_every_key_consumed_every_parameter_filled(variant, preset, tmp_path):
    """An official training checkpoint (its EMA weights under ``ema.module``, as the trainer saves them): every key
    is consumed (or named as derived), every parameter and buffer of the preset is filled with the file's value."""
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.zeros(shape, dtype=torch.long) if k.endswith("num_batches_tracked")
                 else torch.randn(shape, generator=gen)) for k, shape in KEYS[variant].items()}
    torch.save({"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": {"module": state}},
               tmp_path / "ckpt.pth")
    conv = read_checkpoint(tmp_path / "ckpt.pth")
    assert conv.format.name == "official_rt_detr"
    assert all("anchors" in k or "valid_mask" in k or "points_scale" in k for k, _ in conv.ignored)
    model = create_model(preset, weights=tmp_path / "ckpt.pth")  # strict: raises on any missing / unexpected key
    own = model.state_dict()
    assert set(conv.state_dict) <= set(own)
    filled = {k for k in own if k in conv.state_dict or k.startswith("decoder.bbox_embed.")}  # the decoder's alias
    assert filled | {k for k in own if k.endswith("num_batches_tracked")} == set(own)
    for k, v in conv.state_dict.items():  # the EMA weights, not the raw ones
        assert torch.equal(own[k].float(), v.float()), k


def _tiny(**overrides):
    torch.manual_seed(0)
    return create_model("rtdetr_r18vd", num_classes=3, **{**SMALL, **overrides})


def test_aifi_runs_on_the_stride_32_level_only():
    """Section 4.2: intra-scale attention on S5 only. Control: the stride-8 and -16 maps reach the fusion unchanged
    by attention (their projection is all that happens before CCFF)."""
    model = _tiny().eval()
    seen = []
    model.encoder.encoder[0].register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    with torch.no_grad():
        model(torch.rand(1, 3, 128, 192))
    assert seen == [(1, 32, 4, 6)]  # one call, on the 128/32 x 192/32 map
    feats = [torch.randn(1, c, 128 // s, 192 // s) for c, s in ((128, 8), (256, 16), (512, 32))]
    enc = model.encoder
    with torch.no_grad():
        proj = [p(f) for p, f in zip(enc.input_proj, feats, strict=True)]
        attended = enc.encoder[0](proj[2])
    assert not torch.allclose(attended, proj[2])  # attention changes the stride-32 map ...
    with torch.no_grad():  # ... and the fused stride-8 map depends on it, through the top-down path
        a = enc._bottom_up(enc._top_down([proj[0], proj[1], attended]))[0]
        b = enc._bottom_up(enc._top_down([proj[0], proj[1], proj[2]]))[0]
    assert not torch.allclose(a, b)


def test_query_selection_takes_the_top_k_valid_anchors():
    """Section 4.3 with the 0.01..0.99 valid mask: invalid anchors (+inf) are never selected, even when they score
    highest. Negative control: a plain top-k over the same scores takes them."""
    scores = torch.tensor([[9.0, 1.0, 8.0, 2.0, 7.0, 3.0]])
    proposals = torch.zeros(1, 6, 4)
    proposals[0, [0, 2]] = float("inf")  # anchors too close to the border
    chosen = top_valid(scores, proposals, 3)
    assert sorted(chosen[0].tolist()) == [3, 4, 5]
    assert {0, 2} <= set(scores.topk(3, dim=1).indices[0].tolist())  # what the mask prevents


def test_distinct_query_selection_skips_proposals_that_overlap_a_better_one():
    """DDQ (section 3.2): the k queries are the best proposals after a class-agnostic NMS; a proposal covering a
    better one by IoU > 0.8 is taken only when the distinct ones run out. Negative control: the plain top-k takes
    the two near-copies of the best box."""
    boxes = torch.tensor([[[0.30, 0.30, 0.20, 0.20], [0.30, 0.31, 0.20, 0.20], [0.31, 0.30, 0.20, 0.20],
                           [0.70, 0.70, 0.20, 0.20], [0.50, 0.20, 0.10, 0.10], [0.20, 0.80, 0.10, 0.10]]])
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, float("-inf")]])
    assert distinct_topk(scores, boxes, 3, 0.8)[0].tolist() == [0, 3, 4]
    assert scores.topk(3, dim=1).indices[0].tolist() == [0, 1, 2]  # what the NMS prevents
    # more queries than distinct proposals: the suppressed ones follow, best first, the never-selected last
    assert distinct_topk(scores, boxes, 6, 0.8)[0].tolist() == [0, 3, 4, 1, 2, 5]
    # each image of a batch is its own NMS: the same boxes in the second image do not suppress the first's
    two = distinct_topk(scores.repeat(2, 1), boxes.repeat(2, 1, 1), 3, 0.8)
    assert two.tolist() == [[0, 3, 4], [0, 3, 4]]
    # the NMS over the best 4k only gives what the NMS over all gives (a box is suppressed only by better ones)
    gen = torch.Generator().manual_seed(0)
    many = torch.cat([torch.rand(2, 500, 2, generator=gen), torch.rand(2, 500, 2, generator=gen) * 0.3 + 0.05], -1)
    noisy = torch.randn(2, 500, generator=gen)
    assert torch.equal(distinct_topk(noisy, many, 30, 0.3), distinct_topk(noisy, many, 30, 0.3, pool=500 // 30 + 1))


def test_model_with_distinct_queries_starts_from_proposals_that_overlap_less_than_the_iou():
    """``query_nms`` in the model: at initialisation the proposals are the anchors themselves, neighbours overlap by
    IoU 0.17 - 0.25 within and across levels, so at IoU 0.1 no two selected queries may overlap more. Negative
    control: without it, some do. A bad IoU names the option."""
    from torchvision.ops import box_convert, box_iou

    def worst_overlap(model):
        with torch.no_grad():
            boxes = model.eval()(torch.rand(1, 3, 224, 224)).enc_outputs.pred_boxes[0]
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        return box_iou(xyxy, xyxy).triu(1).max().item()

    assert worst_overlap(_tiny(num_queries=40, query_nms=0.1)) <= 0.1
    assert worst_overlap(_tiny(num_queries=40)) > 0.1
    with pytest.raises(ValueError, match=r"query_nms must be an IoU in \(0, 1\]"):
        _tiny(query_nms=1.5)


def test_model_selects_only_valid_anchors_at_640():
    """At 640x640 the stride-8 map's border anchors (centre 0.5 / 80 < 0.01) are invalid; with every proposal
    scoring the same (zeroed encoder projection), only the mask decides, and the selected boxes are all finite."""
    model = _tiny(num_queries=50).eval()
    with torch.no_grad():
        model.enc_output.weight.zero_()
        out = model(torch.rand(1, 3, 640, 640))
    assert out.enc_outputs.pred_boxes.isfinite().all()
    assert (out.enc_outputs.pred_boxes < 1).all()  # an invalid anchor's box would be sigmoid(+inf) = 1


def test_denoising_absent_at_inference_and_hidden_from_matching_queries():
    """Contrastive denoising runs in training only; in training, the attention mask keeps the matching queries
    from seeing the denoising ones (their outputs do not change when denoising queries are added)."""
    model = _tiny()
    images = torch.rand(2, 3, 64, 96)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.5, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    model.eval()
    out = model(images, targets=targets)
    assert out.dn_meta is None and out.dn_outputs is None and out.pred_logits.shape[1] == 20
    model.train()
    torch.manual_seed(1)
    with_dn = model(images, targets=targets)
    torch.manual_seed(1)
    without = model(images)
    assert with_dn.dn_meta is not None and with_dn.dn_meta.num_dn > 0
    torch.testing.assert_close(with_dn.pred_logits, without.pred_logits, rtol=1e-5, atol=1e-5)
    # control: without the mask the matching queries read the denoising ones (which hold the answers)
    from detrkit.layers import denoising

    real = denoising.build_dn_queries

    def unmasked(*args, **kwargs):
        labels, boxes, mask, meta = real(*args, **kwargs)
        return labels, boxes, torch.zeros_like(mask), meta

    denoising.build_dn_queries = unmasked
    try:
        torch.manual_seed(1)
        leaked = model(images, targets=targets)
    finally:
        denoising.build_dn_queries = real
    assert not torch.allclose(leaked.pred_logits, without.pred_logits, rtol=1e-5, atol=1e-5)


def test_input_size_rule_and_preprocessing():
    model = _tiny().eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 100, 128))
    from torchvision import tv_tensors

    image = tv_tensors.Image(torch.zeros(3, 200, 300, dtype=torch.uint8))
    image[0] = 255  # red
    x = val_transforms(640, with_boxes=False, preprocess="rtdetr")(image)
    assert tuple(x.shape) == (3, 640, 640) and x.max() == 1.0 and x.min() == 0.0  # [0, 1], fixed square
    y = val_transforms(640, with_boxes=False)(image)  # the DETR family: ImageNet mean / std, shorter side
    assert tuple(y.shape) == (3, 640, 960) and y.min() < 0


def test_discrete_sampling_reads_the_nearest_pixel():
    """RT-DETRv2's discrete operator: each point reads pixel floor(x * w + 0.5), clamped; checked by hand."""
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    value = torch.randn(1, 24 + 6, 2, 8)
    loc = torch.rand(1, 5, 2, 2, 3, 2) * 1.2 - 0.1  # some points outside the map
    weights = torch.rand(1, 5, 2, 2, 3)
    out = ms_deform_attn_discrete(value, shapes, loc, weights)
    expected = torch.zeros(1, 5, 2, 8)
    start = [0, 24]
    for q in range(5):
        for h in range(2):
            for lvl, (hh, ww) in enumerate(shapes):
                for p in range(3):
                    x = min(max(int((loc[0, q, h, lvl, p, 0] * ww + 0.5).floor()), 0), ww - 1)
                    y = min(max(int((loc[0, q, h, lvl, p, 1] * hh + 0.5).floor()), 0), hh - 1)
                    expected[0, q, h] += weights[0, q, h, lvl, p] * value[0, start[lvl] + y * ww + x, h]
    torch.testing.assert_close(out, expected.view(1, 5, 16))


@pytest.mark.parametrize("name", ["rtdetr_lite", "dfine_lite"])
def test_cli_train_eval_predict_rtdetr(name, synth_dir, tmp_path, capsys):
    """The same commands as for the other families: RT-DETR's [0, 1] square input reaches the model everywhere (a
    DETR-normalized or non-square input would fail its checks or its size rule); D-FINE on the same engine, with
    the default recipe's settings."""
    from conftest import TINY

    from detrkit.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--model", name, "--data", str(synth_dir), "--output_dir", str(out), "--epochs", "1",
               "--image_size", "96", "--batch_size", "2", "--num_workers", "0", "--progress", "false",
               "--max_train_images", "4", "--model_args", json.dumps(TINY)])
    assert rc == 0 and "AP50" in capsys.readouterr().out
    rc = main(["eval", "--checkpoint", str(out), "--data", str(synth_dir), "--output", str(tmp_path / "m.json")])
    assert rc == 0 and "per_class" in json.loads((tmp_path / "m.json").read_text())
    rc = main(["predict", str(synth_dir / "val"), "--checkpoint", str(out), "--output", str(tmp_path / "pred"),
               "--threshold", "0.0", "--max_detections", "3"])
    assert rc == 0 and len(json.loads((tmp_path / "pred" / "detections.json").read_text())) == 4
    # tiled (64-px tiles: each resized to the model's square input) and explained
    rc = main(["predict", str(synth_dir / "val"), "--checkpoint", str(out), "--output", str(tmp_path / "tiles"),
               "--threshold", "0.0", "--max_detections", "3", "--tile", "64"])
    assert rc == 0 and all(0 < len(d) <= 3 for d in json.loads((tmp_path / "tiles" / "detections.json").read_text()
                                                                ).values())
    image = sorted((synth_dir / "val").iterdir())[0]
    rc = main(["explain", str(image), "--checkpoint", str(out), "--output", str(tmp_path / "why"), "--threshold",
               "0.0", "--max_detections", "2"])
    assert rc == 0 and len(json.loads((tmp_path / "why" / "explain.json").read_text())) > 0


def test_checkpoint_of_another_size_names_the_preset_that_fits(tmp_path):
    """An official R50 file given to the R18 preset: refused (strict), and the message names the presets it fits."""
    from detrkit.weights.files import CheckpointError

    state = {k: torch.zeros(shape, dtype=torch.long) if k.endswith("num_batches_tracked") else torch.randn(shape)
             for k, shape in KEYS["v1_r50"].items()}
    torch.save({"model": state}, tmp_path / "r50.pth")
    with pytest.raises(CheckpointError, match=r"loads into: rtdetr_r50vd, rtdetrv2_r50vd"):
        create_model("rtdetr_r18vd", weights=tmp_path / "r50.pth")


def test_per_level_point_counts_match_each_level_sampled_alone():
    """RT-DETRv2's per-level point counts: [4, 2, 1] points read exactly what sampling each level alone with its own
    points reads (the padded points add nothing); [4, 4, 4] is the uniform 4 exactly."""
    from detrkit.layers import MultiScaleDeformableAttention
    from detrkit.ops import ms_deform_attn

    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(32, 3, 4, [4, 2, 1]).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    shapes = [(8, 8), (4, 4), (2, 2)]
    query, value = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 84, 32, dtype=torch.float64)
    ref = torch.rand(2, 5, 1, 4, dtype=torch.float64) * 0.5 + 0.25
    starts = torch.tensor([0, 64, 80])
    out = attn(query, ref, value, shapes, starts)
    # by hand: per-level offsets and one softmax over all 7 points, each level sampled on its own
    v = attn.value_proj(value).view(2, 84, 4, 8)
    offsets = attn.sampling_offsets(query).view(2, 5, 4, 7, 2)
    weights = attn.attention_weights(query).view(2, 5, 4, 7).softmax(-1)
    total, first = 0, 0
    for lvl, (n, (h, w)) in enumerate(zip((4, 2, 1), shapes, strict=True)):
        loc = ref[:, :, None, :, :2] + offsets[:, :, :, first:first + n] / n * ref[:, :, None, :, 2:] * 0.5
        total = total + ms_deform_attn(v[:, starts[lvl]:starts[lvl] + h * w], [(h, w)], None, loc[:, :, :, None],
                                       weights[:, :, :, None, first:first + n], backend="reference")
        first += n
    torch.testing.assert_close(out, attn.output_proj(total), rtol=0, atol=1e-12)
    uniform, listed = MultiScaleDeformableAttention(32, 3, 4, 4), MultiScaleDeformableAttention(32, 3, 4, [4, 4, 4])
    listed.load_state_dict(uniform.state_dict())
    q, val, r = torch.randn(1, 5, 32), torch.randn(1, 84, 32), torch.rand(1, 5, 1, 4)
    assert torch.equal(uniform(q, r, val, shapes, starts), listed(q, r, val, shapes, starts))
    assert torch.equal(uniform.sampling_offsets.bias, listed.sampling_offsets.bias)  # the same radial init


def test_backbone_width_scales_every_stage_and_keeps_the_papers_network_at_one():
    from detrkit.backbones.resnet_vd import ResNetVd

    full, half = ResNetVd(18, norm="batch"), ResNetVd(18, norm="batch", width=0.5)
    assert full.channels == {"res3": 128, "res4": 256, "res5": 512}  # the paper's network: official keys load
    assert half.channels == {"res3": 64, "res4": 128, "res5": 256}
    n_full, n_half = (sum(p.numel() for p in m.parameters()) for m in (full, half))
    assert 0.2 < n_half / n_full < 0.3  # every conv is half as wide on both sides: about a quarter of the weights
    model = create_model("rtdetr_lite", num_classes=3, backbone_width=0.5).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 96, 96)).pred_logits.shape == (1, 100, 3)
    with pytest.raises(ValueError, match="width must be in"):
        ResNetVd(18, width=0)


def test_zero_init_residual_starts_every_block_as_its_shortcut():
    from detrkit.backbones.resnet_vd import ResNetVd

    x = torch.rand(2, 64, 16, 16)  # non-negative, as after a ReLU
    for zero, same in ((True, True), (False, False)):  # control: the default init's residual branch is not zero
        torch.manual_seed(0)
        block = ResNetVd(18, norm="batch", zero_init_residual=zero).res_layers[0].blocks[1].eval()  # identity shortcut
        with torch.no_grad():
            assert torch.equal(block(x), x) is same
    with pytest.raises(ValueError, match="zero_init_residual needs norm='batch'"):
        ResNetVd(18, norm="frozen", zero_init_residual=True)


def test_7x7_stem_gives_the_same_maps_for_a_fraction_of_the_deep_stems_work():
    from torch.utils.flop_counter import FlopCounterMode

    from detrkit.backbones.resnet_vd import ResNetVd

    x = torch.rand(1, 3, 64, 64)
    flops, shapes = {}, {}
    for stem in ("deep", "7x7"):  # control: the paper's deep stem (three 3x3 convolutions, official keys)
        backbone = ResNetVd(18, norm="batch", stem=stem).eval()
        with torch.no_grad():
            shapes[stem] = {k: v[0].shape for k, v in backbone(x).items()}
            counter = FlopCounterMode(display=False)
            with counter:
                backbone.conv1(x)
            flops[stem] = counter.get_total_flops()
        kernels = [m.kernel_size for m in backbone.conv1.modules() if isinstance(m, torch.nn.Conv2d)]
        assert kernels == ([(3, 3)] * 3 if stem == "deep" else [(7, 7)])
    assert shapes["7x7"] == shapes["deep"]  # the same stride-4 input to the first stage, the same returned maps
    assert flops["7x7"] < 0.4 * flops["deep"]  # 3*49*64 against 3*9*32 + 9*32*32 + 9*32*64 multiply-adds a pixel
    model = create_model("rtdetr_lite", num_classes=3, backbone_stem="7x7").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 96, 96)).pred_logits.shape == (1, 100, 3)
    with pytest.raises(ValueError, match="stem must be 'deep'"):
        ResNetVd(18, stem="3x3")
