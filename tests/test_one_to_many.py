"""Hybrid matching (H-DETR): one-to-many queries in training only, hidden from the one-to-one queries."""

import pytest
import torch

import detrkit.models.dab_detr as dab
import detrkit.models.deformable_detr as deformable
import detrkit.models.detr as detr
import detrkit.models.dino as dino
import detrkit.models.rt_detr as rt_detr
from detrkit import create_model
from detrkit.layers.one_to_many import hide_one_to_many, repeat_targets
from detrkit.losses import build_criterion

SMALL = dict(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=3, dim_feedforward=64, num_queries=8,
             backbone="resnet18")
HYBRID = dict(one_to_many="hybrid", o2m_queries=24, o2m_k=3)
TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]])},
           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def _pair(preset: str):
    """The same weights with and without the one-to-many branch."""
    torch.manual_seed(0)
    hybrid = create_model(preset, num_classes=3, **SMALL, **HYBRID)
    plain = create_model(preset, num_classes=3, **SMALL)
    missing, unexpected = plain.load_state_dict(hybrid.state_dict(), strict=False)
    assert not missing and all("_o2m." in k for k in unexpected)  # two-stage Deformable DETR adds none
    return hybrid, plain


PRESETS = ["deformable_detr_lite", "deformable_detr_r50_two_stage", "dino_lite", "dn_deformable_detr_r50",
           "dab_detr_lite", "dn_dab_detr_lite", "detr_lite"]


@pytest.mark.parametrize("preset", PRESETS)
def test_the_one_to_many_queries_do_not_exist_at_inference(preset):
    hybrid, plain = _pair(preset)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a, b = hybrid.eval()(images), plain.eval()(images)
    assert a.o2m_outputs is None
    assert torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_boxes, b.pred_boxes)


def _train_forward(model, images, *, perturb: bool):
    if perturb:  # the one-to-many queries' own parameters, from a generator of their own (denoising draws the same)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "_o2m." in name:
                    p.add_(torch.randn(p.shape, generator=g))
    torch.manual_seed(1)
    return model.train()(images, targets=TARGETS)


@pytest.mark.parametrize("preset", ["deformable_detr_lite", "dino_lite", "dn_dab_detr_lite", "detr_lite"])
def test_the_mask_hides_the_one_to_many_queries_from_the_one_to_one_queries(preset, monkeypatch):
    """Perturbing the one-to-many queries leaves the one-to-one (and denoising) outputs as they were."""
    hybrid, _ = _pair(preset)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        before = _train_forward(hybrid, images, perturb=False)
        after = _train_forward(hybrid, images, perturb=True)
    assert len(before.o2m_outputs) == SMALL["num_decoder_layers"] and before.o2m_k == 3
    assert before.o2m_outputs[-1].pred_logits.shape[:2] == (2, 24)
    assert not torch.allclose(before.o2m_outputs[-1].pred_logits, after.o2m_outputs[-1].pred_logits)
    torch.testing.assert_close(after.pred_logits, before.pred_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.pred_boxes, before.pred_boxes, rtol=0, atol=1e-6)
    if before.dn_outputs is not None:
        torch.testing.assert_close(after.dn_outputs[-1].pred_logits, before.dn_outputs[-1].pred_logits, rtol=0,
                                   atol=1e-6)
    # negative control: without the mask the one-to-one queries attend to the perturbed ones and change
    monkeypatch.setattr(deformable, "separated_self_attn_mask", lambda *args: None)
    monkeypatch.setattr(dino, "hide_after_denoising", lambda mask, *args: mask)
    monkeypatch.setattr(dab, "hide_after_denoising", lambda mask, *args: mask)
    monkeypatch.setattr(detr, "separated_self_attn_mask", lambda *args: None)
    with torch.no_grad():
        before = _train_forward(hybrid, images, perturb=False)
        after = _train_forward(hybrid, images, perturb=True)
    assert (after.pred_logits - before.pred_logits).abs().max() > 1e-4


