"""Deformable DETR's mechanisms do what the paper says."""

import math

import pytest
import torch
from conftest import TINY

from detrkit import create_model
from detrkit.layers import MultiScaleDeformableAttention
from detrkit.losses import build_criterion
from detrkit.models.deformable_detr import encoder_proposals
from detrkit.models.encode import valid_ratios

SMALL = dict(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=3, dim_feedforward=64, num_queries=8)
SHAPES = torch.tensor([[8, 8], [4, 4]])


def test_sampling_offsets_start_on_a_radial_grid():
    attn = MultiScaleDeformableAttention(d_model=32, n_levels=2, n_heads=4, n_points=3)
    grid = attn.sampling_offsets.bias.view(4, 2, 3, 2)  # (heads, levels, points, xy)
    directions = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # heads look right, down, left, up
    for h, (dx, dy) in enumerate(directions):
        for k in range(3):
            torch.testing.assert_close(grid[h, 1, k], torch.tensor([dx * (k + 1.0), dy * (k + 1.0)]), atol=1e-6, rtol=0)
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.sampling_offsets.weight.abs().sum() == 0


def test_padded_values_are_ignored():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(d_model=32, n_levels=2, n_heads=4, n_points=4)
    value = torch.randn(1, 80, 32)
    mask = torch.zeros(1, 80, dtype=torch.bool)
    mask[:, 40:64] = True  # the bottom half of level 0
    query, ref = torch.randn(1, 5, 32), torch.rand(1, 5, 2, 2)
    a = attn(query, ref, value, SHAPES, None, mask)
    value[:, 40:64] = 1000 * torch.randn(1, 24, 32)
    b = attn(query, ref, value, SHAPES, None, mask)
    torch.testing.assert_close(a, b)


def test_box_references_scale_offsets_by_box_size():
    """With 4-D references, sampling points lie inside the box: offsets are fractions of its size."""
    attn = MultiScaleDeformableAttention(d_model=32, n_levels=2, n_heads=4, n_points=2)
    seen = {}
    import detrkit.layers.deformable as mod

    original = mod.ms_deform_attn

    def spy(value, shapes, starts, locations, weights, backend):
        seen["loc"] = locations
        return original(value, shapes, starts, locations, weights, backend=backend)

    mod.ms_deform_attn = spy
    try:
        box = torch.tensor([0.5, 0.5, 0.2, 0.4])
        attn(torch.zeros(1, 1, 32), box.expand(1, 1, 2, 4), torch.randn(1, 80, 32), SHAPES, None)
    finally:
        mod.ms_deform_attn = original
    loc = seen["loc"][0, 0]  # (heads, levels, points, 2)
    # initial offsets are k+1 on a unit grid, divided by points and scaled by half the box size: point 2 of the
    # right-looking head sits on the box's right edge
    torch.testing.assert_close(loc[0, 0, 1], torch.tensor([0.5 + 0.1, 0.5]))
    assert (loc[..., 0] >= 0.4 - 1e-6).all() and (loc[..., 0] <= 0.6 + 1e-6).all()


def test_valid_ratios_and_encoder_proposals():
    mask = torch.zeros(2, 4, 8, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 6:] = True
    torch.testing.assert_close(valid_ratios(mask), torch.tensor([[1.0, 1.0], [0.75, 0.75]]))
    memory = torch.randn(2, 32, 16)
    out_memory, proposals = encoder_proposals(memory, mask.flatten(1), torch.tensor([[4, 8]]))
    assert torch.isinf(proposals[1][mask[1].flatten()]).all()  # padded pixels can never be selected
    assert (out_memory[1][mask[1].flatten()] == 0).all()
    # a valid pixel's proposal is centred on it (in the valid region) with side 0.05
    box = proposals[0, 8 + 2].sigmoid()  # row 1, column 2 of image 0
    torch.testing.assert_close(box, torch.tensor([2.5 / 8, 1.5 / 4, 0.05, 0.05]))


