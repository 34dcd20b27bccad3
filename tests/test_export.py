"""ONNX export of every family: the graph (model + postprocessing) run in onnxruntime matches PyTorch."""

import pytest
import torch
from conftest import TINY

from detrkit import create_model
from detrkit.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from detrkit.export import check_onnx, export_onnx  # noqa: E402

CATS = [1, 5, 9]  # category ids the graph must output instead of class indices
# (builder overrides, traced image size): every feature level must be larger than one pixel when traced, or
# torch.export takes its size for a constant (the two-stage preset has a stride-64 level)
FAMILIES = {"detr_lite": ({}, (64, 96)), "deformable_detr_lite": ({}, (64, 96)), "dab_detr_lite": ({}, (64, 96)),
            "dino_lite": ({}, (64, 96)), "dn_dab_detr_lite": ({}, (64, 96)),
            "deformable_detr_r50_two_stage": ({"backbone": "resnet18"}, (128, 160)),
            "rtdetr_lite": ({"hidden_dim": 32, "encoder_ffn": 64}, (64, 96)),
            "dfine_lite": ({"hidden_dim": 32, "encoder_ffn": 64}, (64, 96))}
DEFORMABLE = ["deformable_detr_lite", "dino_lite", "deformable_detr_r50_two_stage", "dfine_lite"]
# The default suite exports the deformable family (grid_sample, dynamic level sizes); every family: pytest -m slow
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "name", [n if n == "deformable_detr_lite" else pytest.param(n, marks=SLOW) for n in sorted(FAMILIES)]
)
def test_onnx_graph_matches_pytorch_at_other_batch_and_image_sizes(name, tmp_path):
    overrides, (h, w) = FAMILIES[name]
    model = create_model(name, num_classes=3, **TINY, **overrides).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx", image_size=(h, w), label_to_cat=CATS, top_k=20)
    if name in DEFORMABLE:  # the default sampling: GridSample nodes (the gather export's negative control)
        from detrkit.export import graph_operators

        assert "GridSample" in graph_operators(path)
    for shape in [(1, 3, h, w), (2, 3, w, h)]:  # the traced size, then another batch and size
        diff = check_onnx(path, model, torch.randn(shape), label_to_cat=CATS, top_k=20)
        assert diff["scores"] <= 1e-4 and diff["boxes"] <= 1e-4, (shape, diff)

    import onnxruntime as ort

    boxes, scores, labels = ort.InferenceSession(str(path)).run(None, {"images": torch.randn(1, 3, h, w).numpy()})
    k = min(20, TINY["num_queries"]) if model.score_activation == "softmax" else 20  # DETR: one detection per query
    assert boxes.shape == (1, k, 4) and scores.shape == labels.shape == (1, k) and set(labels.ravel()) <= set(CATS)
    assert (scores[0, :-1] >= scores[0, 1:]).all()  # best first


def test_cli_export_checks_parity(tmp_path, capsys):
    from detrkit.weights.files import save_weights

    model = create_model("detr_lite", num_classes=3, **TINY)
    meta = {"model": "detr_lite", "num_classes": 3, "model_args": TINY, "class_names": list("abc"),
            "label_to_cat": CATS, "image_size": 64}
    save_weights(tmp_path / "m.safetensors", model, meta)
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path / "m.onnx")]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime vs PyTorch at 1x3x64x64" in text and "onnxruntime vs PyTorch at 2x3x32x64" in text
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--format", "tflite"]) == 2


def test_export_verify_checks_the_graph_and_refuses_a_mismatch(tmp_path):
    from detrkit.export import ExportMismatchError, verify_onnx

    model = create_model("detr_lite", num_classes=3, **TINY).eval()
    options = dict(image_size=(64, 96), batch_size=1, label_to_cat=CATS, top_k=10)
    path = export_onnx(model, tmp_path / "m.onnx", verify=True, **options)  # passes: the graph is the model
    rows = verify_onnx(path, model, **options)
    assert [r["shape"] for r in rows] == [(1, 3, 64, 96), (2, 3, 32, 96)]  # exported shape + another batch / size
    assert all(r["scores"] <= 1e-4 and r["boxes"] <= 1e-4 for r in rows)
    other = create_model("detr_lite", num_classes=3, **TINY).eval()  # other weights: the graph no longer matches
    with pytest.raises(ExportMismatchError, match="differs from PyTorch"):
        verify_onnx(path, other, **options)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detr_lite", "deformable_detr_lite"])
def test_fp16_export_matches_pytorch_in_fp16(name, tmp_path):
    model = create_model(name, num_classes=3, **TINY).eval()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=(64, 96), label_to_cat=CATS, top_k=20, fp16=True)
    for shape in [(1, 3, 64, 96), (2, 3, 96, 64)]:
        diff = check_onnx(path, model, torch.randn(shape), label_to_cat=CATS, top_k=20)
        assert diff["scores"] <= 1e-3 and diff["boxes"] <= 1e-3, (shape, diff)  # float16 keeps ~3 digits


@pytest.mark.parametrize("name", [n if n == "deformable_detr_lite" else pytest.param(n, marks=SLOW)
                                  for n in DEFORMABLE])
def test_gather_export_has_no_grid_sample_and_matches_pytorch(name, tmp_path):
    from detrkit.export import graph_operators

    overrides, (h, w) = FAMILIES[name]
    model = create_model(name, num_classes=3, **TINY, **overrides).eval()
    gather = export_onnx(model, tmp_path / "gather.onnx", image_size=(h, w), label_to_cat=CATS, top_k=20,
                         sampling="gather")
    assert "GridSample" not in graph_operators(gather)  # (the default export holds it: the test above)
    assert all(m.backend == "auto" for m in model.modules() if hasattr(m, "backend"))  # the model is left as it was
    for shape in [(1, 3, h, w), (2, 3, w, h), (3, 3, h + 32, w + 64)]:  # two batch sizes, three image sizes
        diff = check_onnx(gather, model, torch.randn(shape), label_to_cat=CATS, top_k=20)
        assert diff["scores"] <= 1e-4 and diff["boxes"] <= 1e-4, (shape, diff)


