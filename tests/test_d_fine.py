"""D-FINE as a detector: the criterion's FGL / DDF terms, inference at eval_idx (the commands: tests/test_rt_detr.py).

Its parts (FDR, the losses, the decoder, the GELAN encoder, HGNetv2) are checked against the paper's claims and HF in
tests/test_fdr.py and tests/test_hgnetv2.py; the whole model against HF in tests/test_parity_hf.py.
"""

import json
import math
import re
from dataclasses import replace

import pytest
import torch
from conftest import TINY

from detrkit import create_model
from detrkit.engine.config import TrainConfig
from detrkit.engine.recipes import resolve_recipe
from detrkit.engine.train import Trainer
from detrkit.losses import build_criterion
from detrkit.losses.matcher import union_matches
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



def test_box_losses_use_the_union_of_every_layers_matches():
    """GO-LSD (D-FINE section 3.3): each layer's L1 / GIoU / FGL run on the union of all layers' matches (decoder
    layers, pre-FDR box, encoder proposals), normalised by its size; the class loss keeps the layer's own match.
    Negative control: without union_matching the box loss is the last layer's own match and differs."""
    torch.manual_seed(0)
    model = create_model("dfine_lite", num_classes=3, **SMALL).train()
    for head in model.decoder.bbox_embed:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.05)
    images, targets = _batch()
    out = model(images, targets=targets)
    union = build_criterion(model)
    own = build_criterion(model, union_matching=False)
    assert union.config.union_matching and not own.config.union_matching
    layers = [(out.pred_logits, out.pred_boxes)] + [(o.pred_logits, o.pred_boxes) for o in out.aux_outputs]
    layers += [(out.pre_outputs.pred_logits, out.pre_outputs.pred_boxes),
               (out.enc_outputs.pred_logits, out.enc_outputs.pred_boxes)]
    matches = union.matcher.match_layers([lg for lg, _ in layers], [bx for _, bx in layers], targets)
    go = union_matches(matches)
    assert sum(len(q) for q, _ in go) > 3  # the layers disagree: the union holds more queries than objects

    def l1(indices):
        pred = torch.cat([out.pred_boxes[i, q] for i, (q, _) in enumerate(indices)])
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        return 5.0 * (pred - tgt).abs().sum() / len(pred)

    a, b = union(out, targets), own(out, targets)
    torch.testing.assert_close(a["loss_bbox"], l1(go))
    torch.testing.assert_close(b["loss_bbox"], l1(matches[0]))
    assert (a["loss_bbox"] - b["loss_bbox"]).abs() > 1e-4 and (a["loss_fgl"] - b["loss_fgl"]).abs() > 1e-6
    assert torch.equal(a["loss_class"], b["loss_class"]) and torch.equal(a["loss_class_aux0"], b["loss_class_aux0"])


def test_deim_paper_recipe_is_deims_schedule_and_trains(synth_dir, tmp_path):
    """DEIM (section 4.1): Mosaic / MixUp on half the samples while the lr is flat, then a cosine to half the lr at
    the augmentation stop epoch, the last epochs clean. D-FINE's own recipe has neither (negative control). The
    schedule, shrunk to 4 epochs of a tiny run, trains: the logged lr follows flat-cosine."""
    deim = resolve_recipe(TrainConfig(model="deim_dfine_s", recipe="paper", data=str(synth_dir))).config
    assert (deim.epochs, deim.lr_schedule, deim.lr_drop, deim.lr_gamma, deim.aug_stop_epoch) == (
        132, "flat-cosine", 64, 0.5, 120)
    assert (deim.mosaic, deim.mixup, deim.mosaic_epochs, deim.class_loss or "mal") == (0.5, 0.5, 64, "mal")
    dfine = resolve_recipe(TrainConfig(model="dfine_s", recipe="paper", data=str(synth_dir))).config
    assert (dfine.lr_schedule, dfine.mosaic, dfine.mixup, dfine.aug_stop_epoch) == ("step", 0.0, 0.0, 120)
    run = replace(deim, recipe="none", model="dfine_lite", model_args=dict(SMALL), output_dir=str(tmp_path / "run"),
                  epochs=4, lr_drop=1, mosaic_epochs=1, aug_stop_epoch=3, warmup_steps=0, batch_size=2, ema=False,
                  image_size=96, num_workers=0, progress=False, max_train_images=4, max_val_images=2,
                  eval_every=4, log_every=1, plots=False, tensorboard=False)
    Trainer(run).fit()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    decay = [0.5 + 0.25 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75)]  # 2 steps an epoch
    assert lrs == pytest.approx([4e-4 * f for f in [1, 1, *decay, 0.5, 0.5]])
