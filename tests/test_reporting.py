"""What a run shows: per-class AP, PR curves and the confusion matrix (checked on hand-made detections), the
pictures and TensorBoard events of a training run, early stopping, and the labels picture of `data check`."""

import json
import sys

import numpy as np
import pytest
from conftest import TINY

from detrkit.cli import main
from detrkit.engine.config import TrainConfig
from detrkit.engine.evaluate import coco_box_ap, coco_eval, confusion_matrix, per_class_ap, pr_curves, score
from detrkit.engine.train import train


def _gt():
    """Two images; class 1 ("square"): 2 boxes, class 2 ("circle"): 1 box, class 3 ("star"): none."""
    box = lambda i, image, cat, xywh: {"id": i, "image_id": image, "category_id": cat, "bbox": xywh,  # noqa: E731
                                       "area": xywh[2] * xywh[3], "iscrowd": 0}
    return {"images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
            "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}, {"id": 3, "name": "star"}],
            "annotations": [box(1, 1, 1, [10, 10, 40, 40]), box(2, 2, 1, [100, 100, 50, 50]),
                            box(3, 1, 2, [120, 20, 40, 40])]}


def _det(image, cat, xywh, s):
    return {"image_id": image, "category_id": cat, "bbox": xywh, "score": s}


def test_per_class_ap_and_pr_curves_come_from_the_same_precision_as_the_overall_ap():
    gt = _gt()
    # squares: both found exactly; the circle: only a detection far from it (a miss and a false positive)
    results = [_det(1, 1, [10, 10, 40, 40], 0.9), _det(2, 1, [100, 100, 50, 50], 0.8),
               _det(1, 2, [0, 150, 30, 30], 0.7)]
    ev = coco_eval(gt, results)
    rows = {r["name"]: r for r in per_class_ap(ev, gt)}
    assert rows["square"]["AP"] == pytest.approx(1.0) and rows["square"]["AP50"] == pytest.approx(1.0)
    assert rows["circle"]["AP"] == 0.0 and rows["circle"]["num_gt"] == 1
    assert rows["star"]["AP"] is None and rows["star"]["num_gt"] == 0  # no ground truth: not a zero
    # COCO's AP is the mean over the classes that have ground truth
    assert coco_box_ap(gt, results)["AP"] == pytest.approx((1.0 + 0.0) / 2)
    curves = pr_curves(ev, gt)
    assert curves["category_ids"] == [1, 2, 3] and curves["precision50"].shape == (3, 101)
    np.testing.assert_array_equal(curves["precision50"][0], np.ones(101))
    np.testing.assert_array_equal(curves["precision50"][1], np.zeros(101))
    assert (curves["precision50"][2] == -1).all()


def test_per_class_ap50_orders_a_half_found_class_between_perfect_and_missed():
    gt = _gt()
    results = [_det(1, 1, [10, 10, 40, 40], 0.9), _det(1, 2, [120, 20, 40, 40], 0.8)]  # one of the two squares
    rows = {r["name"]: r for r in per_class_ap(coco_eval(gt, results), gt)}
    assert rows["circle"]["AP50"] == pytest.approx(1.0)
    assert 0.4 < rows["square"]["AP50"] < 0.6  # precision 1 up to recall 0.5, then nothing


def test_confusion_matrix_counts_matches_confusions_misses_and_false_positives():
    gt = _gt()
    results = [
        _det(1, 1, [10, 10, 40, 40], 0.9),     # square found as square
        _det(2, 2, [100, 100, 50, 50], 0.9),   # square found as circle
        _det(1, 1, [0, 150, 30, 30], 0.9),     # a square where nothing is: false positive
        _det(1, 2, [120, 20, 40, 40], 0.1),    # the circle, but below the score threshold: the circle is missed
    ]
    m = confusion_matrix(gt, results, score_threshold=0.25)
    expected = np.zeros((4, 4), dtype=int)  # rows true (square, circle, star, background), columns predicted
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 3] = 1  # circle missed
    expected[3, 0] = 1  # false-positive square
    np.testing.assert_array_equal(m, expected)
    # a detection overlapping too little does not match: with IoU 0.95 required, the exact boxes still match
    shifted = [_det(1, 1, [14, 14, 40, 40], 0.9)]
    assert confusion_matrix(gt, shifted)[0, 0] == 1  # IoU ~0.67 >= 0.5
    loose = confusion_matrix(gt, shifted, iou_threshold=0.9)
    assert loose[0, 0] == 0 and loose[3, 0] == 1 and loose[0, 3] == 2


def test_score_writes_the_evaluation_pictures(tmp_path):
    gt = _gt()
    metrics = score(gt, [_det(1, 1, [10, 10, 40, 40], 0.9)], [1, 2], tmp_path)
    assert [r["name"] for r in metrics["per_class"]] == ["square", "circle", "star"]
    for name in ("pr_curves.png", "per_class_ap.png", "confusion_matrix.png"):
        assert (tmp_path / name).stat().st_size > 5000, name


def _cfg(synth_dir, out, **kw):
    base = dict(recipe="none", model="detr_lite", data=str(synth_dir), output_dir=str(out),
                model_args=dict(TINY), image_size=96,
                batch_size=2, num_workers=0, progress=False, crop=False, lr=1e-3, lr_backbone=1e-3,
                max_train_images=4, max_val_images=4)
    return TrainConfig(**{**base, **kw})


