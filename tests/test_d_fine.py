"""D-FINE as a detector: the criterion's FGL / DDF terms, inference at eval_idx (the commands: tests/test_rt_detr.py).

Its parts (FDR, the losses, the decoder, the GELAN encoder, HGNetv2) are checked against the paper's claims and HF in
tests/test_fdr.py and tests/test_hgnetv2.py; the whole model against HF in tests/test_parity_hf.py.
"""

import re

import torch
from conftest import TINY

from detrkit import create_model
from detrkit.losses import build_criterion
from detrkit.models import build_d_fine

SMALL = dict(TINY, hidden_dim=32, encoder_ffn=64)


def _batch():
    images = torch.rand(2, 3, 64, 64)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.5, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return images, targets


def test_criterion_adds_localization_and_distillation_terms_for_every_layer():
    """D-FINE section 3: FGL on every layer's edge distributions (the matched queries and the denoising queries),
    DDF towards the last layer - zero for the last layer itself, which is the teacher. RT-DETR's
    criterion has neither (negative control)."""
    model = create_model("dfine_lite", num_classes=3, **SMALL).train()
    images, targets = _batch()
    criterion = build_criterion(model)
    # the official initialisation zeroes the distance heads: every layer predicts the teacher's distributions
    assert criterion(model(images, targets=targets), targets)["loss_ddf_aux0"] == 0
    for head in model.decoder.bbox_embed:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.05)
    losses = criterion(model(images, targets=targets), targets)
    for term in ("loss_fgl", "loss_ddf"):
        assert {f"{term}{s}" for s in ("", "_aux0", "_dn", "_dn_aux0")} <= set(losses), term
    # the pre-FDR box (layer 0's pre_bbox_head) has no distributions: class and box losses only
    assert {"loss_class_pre", "loss_giou_dn_pre"} <= set(losses) and "loss_fgl_pre" not in losses
    assert losses["loss_ddf"] == 0 and losses["loss_ddf_dn"] == 0  # the teacher does not distil into itself
    assert losses["loss_ddf_aux0"] > 0 and losses["loss_fgl"] > 0
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.decoder.bbox_embed[0].layers[-1].weight.grad.abs().sum() > 0  # the distance heads learn

    rtdetr = create_model("rtdetr_lite", num_classes=3, **SMALL).train()
    assert not any(k.startswith(("loss_fgl", "loss_ddf")) for k in build_criterion(rtdetr)(
        rtdetr(images, targets=targets), targets))


def test_inference_stops_at_eval_idx():
    """eval_idx (D-FINE-M: 5 layers trained, the 4th's prediction served): inference returns the prediction a
    decoder cut after that layer gives; with eval_idx -1 the extra layer changes it (negative control)."""
    args = dict(num_classes=3, backbone="B0", hidden_dim=32, encoder_ffn=64, d_model=32, nhead=4, dim_feedforward=64,
                num_queries=10, n_points=(2, 2, 2))
    torch.manual_seed(0)
    three = build_d_fine(**args, num_decoder_layers=3, eval_idx=1).eval()
    for p in three.decoder.parameters():  # the official initialisation zeroes the distance heads: give them values
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    two = build_d_fine(**args, num_decoder_layers=2).eval()
    third = re.compile(r"^decoder\.(layers|class_embed|bbox_embed|lqe_layers)\.2\.")
    two.load_state_dict({k: v for k, v in three.state_dict().items() if not third.match(k)})
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = three(images), two(images)
        assert torch.equal(a.pred_boxes, b.pred_boxes) and torch.equal(a.pred_logits, b.pred_logits)
        three.decoder.eval_idx = 2
        c = three(images)
    assert (c.pred_boxes - b.pred_boxes).abs().max() > 1e-4

