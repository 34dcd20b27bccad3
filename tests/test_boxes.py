import torch

from detrkit.ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou, inverse_sigmoid


def test_box_conversions_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.05, 0.1]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.075, 0.85, 0.125, 0.95]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)


def test_generalized_box_iou_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [4.0, 0.0, 6.0, 2.0]])
    giou = generalized_box_iou(a, b)
    # identical: 1; half-overlapping: IoU 1/3, hull equals union -> 1/3; disjoint with a gap: 0 - (12 - 8) / 12
    torch.testing.assert_close(giou, torch.tensor([[1.0, 1 / 3, -1 / 3]]))


def test_inverse_sigmoid_inverts_sigmoid():
    x = torch.linspace(-5, 5, 11)
    torch.testing.assert_close(inverse_sigmoid(x.sigmoid()), x, atol=1e-3, rtol=0)