def test_export_refuses_a_size_that_collapses_a_level_and_an_unknown_sampling(tmp_path):
    from detrkit.export import ExportSettingError

    model = create_model("deformable_detr_lite", num_classes=3, **TINY).eval()  # coarsest level: stride 32
    with pytest.raises(ExportSettingError, match="stride-32 feature level one pixel.*export at 64 px or more"):
        export_onnx(model, tmp_path / "m.onnx", image_size=(48, 96))
    with pytest.raises(ExportSettingError, match="sampling must be one of"):
        export_onnx(model, tmp_path / "m.onnx", image_size=(64, 96), sampling="nearest")


def test_cli_export_says_the_minimum_size(tmp_path, capsys):
    from detrkit.weights.files import save_weights

    model = create_model("deformable_detr_lite", num_classes=3, **TINY)
    meta = {"model": "deformable_detr_lite", "num_classes": 3, "model_args": TINY, "class_names": list("abc"),
            "label_to_cat": CATS, "image_size": 64}
    save_weights(tmp_path / "m.safetensors", model, meta)
    rc = main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path / "m.onnx"),
               "--image_size", "32", "--sampling", "gather"])
    assert rc == 2 and "export at 64 px or more" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "sampling"), [pytest.param("deformable_detr_lite", "grid_sample", marks=SLOW),
                                                ("deformable_detr_lite", "gather"),
                                                pytest.param("dfine_lite", "gather", marks=SLOW)])
def test_openvino_runtime_matches_pytorch(name, sampling, tmp_path):
    pytest.importorskip("openvino")
    from detrkit.export import check_openvino, export_openvino

    model = create_model(name, num_classes=3, **TINY, **FAMILIES[name][0]).eval()
    path = export_openvino(model, tmp_path / "m.xml", image_size=(64, 96), label_to_cat=CATS, top_k=20,
                           sampling=sampling)
    assert path.is_file() and path.with_suffix(".bin").is_file()
    for shape in [(1, 3, 64, 96), (2, 3, 96, 64)]:  # two batch sizes and image sizes: the axes stay dynamic
        diff = check_openvino(path, model, torch.randn(shape), label_to_cat=CATS, top_k=20)
        assert diff["scores"] <= 1e-4 and diff["boxes"] <= 1e-4, (shape, diff)


def test_cli_openvino_export_or_the_extra_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    from detrkit.weights.files import save_weights

    model = create_model("detr_lite", num_classes=3, **TINY)
    meta = {"model": "detr_lite", "num_classes": 3, "model_args": TINY, "class_names": list("abc"),
            "label_to_cat": CATS, "image_size": 64}
    save_weights(tmp_path / "m.safetensors", model, meta)
    args = ["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--format", "openvino", "--output",
            str(tmp_path / "m")]
    if importlib.util.find_spec("openvino") is not None:
        assert main(args) == 0
        assert "OpenVINO vs PyTorch at 2x3x32x64" in capsys.readouterr().out and (tmp_path / "m.xml").is_file()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert main(args) == 2
    assert "pip install 'detrkit[openvino]'" in capsys.readouterr().err


def test_rtdetrv2_discrete_sampling_exports_without_grid_sample(tmp_path):
    """RT-DETRv2's discrete sampling is its deployment answer to GridSample: the graph has none and matches PyTorch
    at other batch and image sizes (multiples of 32, pixels in [0, 1])."""
    from detrkit.export import graph_operators

    model = create_model("rtdetrv2_r18vd", num_classes=3, sampling="discrete", hidden_dim=32, encoder_ffn=64,
                         **TINY).eval()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=(64, 96), label_to_cat=CATS, top_k=20)
    assert "GridSample" not in graph_operators(path)
    for shape in [(1, 3, 64, 96), (2, 3, 96, 64), (1, 3, 128, 160)]:
        diff = check_onnx(path, model, torch.rand(shape), label_to_cat=CATS, top_k=20)
        assert diff["scores"] <= 1e-4 and diff["boxes"] <= 1e-4, (shape, diff)


@SLOW  # about two minutes: an RT-DETR export
def test_distinct_query_selection_exports_as_non_max_suppression(tmp_path):
    """RT-DETR with DDQ's distinct queries (``query_nms``): the NMS before the top-k is an ONNX NonMaxSuppression
    whose batch and image size stay dynamic. At IoU 0.1 it suppresses neighbouring anchors even at initialisation
    (their IoU is 0.17 - 0.25), so the check runs through real suppression."""
    from detrkit.export import graph_operators

    torch.manual_seed(0)
    model = create_model("rtdetr_lite", num_classes=3, **TINY, hidden_dim=32, encoder_ffn=64, query_nms=0.1).eval()
    path = export_onnx(model, tmp_path / "ddq.onnx", image_size=(64, 96), label_to_cat=CATS, top_k=20)
    assert "NonMaxSuppression" in graph_operators(path)
    for shape in [(1, 3, 64, 96), (2, 3, 96, 128)]:
        diff = check_onnx(path, model, torch.randn(shape), label_to_cat=CATS, top_k=20)
        assert diff["scores"] <= 1e-4 and diff["boxes"] <= 1e-4, (shape, diff)
