"""Parity with HF transformers' Detr / DeformableDetr / DabDetr ForObjectDetection (random weights, converted).

The models go the way a user's checkpoint goes: the installed transformers writes the Hub layout with
``save_pretrained`` (model.safetensors, tied tensors stored once), with either backbone it offers (its own ResNet,
``use_timm_backbone=False``, or a timm ResNet, as the Hub checkpoints were saved), and
``create_model(preset, weights=folder)`` detects and converts it.

Each comparison runs twice:

- float64 on both sides (HF under :class:`PromoteFloat32`, since it builds some tensors in float32 whatever the
  model's dtype): logits, boxes, every decoder layer and the two-stage proposal scores agree to ``BOUND64``,
  float64 round-off, whatever the CPU;
- float32, as users run it: each library's float32 error is measured against the float64 result, and detrkit's
  may not exceed ``F32_FACTOR`` times HF's own (plus ``F32_FLOOR``). A bound on the raw float32 difference would
  measure the CPU's summation order (1.3e-4 on one machine against the 1e-4 once used here); this one measures
  whether detrkit computes anything less accurately than its peer, on any machine.
"""

from __future__ import annotations

import pytest
import torch
from _detections import assert_same_detections
from _float64 import PromoteFloat32, max_abs_diff

from detrkit import create_model
from detrkit.models.postprocess import postprocess
from detrkit.weights.files import CheckpointError
from detrkit.weights.formats import load_converted, read_checkpoint

transformers = pytest.importorskip("transformers")

BOUND64 = 1e-9  # measured: <= 2e-13 in every comparison below
# Measured: detrkit's float32 error 0.7-1.5x HF's in every comparison below (1e-7 for the tiny models, 2e-4 for the
# full two-stage boxes, where the raw float32 difference of the two libraries is 6e-5 on one CPU and 1.3e-4 on another).
F32_FACTOR, F32_FLOOR = 4.0, 1e-6


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


def _backbone_config(kind: str, size: str, out_features: list[str]) -> dict:
    """HF config arguments for a ResNet-18 (tiny) or -50 (full), HF's own or timm's."""
    if kind == "timm":  # each model picks the stages itself (its timm defaults); no download asked for
        return dict(
            use_timm_backbone=True, use_pretrained_backbone=False, backbone="resnet18" if size == "tiny" else "resnet50"
        )
    from transformers import ResNetConfig

    if size == "tiny":  # torchvision's resnet18 in HF's ResNet naming
        config = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                              layer_type="basic", out_features=out_features)
    else:
        config = ResNetConfig(out_features=out_features)
    return dict(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=config, backbone=None)


class Pair:
    """An HF model and the detrkit model loaded from its ``save_pretrained`` folder, run in float32 and float64."""

    def __init__(self, hf, tmp_path, preset: str, **overrides):
        try:
            hf.save_pretrained(tmp_path)
        except RuntimeError as e:  # transformers 4 cannot write the tied heads of refinement to safetensors
            if "shared tensors" not in str(e):
                raise
            hf.save_pretrained(tmp_path, safe_serialization=False)  # pytorch_model.bin, as the Hub's such models
        # HF's side loads the same file: transformers 5.0 ties heads in the file that it leaves untied in memory
        self.hf = type(hf).from_pretrained(tmp_path).eval()
        self.model = create_model(preset, weights=tmp_path, **overrides).eval()
        self.model64 = create_model(preset, weights=tmp_path, **overrides).eval().double()
        load_converted(self.model64, read_checkpoint(tmp_path))  # the file's values, not their float32 rounding
        self.hf64 = type(hf).from_pretrained(tmp_path).double().eval()

    def run(self, images, mask, **hf_kwargs):
        """-> (detrkit float32, HF float32, detrkit float64, HF float64) outputs; detrkit's scores of the two-stage
        proposals are recorded on the outputs as ``enc_scores`` when the model has them."""
        with torch.no_grad():
            mine32 = self.model(images, mask)
            ref32 = self.hf(pixel_values=images, pixel_mask=(~mask).long(), **hf_kwargs)
            mine64 = self.model64(images.double(), mask)
            with PromoteFloat32():
                ref64 = self.hf64(pixel_values=images.double(), pixel_mask=(~mask).long(), **hf_kwargs)
        return mine32, ref32, mine64, ref64


def _assert_parity(name: str, mine32, ref32, mine64, ref64) -> None:
    """float64: equal to round-off; float32: detrkit no less accurate than HF (each against the float64 truth)."""
    assert max_abs_diff(mine64, ref64) <= BOUND64, name
    err_mine, err_ref = max_abs_diff(mine32, mine64), max_abs_diff(ref32, ref64)
    assert err_mine <= F32_FACTOR * err_ref + F32_FLOOR, (
        f"{name}: detrkit float32 error {err_mine:.2e}, HF {err_ref:.2e}"
    )


