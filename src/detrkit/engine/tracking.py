"""Experiment tracking: TensorBoard event files in the run folder, through ``torch.utils.tensorboard``.

TensorBoard is an optional extra (``pip install 'detrkit[tensorboard]'``); without it training goes on and says
once how to switch it on. Everything here is called on the main process only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from detrkit.engine.plots import batch_figure
from detrkit.models.postprocess import select_detections
from detrkit.ops.boxes import box_xyxy_to_cxcywh

MISSING = ("TensorBoard logging is off: the tensorboard package is not installed (pip install 'detrkit[tensorboard]' "
           "to switch it on, or pass --tensorboard false to silence this line)")


class TensorBoardLogger:
    """Scalars, per-class AP and prediction pictures of one run, in ``log_dir`` (a no-op when disabled)."""

    def __init__(self, log_dir: str | Path, enabled: bool = True) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional extra
        except ImportError:
            tqdm.write(MISSING)
            return
        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        """Every number in ``values`` as ``prefix/name`` (nested or non-numeric entries are skipped)."""
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def evaluation(self, metrics: dict, step: int) -> None:
        """COCO AP metrics and the AP / AP50 of each class (``per_class`` rows)."""
        if self.writer is None:
            return
        self.scalars("val", metrics, step)
        for row in metrics.get("per_class", []):
            if row["AP"] is not None:
                self.writer.add_scalar(f"val_AP_per_class/{row['name']}", row["AP"], step)
                self.writer.add_scalar(f"val_AP50_per_class/{row['name']}", row["AP50"], step)

    @torch.no_grad()
    def predictions(self, model: nn.Module, batch, names: list[str], step: int, *, threshold: float = 0.3,
                    max_images: int = 4) -> None:
        """The model's detections (score >= ``threshold``) drawn on a few validation images."""
        if self.writer is None:
            return
        was_training = model.training
        model.eval()
        outputs = model(batch.images[:max_images], batch.padding_mask[:max_images])
        model.train(was_training)
        scores, labels, xyxy, _ = select_detections(outputs.pred_logits.float(), outputs.pred_boxes.float(),
                                                    model.score_activation, 100)
        cxcywh = box_xyxy_to_cxcywh(xyxy)
        shown = [{"boxes": b[s >= threshold], "labels": lab[s >= threshold], "scores": s[s >= threshold],
                  "image_id": int(t["image_id"])}
                 for b, lab, s, t in zip(cxcywh.cpu(), labels.cpu(), scores.cpu(), batch.targets, strict=False)]
        fig = batch_figure(batch.images[:max_images], batch.padding_mask[:max_images], shown, names,
                           title=f"score >= {threshold}, image", preprocess=getattr(model, "preprocess", "detr"))
        self.writer.add_figure("val/predictions", fig, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
