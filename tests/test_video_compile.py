"""predict on a video (PyAV), and torch.compile for inference and training (slow: compiling takes a minute on CPU)."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY

from detrkit import Detector, create_model
from detrkit.cli import main
from detrkit.weights.files import save_weights


def _checkpoint(tmp_path, name="detr_lite"):
    model = create_model(name, num_classes=3, **TINY)
    meta = {"model": name, "num_classes": 3, "model_args": TINY, "class_names": ["cat", "dog", "fish"],
            "label_to_cat": [1, 2, 3], "image_size": 64}
    return save_weights(tmp_path / f"{name}.safetensors", model, meta)


@pytest.mark.parametrize("name", ["detr_lite", "rtdetr_lite", "dfine_lite"])  # RT-DETR / D-FINE: square input
def test_predict_video_writes_an_annotated_video_and_per_frame_results(tmp_path, name):
    av = pytest.importorskip("av")
    source = tmp_path / "clip.mp4"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 80, 64, "yuv420p"
        for i in range(6):
            frame = np.zeros((64, 80, 3), np.uint8)
            frame[10 + 4 * i : 30 + 4 * i, 20:50] = (200, 60, 40)  # a moving block
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "pred"
    assert main(["predict", str(source), "--checkpoint", str(_checkpoint(tmp_path, name)), "--output", str(out),
                 "--threshold", "0.0", "--max_detections", "2", "--batch_size", "4"]) == 0
    with av.open(str(out / "clip.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (64, 80, 3)
    per_frame = json.loads((out / "detections.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert sorted(map(int, per_frame)) == list(range(6)) and all(len(d) == 2 for d in per_frame.values())
    assert sorted({r["image_id"] for r in results}) == [1, 2, 3, 4, 5, 6] and len(results) == 12


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detr_lite", "deformable_detr_lite"])
def test_compiled_detector_matches_eager(tmp_path, name):
    ckpt = _checkpoint(tmp_path, name)
    image = torch.rand(3, 60, 80)
    eager = Detector(ckpt).predict(image, threshold=0.0)
    compiled = Detector(ckpt, compile=True).predict(image, threshold=0.0)
    assert torch.equal(eager.labels, compiled.labels)
    assert (eager.scores - compiled.scores).abs().max() <= 1e-4 and (eager.boxes - compiled.boxes).abs().max() <= 1e-3


@pytest.mark.slow
def test_training_with_compile_saves_plain_checkpoints(synth_dir, tmp_path):
    from detrkit.engine.config import TrainConfig
    from detrkit.engine.train import train

    cfg = TrainConfig(recipe="none", model="detr_lite", data=str(synth_dir), output_dir=str(tmp_path / "run"),
                      model_args=dict(TINY),
                      image_size=96, batch_size=2, num_workers=0, progress=False, epochs=1, max_train_images=4,
                      max_val_images=2, compile=True)
    train(cfg)
    assert Detector(tmp_path / "run").model.class_embed.weight.shape[0] == 6  # 5 synthetic classes + no-object
