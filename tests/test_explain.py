"""detrkit explain: each detection with what its query attended to."""

import json

import pytest
from conftest import TINY
from PIL import Image

from detrkit import Detector, create_model
from detrkit.cli import main
from detrkit.inference.explain import draw_explanation, explain
from detrkit.weights.files import save_weights


def _checkpoint(tmp_path, name):
    model = create_model(name, num_classes=3, **TINY)
    meta = {"model": name, "num_classes": 3, "model_args": TINY, "class_names": ["cat", "dog", "fish"],
            "label_to_cat": [1, 2, 3], "image_size": 64}
    return save_weights(tmp_path / f"{name}.safetensors", model, meta)


def test_detr_cross_attention_map(tmp_path):
    image = Image.new("RGB", (80, 60), (90, 120, 30))
    found = explain(Detector(_checkpoint(tmp_path, "detr_lite")), image, threshold=0.0, max_detections=3)
    assert len(found) == 3 and [e.score for e in found] == sorted((e.score for e in found), reverse=True)
    for exp in found:
        # a softmax over the feature map's pixels, averaged over heads: a distribution; 64 px -> stride 16 -> 4 x 6
        assert exp.heatmap.shape == (4, 6) and exp.heatmap.sum() == pytest.approx(1.0, abs=1e-5)
        assert draw_explanation(image, exp).size == image.size


def test_deformable_sampling_points_and_cli(tmp_path):
    ckpt = _checkpoint(tmp_path, "dino_lite")
    Image.new("RGB", (80, 60), (90, 120, 30)).save(tmp_path / "img.png")
    det = Detector(ckpt)
    found = explain(det, tmp_path / "img.png", threshold=0.0, max_detections=2)
    attn = det.model.decoder.layers[-1].cross_attn
    for exp in found:
        assert exp.points.shape == (attn.n_heads * attn.n_levels * attn.n_points, 2)
        # each head's weights are a softmax over its levels x points
        assert exp.weights.sum() == pytest.approx(attn.n_heads, abs=1e-4)
    assert attn.recorded is None and not attn.record  # nothing kept after explaining
    assert main(["explain", str(tmp_path / "img.png"), "--checkpoint", str(ckpt), "--threshold", "0.0",
                 "--max_detections", "2", "--output", str(tmp_path / "x")]) == 0
    summary = json.loads((tmp_path / "x" / "explain.json").read_text())
    assert len(summary) == 2 and all((tmp_path / "x" / s["file"]).is_file() for s in summary)


def test_unsupported_attention_is_a_clear_error(tmp_path, capsys):
    Image.new("RGB", (80, 60)).save(tmp_path / "img.png")
    assert main(["explain", str(tmp_path / "img.png"), "--checkpoint", str(_checkpoint(tmp_path, "dab_detr_lite")),
                 "--output", str(tmp_path / "x")]) == 2
    assert "not supported" in capsys.readouterr().err


def test_rtdetr_sampling_points_on_its_own_input(tmp_path):
    """RT-DETR: the decoder's sampling points, mapped back to the original (non-square) image from its square input;
    with per-level point counts the padded points carry no weight."""
    model = create_model("rtdetrv2_r18vd", num_classes=3, n_points=[4, 2, 1], **TINY)
    meta = {"model": "rtdetrv2_r18vd", "num_classes": 3, "model_args": {**TINY, "n_points": [4, 2, 1]},
            "class_names": ["cat", "dog", "fish"], "label_to_cat": [1, 2, 3], "image_size": 64}
    det = Detector(save_weights(tmp_path / "rt.safetensors", model, meta))
    found = explain(det, Image.new("RGB", (80, 60), (90, 120, 30)), threshold=0.0, max_detections=2)
    attn = det.model.decoder.layers[-1].cross_attn
    assert len(found) == 2
    for exp in found:
        assert exp.points.shape == (attn.n_heads * 3 * 4, 2)  # padded to 4 points on every level
        assert exp.weights.sum() == pytest.approx(attn.n_heads, abs=1e-4)  # the real 7 points of each head
        assert (exp.weights.reshape(attn.n_heads, 3, 4)[:, 1, 2:] == 0).all()  # level 2's padding


def test_d_fine_sampling_points_of_the_layer_inference_ends_at(tmp_path):
    """D-FINE-M infers with its 4th of 5 decoder layers (eval_idx -2): explain shows that layer's points (the 5th
    does not run at inference and records nothing)."""
    args = {**TINY, "num_decoder_layers": 3, "eval_idx": -2, "hidden_dim": 32, "encoder_ffn": 64}
    model = create_model("dfine_m", num_classes=3, **args)
    meta = {"model": "dfine_m", "num_classes": 3, "model_args": args, "class_names": ["cat", "dog", "fish"],
            "label_to_cat": [1, 2, 3], "image_size": 64}
    det = Detector(save_weights(tmp_path / "df.safetensors", model, meta))
    found = explain(det, Image.new("RGB", (80, 60), (90, 120, 30)), threshold=0.0, max_detections=2)
    attn = det.model.decoder.layers[1].cross_attn
    assert len(found) == 2 and det.model.decoder.eval_idx == 1
    for exp in found:
        assert exp.points.shape == (attn.n_heads * attn.n_levels * attn.n_points, 2)
        assert exp.weights.sum() == pytest.approx(attn.n_heads, abs=1e-4)
