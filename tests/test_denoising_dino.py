"""DN-DETR / DINO mechanisms do what the papers say: masks, noise, contrastive negatives, look forward twice,
mixed query selection, and denoising gone at inference."""

import copy

import pytest
import torch
from conftest import TINY

from detrkit import create_model
from detrkit.layers.denoising import DenoisingConfig, DenoisingLayout, build_dn_queries, dn_slots
from detrkit.losses import build_criterion
from detrkit.models.deformable_detr import encoder_proposals
from detrkit.models.outputs import DetectionOutput, LayerOutput
from detrkit.ops import box_cxcywh_to_xyxy


def _inputs():
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 48:, :] = True
    targets = [{"labels": torch.tensor([0, 2, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.5, 0.3, 0.2],
                                                                          [0.5, 0.5, 0.4, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.3, 0.4, 0.2]])}]
    return images, mask, targets


DN_MODELS = ["dn_dab_detr_lite", "dino_lite", "dn_deformable_detr_r50"]


@pytest.mark.parametrize("name", DN_MODELS)
@pytest.mark.parametrize("use_mask", [True, False])
def test_dn_mask_blocks_leakage(name, use_mask):
    """Perturbing group 1's denoising queries changes neither the matching queries nor group 0 (DN-DETR 3.4);
    without the mask (negative control) the matching queries do change."""
    model = create_model(name, num_classes=3, **{**TINY, "dropout": 0.0}).train()
    images, mask, targets = _inputs()
    state = {}

    def perturb(module, args):
        args = list(args)
        meta_n, group_size = state["n"], state["group_size"]
        tgt = args[0].clone()
        tgt[:, group_size : 2 * group_size] += 5 * torch.randn_like(tgt[:, group_size : 2 * group_size])
        args[0] = tgt
        if not use_mask:
            args[-1] = None
        assert args[0].shape[1] == meta_n + TINY["num_queries"]
        return tuple(args)

    def run(hook: bool):
        torch.manual_seed(1)  # the same noise in both runs
        handle = model.decoder.register_forward_pre_hook(perturb) if hook else None
        out = model(images, mask, targets)
        if handle:
            handle.remove()
        return out

    ref = run(False)
    meta = ref.dn_meta
    assert meta.num_groups >= 2
    state.update(n=meta.num_dn, group_size=meta.group_size)
    out = run(True)
    g = meta.group_size
    same_matching = torch.allclose(out.pred_logits, ref.pred_logits, atol=1e-6, rtol=0)
    if use_mask:
        assert same_matching
        assert torch.allclose(out.pred_boxes, ref.pred_boxes, atol=1e-6, rtol=0)
        dn_ref, dn_out = ref.dn_outputs[-1], out.dn_outputs[-1]
        assert torch.allclose(dn_out.pred_logits[:, :g], dn_ref.pred_logits[:, :g], atol=1e-6, rtol=0)  # group 0
        assert not torch.allclose(dn_out.pred_logits[:, g : 2 * g], dn_ref.pred_logits[:, g : 2 * g])  # group 1
    else:
        assert not same_matching


def test_dn_query_layout_and_mask():
    _, _, targets = _inputs()
    torch.manual_seed(0)
    labels, boxes, attn_mask, meta = build_dn_queries(targets, 3, 7, DenoisingConfig(num_dn_pairs=12, contrastive=True))
    assert meta == DenoisingLayout(num_dn=24, num_groups=4, group_size=6, max_objects=3, contrastive=True)
    assert labels.shape == (2, 24) and boxes.shape == (2, 24, 4) and attn_mask.shape == (31, 31)
    assert attn_mask[24:, :24].all() and not attn_mask[24:, 24:].any()  # matching queries never see DN queries
    assert not attn_mask[:24, 24:].any()  # DN queries may see the matching ones
    for g in range(4):
        block = attn_mask[g * 6 : (g + 1) * 6, :24]
        assert not block[:, g * 6 : (g + 1) * 6].any()  # within a group: visible
        assert block.sum() == 6 * 18  # every other group: blocked
    # image 1 has one object: slots 1, 2 (positives) and 4, 5 (negatives) of each group are empty
    assert (labels[1].view(4, 6)[:, [1, 2, 4, 5]] == 3).all()