def test_a_run_folder_holds_pictures_per_class_ap_and_tensorboard_events(synth_dir, tmp_path, capsys):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    metrics = train(_cfg(synth_dir, out, epochs=2))
    for name in ("labels.png", "train_batch.png", "training_curves.png", "pr_curves.png", "per_class_ap.png",
                 "confusion_matrix.png"):
        assert (out / name).stat().st_size > 5000, name
    saved = json.loads((out / "metrics.json").read_text())
    names = json.loads((synth_dir / "annotations" / "instances_val.json").read_text())["categories"]
    assert [r["name"] for r in saved["per_class"]] == [c["name"] for c in sorted(names, key=lambda c: c["id"])]
    assert saved["per_class"] == metrics["per_class"]
    printed = capsys.readouterr().out
    assert all(r["name"] in printed for r in saved["per_class"])  # the per-class table is printed at the end
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"epoch/loss", "val/AP", "val/AP50"} <= set(tags["scalars"])
    assert any(t.startswith("val_AP_per_class/") for t in tags["scalars"])
    assert [e.step for e in acc.Scalars("val/AP")] == [2, 4]  # one per evaluation, at its optimizer step
    assert "val/predictions" in tags["images"]


def test_training_without_tensorboard_says_so_once_and_goes_on(synth_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    train(_cfg(synth_dir, tmp_path / "run", epochs=1, plots=False))
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("pip install 'detrkit[tensorboard]'") == 1
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "labels.png").exists()


def test_early_stopping_ends_after_patience_evaluations_without_gain(synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # lr 0: the weights never change, so the first evaluation stays the best and every later one is no gain
    metrics = train(_cfg(synth_dir, out, epochs=10, lr=0.0, lr_backbone=0.0, patience=2, plots=False,
                         tensorboard=False))
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]  # best at 1, no gain at 2 and 3: stop
    assert metrics["epoch"] == 3 and "early stopping after epoch 3" in capsys.readouterr().out
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()
    # negative control: without patience the same run trains every epoch
    train(_cfg(synth_dir, tmp_path / "all", epochs=4, lr=0.0, lr_backbone=0.0, plots=False, tensorboard=False))
    assert len((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()) == 4


def test_data_check_writes_a_labels_picture_per_split(synth_dir, tmp_path, capsys):
    rc = main(["data", "check", str(synth_dir), "--images_check", "header", "--plots", str(tmp_path / "pics")])
    assert rc == 0
    for split in ("train", "val"):
        assert (tmp_path / "pics" / f"labels_{split}.png").stat().st_size > 5000
    assert "labels picture" in capsys.readouterr().out


def test_training_curves_plot_the_step_log_and_every_evaluation(synth_dir, tmp_path):
    """training_curves.png draws the losses and lr of every logged step (steps.jsonl, not three epoch means) and each
    evaluation's AP at its epoch, on an x axis that starts at 0 and ends at the run's end; a single evaluation is a
    marker labelled with its value."""
    from matplotlib.ticker import MaxNLocator

    from detrkit.engine.plots import _read_jsonl, smooth, training_curves_figure

    out = tmp_path / "run"
    train(_cfg(synth_dir, out, epochs=3, log_every=1, eval_every=3))
    steps, metrics = _read_jsonl(out / "steps.jsonl"), _read_jsonl(out / "metrics.jsonl")
    per_epoch = metrics[0]["step"]
    fig = training_curves_figure(metrics, steps)
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}
    assert len(steps) == 3 * per_epoch > len(metrics)  # a point per step, more than one per epoch
    raw = lines["raw:loss"]
    assert raw.get_xdata().tolist() == [r["step"] / per_epoch for r in steps]
    assert raw.get_ydata().tolist() == [r["loss"] for r in steps]
    np.testing.assert_allclose(lines["smooth:loss"].get_ydata(), smooth([r["loss"] for r in steps]))
    assert lines["lr"].get_ydata().tolist() == [r["lr"] for r in steps]
    evals = [r for r in metrics if "val_AP" in r]
    assert len(evals) == 1 and lines["val_AP50"].get_xdata().tolist() == [3.0]
    assert lines["val_AP50"].get_ydata().tolist() == [100 * evals[0]["val_AP50"]]
    ap_axis = lines["val_AP50"].axes
    assert ap_axis.get_xlim()[0] == 0 and ap_axis.get_xlim()[1] >= 3.0  # not a lone point on 2.84 .. 3.16
    assert f"{100 * evals[0]['val_AP50']:.1f}" in [t.get_text() for t in ap_axis.texts]
    assert isinstance(ap_axis.xaxis.get_major_locator(), MaxNLocator)
    fig.draw_without_rendering()
    for key in ("smooth:loss_bbox", "val_AP50"):  # legends beside the curves, not over them
        ax = lines[key].axes
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_smoothing_is_a_debiased_moving_average():
    from detrkit.engine.plots import smooth

    np.testing.assert_allclose(smooth([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])  # debiased: no pull towards 0 at the start
    s = smooth([0.0, 10.0], weight=0.5)
    assert s[0] == 0.0 and s[1] == pytest.approx(10 * 0.5 / 0.75)
    assert smooth([float("nan"), 1.0]).tolist()[1] == 1.0