def _assert_same_detections(out, ref, sizes, activation: str):
    """detrkit's postprocess vs HF's post_process_object_detection (float64 outputs): the same detections."""
    from transformers import DeformableDetrImageProcessor, DetrImageProcessor

    # DETR: softmax without no-object; Deformable / DAB: top-100 sigmoid scores over (query, class) pairs
    processor = DetrImageProcessor() if activation == "softmax" else DeformableDetrImageProcessor()
    theirs = processor.post_process_object_detection(ref, threshold=0.0, target_sizes=sizes)
    mine = postprocess(out, sizes, score_activation=activation, top_k=100)
    for m, t in zip(mine, theirs, strict=True):
        assert_same_detections(m, t, box_tol=1e-6 * max(sizes[0]), score_tol=1e-9)


TINY = dict(d_model=64, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=128,
            encoder_attention_heads=4, decoder_attention_heads=4, num_queries=12, two_stage_num_proposals=12)
FULL = dict(d_model=256, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
            encoder_attention_heads=8, decoder_attention_heads=8, num_queries=300, two_stage_num_proposals=300)
DEFORMABLE_CASES = [("tiny", v, b) for v in ("plain", "refine", "two_stage") for b in ("hf", "timm")]


@pytest.mark.parametrize("size,variant,backbone", [*DEFORMABLE_CASES, ("full", "two_stage", "hf")])
def test_deformable_detr_matches_hf(size, variant, backbone, tmp_path):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    refine, two_stage = variant in ("refine", "two_stage"), variant == "two_stage"
    torch.manual_seed(0)
    sizes = TINY if size == "tiny" else FULL
    config = DeformableDetrConfig(**_backbone_config(backbone, size, ["stage2", "stage3", "stage4"]), **sizes,
                                  num_labels=5, with_box_refine=refine, two_stage=two_stage, auxiliary_loss=True)
    hf = DeformableDetrForObjectDetection(config)
    with torch.no_grad():  # random values where HF initialises constants, so every parameter is really compared
        for name, p in hf.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name or "bbox_embed" in name:
                p.normal_(0, 0.1)
    _randomize_frozen_bn(hf)
    preset = {"plain": "deformable_detr_r50", "refine": "deformable_detr_r50_refine"}.get(
        variant, "deformable_detr_r50_two_stage")
    pair = Pair(hf, tmp_path, preset, backbone="resnet18" if size == "tiny" else "resnet50", d_model=sizes["d_model"],
                nhead=sizes["encoder_attention_heads"], num_encoder_layers=sizes["encoder_layers"],
                num_decoder_layers=sizes["decoder_layers"], dim_feedforward=sizes["encoder_ffn_dim"],
                num_queries=sizes["num_queries"])
    images, mask = _inputs() if size == "tiny" else _inputs(192, 256)  # full: enough pixels for 300 proposals
    if size == "full":
        # Padded pixels' proposals all score the same (zeroed memory); with 300 of ~1000 proposals kept, random
        # weights put that tie inside the top-k here, where the order of equal scores is arbitrary. Padding is
        # compared by the tiny models; this one keeps every proposal distinct.
        mask[:] = False
    mine32, ref32, mine64, ref64 = pair.run(images, mask)

    if two_stage:  # every proposal's score first; the top-k must not cut through a tie, or its order is arbitrary
        _assert_parity("proposal scores", mine32.enc_outputs.pred_logits, ref32.enc_outputs_class,
                       mine64.enc_outputs.pred_logits, ref64.enc_outputs_class)
        ranked = ref64.enc_outputs_class[..., 0].sort(-1, descending=True).values  # (B, S)
        k = sizes["num_queries"]
        assert (ranked[:, k - 1] - ranked[:, k]).min() > 1e-9, "the top-k proposals end inside a tie"
        _assert_parity("proposal boxes", mine32.enc_outputs.pred_boxes, ref32.enc_outputs_coord_logits.sigmoid(),
                       mine64.enc_outputs.pred_boxes, ref64.enc_outputs_coord_logits.sigmoid())
    _assert_parity("logits", mine32.pred_logits, ref32.logits, mine64.pred_logits, ref64.logits)
    _assert_parity("boxes", mine32.pred_boxes, ref32.pred_boxes, mine64.pred_boxes, ref64.pred_boxes)
    with torch.no_grad():  # HF returns auxiliary outputs only with labels; apply its heads to its hidden states
        hf_aux = [[hf_model.class_embed[i](r.intermediate_hidden_states[:, i]) for i in range(len(mine32.aux_outputs))]
                  for hf_model, r in ((pair.hf, ref32), (pair.hf64, ref64))]
    assert len(hf_aux[0]) == sizes["decoder_layers"] - 1
    for i, (a32, a64) in enumerate(zip(mine32.aux_outputs, mine64.aux_outputs, strict=False)):
        _assert_parity(f"decoder layer {i} logits", a32.pred_logits, hf_aux[0][i], a64.pred_logits, hf_aux[1][i])
    _assert_same_detections(mine64, ref64, [tuple(images.shape[-2:])] * 2, "sigmoid")


