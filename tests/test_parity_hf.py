"""Parity with HF transformers' Detr / DeformableDetr / DabDetr ForObjectDetection (random weights, converted).

The tiny models go the way a user's checkpoint goes: ``save_pretrained`` writes the Hub layout (model.safetensors,
tied tensors stored once), ``create_model(preset, weights=folder)`` detects and converts it. Raw outputs must
agree to 1e-4, and so must the detections of each library's own postprocessing.
"""

import pytest
import torch
from _detections import assert_same_detections

from detrkit import create_model
from detrkit.convert import convert_hf_deformable_detr
from detrkit.models import build_deformable_detr
from detrkit.models.postprocess import postprocess

transformers = pytest.importorskip("transformers")


def _load_saved(hf, folder, preset: str, **overrides):
    hf.save_pretrained(folder)
    return create_model(preset, weights=folder, **overrides).eval()


def _assert_same_detections(out, ref, sizes, activation: str):
    """detrkit's postprocess vs HF's post_process_object_detection: the same detections (label, score, box)."""
    from transformers import DeformableDetrImageProcessor, DetrImageProcessor

    # DETR: softmax without no-object; Deformable / DAB: top-100 sigmoid scores over (query, class) pairs
    processor = DetrImageProcessor() if activation == "softmax" else DeformableDetrImageProcessor()
    theirs = processor.post_process_object_detection(ref, threshold=0.0, target_sizes=sizes)
    mine = postprocess(out, sizes, activation=activation, top_k=100)
    for m, t in zip(mine, theirs, strict=True):
        assert_same_detections(m, t, box_tol=1e-4 * max(sizes[0]))


def _randomize_frozen_bn(model):
    for name, buf in model.named_buffers():
        if "running_var" in name:
            buf.uniform_(0.5, 2.0)
        elif "running_mean" in name:
            buf.normal_(0, 0.1)


