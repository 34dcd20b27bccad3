"""Mosaic and MixUp (DEIM's dense one-to-one): four images in one, two blended, boxes moved with their pixels;
exact resume holds; the final epochs without augmentation."""

import torch
from torchvision import tv_tensors

from detrkit.data import CocoDetection, build_transforms
from detrkit.data.mosaic import mixup, mosaic
from detrkit.data.sampler import SeededSamples
from detrkit.data.transforms import val_transforms

COLOURS = [(250, 20, 20), (20, 250, 20), (20, 20, 250), (250, 250, 20)]


def _drawn(h: int, w: int, box: tuple[int, int, int, int], colour) -> tuple[torch.Tensor, dict]:
    """A grey (3, h, w) uint8 image with ``box`` (x0, y0, x1, y1) filled in ``colour``, and its target."""
    image = torch.full((3, h, w), 90, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY",
                                                canvas_size=(h, w)), "labels": torch.tensor([0])}
    return tv_tensors.Image(image), target


def _inside_colour(image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Mean colour of the box's interior, 2 pixels in from its edges (away from resampling blur)."""
    x0, y0, x1, y1 = box.round().int().tolist()
    return image[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].float().mean((1, 2))


def test_each_box_lands_on_its_drawn_pixels_in_the_mosaic():
    sizes = [(60, 80), (80, 50), (70, 70), (40, 90)]
    boxes = [(10, 10, 40, 35), (5, 30, 35, 70), (20, 15, 60, 50), (50, 8, 85, 32)]
    samples = []
    for i, ((h, w), box, colour) in enumerate(zip(sizes, boxes, COLOURS, strict=True)):
        image, target = _drawn(h, w, box, colour)
        samples.append((image, {**target, "labels": torch.tensor([i])}))
    for seed in range(5):
        torch.manual_seed(seed)
        image, target = mosaic(samples, size=80)
        assert image.shape == (3, 160, 160) and target["boxes"].canvas_size == (160, 160)
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            x0, y0, x1, y1 = box.tolist()
            assert 0 <= x0 <= x1 <= 160 and 0 <= y0 <= y1 <= 160
            if min(x1 - x0, y1 - y0) < 8:
                continue  # cut down to a sliver by the canvas edge: nothing to look inside
            want = torch.tensor(COLOURS[int(label)], dtype=torch.float32)
            assert (_inside_colour(image, box) - want).abs().max() < 12, (seed, int(label))
    # negative control: the source boxes, not moved with their images, do not sit on their colours
    torch.manual_seed(0)
    image, _ = mosaic(samples, size=80)
    off = [(_inside_colour(image, torch.tensor(b, dtype=torch.float32)) - torch.tensor(c, dtype=torch.float32))
           .abs().max() for b, c in zip(boxes, COLOURS, strict=True)]
    assert max(off) > 50


def test_cropped_mosaic_keeps_the_objects_scale_and_their_pixels():
    """``crop=True`` (YOLOv5's mosaic): a window of one image's size around the centre, objects at their own scale;
    the uncropped mosaic is twice the size, which the transforms' resize to ``size`` halves (negative control)."""
    boxes = [(10, 10, 22, 20), (50, 50, 62, 66), (30, 40, 44, 52), (60, 10, 72, 24)]
    samples = []
    for i, (box, colour) in enumerate(zip(boxes, COLOURS, strict=True)):
        image, target = _drawn(80, 80, box, colour)
        samples.append((image, {**target, "labels": torch.tensor([i])}))
    sides = {i: (b[2] - b[0], b[3] - b[1]) for i, b in enumerate(boxes)}
    whole = 0
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = mosaic(samples, size=80, crop=True)
        assert image.shape == (3, 80, 80) and target["boxes"].canvas_size == (80, 80)
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            x0, y0, x1, y1 = box.tolist()
            assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 80
            if 0 < x0 and x1 < 80 and 0 < y0 and y1 < 80:  # not cut by the window: its full size, on its colour
                whole += 1
                assert (x1 - x0, y1 - y0) == sides[int(label)]
                want = torch.tensor(COLOURS[int(label)], dtype=torch.float32)
                assert (_inside_colour(image, box) - want).abs().max() < 12
    assert whole >= 4  # the windows left some objects whole
    torch.manual_seed(0)
    image, target = mosaic(samples, size=80)
    assert image.shape == (3, 160, 160)  # resized to 80 by the transforms: every object at half its size


def test_mosaic_samples_repeat_exactly_and_stop_after_mosaic_epochs(synth_dir):
    data = CocoDetection(synth_dir / "train", synth_dir / "annotations" / "instances_train.json",
                         transforms=build_transforms(True, scales=[96, 128], max_size=200, crop=False),
                         mosaic=1.0, mosaic_epochs=2, check_images="none")
    seeded = SeededSamples(data, seed=3)
    a, b = seeded[(0, 5)], seeded[(0, 5)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])  # a resumed run sees the same
    plain = data[5][1]["labels"]
    assert len(a[1]["labels"]) > len(plain)  # four images' objects in one
    assert not torch.equal(seeded[(1, 5)][0], a[0])  # another epoch, another mosaic
    assert len(seeded[(2, 5)][1]["labels"]) == len(plain)  # from mosaic_epochs on: the image as it is


