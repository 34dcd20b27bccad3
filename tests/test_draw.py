"""Prediction pictures a person can read: upscaled small images, labels that do not cover each other, the score
threshold stated in the picture, and the contact sheet."""

from __future__ import annotations

import numpy as np
from PIL import Image

from detrkit.inference.draw import _overlaps, color_for, contact_sheet, draw_detections, place_labels


def test_a_small_image_is_drawn_upscaled_with_its_boxes_scaled():
    image = Image.new("RGB", (224, 112), (128, 128, 128))
    out = draw_detections(image, [[20, 20, 100, 80]], [3], [0.9], {3: "star"}, min_side=640)
    assert out.size == (640, 320)
    x = round(100 * 640 / 224)  # the box's right edge, scaled with the image
    assert tuple(np.asarray(out)[150, x - 1]) == color_for(3)
    assert draw_detections(image, [[20, 20, 100, 80]], [3], [0.9]).size == image.size  # min_side off: as given


def test_labels_of_boxes_that_share_a_corner_do_not_cover_each_other():
    boxes = np.array([[50, 50, 150, 150], [52, 52, 140, 150], [48, 50, 160, 145]], dtype=float)
    sizes = [(60.0, 16.0)] * 3
    spots = place_labels(boxes, sizes, (400, 400))
    assert not any(_overlaps(a, b) for i, a in enumerate(spots) for b in spots[i + 1:])
    assert spots[0] == (50, 34, 110, 50)  # the best box's label sits just above it
    # the negative control: each label above its own box, as before, would overlap
    naive = [(x0, y0 - 16, x0 + 60, y0) for x0, y0, _, _ in boxes.tolist()]
    assert _overlaps(naive[0], naive[1])


def test_labels_stay_inside_the_image():
    spots = place_labels(np.array([[0, 0, 30, 30], [380, 390, 400, 400]], dtype=float), [(60.0, 16.0)] * 2,
                         (400, 400))
    for x0, y0, x1, y1 in spots:
        assert 0 <= x0 and x1 <= 400 and 0 <= y0 and y1 <= 400


def test_the_threshold_caption_is_drawn_in_a_corner():
    image = Image.new("RGB", (640, 480), (200, 200, 200))
    plain = np.asarray(draw_detections(image, [], [], []))
    captioned = np.asarray(draw_detections(image, [], [], [], caption="score >= 0.5"))
    assert (plain == 200).all() and (captioned[-6:, -6:] < 150).all()  # a dark box behind the text


def test_contact_sheet_lays_out_a_grid():
    panels = [(Image.new("RGB", (224, 224), (255, 0, 0)), f"image {i}") for i in range(6)]
    sheet = contact_sheet(panels, columns=4, cell=200, title="predictions beside the ground truth")
    assert sheet.width == 800 and sheet.height > 2 * 200
    pixels = np.asarray(sheet)
    assert (pixels[pixels.shape[0] - 100, 100] == (255, 0, 0)).all()  # second row, first cell
    assert (pixels[pixels.shape[0] - 100, 700] == 255).all()  # second row, fourth cell: empty