@pytest.mark.parametrize("backbone", ["hf", "timm"])
def test_detr_matches_hf(backbone, tmp_path):
    from transformers import DetrConfig, DetrForObjectDetection

    torch.manual_seed(0)
    config = DetrConfig(**_backbone_config(backbone, "tiny", ["stage4"]), d_model=64, encoder_layers=2,
                        decoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4,
                        decoder_attention_heads=4, num_queries=12, num_labels=5, auxiliary_loss=True)
    hf = DetrForObjectDetection(config)
    _randomize_frozen_bn(hf)
    pair = Pair(hf, tmp_path, "detr_r50", backbone="resnet18", d_model=64, nhead=4, num_encoder_layers=2,
                num_decoder_layers=3, dim_feedforward=128, num_queries=12)
    assert pair.model.num_classes == 5  # 6 outputs in the file: the classes + no-object
    mine32, ref32, mine64, ref64 = pair.run(*_inputs())
    _assert_parity("logits", mine32.pred_logits, ref32.logits, mine64.pred_logits, ref64.logits)
    _assert_parity("boxes", mine32.pred_boxes, ref32.pred_boxes, mine64.pred_boxes, ref64.pred_boxes)
    _assert_same_detections(mine64, ref64, [(96, 128)] * 2, "softmax")


