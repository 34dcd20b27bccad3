"""Training end to end: a few-image overfit, checkpoints, resume, evaluation, the CLI."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from PIL import Image

from detrkit import Detector
from detrkit.cli import main
from detrkit.engine.checkpoint import latest_checkpoint
from detrkit.engine.config import TrainConfig
from detrkit.engine.train import train


def _cfg(synth_dir, out, **kw):
    base = dict(recipe="none", model="detr_lite", data=str(synth_dir), output_dir=str(out),
                model_args=dict(TINY), image_size=96,
                batch_size=2, num_workers=0, progress=False, crop=False, lr=1e-3, lr_backbone=1e-3, clip_max_norm=1.0)
    return TrainConfig(**{**base, **kw})


def _log(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_overfit_few_images_loss_falls_far(synth_dir, tmp_path):
    """Two images memorised: the loss falls far, and evaluated on those same images AP50 is high."""
    train_ann = synth_dir / "annotations" / "instances_train.json"
    cfg = _cfg(synth_dir, tmp_path / "run", epochs=120, max_train_images=2, max_val_images=2, eval_every=1000,
               lr_drop=1000, augment=False, val_images=str(synth_dir / "train"), val_ann=str(train_ann),
               train_images=str(synth_dir / "train"), train_ann=str(train_ann))
    metrics = train(cfg)
    log = _log(tmp_path / "run")
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.15 * first, (first, last)
    assert metrics["AP50"] > 0.5, metrics
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(0.0 <= saved[k] <= 1.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert saved["AP"] == metrics["AP"]


def test_resume_continues_where_it_stopped(synth_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(synth_dir, out, epochs=1, max_train_images=4, max_val_images=2))
    last = latest_checkpoint(out)
    assert last.name == "step_00000002" and (last / "model.safetensors").is_file() and (last / "state.pt").is_file()
    train(_cfg(synth_dir, out, epochs=2, max_train_images=4, max_val_images=2, resume="last"))
    log = _log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[1]["step"] == 2 * log[0]["step"]


def test_cli_train_eval_predict(synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(synth_dir), "--output_dir", str(out), "--epochs", "1", "--image_size", "96",
               "--batch_size", "2", "--num_workers", "0", "--progress", "false", "--max_train_images", "4",
               "--model_args", json.dumps(TINY)])
    assert rc == 0
    assert "AP50" in capsys.readouterr().out
    rc = main(["eval", "--checkpoint", str(out), "--data", str(synth_dir), "--output", str(tmp_path / "m.json")])
    saved = json.loads((tmp_path / "m.json").read_text())
    assert rc == 0 and set(saved) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    assert len(saved["per_class"]) == 5 and (tmp_path / "confusion_matrix.png").is_file()  # beside the metrics
    (tmp_path / "metrics").mkdir()  # --output FOLDER: metrics.json inside it (was an IsADirectoryError traceback)
    rc = main(["eval", "--checkpoint", str(out), "--data", str(synth_dir), "--output", str(tmp_path / "metrics")])
    assert rc == 0
    assert (tmp_path / "metrics" / "metrics.json").is_file()
    # a folder that does not exist yet, named with a trailing slash: made, and everything goes inside it (metrics
    # used to become a file named like the folder, and the pictures landed beside it)
    rc = main(["eval", "--checkpoint", str(out), "--data", str(synth_dir), "--output", f"{tmp_path / 'new'}/"])
    assert rc == 0
    assert (tmp_path / "new" / "metrics.json").is_file() and (tmp_path / "new" / "confusion_matrix.png").is_file()
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(out), "--data", str(synth_dir), "--output", str(tmp_path / "m.json" / "x")])
    err = capsys.readouterr().err  # under a file: one line naming it, before any evaluation; exit status 2
    assert rc == 2 and "m.json is a file, not a folder" in err and "Traceback" not in err and "batch/s" not in err
    rc = main(["predict", str(synth_dir / "val"), "--checkpoint", str(out), "--output", str(tmp_path / "pred"),
               "--threshold", "0.0", "--max_detections", "3"])
    assert rc == 0
    dets = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert len(dets) == 4 and all(len(d) == 3 for d in dets.values())
    assert {d["name"] for ds in dets.values() for d in ds} <= {"circle", "square", "triangle", "star", "cross"}
    assert len(list((tmp_path / "pred").glob("*.jpg"))) == 4
    # COCO results: one entry per detection, bbox xywh of the same box
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert len(results) == 12 and {r["image_id"] for r in results} == {0, 1, 2, 3}  # digit file names are the ids
    first = dets[sorted(dets)[0]][0]
    assert results[0]["bbox"] == pytest.approx([first["box"][0], first["box"][1], first["box"][2] - first["box"][0],
                                               first["box"][3] - first["box"][1]], abs=0.02)
    # a glob, in batches of 3
    # a glob, in batches of 3, with the image ids of the annotation file: results.json scores with COCOeval
    ann = synth_dir / "annotations" / "instances_val.json"
    rc = main(["predict", str(synth_dir / "val" / "*.jpg"), "--checkpoint", str(out), "--output", str(tmp_path / "g"),
               "--threshold", "0.0", "--max_detections", "2", "--batch_size", "3", "--ann", str(ann)])
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    assert rc == 0 and len(results) == 8
    # tiled: ~140-px images in 64-px tiles (9 per image at overlap 0.25), detections in image coordinates
    rc = main(["predict", str(synth_dir / "val"), "--checkpoint", str(out), "--output", str(tmp_path / "t"),
               "--threshold", "0.0", "--max_detections", "5", "--tile", "64", "--overlap", "0.25"])
    dets = json.loads((tmp_path / "t" / "detections.json").read_text())
    assert rc == 0 and all(0 < len(d) <= 5 for d in dets.values())
    for name, found in dets.items():
        w, h = Image.open(synth_dir / "val" / name).size
        assert all(0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h for x0, y0, x1, y1 in (d["box"] for d in found))
    assert main(["predict", str(synth_dir / "val"), "--checkpoint", str(out), "--tile", "0"]) == 2
    assert {r["image_id"] for r in results} == {im["id"] for im in json.loads(ann.read_text())["images"]}


def test_cli_errors_are_readable(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert "not a dataset folder detrkit knows" in err and "YOLO" in err and "Traceback" not in err
    assert main(["predict", str(tmp_path / "missing.jpg"), "--checkpoint", str(tmp_path)]) == 2
    assert "no such image" in capsys.readouterr().err
    assert main(["train", "--model", "detr_nope", "--data", str(tmp_path), "--progress", "false"]) == 2
    assert "unknown model 'detr_nope'" in capsys.readouterr().err
    assert main(["train", "--output_dir", str(tmp_path / "o"), "--progress", "false"]) == 2
    assert "pass --data DIR" in capsys.readouterr().err


def test_bad_one_to_many_and_class_loss_options_are_one_line_errors(synth_dir, tmp_path, capsys):
    common = ["train", "--data", str(synth_dir), "--output_dir", str(tmp_path / "o"), "--progress", "false",
              "--model", "detr_lite", "--check_images", "none"]
    assert main([*common, "--model_args", "{one_to_many: hybrid, o2m_k: 0}"]) == 2
    err = capsys.readouterr().err
    assert "o2m_k must be >= 1" in err and "do not fit detr_lite" in err and "Traceback" not in err
    assert main([*common, "--class_loss", "varifocal"]) == 2
    err = capsys.readouterr().err
    assert "--class_loss: class_loss='varifocal' does not fit a softmax model" in err and "Traceback" not in err


def test_detector_accepts_paths_pil_arrays_and_tensors(synth_dir, tmp_path):
    import numpy as np
    from PIL import Image

    out = tmp_path / "run"
    train(_cfg(synth_dir, out, epochs=1, max_train_images=2, max_val_images=1))
    det = Detector(out, device="cpu", threshold=0.0)
    path = sorted((synth_dir / "val").glob("*.jpg"))[0]
    pil = Image.open(path).convert("RGB")
    results = det.predict([path, pil, np.asarray(pil), torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)])
    for r in results[1:]:
        torch.testing.assert_close(r.boxes, results[0].boxes)
        assert r.names == results[0].names
    one = det.predict(pil, max_detections=5)
    assert len(one) == 5 and one.boxes.shape == (5, 4)
    assert (one.boxes[:, 2] >= one.boxes[:, 0]).all()


@pytest.mark.parametrize(
    "args", [["models"], ["data", "synth", "--num_train", "2", "--num_val", "1", "--image_size", "64"]]
)
def test_cli_models_and_synth(tmp_path, capsys, args):
    if args[0] == "data":
        args = args + ["--out", str(tmp_path / "d")]
    assert main(args) == 0
    text = capsys.readouterr().out
    if args[0] == "models":
        assert "detr_r50" in text and "detr_lite" in text
    else:
        assert (tmp_path / "d" / "annotations" / "instances_val.json").is_file()
        assert len(list((tmp_path / "d" / "train").glob("*.jpg"))) == 2


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "true", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "AP50" in out
    assert (tmp_path / "demo" / "run" / "metrics.json").is_file()
    assert len(list((tmp_path / "demo" / "predictions").glob("*.jpg"))) >= 1
    for picture in ("training_curves.png", "pr_curves.png", "per_class_ap.png", "confusion_matrix.png"):
        assert (tmp_path / "demo" / "run" / picture).is_file() and picture in out  # made, and named to the user
    from PIL import Image

    sheet = tmp_path / "demo" / "contact_sheet.jpg"  # the validation images: predictions beside the ground truth
    assert str(sheet) in out and Image.open(sheet).width >= 4 * 300
    drawn = Image.open(next((tmp_path / "demo" / "predictions").glob("*.jpg")))
    assert max(drawn.size) >= 640  # the demo's small images are drawn at a readable size


def test_demo_is_the_fast_cpu_recipe_the_readme_gives(synth_dir):
    """The demo trains what `detrkit train --data DIR --recipe fast-cpu` trains, the command the README shows."""
    from detrkit.cli.train import demo_config, train_parser
    from detrkit.engine.recipes import resolve_recipe

    args = train_parser().parse_args(["--data", str(synth_dir), "--output_dir", "out", "--recipe", "fast-cpu"])
    fields = TrainConfig.__dataclass_fields__
    command = resolve_recipe(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})).config
    assert resolve_recipe(demo_config(synth_dir, "out")).config == command
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "detrkit train --data my_data --recipe fast-cpu" in " ".join(readme.split())


def test_fine_tune_from_official_weights(synth_dir, tmp_path):
    """--weights: an official-layout 91-class DETR checkpoint; the synthetic classes re-initialise the head only."""
    from test_detrex_names import official_detr_state

    from detrkit import create_model

    source = create_model("detr_lite", num_classes=91, **TINY)
    torch.save({"model": official_detr_state(source)}, tmp_path / "official.pth")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="has 91 classes.*re-initialised for fine-tuning"):
        train(_cfg(synth_dir, out, epochs=1, max_train_images=2, max_val_images=2, lr=0.0, lr_backbone=0.0,
                   weights=str(tmp_path / "official.pth")))
    tuned = Detector(out).model  # trained with lr 0: the loaded weights, saved as they were
    assert torch.equal(tuned.backbone.body.conv1.weight, source.backbone.body.conv1.weight)
    assert torch.equal(tuned.decoder.layers[1].linear2.weight, source.decoder.layers[1].linear2.weight)
    assert tuned.class_embed.weight.shape[0] == tuned.num_classes + 1 != 92


def test_evaluate_checkpoint_warns_about_categories_it_never_predicts(synth_dir, tmp_path, capsys):
    from detrkit import create_model
    from detrkit.engine.evaluate import UnpredictedCategoriesWarning, evaluate_checkpoint
    from detrkit.weights.files import save_weights

    model = create_model("detr_lite", num_classes=3, **TINY)
    meta = {"model": "detr_lite", "num_classes": 3, "model_args": TINY, "class_names": list("abc"),
            "label_to_cat": [100, 101, 102], "image_size": 64}  # ids the synthetic data does not use
    save_weights(tmp_path / "m.safetensors", model, meta)
    val = (synth_dir / "val", synth_dir / "annotations" / "instances_val.json")
    with pytest.warns(UnpredictedCategoriesWarning, match="never predicts"):
        metrics = evaluate_checkpoint(tmp_path / "m.safetensors", *val, progress=False)
    assert metrics["AP"] == 0.0
    assert main(["eval", "--checkpoint", str(tmp_path / "m.safetensors"), "--images", str(val[0]), "--ann",
                 str(val[1]), "--output", str(tmp_path / "m.json")]) == 0
    assert "warning: " in capsys.readouterr().err


def test_val_split_trains_a_dataset_without_one_and_eval_finds_the_held_out_images(synth_dir, tmp_path, capsys):
    """A flat VOC folder has no validation split: training refuses and names --val_split; with it the run holds out a
    seeded share of the images, writes which, and `detrkit eval` evaluates on exactly those."""
    from _datasets import write_voc

    voc = write_voc(synth_dir, tmp_path / "voc", splits=("train",)) / "VOCdevkit" / "VOC2007"
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in [*(voc / "JPEGImages").iterdir(), *(voc / "Annotations").iterdir()]:
        f.rename(flat / f.name)
    common = ["train", "--data", str(flat), "--output_dir", str(tmp_path / "run"), "--epochs", "1", "--image_size",
              "96", "--batch_size", "2", "--num_workers", "0", "--progress", "false", "--model_args",
              json.dumps(TINY)]
    assert main(common) == 2
    assert "--val_split 0.1" in capsys.readouterr().err
    assert main([*common, "--val_split", "0.25"]) == 0
    held = json.loads((tmp_path / "run" / "val_split.json").read_text())
    assert len(held["val_image_ids"]) == 3 and held["seed"] == 42
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(flat)]) == 0
    assert "held out" in capsys.readouterr().out
    from detrkit.engine.config import read_val_split

    _, coco, _ = read_val_split(tmp_path / "run" / "val_split.json")
    assert sorted(img["id"] for img in coco["images"]) == held["val_image_ids"]


def test_resume_keeps_the_network_its_checkpoint_was_saved_with(synth_dir, tmp_path):
    """A run saved with ResNet-vd's deep stem (as every rtdetr_lite run before the fast-cpu recipe took the 7x7
    stem) resumes under that recipe with its own stem; a new run of the recipe gets the 7x7 one (the control)."""
    out, new = tmp_path / "old", tmp_path / "new"
    small = dict(model="rtdetr_lite", model_args={}, image_size=64, max_train_images=2, max_val_images=2)
    train(_cfg(synth_dir, out, epochs=1, **small))  # recipe none: the preset's deep stem, no backbone_stem saved
    train(_cfg(synth_dir, out, epochs=2, resume="last", **{**small, "recipe": "fast-cpu"}))
    assert "backbone_stem" not in yaml.safe_load((out / "config.yaml").read_text())["model_args"]
    assert [r["epoch"] for r in _log(out)] == [1, 2]
    train(_cfg(synth_dir, new, epochs=1, **{**small, "recipe": "fast-cpu"}))
    assert yaml.safe_load((new / "config.yaml").read_text())["model_args"]["backbone_stem"] == "7x7"
