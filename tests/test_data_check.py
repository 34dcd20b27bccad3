"""Robust data: image modes, the dataset doctor, --skip_invalid, YOLO / Pascal VOC datasets and their conversion."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from _datasets import read_coco, write_coco_per_split, write_voc, write_yolo
from PIL import Image

from detrkit.cli import main
from detrkit.data import CocoDetection, DatasetError
from detrkit.data.check import check_dataset, drop_invalid
from detrkit.data.image import BACKGROUND, image_size, open_rgb
from detrkit.engine.config import TrainConfig, dataset_split


# -- image modes ---------------------------------------------------------------------------------------------
def test_grayscale_palette_rgba_16bit_read_as_the_rgb_they_show(tmp_path):
    gray = np.full((8, 10), 200, np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    assert np.asarray(open_rgb(tmp_path / "gray.png")).tolist() == np.full((8, 10, 3), 200).tolist()

    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[:, :5] = (255, 0, 0, 255)          # opaque red on the left
    rgba[:, 5:] = (0, 255, 0, 0)            # fully transparent green on the right: hidden colour must not show
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(open_rgb(tmp_path / "rgba.png"))
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 9].tolist() == list(BACKGROUND)

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pal.png", transparency=1)
    out = np.asarray(open_rgb(tmp_path / "pal.png"))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == list(BACKGROUND)

    sixteen = np.array([[0, 257 * 100], [65535, 257 * 7]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    out = np.asarray(open_rgb(tmp_path / "16.png"))
    assert out[..., 0].tolist() == [[0, 100], [255, 7]] and out.dtype == np.uint8


def test_exif_rotated_image_is_read_upright_and_its_boxes_fit(tmp_path):
    """A phone photo stored sideways (EXIF orientation 6 = rotate 90 clockwise to display): annotation tools show
    the upright image, so the boxes are in its frame; the doctor and the dataset read it upright too."""
    upright = np.zeros((40, 60, 3), np.uint8)   # displayed: 60 wide, 40 high
    upright[5:15, 40:58] = 255                  # object at x 40..58, y 5..15
    stored = np.rot90(upright, k=1).copy()      # stored 40 wide, 60 high; orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "img").mkdir()
    Image.fromarray(stored).save(tmp_path / "img" / "a.jpg", exif=exif.tobytes(), quality=100)
    assert image_size(tmp_path / "img" / "a.jpg") == (60, 40)
    assert open_rgb(tmp_path / "img" / "a.jpg").size == (60, 40)
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 60, "height": 40}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [40, 5, 18, 10]}],
            "categories": [{"id": 1, "name": "thing"}]}
    assert check_dataset(coco, tmp_path / "img", progress=False).ok
    img, target = CocoDetection(tmp_path / "img", coco)[0]
    assert img.shape == (3, 40, 60)
    assert img[:, 10, 49].float().mean() > 200 and img[:, 30, 10].float().mean() < 50  # the object is where the box is


# -- the doctor ----------------------------------------------------------------------------------------------
def _broken_dataset(root):
    """Every kind of problem once, next to good data."""
    (root / "img").mkdir(parents=True)
    for name in ("ok.png", "ok2.png", "empty.png", "dup.png"):
        Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(root / "img" / name)
    (root / "img" / "garbage.png").write_bytes(b"this is not a png")
    full = root / "img" / "trunc.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    full.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    images = [{"id": 1, "file_name": "ok.png", "width": 80, "height": 50},
              {"id": 2, "file_name": "ok2.png", "width": 80, "height": 50},
              {"id": 3, "file_name": "gone.png", "width": 80, "height": 50},
              {"id": 4, "file_name": "garbage.png", "width": 80, "height": 50},
              {"id": 5, "file_name": "trunc.jpg", "width": 64, "height": 64},
              {"id": 6, "file_name": "empty.png", "width": 80, "height": 50},
              {"id": 2, "file_name": "dup.png", "width": 80, "height": 50}]
    box = [10, 10, 20, 20]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": box},            # unknown category
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5]},  # zero width
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [10, 10, -3, 5]},  # negative
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [100, 60, 5, 5]},  # outside the 80x50 image
            {"id": 6, "image_id": 1, "category_id": 1, "bbox": [70, 40, 20, 20]},  # partly outside: warning
            {"id": 7, "image_id": 99, "category_id": 1, "bbox": box},           # unknown image
            {"id": 1, "image_id": 2, "category_id": 1, "bbox": box},            # duplicate annotation id
            {"id": 8, "image_id": 2, "category_id": 2, "bbox": [1, 2, 3]},       # malformed bbox
            {"id": 9, "image_id": 2, "category_id": 1, "bbox": box}]
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "never"}]}
    (root / "ann.json").write_text(json.dumps(coco))
    return root / "img", root / "ann.json", coco


def test_doctor_finds_every_problem(tmp_path):
    images, _, coco = _broken_dataset(tmp_path)
    report = check_dataset(coco, images, images="full", progress=False)
    errors = {p.kind for p in report.errors}
    assert errors == {"unknown category", "empty box", "box outside the image", "unknown image",
                      "duplicate annotation id", "malformed bbox", "duplicate image id", "missing image",
                      "unreadable image", "truncated image"}
    assert sum(p.kind == "empty box" for p in report.errors) == 2
    warnings = {p.kind for p in report.warnings}
    assert {"box partly outside the image", "image without annotations", "category without annotations"} <= warnings
    assert report.class_counts == {"cat": 3, "dog": 0, "never": 0}   # ann 1, 6 (partly outside, kept), 9
    text = report.format()
    assert "gone.png" in text and "category_id 9" in text and "trunc.jpg" in text and "never" in text
    # header-only (training's default) cannot see the truncation, but sees everything else
    fast = {p.kind for p in check_dataset(coco, images, images="header", progress=False).errors}
    assert fast == errors - {"truncated image"}


def test_skip_invalid_drops_exactly_the_broken_parts(tmp_path):
    images, ann, coco = _broken_dataset(tmp_path)
    report = check_dataset(coco, images, images="full", progress=False)
    clean, dropped = drop_invalid(coco, report)
    assert [img["file_name"] for img in clean["images"]] == ["ok.png", "ok2.png", "empty.png"]
    assert sorted(a["id"] for a in clean["annotations"]) == [1, 6, 9]
    assert dropped == {"images": 4, "annotations": 7}
    assert check_dataset(clean, images, images="full", progress=False).ok
    with pytest.raises(DatasetError, match="(?s)missing image.*--skip_invalid true"):
        CocoDetection(images, ann)
    with pytest.warns(UserWarning, match=r"dropped 4 image\(s\) and 7 annotation\(s\)"):
        ds = CocoDetection(images, ann, skip_invalid=True, check_images="full")
    assert len(ds) == 3 and [len(ds[i][1]["boxes"]) for i in range(3)] == [2, 1, 0]


def test_cli_data_check_exit_status_and_report(tmp_path, synth_dir, capsys):
    assert main(["data", "check", str(synth_dir)]) == 0
    out = capsys.readouterr().out
    assert "instances_train.json: 12 images" in out and "OK: 0 errors" in out and "circle" in out
    images, ann, _ = _broken_dataset(tmp_path)
    rc = main(["data", "check", str(ann), "--images", str(images), "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED: 11 errors" in out and "ERROR missing image: 1" in out
    assert json.loads((tmp_path / "r.json").read_text())[0]["errors"] == 11


# -- YOLO and Pascal VOC -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["yolo", "voc"])
def test_yolo_and_voc_read_back_the_same_boxes(synth_dir, tmp_path, layout):
    root = (write_yolo if layout == "yolo" else write_voc)(synth_dir, tmp_path / layout)
    coco = read_coco(synth_dir, "val")
    images, ann, source = dataset_split(TrainConfig(data=str(root)), "val")
    assert isinstance(ann, dict) and source
    coco_names = [c["name"] for c in coco["categories"]]  # YOLO keeps the class order, VOC sorts the names
    expected_names = sorted(coco_names) if layout == "voc" else coco_names
    assert [c["name"] for c in sorted(ann["categories"], key=lambda c: c["id"])] == expected_names
    assert len(ann["images"]) == len(coco["images"]) and len(ann["annotations"]) == len(coco["annotations"])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    got_names = {c["id"]: c["name"] for c in ann["categories"]}
    expect = sorted((names[a["category_id"]], *a["bbox"]) for a in coco["annotations"])
    got = sorted((got_names[a["category_id"]], *a["bbox"]) for a in ann["annotations"])
    assert [e[0] for e in expect] == [g[0] for g in got]
    np.testing.assert_allclose([e[1:] for e in expect], [g[1:] for g in got], atol=0.01)  # YOLO: 6 decimals
    ds = CocoDetection(images, ann, source=source)
    assert len(ds) == len(coco["images"]) and ds.report.ok


def test_yolo_bad_lines_are_reported_with_file_and_line(synth_dir, tmp_path):
    root = write_yolo(synth_dir, tmp_path / "y")
    label = sorted((root / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text() + "7 0.5 0.5 0.1 0.1\n0 0.5 oops 0.1\n")   # class 7 of 5; not a number
    images, ann, source = dataset_split(TrainConfig(data=str(root)), "train")
    report = check_dataset(ann, images, source=source, progress=False)
    messages = [p.message for p in report.errors]
    assert len(messages) == 2 and all(label.name in m for m in messages)
    assert any("category_id 7" in m for m in messages) and any("'0 0.5 oops 0.1'" in m for m in messages)


def test_cli_data_convert_writes_a_coco_folder_training_reads(synth_dir, tmp_path, capsys):
    root = write_voc(synth_dir, tmp_path / "voc")
    assert main(["data", "convert", str(root), "-o", str(tmp_path / "coco")]) == 0
    assert "train: 12 images" in capsys.readouterr().out
    images, ann, _ = dataset_split(TrainConfig(data=str(tmp_path / "coco")), "train")
    ds = CocoDetection(images, ann)
    assert len(ds) == 12 and isinstance(ds[0][0], torch.Tensor)
    assert main(["data", "check", str(tmp_path / "coco"), "--images-check", "header"]) == 0  # dashes work too


@pytest.mark.parametrize("json_name,val_dir", [("_annotations.coco.json", "valid"), ("annotations.json", "val")])
def test_coco_per_split_folders_are_found_by_data(synth_dir, tmp_path, capsys, json_name, val_dir):
    """Roboflow's COCO export (train/ valid/ test/, each with _annotations.coco.json beside its images) and the
    plain per-split layout read as the COCO folder they came from; `data check` and `data convert` take them."""
    root = write_coco_per_split(synth_dir, tmp_path / "rf", json_name, val_dir)
    for split in ("train", "val"):
        images, ann, _ = dataset_split(TrainConfig(data=str(root)), split)
        assert ann == root / ("train" if split == "train" else val_dir) / json_name and images == ann.parent
        ds = CocoDetection(images, ann)
        assert len(ds) == len(read_coco(synth_dir, split)["images"]) and ds.report.ok
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "OK: 0 errors" in out and f"COCO dataset per split (train/{json_name}, {val_dir}/{json_name})" in out
    assert main(["data", "convert", str(root), "-o", str(tmp_path / "coco")]) == 0
    assert read_coco(tmp_path / "coco", "val")["annotations"] == read_coco(synth_dir, "val")["annotations"]


def test_coco_per_split_without_a_val_folder_names_what_it_looked_for(synth_dir, tmp_path):
    root = write_coco_per_split(synth_dir, tmp_path / "rf")
    shutil.rmtree(root / "valid")
    with pytest.raises(DatasetError, match=r"no val split: expected valid/ or val/ or validation/"):
        dataset_split(TrainConfig(data=str(root)), "val")


def test_flat_voc_folder_and_xml_names_that_lie(synth_dir, tmp_path, capsys):
    """Images and their .xml side by side (LabelImg's layout) read as VOC; an XML <filename> naming a file that does
    not exist (the original .tif of a .jpg) finds the image by the XML's stem, with one warning counting them."""
    voc = write_voc(synth_dir, tmp_path / "voc", splits=("train",)) / "VOCdevkit" / "VOC2007"
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in [*(voc / "JPEGImages").iterdir(), *(voc / "Annotations").iterdir()]:
        shutil.move(f, flat / f.name)
    xmls = sorted(flat.glob("*.xml"))
    for xml in xmls[:3]:
        xml.write_text(xml.read_text().replace(f"<filename>{xml.stem}.jpg<", f"<filename>{xml.stem}.tif<"))
    with pytest.warns(UserWarning, match=r"3 of 12 XML files .*\(e\.g\. \S+\.tif -> \S+\.jpg\)"):
        images, ann, source = dataset_split(TrainConfig(data=str(flat)), "train")
    assert images == flat and len(ann["images"]) == 12
    assert len(ann["annotations"]) == len(read_coco(synth_dir, "train")["annotations"])
    assert CocoDetection(images, ann, source=source).report.ok  # every image found
    (flat / f"{xmls[3].stem}.jpg").unlink()  # truly missing: the doctor's error names the XML file
    with pytest.warns(UserWarning, match="3 of 12"):
        images, ann, source = dataset_split(TrainConfig(data=str(flat)), "train")
    errors = [p.message for p in check_dataset(ann, images, source=source, progress=False).errors]
    assert len(errors) == 1 and f"named in {xmls[3]}" in errors[0]
    shutil.copy(synth_dir / "train" / f"{xmls[3].stem.split('_')[-1]}.jpg", flat / f"{xmls[3].stem}.jpg")
    with pytest.raises(DatasetError, match=r"no ImageSets/Main/val.txt .*--val_images --val_ann"):
        dataset_split(TrainConfig(data=str(flat)), "val")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="3 of 12"):
        assert main(["data", "check", str(flat)]) == 0
    assert "Pascal VOC dataset, flat: 12 .xml files beside the images" in capsys.readouterr().out
    # convert, then the check command convert suggests works (it failed on the missing val json)
    with pytest.warns(UserWarning, match="3 of 12"):
        assert main(["data", "convert", str(flat), "-o", str(tmp_path / "coco")]) == 0
    out = capsys.readouterr().out
    assert "--val_split 0.1" in out and f"detrkit data check {tmp_path / 'coco'}" in out
    assert main(["data", "check", str(tmp_path / "coco")]) == 0
    with pytest.warns(UserWarning, match="3 of 12"):  # convert can make the split too: the same one training would
        assert main(["data", "convert", str(flat), "-o", str(tmp_path / "split"), "--val_split", "0.25"]) == 0
    assert "train: 9 images" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "split")]) == 0
    with pytest.warns(UserWarning, match="3 of 12"):
        held = dataset_split(TrainConfig(data=str(flat), val_split=0.25), "val")[1]
    assert sorted(i["id"] for i in read_coco(tmp_path / "split", "val")["images"]) == sorted(
        i["id"] for i in held["images"])