def test_contrastive_noise_ranges():
    """DINO 3.3: positives are moved by less than lambda * (w/2, h/2) per corner, negatives by lambda..2 lambda."""
    torch.manual_seed(0)
    n = 200
    targets = [{"labels": torch.randint(0, 5, (n,)), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(n, 1)}]
    lam = 0.4
    labels, boxes, _, meta = build_dn_queries(
        targets, 5, 10, DenoisingConfig(num_dn_pairs=n, box_noise_scale=lam, label_noise=0.25)
    )
    gt = box_cxcywh_to_xyxy(targets[0]["boxes"][:1])
    moved = (box_cxcywh_to_xyxy(boxes[0]) - gt).abs() / (0.2 / 2 * lam)  # (N, 4) in units of lambda * w / 2
    pos, neg = moved[:n], moved[n:]
    assert (pos < 1 + 1e-4).all() and (neg >= 1 - 1e-4).all() and (neg < 2 + 1e-4).all()
    flipped = (labels[0, :n] != targets[0]["labels"]).float().mean().item()
    assert 0.1 < flipped < 0.3  # p = 0.25, minus the flips that land on the same class


def test_negatives_are_trained_towards_no_object():
    """The denoising class loss wants negatives to score no class; boxes are supervised on positives only."""
    model = create_model("dino_lite", num_classes=3, **TINY)
    criterion = build_criterion(model)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.5, 0.3, 0.2]])}]
    meta = DenoisingLayout(num_dn=8, num_groups=2, group_size=4, max_objects=2, contrastive=True)
    b_idx, slot, t_idx, positive = dn_slots(meta, targets)
    assert slot.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and positive.tolist() == [True, True, False, False] * 2
    assert t_idx.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]

    def losses(neg_predicts_class: bool, neg_boxes: torch.Tensor):
        logits = torch.full((1, 8, 3), -12.0)
        boxes = torch.zeros(1, 8, 4)
        for s, j, p in zip(slot.tolist(), t_idx.tolist(), positive.tolist(), strict=False):
            if p or neg_predicts_class:
                logits[0, s, targets[0]["labels"][j]] = 12.0
            boxes[0, s] = targets[0]["boxes"][j] if p else neg_boxes
        out = DetectionOutput(pred_logits=torch.zeros(1, 5, 3), pred_boxes=torch.full((1, 5, 4), 0.5),
                              dn_meta=meta, dn_outputs=[LayerOutput(logits, boxes)])
        return criterion(out, targets)

    good = losses(False, torch.tensor([0.5, 0.5, 0.1, 0.1]))
    assert good["loss_class_dn"] < 1e-3 and good["loss_bbox_dn"] < 1e-6 and good["loss_giou_dn"] < 1e-6
    moved = losses(False, torch.tensor([0.9, 0.9, 0.05, 0.05]))
    assert torch.equal(moved["loss_bbox_dn"], good["loss_bbox_dn"])  # negatives' boxes are not supervised
    bad = losses(True, torch.tensor([0.5, 0.5, 0.1, 0.1]))
    assert bad["loss_class_dn"] > 1.0  # a negative claiming the object's class is penalised


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_look_forward_twice_gradients(look_forward_twice):
    """DINO 3.4: layer 1's box loss reaches layer 0's box head only with look forward twice; the reference
    passed to layer 1 stays detached (layer 1's content never sends gradient to layer 0's box head)."""
    model = create_model("dino_lite", num_classes=3, **TINY, look_forward_twice=look_forward_twice, denoising=None,
                         two_stage=False).train()
    heads = torch.nn.ModuleList(copy.deepcopy(model.bbox_embed[0]) for _ in model.bbox_embed)  # unshared, to tell apart
    for h in heads:
        torch.nn.init.normal_(h.layers[-1].weight, std=0.1)
    model.bbox_embed = model.decoder.bbox_embed = heads
    images, mask, _ = _inputs()

    out = model(images, mask)
    out.pred_boxes.sum().backward()  # layer 1 (the last of TINY's 2 decoder layers)
    grad = heads[0].layers[-1].weight.grad
    if look_forward_twice:
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None or grad.abs().sum() == 0

    model.zero_grad(set_to_none=True)
    captured = {}
    model.decoder.layers[1].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
    model(images, mask)
    captured["h"].sum().backward()  # layer 1's content depends on its (detached) input reference only
    grad = heads[0].layers[-1].weight.grad
    assert grad is None or grad.abs().sum() == 0


