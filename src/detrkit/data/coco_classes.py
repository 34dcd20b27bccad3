"""COCO's label space, for checkpoints trained on COCO.

COCO detection annotations use 80 category ids spread over 1..90 (ids such as 12, 26, 29 were planned
and dropped). The official DETR-family checkpoints keep that id space: their class heads have 91
outputs (DETR: 92, with no-object) and output ``i`` is category id ``i``, so the unused ids are
outputs that were never trained. detectron2-based code (detrex) uses the 80 ids compacted to 0..79.
"""

from __future__ import annotations

COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}
COCO_80_IDS: list[int] = sorted(COCO_CATEGORIES)


def coco_label_space(num_classes: int) -> tuple[list[int], list[str]] | None:
    """(label_to_cat, class_names) of a COCO-trained class head with ``num_classes`` outputs, or None.

    91 outputs: output ``i`` is COCO category id ``i`` (ids without a category are named ``"N/A"``).
    80 outputs: the 80 categories in id order (detectron2 / detrex).
    """
    if num_classes == 91:
        ids = list(range(91))
        return ids, [COCO_CATEGORIES.get(i, "N/A") for i in ids]
    if num_classes == 80:
        return list(COCO_80_IDS), [COCO_CATEGORIES[i] for i in COCO_80_IDS]
    return None
