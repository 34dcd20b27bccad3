"""D-FINE's distribution pieces (layers/fdr.py, losses/distribution.py): the paper's claims, each with a negative
control, and parity with HF transformers' D-FINE functions in float64 (random inputs)."""

from __future__ import annotations

import pytest
import torch
from _float64 import PromoteFloat32

from detrkit.layers.fdr import (
    LocationQualityEstimator,
    bin_targets,
    boxes_to_distances,
    distances_to_boxes,
    expected_distances,
    weighting_function,
)
from detrkit.losses.distribution import decoupled_distillation_loss, fine_grained_localization_loss
from detrkit.ops.boxes import box_cxcywh_to_xyxy

# D-FINE's settings (official configs): 32 bins + 1, up 0.5, reg_scale 4
REG_MAX, UP, SCALE = 32, 0.5, 4.0


def _anchors(n: int, gen: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    return torch.cat([centre, size], -1)


def test_weighting_function_has_the_papers_ends_zero_middle_and_finest_bins_near_zero():
    """Eq. 3: W(0) = -2a, W(N) = 2a, W(N/2) = 0, W(N/2 +- (N/2 - 1)) = +-a (a = up * reg_scale), odd symmetry, and
    the spacing grows away from the middle (fine corrections precise, coarse ones cheap)."""
    w = weighting_function(REG_MAX, UP, SCALE, dtype=torch.float64)
    a = UP * SCALE
    assert w.shape == (REG_MAX + 1,)
    assert w[0].item() == -2 * a and w[-1].item() == 2 * a and w[REG_MAX // 2].item() == 0.0
    torch.testing.assert_close(w[1], torch.tensor(-a, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(w[-2], torch.tensor(a, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(w, -w.flip(0), rtol=0, atol=0)
    gaps = w[REG_MAX // 2 + 1: -1].diff()
    assert (gaps > 0).all() and (gaps.diff() > 0).all()
    # negative control: evenly spaced bins with the same ends do not have finer bins near zero
    even = torch.linspace(-a, a, REG_MAX - 1, dtype=torch.float64)
    assert not (even[REG_MAX // 2:].diff().diff() > 1e-12).all()
    with pytest.raises(ValueError, match="even"):
        weighting_function(7, UP, SCALE)


def test_distances_and_boxes_are_inverse():
    """Eq. 1 both ways: the distances that put an anchor on a box decode back to that box."""
    gen = torch.Generator().manual_seed(0)
    anchors, boxes = _anchors(50, gen), _anchors(50, gen)
    d = boxes_to_distances(anchors, box_cxcywh_to_xyxy(boxes), SCALE)
    torch.testing.assert_close(distances_to_boxes(anchors, d, SCALE), boxes, rtol=0, atol=1e-12)
    # zero distances are the anchor itself
    torch.testing.assert_close(distances_to_boxes(anchors, torch.zeros_like(d), SCALE), anchors, rtol=0, atol=1e-15)


def test_fdr_refinement_moves_the_box_by_the_residual_distributions_expectation():
    """Eq. 4: a layer adds residual logits to the previous layer's distribution, and its box is the anchor decoded
    at the new expectation. A peaked residual on the bin W(k) moves an edge by about W(k) w / reg_scale; the
    previous layer's box stays where its own logits put it (negative control: without the residual, no move)."""
    w = weighting_function(REG_MAX, UP, SCALE, dtype=torch.float64)
    anchor = torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)
    previous = torch.zeros(1, 4 * (REG_MAX + 1), dtype=torch.float64)
    previous.view(4, REG_MAX + 1)[:, REG_MAX // 2] = 30.0  # every edge at W = 0: the anchor
    residual = torch.zeros_like(previous)
    residual.view(4, REG_MAX + 1)[2, REG_MAX // 2 + 3] = 60.0  # the right edge moves to W(N/2 + 3)
    before = distances_to_boxes(anchor, expected_distances(previous, w), SCALE)
    after = distances_to_boxes(anchor, expected_distances(previous + residual, w), SCALE)
    torch.testing.assert_close(before, anchor, rtol=0, atol=1e-9)
    moved = box_cxcywh_to_xyxy(after) - box_cxcywh_to_xyxy(before)
    torch.testing.assert_close(moved, torch.tensor([[0, 0, w[REG_MAX // 2 + 3].item() * 0.2 / SCALE, 0]],
                                                   dtype=torch.float64), rtol=0, atol=1e-9)


def test_bin_targets_interpolate_the_target_between_two_bins():
    """Section 3.2: W[left] w_left + W[left + 1] w_right is the target inside W's range; outside, one end bin."""
    w = weighting_function(REG_MAX, UP, SCALE, dtype=torch.float64)
    targets = torch.linspace(-3.9, 3.9, 40, dtype=torch.float64).reshape(-1, 4)
    index, w_left, w_right = bin_targets(targets, w)
    torch.testing.assert_close(w[index] * w_left + w[index + 1] * w_right, targets, rtol=0, atol=1e-12)
    assert ((w_left >= 0) & (w_right >= 0)).all()
    index, w_left, w_right = bin_targets(torch.tensor([-9.0, 9.0], dtype=torch.float64), w)
    assert index.tolist() == [0, REG_MAX - 1] and w_left.tolist() == [1.0, 0.0] and w_right.tolist() == [0.0, 1.0]


def test_the_localization_loss_is_least_at_the_targets_two_bins():
    """FGL is smallest for a distribution that puts the target's two shares on its two bins, and larger for one
    peaked elsewhere (negative control)."""
    w = weighting_function(REG_MAX, UP, SCALE, dtype=torch.float64)
    target = torch.tensor([[0.3, -0.7, 1.1, 0.05]], dtype=torch.float64)
    index, w_left, w_right = bin_targets(target, w)
    right = torch.full((1, 4, REG_MAX + 1), -30.0, dtype=torch.float64)
    right.scatter_(2, index[..., None], w_left[..., None].log()).scatter_(2, index[..., None] + 1,
                                                                          w_right[..., None].log())
    wrong = torch.roll(right, 5, dims=2)
    iou = torch.ones(1, dtype=torch.float64)
    best = fine_grained_localization_loss(right.flatten(1), index, w_left, w_right, iou, 1.0)
    worse = fine_grained_localization_loss(wrong.flatten(1), index, w_left, w_right, iou, 1.0)
    assert best < worse
    assert fine_grained_localization_loss(wrong.flatten(1), index, w_left, w_right, 0 * iou, 1.0) == 0


def test_distillation_is_zero_when_earlier_layers_equal_the_last():
    """GO-LSD (section 3.3): the DDF term vanishes where a layer already predicts the last layer's distributions
    and is positive where it does not (negative control); its gradient reaches the student, never the teacher."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 5, 4 * (REG_MAX + 1), generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(2, 5, generator=gen, dtype=torch.float64)
    matched = torch.zeros(2, 5, dtype=torch.bool)
    matched[0, 1] = matched[1, 3] = True
    assert decoupled_distillation_loss(teacher, teacher, weight, matched).item() == 0.0
    student = (teacher.detach() + 0.5 * torch.randn(teacher.shape, generator=gen, dtype=torch.float64)
               ).requires_grad_()
    loss = decoupled_distillation_loss(student, teacher, weight, matched)
    assert loss > 0
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    near = decoupled_distillation_loss(teacher.detach() + 1e-3, teacher, weight, matched)
    assert near < 1e-6  # a shift of every logit leaves each softmax unchanged


transformers = pytest.importorskip("transformers")
hf_dfine = pytest.importorskip("transformers.models.d_fine.modeling_d_fine")
hf_loss = pytest.importorskip("transformers.loss.loss_d_fine")


@pytest.mark.parametrize(("reg_max", "up", "reg_scale"), [(32, 0.5, 4.0), (16, 0.5, 8.0), (8, 1.0, 2.0)])
def test_weighting_function_matches_hf(reg_max, up, reg_scale):
    # HF keeps up and reg_scale as one-element parameters
    theirs = hf_dfine.weighting_function(reg_max, torch.tensor([up], dtype=torch.float64),
                                         torch.tensor([reg_scale], dtype=torch.float64))
    ours = weighting_function(reg_max, up, reg_scale, dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-13)


def test_box_decoding_expectation_and_targets_match_hf():
    gen = torch.Generator().manual_seed(2)
    w = weighting_function(REG_MAX, UP, SCALE, dtype=torch.float64)
    anchors = _anchors(30, gen)
    corners = torch.randn(1, 30, 4 * (REG_MAX + 1), generator=gen, dtype=torch.float64) * 3
    config = transformers.DFineConfig(max_num_bins=REG_MAX)
    theirs = hf_dfine.DFineIntegral(config)(corners, w)
    ours = expected_distances(corners, w)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-13)
    torch.testing.assert_close(distances_to_boxes(anchors, ours[0], SCALE),
                               hf_dfine.distance2bbox(anchors, theirs[0], SCALE), rtol=0, atol=1e-14)
    boxes = box_cxcywh_to_xyxy(_anchors(30, gen))
    up = torch.tensor([UP], dtype=torch.float64)
    with torch.no_grad(), PromoteFloat32():  # HF's targets start as float32 (``indices.float()``)
        t_index, t_right, t_left = hf_loss.bbox2distance(anchors, boxes, REG_MAX, SCALE, up)
    index, w_left, w_right = bin_targets(boxes_to_distances(anchors, boxes, SCALE), w)
    assert (index.reshape(-1) == t_index.long()).all()
    torch.testing.assert_close(w_left.reshape(-1), t_left, rtol=0, atol=1e-12)
    torch.testing.assert_close(w_right.reshape(-1), t_right, rtol=0, atol=1e-12)


def test_quality_estimator_and_losses_match_hf():
    gen = torch.Generator().manual_seed(3)
    config = transformers.DFineConfig(max_num_bins=REG_MAX)
    theirs = hf_dfine.DFineLQE(config).double()
    ours = LocationQualityEstimator(REG_MAX, config.top_prob_values, config.lqe_hidden_dim, config.lqe_layers).double()
    ours.load_state_dict(theirs.state_dict())  # the official names: reg_conf.layers.{i}
    logits = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    corners = torch.randn(2, 7, 4 * (REG_MAX + 1), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ours(logits, corners), theirs(logits, corners), rtol=0, atol=1e-14)

    # FGL: HF's unimodal distribution focal loss on the same targets and IoU weights
    w = weighting_function(REG_MAX, UP, SCALE, dtype=torch.float64)
    anchors, boxes = _anchors(6, gen), box_cxcywh_to_xyxy(_anchors(6, gen))
    index, w_left, w_right = bin_targets(boxes_to_distances(anchors, boxes, SCALE), w)
    pred = torch.randn(6, 4 * (REG_MAX + 1), generator=gen, dtype=torch.float64)
    iou = torch.rand(6, generator=gen, dtype=torch.float64)
    loss = hf_loss.DFineLoss.__new__(hf_loss.DFineLoss)  # the method uses no state
    with PromoteFloat32():  # HF casts the IoU weights to float32 (``weight.float()``)
        expected = loss.unimodal_distribution_focal_loss(pred.reshape(-1, REG_MAX + 1), index.reshape(-1).double(),
                                                         w_right, w_left, iou.repeat_interleave(4), avg_factor=3.0)
    got = fine_grained_localization_loss(pred, index, w_left, w_right, iou, 3.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)


def test_distillation_matches_hf():
    """DDF against HF's ``loss_local`` (which also returns FGL) on matched queries of a random batch; the weights as
    D-FINE builds them: the teacher's class confidence, the IoU with the target where matched."""
    from torchvision.ops import box_iou

    gen = torch.Generator().manual_seed(4)
    b, n = 2, 6
    corners = torch.randn(b, n, 4 * (REG_MAX + 1), generator=gen, dtype=torch.float64)
    teacher = torch.randn(b, n, 4 * (REG_MAX + 1), generator=gen, dtype=torch.float64)
    teacher_logits = torch.randn(b, n, 3, generator=gen, dtype=torch.float64)
    pred_boxes, refs = _anchors(b * n, gen).view(b, n, 4), _anchors(b * n, gen).view(b, n, 4)
    targets = [{"boxes": _anchors(2, gen), "class_labels": torch.tensor([0, 1])} for _ in range(b)]
    indices = [(torch.tensor([1, 4]), torch.tensor([0, 1])), (torch.tensor([0, 5]), torch.tensor([1, 0]))]
    outputs = {"pred_corners": corners, "ref_points": refs, "pred_boxes": pred_boxes, "teacher_corners": teacher,
               "teacher_logits": teacher_logits}
    criterion = hf_loss.DFineLoss(transformers.DFineConfig(max_num_bins=REG_MAX, reg_scale=SCALE, up=UP))
    with PromoteFloat32():
        expected = criterion.loss_local(outputs, targets, indices, num_boxes=4.0)

    matched = torch.zeros(b, n, dtype=torch.bool)
    weight = teacher_logits.sigmoid().max(-1).values
    for i, (src, tgt) in enumerate(indices):
        matched[i, src] = True
        weight[i, src] = box_iou(box_cxcywh_to_xyxy(pred_boxes[i, src]),
                                 box_cxcywh_to_xyxy(targets[i]["boxes"][tgt])).diagonal()
    got = decoupled_distillation_loss(corners, teacher, weight, matched)
    torch.testing.assert_close(got, expected["loss_ddf"], rtol=0, atol=1e-13)


def _hf_to_detrkit(state: dict, renames: list[tuple[str, str]]) -> dict:
    """HF D-FINE module keys -> detrkit's: the given renames, q / k / v joined as nn.MultiheadAttention's, HF's
    derived buffers and fixed parameters (W(n)'s ``up`` / ``reg_scale``, 1 / points) dropped."""
    import re

    from detrkit.weights.hf import _merge_qkv

    out = {}
    for key, value in state.items():
        if key in ("reg_scale", "up") or key.endswith("num_points_scale"):
            continue
        for old, new in renames:
            key = re.sub(old, new, key)
        out[key] = value
    return _merge_qkv(out)


_HF_DECODER = [(r"\.self_attn_layer_norm\.", ".norm1."), (r"\.encoder_attn\.", ".cross_attn."),
               (r"\.mlp\.layers\.0\.", ".linear1."), (r"\.mlp\.layers\.1\.", ".linear2."),
               (r"\.final_layer_norm\.", ".norm3.")]
_HF_ENCODER = [(r"^aifi\.", "encoder."), (r"\.self_attn_layer_norm\.", ".norm1."),
               (r"\.mlp\.layers\.0\.", ".linear1."), (r"\.mlp\.layers\.1\.", ".linear2."),
               (r"\.final_layer_norm\.", ".norm2.")]


@pytest.mark.parametrize("training", [False, True])
def test_fdr_decoder_matches_hf(training):
    """The whole FDR decoder (3 layers, points 3 / 6 / 3, 8 bins) against HF's DFineDecoder with its heads, in
    float64 from the same random weights: pre-FDR box and logits, every layer's logits, boxes and corners."""
    from detrkit.layers.dfine_decoder import DFineDecoderLayer, FDRDecoder

    torch.manual_seed(5)
    d, heads, levels, reg_max, classes = 32, 4, 3, 8, 5
    config = transformers.DFineConfig(d_model=d, decoder_attention_heads=heads, decoder_layers=3,
                                      decoder_ffn_dim=64, num_feature_levels=levels, decoder_n_points=[3, 6, 3],
                                      max_num_bins=reg_max, num_labels=classes, reg_scale=4.0, up=0.5)
    config._attn_implementation = "eager"
    theirs = hf_dfine.DFineDecoder(config)
    theirs.class_embed = torch.nn.ModuleList(torch.nn.Linear(d, classes) for _ in range(3))
    theirs.bbox_embed = torch.nn.ModuleList(hf_dfine.DFineMLP(d, d, 4 * (reg_max + 1), 3) for _ in range(3))
    with torch.no_grad():
        for p in theirs.parameters():  # HF starts some heads at zero: random weights exercise every path
            if p.requires_grad:
                p.normal_(0, 0.3)
    theirs = theirs.double().train(training)
    for layer in theirs.layers:  # HF keeps 1 / points as a float32 buffer: rounded, whatever .double() does later
        layer.encoder_attn.num_points_scale = torch.tensor([1 / n for n in (3, 6, 3) for _ in range(n)],
                                                           dtype=torch.float64)
    layer = DFineDecoderLayer(d, 64, 0.0, levels, heads, [3, 6, 3])
    ours = FDRDecoder(layer, 3, d, classes, reg_max=reg_max, reg_scale=4.0, up=0.5).double().train(training)
    ours.load_state_dict(_hf_to_detrkit(theirs.state_dict(), _HF_DECODER))

    shapes = [(8, 8), (4, 4), (2, 2)]
    memory = torch.randn(2, sum(h * w for h, w in shapes), d, dtype=torch.float64)
    tgt = torch.randn(2, 10, d, dtype=torch.float64)
    anchors = torch.randn(2, 10, 4, dtype=torch.float64)
    shapes_t = torch.tensor(shapes)
    start = torch.tensor([0, 64, 80])
    got = ours(tgt, anchors, memory, shapes_t, start)
    with PromoteFloat32():
        hf = theirs(encoder_hidden_states=memory, reference_points=anchors, inputs_embeds=tgt,
                    spatial_shapes=shapes_t, spatial_shapes_list=shapes, level_start_index=start)
    if training:  # HF: [layer 0's pre-FDR output, then every layer's]
        torch.testing.assert_close(got.pre_logits, hf.intermediate_logits[:, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got.pre_boxes, hf.intermediate_reference_points[:, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got.logits.transpose(0, 1), hf.intermediate_logits[:, 1:], rtol=0, atol=1e-12)
        torch.testing.assert_close(got.boxes.transpose(0, 1), hf.intermediate_reference_points[:, 1:], rtol=0,
                                   atol=1e-12)
        torch.testing.assert_close(got.corners.transpose(0, 1), hf.intermediate_predicted_corners, rtol=0,
                                   atol=1e-12)
    else:  # HF keeps the last layer's outputs only
        torch.testing.assert_close(got.logits[-1], hf.intermediate_logits[:, -1], rtol=0, atol=1e-12)
        torch.testing.assert_close(got.boxes[-1], hf.intermediate_reference_points[:, -1], rtol=0, atol=1e-12)
    torch.testing.assert_close(got.hidden, hf.intermediate_hidden_states, rtol=0, atol=1e-12)


def test_fdr_decoder_layers_add_residual_distributions_to_the_previous_layers():
    """Eq. 4 in the decoder: layer l's logits are layer l-1's plus its head's output (from its hidden state and the
    previous one's), its box is the anchor decoded at their expectation, and the sum stays undetached (layer l's
    loss trains layer l-1's head). Negative control: the residual alone does not give layer l's logits."""
    from detrkit.layers.dfine_decoder import DFineDecoderLayer, FDRDecoder

    torch.manual_seed(6)
    dec = FDRDecoder(DFineDecoderLayer(32, 64, 0.0, 2, 4, 2), 3, 32, 3, reg_max=8).double()
    with torch.no_grad():
        for head in dec.bbox_embed:  # non-zero distribution heads
            head.layers[-1].weight.normal_(0, 0.5)
    memory = torch.randn(1, 20, 32, dtype=torch.float64)
    out = dec(torch.randn(1, 6, 32, dtype=torch.float64), torch.randn(1, 6, 4, dtype=torch.float64), memory,
              torch.tensor([[4, 4], [2, 2]]), torch.tensor([0, 16]))
    w = weighting_function(8, 0.5, 4.0, dtype=torch.float64)
    for lid in (1, 2):
        residual = dec.bbox_embed[lid](out.hidden[lid] + out.hidden[lid - 1])
        torch.testing.assert_close(out.corners[lid], out.corners[lid - 1] + residual, rtol=0, atol=1e-12)
        assert not torch.allclose(out.corners[lid], residual, atol=1e-3)
        torch.testing.assert_close(out.boxes[lid], distances_to_boxes(out.anchors, expected_distances(
            out.corners[lid], w), 4.0), rtol=0, atol=1e-12)
    out.corners[2].sum().backward()
    assert dec.bbox_embed[0].layers[-1].weight.grad.abs().sum() > 0


def test_gelan_hybrid_encoder_matches_hf():
    """D-FINE's hybrid encoder (AIFI, then FPN / PAN with GELAN blocks and SCDown) against HF's
    DFineHybridEncoder in float64, from the same random weights and BatchNorm statistics (input projections
    aside: HF keeps them in the model)."""
    from detrkit.layers.hybrid_encoder import HybridEncoder

    torch.manual_seed(7)
    d = 32
    config = transformers.DFineConfig(encoder_hidden_dim=d, encoder_in_channels=[d, d, d], encoder_ffn_dim=64,
                                      encoder_attention_heads=4, depth_mult=0.67, hidden_expansion=0.5)
    config._attn_implementation = "eager"
    theirs = hf_dfine.DFineHybridEncoder(config)
    with torch.no_grad():
        for name, t in theirs.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.3)
    theirs = theirs.double().eval()
    ours = HybridEncoder((d, d, d), hidden_dim=d, nhead=4, dim_feedforward=64, depth_mult=0.67, expansion=0.5,
                         fusion="gelan").double().eval()
    missing = ours.load_state_dict(_hf_to_detrkit(theirs.state_dict(), _HF_ENCODER), strict=False)
    assert not missing.unexpected_keys and all(k.startswith("input_proj.") for k in missing.missing_keys)
    ours.input_proj = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))
    feats = [torch.randn(2, d, s, s * 5 // 4, dtype=torch.float64) for s in (16, 8, 4)]  # non-square
    got = ours([f.clone() for f in feats])
    with PromoteFloat32():
        hf = theirs(inputs_embeds=[f.clone() for f in feats]).last_hidden_state
    for a, b in zip(got, hf, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # negative control: RT-DETR's CSP fusion with the same names is a different network
    assert HybridEncoder((d, d, d), hidden_dim=d, depth_mult=0.67, expansion=0.5).downsample_convs[0].__class__ \
        is not ours.downsample_convs[0].__class__