def test_split_coco_is_seeded_disjoint_and_order_free(synth_dir):
    from detrkit.data.formats import split_coco

    coco = read_coco(synth_dir, "train")
    train, val = split_coco(coco, 0.25, seed=3)
    ids = lambda c: {img["id"] for img in c["images"]}  # noqa: E731
    assert len(val["images"]) == 3 and ids(train) | ids(val) == ids(coco) and not ids(train) & ids(val)
    assert all(a["image_id"] in ids(val) for a in val["annotations"])
    assert len(train["annotations"]) + len(val["annotations"]) == len(coco["annotations"])
    shuffled = {**coco, "images": coco["images"][::-1]}
    assert ids(split_coco(shuffled, 0.25, seed=3)[1]) == ids(val)  # the file's order does not matter
    assert ids(split_coco(coco, 0.25, seed=4)[1]) != ids(val)  # the seed does
    with pytest.raises(DatasetError, match="must be in"):
        split_coco(coco, 1.5)


@pytest.mark.parametrize("flat", [False, True])
def test_yolo_export_with_classes_txt_instead_of_data_yaml(synth_dir, tmp_path, flat):
    """LabelImg's YOLO mode and many exporters write classes.txt, not data.yaml: images/{train,val} + labels/, or
    every image with its .txt side by side (then all of it is the train split)."""
    root = write_yolo(synth_dir, tmp_path / "y")
    names = yaml.safe_load((root / "data.yaml").read_text())["names"]
    (root / "data.yaml").unlink()
    if flat:
        for f in [*(root / "images" / "train").iterdir(), *(root / "labels" / "train").iterdir()]:
            f.rename(root / f.name)
        shutil.rmtree(root / "images"), shutil.rmtree(root / "labels")
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    images, ann, source = dataset_split(TrainConfig(data=str(root)), "train")
    coco = read_coco(synth_dir, "train")
    assert [c["name"] for c in ann["categories"]] == names
    assert len(ann["images"]) == 12 and len(ann["annotations"]) == len(coco["annotations"])
    assert CocoDetection(images, ann, source=source).report.ok
    if flat:
        with pytest.raises(DatasetError, match=r"classes.txt: no 'val' images; .*--val_split 0.1"):
            dataset_split(TrainConfig(data=str(root)), "val")
    else:
        assert len(dataset_split(TrainConfig(data=str(root)), "val")[1]["images"]) == 4


