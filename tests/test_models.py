"""Every registered preset: forward, backward, loss, postprocess, save / load round trip."""

import pytest
import torch
from conftest import TINY

from detrkit import create_model, list_models, load_checkpoint
from detrkit.engine.checkpoint import save_checkpoint
from detrkit.losses import build_criterion
from detrkit.models import DetectionOutput, postprocess
from detrkit.weights.files import CheckpointError


def _inputs():
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 48:, :] = True
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.5, 0.3, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return images, mask, targets


@pytest.mark.parametrize("name", list_models())
def test_preset_forward_backward_loss_postprocess(name):
    model = create_model(name, num_classes=3, **TINY)
    images, mask, targets = _inputs()
    out = model(images, mask, targets)
    assert isinstance(out, DetectionOutput)
    k = 3 + (model.score_activation == "softmax")
    assert out.pred_logits.shape == (2, TINY["num_queries"], k)
    assert out.pred_boxes.shape == (2, TINY["num_queries"], 4)
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
    assert len(out.aux_outputs) == TINY["num_decoder_layers"] - 1

    losses = build_criterion(model)(out, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    for head in ("class_embed", "bbox_embed"):
        assert any(g.abs().sum() > 0 for n, g in grads.items() if head in n), head

    model.eval()
    dets = postprocess(model(images, mask), [(64, 96), (48, 96)], score_activation=model.score_activation,
                       label_map=[10, 20, 30])
    assert len(dets) == 2
    assert set(dets[0]["labels"].tolist()) <= {10, 20, 30}
    assert (dets[0]["scores"][:-1] >= dets[0]["scores"][1:]).all()


def test_eval_output_same_with_and_without_targets():
    model = create_model("detr_lite", num_classes=3, **TINY).eval()
    images, mask, targets = _inputs()
    a, b = model(images, mask), model(images, mask, targets)
    assert torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_boxes, b.pred_boxes)


def test_transformer_ignores_padded_tokens():
    """Padded tokens (whatever their content) change neither encoder memory nor decoder output."""
    from detrkit.layers import TransformerDecoder, TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer

    enc = TransformerEncoder(TransformerEncoderLayer(32, 4, 64, 0.0), 2).eval()
    dec = TransformerDecoder(TransformerDecoderLayer(32, 4, 64, 0.0), 2, 32).eval()
    src, pos, queries = torch.randn(1, 10, 32), torch.randn(1, 10, 32), torch.randn(1, 5, 32)
    padded_src = torch.cat([src, 100 * torch.randn(1, 6, 32)], 1)
    padded_pos = torch.cat([pos, torch.randn(1, 6, 32)], 1)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[:, 10:] = True
    with torch.no_grad():
        mem = enc(src, pos)
        mem_p = enc(padded_src, padded_pos, key_padding_mask=mask)
        out = dec(torch.zeros_like(queries), mem, pos=pos, query_pos=queries)
        out_p = dec(torch.zeros_like(queries), mem_p, pos=padded_pos, query_pos=queries, memory_key_padding_mask=mask)
    torch.testing.assert_close(mem_p[:, :10], mem, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_p, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_save_load_round_trip(tmp_path, name):
    model = create_model(name, num_classes=4, **TINY).eval()
    meta = {"model": name, "num_classes": 4, "model_args": TINY, "class_names": list("abcd"),
            "label_to_cat": [1, 2, 5, 9], "image_size": 64}
    save_checkpoint(tmp_path / "ckpt", model, meta)
    loaded, loaded_meta = load_checkpoint(tmp_path / "ckpt")
    assert loaded_meta == meta
    images, mask, _ = _inputs()
    with torch.no_grad():
        a, b = model(images, mask), loaded.eval()(images, mask)
    assert torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_boxes, b.pred_boxes)
    if name == "detr_lite":
        # a checkpoint that does not fit the model is refused with the keys named, never partially loaded
        with pytest.raises(CheckpointError, match=r"shape of encoder\.layers\.0\.linear1\.weight"):
            create_model("detr_lite", weights=str(tmp_path / "ckpt"), **{**TINY, "dim_feedforward": 32})
        # except the class heads, on request: fine-tuning on another label space
        with pytest.warns(UserWarning, match=r"re-initialised for fine-tuning"):
            tuned = create_model("detr_lite", num_classes=7, weights=str(tmp_path / "ckpt"), **TINY)
        assert tuned.class_embed.weight.shape[0] == 8
        assert torch.equal(tuned.query_embed.weight, model.query_embed.weight)