@pytest.mark.parametrize("size,backbone", [("tiny", "hf"), ("tiny", "timm"), ("full", "hf")])
def test_dab_detr_matches_hf(size, backbone, tmp_path):
    """DabDetrForObjectDetection (random weights incl. PReLU slopes, anchors and the zero-initialised box head)."""
    if not hasattr(transformers, "DabDetrForObjectDetection"):
        pytest.skip(f"transformers {transformers.__version__} has no DabDetr (added in 4.49)")
    from transformers import DabDetrConfig, DabDetrForObjectDetection

    torch.manual_seed(0)
    if size == "tiny":
        sizes = dict(hidden_size=64, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=128,
                     encoder_attention_heads=4, decoder_attention_heads=4, num_queries=12)
    else:
        sizes = dict(hidden_size=256, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                     encoder_attention_heads=8, decoder_attention_heads=8, num_queries=300)
    config = DabDetrConfig(**_backbone_config(backbone, size, ["stage4"]), **sizes, num_labels=5, auxiliary_loss=True)
    hf = DabDetrForObjectDetection(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "bbox" in name or "activation" in name or "refpoint" in name:
                p.normal_(0, 0.5 if "activation" in name or "refpoint" in name else 0.1)
    _randomize_frozen_bn(hf)
    pair = Pair(hf, tmp_path, "dab_detr_r50", backbone="resnet18" if size == "tiny" else "resnet50",
                d_model=sizes["hidden_size"], nhead=sizes["decoder_attention_heads"],
                num_encoder_layers=sizes["encoder_layers"], num_decoder_layers=sizes["decoder_layers"],
                dim_feedforward=sizes["encoder_ffn_dim"], num_queries=sizes["num_queries"])
    assert pair.model.eps == 1e-5  # HF's port clamps its inverse sigmoid at 1e-5 (the official code at 1e-3)
    mine32, ref32, mine64, ref64 = pair.run(*_inputs(), output_hidden_states=False)
    _assert_parity("logits", mine32.pred_logits, ref32.logits, mine64.pred_logits, ref64.logits)
    _assert_parity("boxes", mine32.pred_boxes, ref32.pred_boxes, mine64.pred_boxes, ref64.pred_boxes)
    _assert_same_detections(mine64, ref64, [(96, 128)] * 2, "sigmoid")


def test_hub_checkpoint_with_timm_backbone_names(tmp_path):
    """The Hub's DETR-family checkpoints were saved with timm ResNets (``use_timm_backbone=True``) in the older
    key layout (``backbone.conv_encoder.model.layer1.0.conv1``, ``out_proj``, ``fc1``) as ``pytorch_model.bin``.
    Written here from a random HF model by renaming its ResNet to timm's names, which are torchvision's."""
    from transformers import DetrConfig, DetrForObjectDetection

    from detrkit.weights import convert_hf_resnet_key

    torch.manual_seed(0)
    config = DetrConfig(**_backbone_config("hf", "tiny", ["stage4"]), d_model=64, encoder_layers=2, decoder_layers=3,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
                        num_queries=12, num_labels=5)
    hf = DetrForObjectDetection(config)
    _randomize_frozen_bn(hf)
    hf.eval()
    hub = {}
    for key, value in hf.state_dict().items():
        for prefix in ("model.backbone.conv_encoder.model.", "model.backbone.model."):  # transformers 4 / 5 in memory
            if key.startswith(prefix):
                key = "model.backbone.conv_encoder.model." + convert_hf_resnet_key(key.removeprefix(prefix))
        key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc")
        hub[key] = value
    assert "model.backbone.conv_encoder.model.layer1.0.conv1.weight" in hub
    assert "model.encoder.layers.0.self_attn.out_proj.weight" in hub and "model.encoder.layers.0.fc1.weight" in hub
    torch.save(hub, tmp_path / "pytorch_model.bin")
    images, mask = _inputs()
    model = create_model("detr_r50", weights=tmp_path, backbone="resnet18", d_model=64, nhead=4, num_encoder_layers=2,
                         num_decoder_layers=3, dim_feedforward=128, num_queries=12).eval().double()
    load_converted(model, read_checkpoint(tmp_path))  # float64, as in the other parity tests
    with torch.no_grad(), PromoteFloat32():
        ref = hf.double()(pixel_values=images.double(), pixel_mask=(~mask).long())
    with torch.no_grad():
        out = model(images.double(), mask)
    assert max_abs_diff(out.pred_logits, ref.logits) <= BOUND64
    assert max_abs_diff(out.pred_boxes, ref.pred_boxes) <= BOUND64


def _rt_detr_hf(version: str, size: str, **extra):
    """A random-weight HF RTDetr / RTDetrV2 (ResNet-18-vd or -50-vd), every constant-initialised tensor randomised."""
    from transformers import RTDetrResNetConfig

    if version == "v2":
        if not hasattr(transformers, "RTDetrV2ForObjectDetection"):
            pytest.skip(f"transformers {transformers.__version__} has no RTDetrV2 (added in 4.52)")
        from transformers import RTDetrV2Config as Config
        from transformers import RTDetrV2ForObjectDetection as Model
    else:
        if not hasattr(transformers, "RTDetrForObjectDetection"):
            pytest.skip(f"transformers {transformers.__version__} has no RTDetr (added in 4.44)")
        from transformers import RTDetrConfig as Config
        from transformers import RTDetrForObjectDetection as Model
    torch.manual_seed(0)
    if size == "tiny":
        backbone = RTDetrResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                      layer_type="basic", out_features=["stage2", "stage3", "stage4"])
        dims = dict(encoder_hidden_dim=32, encoder_in_channels=[128, 256, 512], encoder_ffn_dim=64,
                    encoder_attention_heads=4, d_model=32, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64,
                    decoder_layers=2, decoder_attention_heads=4, num_queries=20, hidden_expansion=0.5)
    else:  # the R18 / R50 presets' own sizes
        depth = 18 if size == "r18" else 50
        backbone = RTDetrResNetConfig(
            **(dict(hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic") if depth == 18 else {}),
            out_features=["stage2", "stage3", "stage4"])
        dims = dict(encoder_in_channels=[128, 256, 512] if depth == 18 else [512, 1024, 2048],
                    hidden_expansion=0.5 if depth == 18 else 1.0, decoder_layers=3 if depth == 18 else 6)
    hf = Model(Config(backbone_config=backbone, num_labels=5, **dims, **extra))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if any(s in name for s in ("sampling_offsets", "attention_weights", "bbox_embed", "bbox_head")):
                p.normal_(0, 0.1)
    _randomize_frozen_bn(hf)
    return hf, dims


def _rt_detr_overrides(size: str, dims: dict) -> tuple[str, dict]:
    if size != "tiny":
        return ("rtdetr_r18vd" if size == "r18" else "rtdetr_r50vd"), {}
    return "rtdetr_r18vd", dict(hidden_dim=32, encoder_ffn=64, nhead=4, d_model=32, dim_feedforward=64,
                                num_decoder_layers=2, num_queries=20, backbone_norm="frozen")


RT_DETR_CASES = [("v1", "tiny", (64, 64)), ("v1", "tiny", (64, 96)), ("v2", "tiny", (64, 64)),
                 ("v2", "tiny", (96, 64)), ("v1", "tiny", (480, 640)), ("v2-discrete", "tiny", (64, 96))]


@pytest.mark.parametrize("version,size,hw", [
    *RT_DETR_CASES,
    *[pytest.param(v, s, hw, marks=pytest.mark.slow) for v in ("v1", "v2") for s in ("r18", "r50")
      for hw in ((640, 640), (480, 640))],
])
def test_rt_detr_matches_hf(version, size, hw, tmp_path):
    """RTDetr / RTDetrV2ForObjectDetection, loaded through create_model from the saved HF folder: logits, boxes,
    every decoder layer and the selected proposals, square and non-square inputs, pixels in [0, 1]."""
    discrete = version == "v2-discrete"  # RT-DETRv2's discrete sampling: one pixel per point, no grid_sample
    hf, dims = _rt_detr_hf("v2" if discrete else version, size, **({"decoder_method": "discrete"} if discrete else {}))
    preset, overrides = _rt_detr_overrides(size, dims)
    if version != "v1":
        preset = preset.replace("rtdetr_", "rtdetrv2_")
    if discrete:
        overrides["sampling"] = "discrete"
    pair = Pair(hf, tmp_path, preset, **overrides)
    images = torch.rand(2, 3, *hw)
    mask = torch.zeros(2, *hw, dtype=torch.bool)
    mine32, ref32, mine64, ref64 = pair.run(images, mask)
    # detrkit never selects an anchor within 0.01 of the border (HF may, on zeroed features): the comparison holds
    # where HF's top-k has none of them, which this checks rather than assumes.
    k = pair.model.num_queries
    assert ref64.init_reference_points.isfinite().all() and (ref64.init_reference_points.abs() < 1e30).all(), (
        "HF selected an invalid anchor")
    _assert_parity("selected proposal logits", mine32.enc_outputs.pred_logits, ref32.enc_topk_logits,
                   mine64.enc_outputs.pred_logits, ref64.enc_topk_logits)
    _assert_parity("selected proposal boxes", mine32.enc_outputs.pred_boxes, ref32.enc_topk_bboxes,
                   mine64.enc_outputs.pred_boxes, ref64.enc_topk_bboxes)
    assert mine64.pred_logits.shape[1] == k
    _assert_parity("logits", mine32.pred_logits, ref32.logits, mine64.pred_logits, ref64.logits)
    _assert_parity("boxes", mine32.pred_boxes, ref32.pred_boxes, mine64.pred_boxes, ref64.pred_boxes)
    for i, (a32, a64) in enumerate(zip(mine32.aux_outputs, mine64.aux_outputs, strict=True)):
        _assert_parity(f"decoder layer {i} logits", a32.pred_logits, ref32.intermediate_logits[:, i],
                       a64.pred_logits, ref64.intermediate_logits[:, i])
        _assert_parity(f"decoder layer {i} boxes", a32.pred_boxes, ref32.intermediate_reference_points[:, i],
                       a64.pred_boxes, ref64.intermediate_reference_points[:, i])
    assert max_abs_diff(mine32.pred_logits, ref32.logits) <= 1e-4 and max_abs_diff(mine32.pred_boxes,
                                                                                    ref32.pred_boxes) <= 1e-4


# D-FINE: a small HGNetv2 of the B0 form (every kind of block: plain and light, residual, downsampling)
HGNET_TINY = ((3, 8, 8), ((8, 8, 16, 1, False, False, 3, 2), (16, 8, 32, 2, True, False, 3, 2),
                          (32, 8, 48, 2, True, True, 5, 2), (48, 16, 64, 1, True, True, 5, 2)))


def _d_fine_hf(width: int, d_model: int, eval_idx: int = -1):
    """A random-weight HF DFineForObjectDetection: the tiny HGNetv2 (learnable affine blocks), GELAN encoder, 3 FDR
    layers with 3 / 6 / 3 points and 8 + 1 bins; every tensor HF starts at a constant randomised."""
    if not hasattr(transformers, "DFineForObjectDetection"):
        pytest.skip(f"transformers {transformers.__version__} has no DFine (added in 4.52)")
    from transformers import DFineConfig, DFineForObjectDetection, HGNetV2Config

    torch.manual_seed(0)
    stem, stages = HGNET_TINY
    cols = list(zip(*stages, strict=True))
    backbone = HGNetV2Config(
        stem_channels=list(stem), stage_in_channels=list(cols[0]), stage_mid_channels=list(cols[1]),
        stage_out_channels=list(cols[2]), stage_num_blocks=list(cols[3]), stage_downsample=list(cols[4]),
        stage_light_block=list(cols[5]), stage_kernel_size=list(cols[6]), stage_numb_of_layers=list(cols[7]),
        use_learnable_affine_block=True, out_features=["stage2", "stage3", "stage4"], hidden_sizes=list(cols[2]))
    config = DFineConfig(backbone_config=backbone, encoder_in_channels=[32, 48, 64], encoder_hidden_dim=width,
                         encoder_ffn_dim=64, encoder_attention_heads=4, d_model=d_model,
                         decoder_in_channels=[width] * 3, decoder_ffn_dim=64, decoder_layers=3, eval_idx=eval_idx,
                         decoder_attention_heads=4, num_queries=20, hidden_expansion=0.5, depth_mult=0.34,
                         decoder_n_points=[3, 6, 3], max_num_bins=8, num_labels=5)
    return _randomised(DFineForObjectDetection(config))


def _randomised(hf):
    """Every tensor of an HF D-FINE that starts at a constant (zero heads, unit norms) randomised, so that each
    one's conversion shows in the outputs."""
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            if not t.is_floating_point() or name.endswith(("num_points_scale", ".up", ".reg_scale")):
                continue
            if "running_var" in name or name.endswith("lab.scale"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif "running_mean" in name:
                t.normal_(0, 0.1)
            elif any(s in name for s in ("sampling_offsets", "attention_weights", "bbox_embed", "bbox_head", "gate",
                                         "lqe_layers", "lab.bias")):
                t.normal_(0, 0.3)
    return hf


def _exact_point_scales(hf) -> None:
    """HF keeps each decoder layer's 1 / points as a float32 buffer; in float64 it must be the exact fractions."""
    for layer in hf.model.decoder.layers:
        scale = layer.encoder_attn.num_points_scale
        layer.encoder_attn.num_points_scale = (1 / (1 / scale.double()).round()).to(scale.device)


D_FINE_CASES = [(32, 32, (64, 64)), (32, 32, (64, 96)), (48, 32, (96, 64))]


@pytest.mark.slow
@pytest.mark.parametrize("size,hw", [("s", (320, 320)), ("l", (256, 384))])
def test_d_fine_full_size_matches_hf(size, hw, tmp_path):
    """D-FINE-S and -L at full size (HGNetv2-B0 / B4, 300 queries, 32 + 1 bins; transformers' DFineConfig of the
    preset), random weights: the last layer's logits and boxes in float64, a square and a non-square input."""
    if not hasattr(transformers, "DFineForObjectDetection"):
        pytest.skip(f"transformers {transformers.__version__} has no DFine (added in 4.52)")
    from transformers import DFineForObjectDetection

    from detrkit.weights.d_fine import hf_d_fine_config

    torch.manual_seed(0)
    pair = Pair(_randomised(DFineForObjectDetection(hf_d_fine_config(size))), tmp_path, f"dfine_{size}")
    _exact_point_scales(pair.hf64)
    images = torch.rand(2, 3, *hw)
    mine32, ref32, mine64, ref64 = pair.run(images, torch.zeros(2, *hw, dtype=torch.bool))
    _assert_parity("logits", mine32.pred_logits, ref32.logits, mine64.pred_logits, ref64.logits)
    _assert_parity("boxes", mine32.pred_boxes, ref32.pred_boxes, mine64.pred_boxes, ref64.pred_boxes)


@pytest.mark.parametrize("width,d_model,hw", D_FINE_CASES)
def test_d_fine_matches_hf(width, d_model, hw, tmp_path):
    """DFineForObjectDetection, loaded through create_model from its saved folder: the selected proposals, the
    last layer's logits and boxes (with the location-quality score), square and non-square inputs; with an encoder
    wider than the decoder, the decoder's input projections too (D-FINE-X's 384 -> 256)."""
    hf = _d_fine_hf(width, d_model)
    overrides = dict(backbone=HGNET_TINY, hidden_dim=width, encoder_ffn=64, nhead=4, d_model=d_model,
                     dim_feedforward=64, num_decoder_layers=3, num_queries=20, reg_max=8, backbone_norm="frozen")
    pair = Pair(hf, tmp_path, "dfine_s", num_classes=5, **overrides)
    _exact_point_scales(pair.hf64)
    images = torch.rand(2, 3, *hw)
    mask = torch.zeros(2, *hw, dtype=torch.bool)
    mine32, ref32, mine64, ref64 = pair.run(images, mask)
    assert (ref64.init_reference_points.abs() < 1e30).all(), "HF selected an invalid anchor"
    _assert_parity("selected proposal logits", mine32.enc_outputs.pred_logits, ref32.enc_topk_logits,
                   mine64.enc_outputs.pred_logits, ref64.enc_topk_logits)
    _assert_parity("selected proposal boxes", mine32.enc_outputs.pred_boxes, ref32.enc_topk_bboxes,
                   mine64.enc_outputs.pred_boxes, ref64.enc_topk_bboxes)
    _assert_parity("logits", mine32.pred_logits, ref32.logits, mine64.pred_logits, ref64.logits)
    _assert_parity("boxes", mine32.pred_boxes, ref32.pred_boxes, mine64.pred_boxes, ref64.pred_boxes)
    # the location-quality estimator changes the scores: without it they would differ (negative control)
    assert max_abs_diff(mine64.pred_logits, pair.model64.decoder.class_embed[-1](
        ref64.last_hidden_state)) > 1e-3


# HF's own converter (transformers' convert_d_fine_original_pytorch_checkpoint_to_hf.py) names each official key's
# HF counterpart; these are its rules read backwards, HF -> Peterande/D-FINE, to write an official-layout file.
_HF_TO_OFFICIAL = [
    (r"^model\.backbone\.model\.embedder\.", "backbone.stem."),
    (r"^model\.backbone\.model\.encoder\.stages\.", "backbone.stages."),
    (r"\.convolution\.", ".conv."),
    (r"\.normalization\.", ".bn."),
    (r"^model\.encoder_input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv."),
    (r"^model\.encoder_input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.norm."),
    (r"^model\.encoder\.aifi\.(\d+)\.layers\.0\.self_attn_layer_norm\.", r"encoder.encoder.\1.layers.0.norm1."),
    (r"^model\.encoder\.aifi\.(\d+)\.layers\.0\.final_layer_norm\.", r"encoder.encoder.\1.layers.0.norm2."),
    (r"^model\.encoder\.aifi\.", "encoder.encoder."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.conv1\.", r"encoder.\1_blocks.\2.cv1."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.csp_rep1\.", r"encoder.\1_blocks.\2.cv2.0."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.conv2\.", r"encoder.\1_blocks.\2.cv2.1."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.csp_rep2\.", r"encoder.\1_blocks.\2.cv3.0."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.conv3\.", r"encoder.\1_blocks.\2.cv3.1."),
    (r"^model\.encoder\.(fpn|pan)_blocks\.(\d+)\.conv4\.", r"encoder.\1_blocks.\2.cv4."),
    (r"^model\.encoder\.downsample_convs\.(\d+)\.conv(\d)\.", r"encoder.downsample_convs.\1.0.cv\2."),
    (r"^model\.encoder\.", "encoder."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"decoder.decoder.layers.\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"decoder.decoder.layers.\1.norm3."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"decoder.decoder.layers.\1.cross_attn."),
    (r"^model\.decoder\.(layers|lqe_layers|up$|reg_scale$)", r"decoder.decoder.\1"),
    (r"^model\.decoder\.(pre_bbox_head|query_pos_head)\.", r"decoder.\1."),
    (r"^model\.decoder\.class_embed\.", "decoder.dec_score_head."),
    (r"^model\.decoder\.bbox_embed\.", "decoder.dec_bbox_head."),
    (r"^model\.decoder_input_proj\.(\d+)\.0\.", r"decoder.input_proj.\1.conv."),
    (r"^model\.decoder_input_proj\.(\d+)\.1\.", r"decoder.input_proj.\1.norm."),
    (r"^model\.enc_output\.0\.", "decoder.enc_output.proj."),
    (r"^model\.enc_output\.1\.", "decoder.enc_output.norm."),
    (r"^model\.", "decoder."),  # denoising_class_embed, enc_score_head, enc_bbox_head
    (r"\.mlp\.layers\.0\.", ".linear1."),
    (r"\.mlp\.layers\.1\.", ".linear2."),
    (r"\.o_proj\.", ".out_proj."),
]


def _official_d_fine_state(hf) -> dict:
    """HF DFineForObjectDetection's tensors under Peterande/D-FINE's names: q / k / v as one in_proj, the tied
    top-level heads dropped, the anchors buffers added (the official code saves them)."""
    import re

    state = {}
    for key, value in hf.state_dict().items():
        if key.startswith(("class_embed.", "bbox_embed.")):
            continue
        for pattern, repl in _HF_TO_OFFICIAL:
            key = re.sub(pattern, repl, key)
        state[key] = value.clone()
    for key in [k for k in state if k.endswith(".self_attn.q_proj.weight")]:
        stem = key.removesuffix("q_proj.weight")
        for kind in ("weight", "bias"):
            state[f"{stem}in_proj_{kind}"] = torch.cat([state.pop(f"{stem}{p}_proj.{kind}") for p in "qkv"])
    state["decoder.anchors"], state["decoder.valid_mask"] = torch.zeros(1, 10, 4), torch.ones(1, 10, 1)
    return state


def test_d_fine_official_layout(tmp_path):
    """A Peterande/D-FINE file (written from HF's model by HF's published key table) loads into the same model as
    HF's folder: every tensor equal and the same outputs; the layers, bins, points and W(n)'s reg_scale come from
    the file (negative control: the file's reg_scale 8 changes the boxes), and a reg_max it does not have is refused
    with the file's value."""
    hf = _d_fine_hf(48, 32).eval()
    hf.save_pretrained(tmp_path / "hf")
    state = _official_d_fine_state(hf)
    torch.save({"model": state}, tmp_path / "dfine.pth")
    conv = read_checkpoint(tmp_path / "dfine.pth")
    assert conv.format.name == "official_d_fine"
    assert conv.model_args == {"num_decoder_layers": 3, "reg_max": 8, "up": 0.5, "reg_scale": 4.0,
                               "n_points": [3, 6, 3]}
    tiny = dict(backbone=HGNET_TINY, hidden_dim=48, encoder_ffn=64, nhead=4, d_model=32, dim_feedforward=64,
                num_queries=20, backbone_norm="frozen", expansion=0.5, depth_mult=0.34)
    # dfine_m: 5 layers, eval_idx -2; the file's 3 layers evaluate at the last (as the released M file)
    mine = create_model("dfine_m", weights=tmp_path / "dfine.pth", num_classes=5, **tiny).eval()
    ref = create_model("dfine_m", weights=tmp_path / "hf", num_classes=5, **tiny).eval()
    assert len(mine.decoder.layers) == 3 and mine.decoder.eval_idx == 2
    assert mine.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v), k
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        a, b, c = mine(images), ref(images), hf(pixel_values=images)
    assert torch.equal(a.pred_boxes, b.pred_boxes) and torch.equal(a.pred_logits, b.pred_logits)
    torch.testing.assert_close(a.pred_boxes, c.pred_boxes, atol=1e-5, rtol=1e-4)

    with pytest.raises(CheckpointError, match=r"trained with reg_max=8; reg_max=32 does not fit it. Leave reg_max out"):
        create_model("dfine_m", weights=tmp_path / "dfine.pth", num_classes=5, reg_max=32, **tiny)

    state["decoder.decoder.reg_scale"] = torch.tensor([8.0])
    torch.save({"model": state}, tmp_path / "dfine_x_like.pth")
    wider = create_model("dfine_m", weights=tmp_path / "dfine_x_like.pth", num_classes=5, **tiny).eval()
    assert wider.decoder.reg_scale == 8.0
    with torch.no_grad():
        assert max_abs_diff(wider(images).pred_boxes, a.pred_boxes) > 1e-3


def test_d_fine_file_of_another_size_names_the_presets_it_fits(tmp_path):
    """A D-FINE-S-shaped file (GELAN expansion 0.5, depth 0.34, learnable-affine backbone) given to dfine_l: the
    error lists the keys that differ and names the presets the file loads into."""
    _d_fine_hf(48, 32).save_pretrained(tmp_path / "hf")
    tiny = dict(backbone=HGNET_TINY, hidden_dim=48, encoder_ffn=64, nhead=4, d_model=32, dim_feedforward=64,
                num_queries=20, backbone_norm="frozen")  # sizes of the tiny file; the preset's own block settings
    with pytest.raises(CheckpointError, match=r"does not fit DFINE(.|\n)*This checkpoint loads into: deim_dfine_s, "
                                              r"dfine_s$"):
        create_model("dfine_l", weights=tmp_path / "hf", num_classes=5, **tiny)
    create_model("dfine_s", weights=tmp_path / "hf", num_classes=5, **tiny)  # and it does


def test_convert_cli_turns_an_hf_d_fine_folder_into_a_detrkit_checkpoint(tmp_path, capsys):
    """`detrkit convert HF_DIR --model dfine_s`: reports the layout and every tensor converted, keeps the file's 5
    classes (D-FINE's heads sit under decoder.: they were not counted, and a 91-class model refused the file); the
    written file predicts what the HF folder's model predicts."""
    from detrkit import Detector
    from detrkit.cli import main

    hf = _d_fine_hf(48, 32).eval()
    hf.save_pretrained(tmp_path / "hf")
    tiny = dict(backbone=HGNET_TINY, hidden_dim=48, encoder_ffn=64, nhead=4, d_model=32, dim_feedforward=64,
                num_queries=20, backbone_norm="frozen")
    import json

    out = tmp_path / "dfine.safetensors"
    assert main(["convert", str(tmp_path / "hf"), "--model", "dfine_s", "-o", str(out), "--model_args",
                 json.dumps(tiny)]) == 0
    text = capsys.readouterr().out
    assert "layout hf_d_fine" in text and "missing: 0" in text
    detector = Detector(out)
    assert detector.meta["model"] == "dfine_s" and detector.meta["num_classes"] == 5
    reference = create_model("dfine_s", weights=tmp_path / "hf", **tiny).eval()
    assert reference.num_classes == 5
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(detector.model(images).pred_boxes, reference(images).pred_boxes)