def test_voc_xml_and_image_folders_given_explicitly(synth_dir, tmp_path):
    """--train_ann XML_FOLDER --train_images IMAGE_FOLDER (and the same for val): any two folders are a VOC split."""
    voc = write_voc(synth_dir, tmp_path / "voc") / "VOCdevkit" / "VOC2007"
    for split in ("train", "val"):
        stems = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        for sub, suffix in (("xml", ".xml"), ("img", ".jpg")):
            (tmp_path / split / sub).mkdir(parents=True)
            for stem in stems:
                src = voc / ("Annotations" if sub == "xml" else "JPEGImages") / f"{stem}{suffix}"
                shutil.copy(src, tmp_path / split / sub / src.name)
    cfg = TrainConfig(train_images=str(tmp_path / "train" / "img"), train_ann=str(tmp_path / "train" / "xml"),
                      val_images=str(tmp_path / "val" / "img"), val_ann=str(tmp_path / "val" / "xml"))
    for split, n in (("train", 12), ("val", 4)):
        images, ann, source = dataset_split(cfg, split)
        assert images == tmp_path / split / "img" and len(ann["images"]) == n
        assert len(ann["annotations"]) == len(read_coco(synth_dir, split)["annotations"])
        assert CocoDetection(images, ann, source=source).report.ok