def test_mixed_query_selection_uses_topk_proposals():
    """DINO 3.2: the decoder's anchors are the top-k encoder proposals (by best class score), its content
    queries the learned embeddings."""
    model = create_model("dino_lite", num_classes=3, **TINY).eval()
    images, mask, _ = _inputs()
    captured = {}
    model.decoder.register_forward_pre_hook(lambda m, a: captured.update(tgt=a[0], anchors=a[1]))
    with torch.no_grad():
        out = model(images, mask)
        memory, flat_mask, shapes, _, _ = model._encode(images, mask)
        mem, proposals = encoder_proposals(memory, flat_mask, shapes)
        mem = model.enc_output_norm(model.enc_output(mem))
        scores = model.enc_out_class_embed(mem).max(-1).values  # (B, S)
        coords = model.enc_out_bbox_embed(mem) + proposals
    k = TINY["num_queries"]
    for b in range(2):
        top = scores[b].argsort(descending=True)[:k]
        assert torch.allclose(captured["anchors"][b], coords[b, top], atol=1e-5)
        assert torch.allclose(out.enc_outputs.pred_boxes[b], coords[b, top].sigmoid(), atol=1e-6)
    assert torch.equal(captured["tgt"][0], model.tgt_embed.weight[:k])


@pytest.mark.parametrize("name", DN_MODELS)
def test_inference_ignores_denoising(name):
    model = create_model(name, num_classes=3, **{**TINY, "dropout": 0.0})
    images, mask, targets = _inputs()
    model.train()
    out = model(images, mask, targets)
    assert out.dn_meta is not None and out.pred_logits.shape[1] == TINY["num_queries"]
    assert {"loss_class_dn", "loss_bbox_dn", "loss_giou_dn", "loss_class_dn_aux0"} <= set(
        build_criterion(model)(out, targets)
    )
    model.eval()
    a, b = model(images, mask), model(images, mask, targets)
    assert a.dn_meta is None and b.dn_meta is None
    assert torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_boxes, b.pred_boxes)


@pytest.mark.parametrize("preset, base", [("rtdetr_lite", "RTDETR_NOISE"), ("dino_lite", "DINO_NOISE"),
                                          ("dn_dab_detr_lite", "DN_DETR_NOISE")])
def test_a_denoising_dict_changes_only_the_fields_it_names_of_the_presets_setting(preset, base):
    import dataclasses

    from detrkit.layers import denoising as dn
    from detrkit.models import rt_detr

    own = getattr(rt_detr if base == "RTDETR_NOISE" else dn, base)
    assert create_model(preset, num_classes=3).denoising == own
    model = create_model(preset, num_classes=3, denoising={"num_dn_pairs": 50})
    assert model.denoising == dataclasses.replace(own, num_dn_pairs=50)
    if base == "RTDETR_NOISE":  # RT-DETR's box noise (1.0) is not DenoisingConfig's default (0.4, DINO's)
        assert model.denoising.box_noise_scale == 1.0 != DenoisingConfig().box_noise_scale
    assert create_model(preset, num_classes=3, denoising=None).denoising is None
    assert create_model(preset, num_classes=3, denoising=DenoisingConfig(num_groups=2)).denoising.num_groups == 2