def test_each_object_is_matched_k_times_and_every_layer_gets_o2m_losses():
    hybrid, _ = _pair("deformable_detr_lite")
    out = hybrid.train()(torch.randn(2, 3, 96, 96))
    criterion = build_criterion(hybrid)
    repeated = repeat_targets(TARGETS, out.o2m_k)
    last = out.o2m_outputs[-1]
    for image, (src, tgt) in enumerate(criterion.matcher(last.pred_logits, last.pred_boxes, repeated)):
        n = len(TARGETS[image]["labels"])
        assert len(src) == len(set(src.tolist())) == 3 * n  # k * n distinct one-to-many queries
        assert torch.bincount(tgt % n, minlength=n).tolist() == [3] * n  # each object k times
    losses = criterion(out, TARGETS)
    expected = {f"{name}{s}" for name in ("loss_class", "loss_bbox", "loss_giou") for s in ("_o2m", "_o2m_aux0",
                                                                                           "_o2m_aux1")}
    assert expected <= set(losses)
    sum(losses.values()).backward()
    assert hybrid.query_embed_o2m.weight.grad.abs().sum() > 0


def test_bad_one_to_many_settings_name_the_option():
    with pytest.raises(ValueError, match="o2m_k must be >= 1"):
        create_model("deformable_detr_lite", num_classes=3, **SMALL, one_to_many="hybrid", o2m_k=0)
    with pytest.raises(ValueError, match="one_to_many must be one of none, hybrid"):
        create_model("deformable_detr_lite", num_classes=3, **SMALL, one_to_many="many")
    model = create_model("deformable_detr_r50_two_stage", num_classes=3, **SMALL, one_to_many="hybrid",
                         o2m_queries=10_000)
    with pytest.raises(ValueError, match="num_queries \\+ o2m_queries = 10008 exceeds the"):
        model.train()(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("preset", ["dino_lite", "deformable_detr_r50_two_stage"])
def test_the_default_hybrid_count_fits_a_small_images_proposals(preset):
    # 8 + 5 x 8 = 48 queries, more than a 32 px image's encoder proposals. The default count takes the proposals
    # the one-to-one queries leave; a count the user gave is used as given, or rejected.
    model = create_model(preset, num_classes=3, **SMALL, one_to_many="hybrid", o2m_k=2).train()
    images = torch.randn(2, 3, 32, 32)
    proposals = model._encode(images, None)[0].shape[1]
    assert proposals < 48
    out = model(images, targets=TARGETS)
    assert out.o2m_outputs[-1].pred_logits.shape[1] == proposals - SMALL["num_queries"]
    build_criterion(model)(out, TARGETS)  # the one-to-many losses see the queries that ran
    given = create_model(preset, num_classes=3, **SMALL, one_to_many="hybrid", o2m_queries=40).train()
    with pytest.raises(ValueError, match="num_queries \\+ o2m_queries = 48 exceeds the"):
        given(torch.randn(2, 3, 32, 32), targets=TARGETS)


GROUP = dict(one_to_many="group", o2m_groups=3)


def test_group_detr_groups_see_only_themselves_and_match_one_to_one(monkeypatch):
    torch.manual_seed(0)
    model = create_model("deformable_detr_lite", num_classes=3, **SMALL, **GROUP)
    plain = create_model("deformable_detr_lite", num_classes=3, **SMALL)
    plain.load_state_dict(model.state_dict(), strict=False)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images).pred_logits, plain.eval()(images).pred_logits, rtol=0, atol=0)
    n = SMALL["num_queries"]

    def forward(perturb_last_group: bool):
        if perturb_last_group:  # the second extra group only
            with torch.no_grad():
                model.query_embed_o2m.weight[n:] += torch.randn(n, model.query_embed_o2m.weight.shape[1])
        return model.train()(images)

    with torch.no_grad():
        before, after = forward(False), forward(True)
    assert before.o2m_groups == 2 and before.o2m_k == 1 and before.o2m_outputs[-1].pred_logits.shape[1] == 2 * n
    first = slice(0, n)  # the first extra group, and the one-to-one queries, do not see the perturbed group
    a, b = after.o2m_outputs[-1].pred_logits[:, first], before.o2m_outputs[-1].pred_logits[:, first]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.pred_logits, before.pred_logits, rtol=0, atol=1e-6)
    criterion = build_criterion(model)
    last = before.o2m_outputs[-1]
    (indices,) = criterion._match_groups([last.pred_logits], [last.pred_boxes], TARGETS, groups=2)
    for (src, tgt), t in zip(indices, TARGETS, strict=True):
        m = len(t["labels"])
        assert sorted((src // n).tolist()) == [0] * m + [1] * m  # each group matched on its own
        for g in range(2):
            assert sorted(tgt[src // n == g].tolist()) == list(range(m))  # one-to-one within the group
    assert {"loss_class_o2m", "loss_giou_o2m_aux0"} <= set(criterion(before, TARGETS))
    # negative control: without the group-wise mask, the first group sees the perturbed second one
    monkeypatch.setattr(deformable, "separated_self_attn_mask",
                        lambda q, extra, device, groups: hide_one_to_many(
                            torch.zeros(q + extra, q + extra, dtype=torch.bool), 0, q, groups=1))
    with torch.no_grad():
        before, after = forward(False), forward(True)
    a, b = after.o2m_outputs[-1].pred_logits[:, first], before.o2m_outputs[-1].pred_logits[:, first]
    assert (a - b).abs().max() > 1e-4


def test_group_needs_two_groups():
    with pytest.raises(ValueError, match="o2m_groups must be >= 2 with one_to_many='group'"):
        create_model("deformable_detr_lite", num_classes=3, **SMALL, one_to_many="group", o2m_groups=1)


# RT-DETR: the one-to-many queries are the proposals ranked after the one-to-one queries' (no parameters of their own)
RT_SMALL = dict(hidden_dim=32, encoder_ffn=64, d_model=32, nhead=4, num_decoder_layers=3, dim_feedforward=64,
                num_queries=8)
RT_IMAGES = torch.rand(2, 3, 96, 96)  # 12^2 + 6^2 + 3^2 = 189 proposals


def _rt_pair(**o2m):
    torch.manual_seed(0)
    model = create_model("rtdetr_lite", num_classes=3, **RT_SMALL, **o2m)
    plain = create_model("rtdetr_lite", num_classes=3, **RT_SMALL)
    plain.load_state_dict(model.state_dict())  # the branch adds no weights
    return model, plain


@pytest.mark.parametrize("o2m", [HYBRID, GROUP])
def test_rtdetr_one_to_many_queries_do_not_exist_at_inference(o2m):
    model, plain = _rt_pair(**o2m)
    with torch.no_grad():
        a, b = model.eval()(RT_IMAGES), plain.eval()(RT_IMAGES)
    assert a.o2m_outputs is None
    assert torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_boxes, b.pred_boxes)


def _rt_train_forward(model, monkeypatch, *, perturb: bool):
    """A training forward; with ``perturb`` the one-to-many queries' content is moved after query selection."""
    select = rt_detr.RTDETR._select_queries

    def selected(self, memory, shapes, extra=0):
        tgt, anchors, enc, dense = select(self, memory, shapes, extra)
        if perturb and extra:
            noise = torch.randn(tgt[:, -extra:].shape, generator=torch.Generator().manual_seed(2))
            tgt = torch.cat([tgt[:, :-extra], tgt[:, -extra:] + noise], 1)
        return tgt, anchors, enc, dense

    monkeypatch.setattr(rt_detr.RTDETR, "_select_queries", selected)
    torch.manual_seed(1)  # the same denoising queries
    with torch.no_grad():
        return model.train()(RT_IMAGES, targets=TARGETS)


def test_rtdetr_mask_hides_the_one_to_many_queries_from_the_one_to_one_and_denoising_queries(monkeypatch):
    model, _ = _rt_pair(**HYBRID)
    before = _rt_train_forward(model, monkeypatch, perturb=False)
    after = _rt_train_forward(model, monkeypatch, perturb=True)
    assert len(before.o2m_outputs) == RT_SMALL["num_decoder_layers"] and before.o2m_k == 3
    assert before.o2m_outputs[-1].pred_logits.shape[:2] == (2, 24) and before.pred_logits.shape[1] == 8
    assert before.enc_outputs.pred_logits.shape[1] == 8  # the encoder loss sees the one-to-one proposals only
    assert not torch.allclose(before.o2m_outputs[-1].pred_logits, after.o2m_outputs[-1].pred_logits)
    torch.testing.assert_close(after.pred_logits, before.pred_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.pred_boxes, before.pred_boxes, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.dn_outputs[-1].pred_logits, before.dn_outputs[-1].pred_logits, rtol=0, atol=1e-6)
    # negative control: without the mask the one-to-one queries attend to the perturbed ones and change
    monkeypatch.setattr(rt_detr, "hide_after_denoising", lambda mask, *args: mask)
    before = _rt_train_forward(model, monkeypatch, perturb=False)
    after = _rt_train_forward(model, monkeypatch, perturb=True)
    assert (after.pred_logits - before.pred_logits).abs().max() > 1e-4


def test_rtdetr_one_to_many_queries_are_the_next_proposals_and_get_mal_losses():
    model, _ = _rt_pair(**HYBRID)
    model.train()
    torch.manual_seed(1)
    out = model(RT_IMAGES, targets=TARGETS)
    # the one-to-many queries start from the proposals ranked 9..32 by score (the decoder refines them)
    memory, shapes, _ = model._flatten_levels(model.encoder([f for f, _ in model.backbone(RT_IMAGES).values()]))
    _, anchors, _, _ = model._select_queries(memory, shapes, 24)
    _, first8, _, _ = model._select_queries(memory, shapes, 0)
    torch.testing.assert_close(anchors[:, :8], first8)
    criterion = build_criterion(model, class_loss="mal")
    losses = criterion(out, TARGETS)
    assert {f"loss_class_o2m{s}" for s in ("", "_aux0", "_aux1")} <= set(losses)
    sum(losses.values()).backward()
    assert model.enc_output.weight.grad.abs().sum() > 0


def test_rtdetr_group_and_learned_queries_and_a_count_too_large():
    model = create_model("rtdetr_lite", num_classes=3, **RT_SMALL, **GROUP, learn_query=True).train()
    out = model(RT_IMAGES, targets=TARGETS)
    assert out.o2m_groups == 2 and out.o2m_outputs[-1].pred_logits.shape[1] == 2 * RT_SMALL["num_queries"]
    assert model.tgt_embed_o2m.weight.shape == (16, 32)
    big = create_model("rtdetr_lite", num_classes=3, **RT_SMALL, one_to_many="hybrid", o2m_queries=400).train()
    with pytest.raises(ValueError, match="num_queries \\+ o2m_queries = 408 exceeds the 189"):
        big(RT_IMAGES, targets=TARGETS)
    fitted = create_model("rtdetr_lite", num_classes=3, **RT_SMALL, one_to_many="hybrid").train()
    # 8 + 5 x 8 queries, more than a 32 px image's 4^2 + 2^2 + 1 = 21 proposals: the default count takes what is left
    assert fitted(torch.rand(2, 3, 32, 32), targets=TARGETS).o2m_outputs[-1].pred_logits.shape[1] == 21 - 8


def test_rtdetr_dense_encoder_supervision_matches_each_object_k_times_and_reaches_every_proposal():
    """``enc_o2m_k``: every encoder proposal takes part in a one-to-many loss (``_enc_o2m``), each object matched
    k times; the model's outputs at inference are those of the same weights without it. Negative control: RT-DETR's
    own encoder loss trains only the top-k proposals, so the class head gets no gradient at the others."""
    model, plain = _rt_pair(enc_o2m_k=3)
    with torch.no_grad():
        a, b = model.eval()(RT_IMAGES), plain.eval()(RT_IMAGES)
    assert a.enc_dense is None and torch.equal(a.pred_logits, b.pred_logits)

    def train_step(m):
        scored = []
        m.enc_out_class_embed.register_forward_hook(lambda mod, i, o: scored.append(o) or o.retain_grad())
        criterion = build_criterion(m, class_loss="mal")
        matched = []
        criterion.matcher.register_forward_hook(lambda mod, i, o: matched.append((i[0].shape[1], o)))
        torch.manual_seed(1)
        out = m.train()(RT_IMAGES, targets=TARGETS)
        losses = criterion(out, TARGETS)
        sum(losses.values()).backward()
        return out, losses, matched, scored[0].grad

    out, losses, matched, grad = train_step(model)
    assert out.enc_dense.pred_logits.shape == (2, 189, 3) and out.enc_dense_k == 3
    assert {"loss_class_enc_o2m", "loss_bbox_enc_o2m", "loss_giou_enc_o2m"} <= set(losses)
    (dense_matches,) = [m for n, m in matched if n == 189]  # the one matching over all 189 proposals
    for (src, tgt), t in zip(dense_matches, TARGETS, strict=True):
        assert len(src) == 3 * len(t["labels"]) and len(set(src.tolist())) == len(src)  # k distinct proposals each
        assert sorted((tgt % len(t["labels"])).tolist()) == sorted(list(range(len(t["labels"]))) * 3)
    assert (grad.abs().sum(-1) > 0).all()  # every proposal's score is trained
    _, losses, _, grad = train_step(plain)
    assert not any(k.endswith("_enc_o2m") for k in losses)
    assert (grad.abs().sum(-1) > 0).sum(1).max() <= RT_SMALL["num_queries"]  # only the selected ones
    with pytest.raises(ValueError, match="enc_o2m_k must be >= 1"):
        create_model("rtdetr_lite", num_classes=3, **RT_SMALL, enc_o2m_k=-1)
