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
