import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torchvision import tv_tensors

from detrkit.data import IMAGENET_MEAN, IMAGENET_STD, CocoDetection, DatasetError, build_transforms, collate
from detrkit.data.synthetic import CLASSES, draw_image
from detrkit.data.transforms import photometric_distortion


def _write_dataset(root, images, annotations, categories=None):
    (root / "img").mkdir(parents=True, exist_ok=True)
    infos = []
    for i, arr in enumerate(images):
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        infos.append({"id": i + 1, "file_name": f"{i}.png", "width": arr.shape[1], "height": arr.shape[0]})
    categories = categories or [{"id": 7, "name": "box"}, {"id": 3, "name": "other"}]
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": infos, "annotations": annotations, "categories": categories}))
    return root / "img", ann


def _white_extent(img):
    """xyxy extent of the bright pixels of a normalized (3, H, W) image."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    gray = (img * std + mean).mean(0)
    ys, xs = torch.nonzero(gray > 0.5, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


@pytest.mark.parametrize("seed", range(8))
def test_train_transforms_keep_boxes_on_their_objects(tmp_path, seed):
    arr = np.zeros((120, 160, 3), np.uint8)
    arr[30:70, 50:110] = 255  # the object: x 50..110, y 30..70
    images, ann = _write_dataset(
        tmp_path, [arr], [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [50, 30, 60, 40], "iscrowd": 0}]
    )
    tf = build_transforms(True, scales=[96, 128, 160], max_size=240, crop_scales=[100, 120], crop_size=(60, 100))
    ds = CocoDetection(images, ann, tf)
    torch.manual_seed(seed)
    import random
    random.seed(seed)
    img, target = ds[0]
    h, w = img.shape[-2:]
    assert target["size"].tolist() == [h, w] and target["orig_size"].tolist() == [120, 160]
    extent = _white_extent(img)
    if len(target["boxes"]) == 0:  # cropped away entirely
        assert extent is None or (extent[2:] - extent[:2]).min() <= 2
        return
    assert target["labels"].tolist() == [ds.cat_to_label[7]]
    cx, cy, bw, bh = (target["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
    box = torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
    assert extent is not None
    torch.testing.assert_close(box, extent, atol=2.5, rtol=0)  # interpolation blurs edges by ~1 px


def test_flip_moves_box(tmp_path):
    import torchvision.transforms.v2 as T
    from torchvision import tv_tensors

    boxes = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 5.0, 30.0, 25.0]]), format="XYXY", canvas_size=(40, 100))
    img = tv_tensors.Image(torch.zeros(3, 40, 100, dtype=torch.uint8))
    _, out = T.RandomHorizontalFlip(p=1.0)(img, {"boxes": boxes, "labels": torch.tensor([0])})
    assert out["boxes"].tolist() == [[70.0, 5.0, 90.0, 25.0]]


def test_val_resize_and_category_mapping(tmp_path):
    arr = np.zeros((100, 200, 3), np.uint8)
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 100, 50], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [100, 50, 100, 50], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 1}]
    images, ann = _write_dataset(tmp_path, [arr, arr], anns)
    ds = CocoDetection(images, ann, build_transforms(False, val_size=50, max_size=1000))
    assert ds.label_to_cat == [3, 7] and ds.class_names == ["other", "box"]
    img, t = ds[0]
    assert img.shape == (3, 50, 100)
    assert t["labels"].tolist() == [0, 1]  # crowd box left out
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]))
    img2, t2 = ds[1]  # image without annotations is kept
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,)
    batch = collate([(img, t), (torch.zeros(3, 30, 60), t2)])
    assert batch.images.shape == (2, 3, 50, 100)
    assert batch.padding_mask[1, 30:, :].all() and not batch.padding_mask[1, :30, :60].any()
    assert not batch.padding_mask[0].any()


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
    arr = np.zeros((20, 20, 3), np.uint8)
    images, ann = _write_dataset(tmp_path, [arr], [{"id": 5, "image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5]}])
    with pytest.raises(
        DatasetError, match=r"(?s)annotation id 5 .*category_id 99 is not in 'categories'.*--skip_invalid"
    ):
        CocoDetection(images, ann)
    with pytest.raises(DatasetError, match="annotation file not found"):
        CocoDetection(images, tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json is not valid JSON"):
        CocoDetection(images, bad)
    images, ann = _write_dataset(tmp_path / "m", [arr], [])
    (images / "0.png").unlink()
    with pytest.raises(DatasetError, match=r"missing image: 1\n.*'0.png'.*0.png does not exist"):
        CocoDetection(images, ann)
    images, ann = _write_dataset(tmp_path / "c", [arr], [])
    (images / "0.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="unreadable image: 1\n.*0.png"):
        CocoDetection(images, ann)
    with pytest.raises(DatasetError, match="cannot read image .*0.png"):  # found when it is read, if not checked
        CocoDetection(images, ann, check_images="none")[0]


def test_synthetic_dataset_is_a_fair_task_and_deterministic(synth_dir):
    a, objs_a = draw_image(3, "train", 5, image_size=160)
    b, objs_b = draw_image(3, "train", 5, image_size=160)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and objs_a == objs_b
    c, _ = draw_image(4, "train", 5, image_size=160)
    assert not np.array_equal(np.asarray(c.resize(a.size)), np.asarray(a))
    data = json.loads((synth_dir / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASSES) and len(CLASSES) >= 5
    per_image = np.bincount([a["image_id"] for a in data["annotations"]])[1:]
    assert per_image.min() >= 1
    # over many images: every class appears, sizes span small to large, up to ~20 objects
    objs = [o for i in range(60) for o in draw_image(0, "train", i, image_size=320)[1]]
    sides = np.array([min(x1 - x0, y1 - y0) for _, (x0, y0, x1, y1), _ in objs])
    assert set(c for c, _, _ in objs) == set(range(len(CLASSES)))
    assert sides.min() < 12 and sides.max() > 120
    counts = [len(draw_image(0, "train", i, image_size=320)[1]) for i in range(60)]
    assert min(counts) >= 1 and max(counts) >= 15


def test_rtdetr_transforms_without_crop_keep_the_object_size(tmp_path):
    """crop=False leaves out RT-DETR's zoom-out and IoU crop: every sample keeps the object where it was; with
    them (the negative control) some samples move or rescale it."""
    arr = np.zeros((120, 160, 3), np.uint8)
    arr[30:70, 50:110] = 255
    images, ann = _write_dataset(
        tmp_path, [arr], [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [50, 30, 60, 40], "iscrowd": 0}]
    )
    kept = [80 / 160, 50 / 120, 60 / 160, 40 / 120]  # cxcywh, normalized; centred in x, so a flip keeps it too
    changed = 0
    for crop in (False, True):
        ds = CocoDetection(images, ann, build_transforms(True, val_size=96, crop=crop, preprocess="rtdetr"))
        for seed in range(12):
            torch.manual_seed(seed)
            img, target = ds[0]
            assert img.shape == (3, 96, 96)
            box = target["boxes"][0].tolist() if len(target["boxes"]) else None
            same = box is not None and max(abs(a - b) for a, b in zip(box, kept, strict=True)) < 0.02
            if not crop:
                assert same, (seed, box)
            changed += not same
    assert changed > 0


def test_rtdetr_scale_jitter_rescales_and_shifts_boxes_with_their_pixels(tmp_path):
    """scale_jitter = s (YOLO's random affine): the object's size varies within [1 - s, 1 + s] of its resized size
    and its box follows its pixels; without it (the negative control) every sample keeps the same size."""
    arr = np.zeros((120, 160, 3), np.uint8)
    arr[40:70, 60:100] = 255  # the object: 40 x 30 px, well inside the image
    images, ann = _write_dataset(
        tmp_path, [arr], [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [60, 40, 40, 30], "iscrowd": 0}]
    )
    base_w = 40 / 160  # normalized width after the resize to the square
    for jitter in (0.5, 0.0):
        ds = CocoDetection(images, ann, build_transforms(True, val_size=96, crop=False, preprocess="rtdetr",
                                                         scale_jitter=jitter))
        widths = []
        for seed in range(16):
            torch.manual_seed(seed)
            img, target = ds[0]
            assert img.shape == (3, 96, 96) and len(target["boxes"]) == 1
            cx, cy, bw, bh = (target["boxes"][0] * 96).tolist()
            x0, y0, x1, y1 = (round(v) for v in (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2))
            inside = img[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].mean()
            above, below = img[:, max(y0 - 4, 0) : y0 - 1, x0:x1], img[:, y1 + 1 : y1 + 4, x0:x1]
            ring = torch.cat([above.flatten(), below.flatten()])
            assert inside > ring.mean() + 0.3, (jitter, seed)  # the box sits on the bright object
            widths.append(target["boxes"][0, 2].item() / base_w)
        if jitter:
            assert 0.5 - 0.03 <= min(widths) and max(widths) <= 1.5 + 0.03
            assert max(widths) - min(widths) > 0.4, widths
        else:
            assert max(widths) - min(widths) < 0.01, widths
    with pytest.raises(ValueError, match="RT-DETR"):
        build_transforms(True, scale_jitter=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        build_transforms(True, preprocess="rtdetr", scale_jitter=1.5)


def test_photometric_yolo_changes_the_light_more_than_rtdetr_and_none_keeps_the_colours():
    """photometric = yolo (YOLO's HSV gains, V x 0.6-1.4 on every image) spreads a grey image's brightness wider
    than RT-DETR's distortion (x 0.875-1.125, half the time); none (the negative control) leaves it as it is;
    the boxes never move with the colours."""
    img = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    boxes = tv_tensors.BoundingBoxes([[8, 8, 40, 40]], format="XYXY", canvas_size=(64, 64))
    spread = {}
    for name in ("yolo", "rtdetr", "none"):
        tf = T.Compose([*photometric_distortion(name), T.Identity()])
        means = []
        for seed in range(40):
            torch.manual_seed(seed)
            out, target = tf(img, {"boxes": boxes, "labels": torch.tensor([1])})
            assert target["boxes"].tolist() == boxes.tolist()
            means.append(out.float().mean().item() / 128)
        spread[name] = (min(means), max(means))
    assert spread["none"] == (1.0, 1.0)
    assert spread["yolo"][0] < 0.7 and spread["yolo"][1] > 1.3, spread  # x 0.6-1.4 in 40 draws
    assert spread["rtdetr"][0] > 0.85 and spread["rtdetr"][1] < 1.15, spread
    with pytest.raises(ValueError, match="rtdetr, yolo, none"):
        photometric_distortion("hsv")
