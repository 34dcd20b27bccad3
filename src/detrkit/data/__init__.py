"""Datasets, transforms, batching and the built-in synthetic dataset."""

from detrkit.data.coco import CocoDetection, DatasetError, load_coco_json
from detrkit.data.collate import Batch, collate, pad_images
from detrkit.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from detrkit.data.synthetic import make_synthetic_dataset
from detrkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "SYNTHETIC_CLASSES", "Batch", "CocoDetection", "DatasetError",
    "build_transforms", "collate", "load_coco_json", "make_synthetic_dataset", "pad_images",
]
