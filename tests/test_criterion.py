import pytest
import torch

from detrkit.losses import LossConfig, SetCriterion
from detrkit.models import DetectionOutput, LayerOutput


def _perfect_output(targets, num_queries=8, num_classes=4, focal=False):
    b = len(targets)
    k = num_classes if focal else num_classes + 1
    logits = torch.full((b, num_queries, k), -8.0)
    if not focal:
        logits[..., -1] = 8.0  # unmatched queries say no-object
    boxes = torch.full((b, num_queries, 4), 0.5)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n] = t["boxes"]
        logits[i, torch.arange(n), t["labels"]] = 8.0
        if not focal:
            logits[i, :n, -1] = -8.0
    return DetectionOutput(logits, boxes, aux_outputs=[LayerOutput(logits.clone(), boxes.clone())])


TARGETS = [
    {"labels": torch.tensor([0, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]])},
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]


def test_perfect_prediction_has_zero_box_losses_and_small_class_loss():
    losses = SetCriterion(4)(_perfect_output(TARGETS), TARGETS)
    assert set(losses) == {f"{name}{s}" for name in ("loss_class", "loss_bbox", "loss_giou") for s in ("", "_aux0")}
    for key in ("loss_bbox", "loss_giou", "loss_bbox_aux0", "loss_giou_aux0"):
        assert losses[key].item() < 1e-6, key
    assert losses["loss_class"].item() < 1e-3


def test_focal_perfect_prediction_has_zero_box_losses():
    losses = SetCriterion(4, LossConfig(focal=True, class_weight=2.0))(_perfect_output(TARGETS, focal=True), TARGETS)
    assert losses["loss_bbox"].item() < 1e-6 and losses["loss_giou"].item() < 1e-6
    assert losses["loss_class"].item() < 1e-3


def test_wrong_boxes_cost_more_and_gradients_flow():
    out = _perfect_output(TARGETS)
    out.pred_boxes = (out.pred_boxes + 0.05).requires_grad_()
    losses = SetCriterion(4)(out, TARGETS)
    assert losses["loss_bbox"].item() > 0.1
    sum(losses.values()).backward()
    assert out.pred_boxes.grad.abs().sum() > 0


def test_images_without_targets():
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    logits = torch.randn(2, 5, 5, requires_grad=True)
    losses = SetCriterion(4)(DetectionOutput(logits, torch.rand(2, 5, 4)), empty)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert torch.isfinite(losses["loss_class"])
    losses["loss_class"].backward()
    # everything is trained towards no-object: raising the no-object logit lowers the loss
    assert (logits.grad[..., -1] < 0).all()


def _half_iou_output(score: float, num_classes: int = 3):
    """One object (class 1); query 0 predicts a box of IoU 0.5 with it and class-1 score ``score``; query 1 is far
    away and sure there is nothing. Returns (outputs with a leaf logits tensor, targets)."""
    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.1], [0.9, 0.9, 0.05, 0.05]]])  # IoU 0.02 / 0.04 = 0.5, and 0
    logits = torch.full((1, 2, num_classes), -30.0, dtype=torch.float64)
    logits[0, 0, 1] = torch.logit(torch.tensor(score, dtype=torch.float64))
    logits.requires_grad_()
    return DetectionOutput(logits, boxes.double()), target, logits


@pytest.mark.parametrize("kind, target", [("varifocal", 0.5), ("mal", 0.5**1.5)])
def test_iou_aware_losses_train_the_score_towards_the_matched_iou(kind, target):
    config = LossConfig(focal=True, class_loss=kind, aux_loss=False)
    out, targets, logits = _half_iou_output(target)
    loss = SetCriterion(3, config)(out, targets)["loss_class"]
    (grad,) = torch.autograd.grad(loss, logits)
    # the formula's fixed point: score = IoU (varifocal) / IoU^1.5 (MAL) on the match, 0 elsewhere -> no gradient
    # (up to float32 rounding: the criterion computes its losses in float32)
    assert grad.abs().max() < 1e-6
    out, targets, logits = _half_iou_output(0.99)  # a confident score on a half-fitting box is pushed down
    (grad,) = torch.autograd.grad(SetCriterion(3, config)(out, targets)["loss_class"], logits)
    assert grad[0, 0, 1] > 1e-3
    # negative control: the focal loss's target is 1 whatever the IoU, so the same score keeps a gradient
    out, targets, logits = _half_iou_output(target)
    focal = SetCriterion(3, LossConfig(focal=True, aux_loss=False))(out, targets)["loss_class"]
    (grad,) = torch.autograd.grad(focal, logits)
    assert grad[0, 0, 1] < -1e-3


def test_class_loss_names_the_valid_choices():
    with pytest.raises(ValueError, match="class_loss='varifocal' does not fit a softmax model; choose one of ce"):
        LossConfig(focal=False, class_loss="varifocal")
    with pytest.raises(ValueError, match="choose one of focal, varifocal, mal"):
        LossConfig(focal=True, class_loss="vfl")


def test_build_criterion_follows_the_model_device():
    """A criterion built for a model on a device keeps its class weights there (first seen on CUDA: cross-entropy
    complained that its weight was on the CPU). The meta device stands in for CUDA on CPU-only machines."""
    from detrkit import create_model
    from detrkit.losses import build_criterion

    model = create_model("detr_lite", num_classes=3).to("meta")
    assert build_criterion(model).class_weights.device.type == "meta"
    # negative control: a bare SetCriterion stays on the CPU, which is what the CUDA step tripped on
    assert SetCriterion(3, model.loss_config).class_weights.device.type == "cpu"
