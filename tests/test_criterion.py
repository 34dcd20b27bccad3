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
