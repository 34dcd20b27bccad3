"""Tiled prediction: windows cover the image, and merging finds each object once, whole, across tile borders."""

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from detrkit.inference.detector import Detections, Detector
from detrkit.inference.tiles import cut_by_tile_border, merge_tiles, tile_windows


def test_windows_cover_the_image_with_the_overlap_asked():
    windows = tile_windows(1000, 700, 400, 0.25)
    covered = np.zeros((700, 1000), bool)
    for x0, y0, x1, y1 in windows:
        assert x1 - x0 == 400 and y1 - y0 == 400
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted({w[0] for w in windows})
    assert xs[:2] == [0, 300] and xs[-1] == 600  # stride 400 * 0.75; the last column ends at the border
    assert tile_windows(300, 200, 400, 0.25) == [(0, 0, 300, 200)]


class PixelOracle(Detector):
    """A 'model' that sees pixels: every connected blob of a class colour is a detection (score 0.9), so a blob cut
    by a tile's border gives a cut box, as a real detector would."""

    COLOURS = {1: (255, 0, 0), 2: (0, 0, 255)}

    def __init__(self):  # no checkpoint
        self.calls = 0

    def predict(self, images, *, threshold=None, max_detections=100, tile=None, overlap=0.2, batch_size=8):
        if tile:
            return super().predict(images, max_detections=max_detections, tile=tile, overlap=overlap,
                                   batch_size=batch_size)
        out = []
        for image in images:
            self.calls += 1
            pixels = np.asarray(image)
            boxes, labels = [], []
            for label, colour in self.COLOURS.items():
                blobs, _ = ndimage.label((pixels == colour).all(-1))
                for ys, xs in ndimage.find_objects(blobs):
                    boxes.append([xs.start, ys.start, xs.stop, ys.stop])
                    labels.append(label)
            n = len(boxes)
            names = ["red" if c == 1 else "blue" for c in labels]
            out.append(Detections(torch.tensor(boxes, dtype=torch.float32).reshape(n, 4), torch.full((n,), 0.9),
                                  torch.tensor(labels, dtype=torch.long), names))
        return out


def _scene(objects):
    image = np.zeros((600, 900, 3), np.uint8)
    for label, (x0, y0, x1, y1) in objects:
        image[y0:y1, x0:x1] = PixelOracle.COLOURS[label]
    return Image.fromarray(image)


def test_objects_across_tile_borders_are_found_once_and_whole():
    # tiles of 300 with overlap 0.3: columns start at 0, 210, 420, 600; rows at 0, 210, 300
    objects = [
        (1, (280, 100, 330, 150)),   # crosses the first tile's right border
        (2, (250, 280, 310, 320)),   # crosses a right and a bottom border
        (1, (440, 20, 480, 60)),     # inside the overlap of two columns: seen whole twice
        (1, (700, 400, 760, 470)),   # red neighbours of one class, side by side
        (1, (762, 420, 800, 500)),   # (apart by a column: touching pixels would make one blob)
        (2, (30, 500, 80, 560)),
    ]
    detector = PixelOracle()
    found = detector.predict(_scene(objects), tile=300, overlap=0.3)
    assert detector.calls == len(tile_windows(900, 600, 300, 0.3))
    got = sorted((int(lab), *[round(v) for v in box]) for lab, box in zip(found.labels, found.boxes.tolist(),
                                                                          strict=True))
    assert got == sorted((lab, *box) for lab, box in objects)


def test_without_the_merge_border_objects_are_found_several_times():
    """Negative control: the same tiles without merge_tiles report the cut and duplicated boxes."""
    objects = [(1, (280, 100, 330, 150)), (1, (440, 20, 480, 60))]
    image = _scene(objects)
    windows = tile_windows(900, 600, 300, 0.3)
    raw = PixelOracle().predict([image.crop(w) for w in windows])
    assert sum(len(d) for d in raw) > len(objects)


def test_merge_keeps_same_class_neighbours_inside_one_tile():
    """Only pairs from different tiles are compared: two overlapping same-class boxes of one tile both stay (a
    class-wise NMS at IoU 0.5 would drop one)."""
    boxes = torch.tensor([[0, 0, 100, 100], [20, 0, 120, 100]], dtype=torch.float32)
    kept = merge_tiles(boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), torch.tensor([0, 0]),
                       torch.tensor([False, False]))
    assert kept.tolist() == [0, 1]
    kept = merge_tiles(boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), torch.tensor([0, 1]),
                       torch.tensor([False, False]))
    assert kept.tolist() == [0]  # the same pair from two tiles is one object seen twice


def test_cut_flags_only_inner_tile_borders():
    windows = torch.tensor([[0, 0, 300, 300], [0, 0, 300, 300]], dtype=torch.float32)
    boxes = torch.tensor([[0, 0, 50, 50], [250, 10, 300, 60]], dtype=torch.float32)  # image border; inner border
    assert cut_by_tile_border(boxes, windows, 900, 600).tolist() == [False, True]