def test_mixup_blends_the_second_image_resized_and_keeps_both_images_boxes():
    first = _drawn(60, 80, (10, 10, 40, 35), COLOURS[0])
    second = _drawn(30, 40, (20, 5, 35, 25), COLOURS[1])  # half the size: resized to the first's
    torch.manual_seed(0)
    image, target = mixup(first, second)
    assert image.shape == (3, 60, 80) and target["boxes"].canvas_size == (60, 80)
    assert target["labels"].tolist() == [0, 0] and len(target["boxes"]) == 2
    torch.testing.assert_close(target["boxes"][1], torch.tensor([40.0, 10.0, 70.0, 50.0]))  # scaled x2
    assert (image[:, 30, 5].float() - 90).abs().max() < 2  # grey on grey: still grey
    # inside the second image's box only: the first's grey blended with the second's green, about half and half
    mix = _inside_colour(image, target["boxes"][1])
    grey, green = torch.full((3,), 90.0), torch.tensor(COLOURS[1], dtype=torch.float32)
    assert (mix - (0.5 * grey + 0.5 * green)).abs().max() < 0.06 * 255
    # negative control: the second image's box unscaled is not where its green went
    assert (_inside_colour(image, torch.tensor([20.0, 5.0, 35.0, 25.0])) - mix).abs().max() > 20


def test_mixup_and_augmentation_stop_epoch(synth_dir):
    """MixUp adds the objects of a second image; from aug_stop_epoch on a sample is the plain transforms' output
    (what validation sees), with neither mosaics nor MixUp."""
    plain = val_transforms(128)
    data = CocoDetection(synth_dir / "train", synth_dir / "annotations" / "instances_train.json",
                         transforms=build_transforms(True, scales=[96, 128], max_size=200, crop=False),
                         mixup=1.0, aug_stop_epoch=2, plain_transforms=plain, check_images="none")
    seeded = SeededSamples(data, seed=3)
    n = len(data[5][1]["labels"])
    assert len(seeded[(0, 5)][1]["labels"]) > n  # the objects of two images
    assert torch.equal(seeded[(0, 5)][0], seeded[(0, 5)][0])  # a resumed run sees the same
    late = seeded[(2, 5)]
    want = CocoDetection(synth_dir / "train", synth_dir / "annotations" / "instances_train.json", transforms=plain,
                         check_images="none")[5]
    assert torch.equal(late[0], want[0]) and torch.equal(late[1]["boxes"], want[1]["boxes"])
    assert not torch.equal(seeded[(1, 5)][0][:, :96, :96], want[0][:, :96, :96])  # before it: augmented