def _inputs(h=96, w=128):
    images = torch.randn(2, 3, h, w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)  # detrkit: True = padding
    mask[1, h * 3 // 4 :, :] = True
    mask[1, :, w * 2 // 3 :] = True
    return images, mask


TINY = dict(d_model=64, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=128,
            encoder_attention_heads=4, decoder_attention_heads=4, num_queries=12, two_stage_num_proposals=12)
FULL = dict(d_model=256, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
            encoder_attention_heads=8, decoder_attention_heads=8, num_queries=300, two_stage_num_proposals=300)


@pytest.mark.parametrize("size,variant", [("tiny", "plain"), ("tiny", "refine"), ("tiny", "two_stage"), ("full", "two_stage")])
def test_deformable_detr_matches_hf(size, variant, tmp_path):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    refine, two_stage = variant in ("refine", "two_stage"), variant == "two_stage"
    torch.manual_seed(0)
    if size == "tiny":  # torchvision's resnet18 in HF's ResNet naming
        backbone = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    else:  # resnet50
        backbone = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
    sizes = TINY if size == "tiny" else FULL
    config = DeformableDetrConfig(backbone_config=backbone, **sizes, num_labels=5, with_box_refine=refine,
                                  two_stage=two_stage, auxiliary_loss=True)
    hf = DeformableDetrForObjectDetection(config)
    with torch.no_grad():  # random values where HF initialises constants, so every parameter is really compared
        for name, p in hf.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name or "bbox_embed" in name:
                p.normal_(0, 0.1)
    _randomize_frozen_bn(hf)
    hf.eval()
    images, mask = _inputs() if size == "tiny" else _inputs(192, 256)  # full: enough pixels for 300 proposals
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())

    args = dict(backbone="resnet18" if size == "tiny" else "resnet50", d_model=sizes["d_model"],
                nhead=sizes["encoder_attention_heads"], num_encoder_layers=sizes["encoder_layers"],
                num_decoder_layers=sizes["decoder_layers"], dim_feedforward=sizes["encoder_ffn_dim"],
                num_queries=sizes["num_queries"])
    if size == "tiny":  # through the saved Hub layout
        preset = {"plain": "deformable_detr_r50", "refine": "deformable_detr_r50_refine"}.get(variant, "deformable_detr_r50_two_stage")
        model = _load_saved(hf, tmp_path, preset, **args)
    else:
        model = build_deformable_detr(num_classes=5, refine=refine, two_stage=two_stage, **args).eval()
        model.load_state_dict(convert_hf_deformable_detr(hf.state_dict()), strict=True)
    with torch.no_grad():
        out = model(images, mask)
    assert (out.pred_logits - ref.logits).abs().max().item() <= 1e-4
    assert (out.pred_boxes - ref.pred_boxes).abs().max().item() <= 1e-4
    _assert_same_detections(out, ref, [tuple(images.shape[-2:])] * 2, "sigmoid")
    with torch.no_grad():  # HF returns auxiliary outputs only with labels; apply its heads to its hidden states
        hf_aux = [hf.class_embed[i](ref.intermediate_hidden_states[:, i]) for i in range(len(out.aux_outputs))]
    assert len(hf_aux) == sizes["decoder_layers"] - 1
    for mine, theirs in zip(out.aux_outputs, hf_aux):
        assert (mine["pred_logits"] - theirs).abs().max().item() <= 1e-4
    if two_stage:
        assert (out.enc_outputs["pred_logits"] - ref.enc_outputs_class).abs().max().item() <= 1e-4
        assert (out.enc_outputs["pred_boxes"] - ref.enc_outputs_coord_logits.sigmoid()).abs().max().item() <= 1e-4


def test_detr_matches_hf(tmp_path):
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                            out_features=["stage4"])
    config = DetrConfig(backbone_config=backbone, d_model=64, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4, num_queries=12,
                        num_labels=5, auxiliary_loss=True)
    hf = DetrForObjectDetection(config)
    _randomize_frozen_bn(hf)
    hf.eval()
    images, mask = _inputs()
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())
    model = _load_saved(hf, tmp_path, "detr_r50", backbone="resnet18", d_model=64, nhead=4, num_encoder_layers=2,
                        num_decoder_layers=3, dim_feedforward=128, num_queries=12)
    assert model.num_classes == 5  # 6 outputs in the file: the classes + no-object
    with torch.no_grad():
        out = model(images, mask)
    assert (out.pred_logits - ref.logits).abs().max().item() <= 1e-4
    assert (out.pred_boxes - ref.pred_boxes).abs().max().item() <= 1e-4
    _assert_same_detections(out, ref, [tuple(images.shape[-2:])] * 2, "softmax")


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_dab_detr_matches_hf(size, tmp_path):
    """DabDetrForObjectDetection (random weights incl. PReLU slopes, anchors and the zero-initialised box head)."""
    from transformers import DabDetrConfig, DabDetrForObjectDetection, ResNetConfig

    from detrkit.convert import convert_hf_dab_detr
    from detrkit.models import build_dab_detr

    torch.manual_seed(0)
    if size == "tiny":
        backbone = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                layer_type="basic", out_features=["stage4"])
        sizes = dict(hidden_size=64, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=128,
                     encoder_attention_heads=4, decoder_attention_heads=4, num_queries=12)
    else:
        backbone = ResNetConfig(out_features=["stage4"])
        sizes = dict(hidden_size=256, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                     encoder_attention_heads=8, decoder_attention_heads=8, num_queries=300)
    config = DabDetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                           **sizes, num_labels=5, auxiliary_loss=True)
    hf = DabDetrForObjectDetection(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "bbox" in name or "activation" in name or "refpoint" in name:
                p.normal_(0, 0.5 if "activation" in name or "refpoint" in name else 0.1)
    _randomize_frozen_bn(hf)
    hf.eval()
    images, mask = _inputs()
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~mask).long(), output_hidden_states=False)

    args = dict(backbone="resnet18" if size == "tiny" else "resnet50", d_model=sizes["hidden_size"],
                nhead=sizes["decoder_attention_heads"], num_encoder_layers=sizes["encoder_layers"],
                num_decoder_layers=sizes["decoder_layers"], dim_feedforward=sizes["encoder_ffn_dim"],
                num_queries=sizes["num_queries"])
    if size == "tiny":  # through the saved Hub layout
        model = _load_saved(hf, tmp_path, "dab_detr_r50", **args)
    else:
        model = build_dab_detr(num_classes=5, **args).eval()
        model.load_state_dict(convert_hf_dab_detr(hf.state_dict()), strict=True)
    with torch.no_grad():
        out = model(images, mask)
    assert (out.pred_logits - ref.logits).abs().max().item() <= 1e-4
    assert (out.pred_boxes - ref.pred_boxes).abs().max().item() <= 1e-4
    _assert_same_detections(out, ref, [tuple(images.shape[-2:])] * 2, "sigmoid")


def test_hub_checkpoint_with_timm_backbone_names(tmp_path):
    """The Hub's DETR-family checkpoints were saved with timm ResNets (``use_timm_backbone=True``) in the older
    key layout (``backbone.conv_encoder.model.layer1.0.conv1``, ``out_proj``, ``fc1``) as ``pytorch_model.bin``.
    Written here from a random HF model by renaming its ResNet to timm's names, which are torchvision's."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    from detrkit.convert import convert_hf_resnet_key

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                            out_features=["stage4"])
    config = DetrConfig(backbone_config=backbone, d_model=64, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4, num_queries=12,
                        num_labels=5)
    hf = DetrForObjectDetection(config)
    _randomize_frozen_bn(hf)
    hf.eval()
    hub = {}
    for key, value in hf.state_dict().items():
        if key.startswith("model.backbone.model."):
            key = "model.backbone.conv_encoder.model." + convert_hf_resnet_key(key.removeprefix("model.backbone.model."))
        key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc")
        hub[key] = value
    assert "model.backbone.conv_encoder.model.layer1.0.conv1.weight" in hub
    assert "model.encoder.layers.0.self_attn.out_proj.weight" in hub and "model.encoder.layers.0.fc1.weight" in hub
    torch.save(hub, tmp_path / "pytorch_model.bin")
    images, mask = _inputs()
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())
        model = create_model("detr_r50", weights=tmp_path, backbone="resnet18", d_model=64, nhead=4,
                             num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=128, num_queries=12).eval()
        out = model(images, mask)
    assert (out.pred_logits - ref.logits).abs().max().item() <= 1e-4
    assert (out.pred_boxes - ref.pred_boxes).abs().max().item() <= 1e-4