def test_refinement_detaches_references_between_layers():
    """The final prediction's loss does not reach the first layer's box head through the reference chain."""
    torch.manual_seed(0)
    model = create_model("deformable_detr_r50_refine", num_classes=3, backbone="resnet18", **SMALL)
    out = model(torch.randn(1, 3, 128, 128))
    out.pred_boxes.sum().backward()
    first_head = model.bbox_embed[0].layers[-1].weight.grad
    last_head = model.bbox_embed[-1].layers[-1].weight.grad
    assert first_head is None or first_head.abs().sum() == 0
    assert last_head.abs().sum() > 0
    assert model.bbox_embed[0] is not model.bbox_embed[1]  # one head per layer


def test_plain_model_shares_one_head_across_layers():
    model = create_model("deformable_detr_r50", num_classes=3, backbone="resnet18", **SMALL)
    assert all(head is model.class_embed[0] for head in model.class_embed)
    assert model.decoder.bbox_embed is None


def test_two_stage_queries_are_the_top_k_encoder_proposals():
    torch.manual_seed(0)
    model = create_model("deformable_detr_r50_two_stage", num_classes=3, backbone="resnet18", **SMALL).eval()
    images = torch.randn(1, 3, 128, 128)
    memory, mask, shapes, starts, ratios = model._encode(images, None)
    _, _, reference, enc = model._select_topk_proposals(memory, mask, shapes)
    top = enc.pred_logits[0, :, 0].topk(SMALL["num_queries"]).indices
    torch.testing.assert_close(reference[0], enc.pred_boxes[0, top])
    out = model(images)
    assert out.enc_outputs.pred_logits.shape[1] == memory.shape[1]  # a proposal per encoder pixel
    losses = build_criterion(model)(
        model.train()(images), [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    )
    assert {"loss_class_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)


def test_focal_prior_initialisation():
    model = create_model("deformable_detr_lite", num_classes=3, **SMALL)
    torch.testing.assert_close(model.class_embed[0].bias, torch.full((3,), -math.log(99.0)))



def _selected_boxes(name: str, **kw) -> torch.Tensor:
    """The reference boxes a two-stage model's decoder starts from (cxcywh in [0, 1]) for one random image, with
    the encoder's box head set to widen every proposal (inverse-sigmoid w, h + 2: the anchors' side 0.05 becomes
    0.28), so that neighbouring proposals overlap (IoU about 0.6)."""
    torch.manual_seed(0)
    images = torch.rand(1, 3, 128, 128)
    dino = name == "dino_lite"
    model = create_model(name, num_classes=3, **{**(TINY if dino else SMALL), "num_queries": 20}, **kw,
                         **({} if dino else {"backbone": "resnet18"})).eval()
    last = (model.enc_out_bbox_embed if dino else model.bbox_embed[-1]).layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.0, 2.0, 2.0]))
        if dino:
            return model(images).enc_outputs.pred_boxes[0]  # DINO: the selected proposals' boxes
        memory, mask, shapes, _, _ = model._encode(images, None)
        return model._select_topk_proposals(memory, mask, shapes)[2][0]


@pytest.mark.parametrize("name", ["dino_lite", "deformable_detr_r50_two_stage"])
def test_distinct_queries_in_two_stage_models(name):
    """DDQ's distinct query selection (``query_nms``) in DINO and two-stage Deformable DETR: the selected proposals
    overlap each other by at most the IoU. Negative control: the plain top-k selects ones that overlap more.
    Without two-stage there are no proposals to select among: the error says so."""
    from torchvision.ops import box_convert, box_iou

    def worst_overlap(boxes):
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        return box_iou(xyxy, xyxy).triu(1).max().item()

    assert worst_overlap(_selected_boxes(name, query_nms=0.5)) <= 0.5
    assert worst_overlap(_selected_boxes(name)) > 0.5
    with pytest.raises(ValueError, match=r"query_nms must be an IoU in \(0, 1\]"):
        _selected_boxes(name, query_nms=0.0)
    single = "dino_lite" if name == "dino_lite" else "deformable_detr_lite"
    with pytest.raises(ValueError, match="needs two_stage=True"):
        create_model(single, num_classes=3, two_stage=False, query_nms=0.5)
