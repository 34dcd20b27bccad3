"""Inference on user images: ``Detector(checkpoint).predict(image)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from detrkit.data.collate import pad_images
from detrkit.data.image import to_pil
from detrkit.data.transforms import val_transforms
from detrkit.inference.tiles import cut_by_tile_border, merge_tiles, tile_windows
from detrkit.models.postprocess import postprocess
from detrkit.registry import image_size_of, preprocess_of
from detrkit.runtime import amp_dtype, resolve_device
from detrkit.weights.formats import load_checkpoint, load_pretrained
from detrkit.weights.hub import resolve_weights


@dataclass
class Detections:
    """Detections of one image, best first.

    Attributes:
        boxes: (N, 4) absolute xyxy pixels of the input image.
        scores: (N,) confidences.
        labels: (N,) the dataset's category ids.
        names: N class names.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.scores)

    def to_list(self) -> list[dict]:
        return [
            {"box": [round(v, 2) for v in b], "score": round(s, 4), "label": int(lab), "name": n}
            for b, s, lab, n in zip(
                self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(), self.names, strict=False
            )
        ]


def load_for_inference(checkpoint: str | Path, model: str | None = None) -> tuple[torch.nn.Module, dict]:
    """(model, meta) from a detrkit checkpoint, or with ``model`` from any checkpoint / URL / tag it reads."""
    if model is None:
        return load_checkpoint(checkpoint)
    return load_pretrained(model, resolve_weights(model, checkpoint))


class Detector:
    """A trained detector ready for inference.

    Args:
        checkpoint: a detrkit checkpoint folder, ``model.safetensors`` or a training run folder; with ``model``,
            any checkpoint :func:`~detrkit.create_model` reads (official, detrex, HF, a URL, ``"coco"``).
        model: the preset of a checkpoint that is not detrkit's own, e.g. ``"dino_r50_4scale"``.
        device: ``auto``, ``cpu``, ``cuda``...
        threshold: default minimum score of returned detections.
        amp: autocast on CUDA: ``auto`` (bf16 where supported, else fp16), ``bf16``, ``fp16`` or ``none``;
            a CPU runs fp32 unless given ``bf16``.
        compile: run the model through ``torch.compile`` (the first call compiles; later ones are faster).
    """

    def __init__(self, checkpoint: str | Path, *, model: str | None = None, device: str = "auto",
                 threshold: float = 0.5, amp: str = "auto", compile: bool = False) -> None:
        self.model, self.meta = load_for_inference(checkpoint, model)
        self.device = resolve_device(device)
        self.model.eval().to(self.device)
        self.amp_dtype = amp_dtype(amp, self.device)
        self._forward = torch.compile(self.model) if compile else self.model
        self.threshold = threshold
        self.class_names = self.meta["class_names"]
        self.label_to_cat = self.meta["label_to_cat"]
        self.cat_to_name = dict(zip(self.label_to_cat, self.class_names, strict=False))
        self.transform = val_transforms(image_size_of(self.meta), with_boxes=False,
                                        preprocess=preprocess_of(self.meta))

    @torch.no_grad()
    def predict(self, images, *, threshold: float | None = None, max_detections: int = 100, tile: int | None = None,
                overlap: float = 0.2, batch_size: int = 8):
        """Detect objects in one image (returns :class:`Detections`) or a list of images (returns a list).

        ``tile``: cut each image into overlapping squares of that many pixels (``overlap``: the share neighbours
        have in common), predict them ``batch_size`` at a time and merge the detections in image coordinates
        (:mod:`detrkit.inference.tiles`); for images far larger than the model's input."""
        single = not isinstance(images, (list, tuple))
        pils = [to_pil(img) for img in ([images] if single else images)]
        if tile:
            results = [self._predict_tiled(p, tile, overlap, batch_size, threshold, max_detections) for p in pils]
            return results[0] if single else results
        outputs = self.forward_pil(pils)
        sizes = [(p.height, p.width) for p in pils]
        dets = postprocess(outputs, sizes, score_activation=self.model.score_activation, top_k=max_detections,
                           threshold=self.threshold if threshold is None else threshold, label_map=self.label_to_cat)
        results = [Detections(d["boxes"].cpu(), d["scores"].cpu(), d["labels"].cpu(),
                              [self.cat_to_name[int(c)] for c in d["labels"]]) for d in dets]
        return results[0] if single else results

    def _predict_tiled(self, pil: Image.Image, tile: int, overlap: float, batch_size: int,
                       threshold: float | None, max_detections: int) -> Detections:
        windows = tile_windows(pil.width, pil.height, tile, overlap)
        found = []
        for start in range(0, len(windows), max(1, batch_size)):
            chunk = windows[start:start + max(1, batch_size)]
            found += self.predict([pil.crop(w) for w in chunk], threshold=threshold, max_detections=max_detections)
        offsets = torch.tensor([[w[0], w[1], w[0], w[1]] for w in windows], dtype=torch.float32)
        counts = torch.tensor([len(d) for d in found])
        boxes = torch.cat([d.boxes.float() + offsets[i] for i, d in enumerate(found)]).reshape(-1, 4)
        scores = torch.cat([d.scores for d in found])
        labels = torch.cat([d.labels for d in found])
        tile_ids = torch.arange(len(windows)).repeat_interleave(counts)
        where = torch.tensor(windows, dtype=torch.float32)[tile_ids]
        boxes = torch.max(torch.min(boxes, where[:, [2, 3, 2, 3]]), where[:, [0, 1, 0, 1]])  # inside what it saw
        cut = cut_by_tile_border(boxes, where, pil.width, pil.height)
        keep = merge_tiles(boxes, scores, labels, tile_ids, cut)[:max_detections]
        names = [n for d in found for n in d.names]
        return Detections(boxes[keep], scores[keep], labels[keep], [names[i] for i in keep.tolist()])

    @torch.no_grad()
    def forward_pil(self, pils: list[Image.Image], *, compiled: bool = True):
        """The model's raw output for RGB PIL images (resized, normalized, padded into one batch)."""
        tensors = [
            self.transform(tv_tensors.Image(torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1))) for p in pils
        ]
        batch, mask = pad_images([t.as_subclass(Tensor) for t in tensors])
        forward = self._forward if compiled else self.model
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return forward(batch.to(self.device), mask.to(self.device))
