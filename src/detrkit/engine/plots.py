"""Pictures of a run, written with matplotlib's object API (no pyplot state, no display needed): training curves,
precision-recall curves, per-class AP, the detection confusion matrix, the labels of a dataset and a grid of
augmented training samples. Every function takes plain numbers and writes one PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from detrkit.data.transforms import denormalize

_LOSS_PREFIX = "loss"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _short(names: list[str], n: int = 18) -> list[str]:
    return [s if len(s) <= n else s[: n - 1] + "…" for s in names]


def _read_jsonl(file: str | Path | None) -> list[dict]:
    file = Path(file) if file is not None else None
    if file is None or not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def smooth(values: list[float], weight: float = 0.8) -> np.ndarray:
    """A debiased exponential moving average (TensorBoard's smoothing): each point is the weighted mean of the ones
    before it, weights decaying by ``weight`` a point; NaNs are skipped."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if np.isfinite(v):
            avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm if norm else np.nan)
    return np.asarray(out)


def training_curves_figure(metrics: list[dict], steps: list[dict]) -> Figure | None:
    """Losses and learning rate per logged step (``steps.jsonl``: each loss smoothed, its raw values faint behind),
    and validation AP / AP50 at each evaluation (``metrics.jsonl``), on one x axis in epochs (fractions between
    the epoch ends; optimizer steps while no epoch has ended). None when there is nothing to plot yet.

    Without a step log (``--log_every 0``) the losses are the epoch means of ``metrics.jsonl``."""
    points = steps or [r for r in metrics if "step" in r and any(k.startswith(_LOSS_PREFIX) for k in r)]
    if not points and not metrics:
        return None
    first_epoch = next((r for r in metrics if r.get("epoch") == 1 and r.get("step")), None)
    per_epoch = first_epoch["step"] if first_epoch else None

    def x_of(r: dict) -> float:
        if per_epoch and "step" in r:
            return r["step"] / per_epoch
        return r.get("step", r.get("epoch", 0))

    xlabel = "epoch" if per_epoch else "optimizer step"
    fig = Figure(figsize=(13, 8), layout="constrained")
    (ax_total, ax_loss), (ax_lr, ax_ap) = fig.subplots(2, 2)
    losses = sorted({k for r in points for k in r if k.startswith(_LOSS_PREFIX) and k != "loss"})
    x = [x_of(r) for r in points]
    what = "per logged step: smoothed, raw faint" if steps else "epoch means"
    for ax, keys in ((ax_total, ["loss"]), (ax_loss, losses)):
        for i, k in enumerate(keys):
            raw, color = [r.get(k, np.nan) for r in points], "black" if k == "loss" else f"C{i % 10}"
            ax.plot(x, raw, color=color, alpha=0.25, lw=0.8, gid=f"raw:{k}")
            ax.plot(x, smooth(raw), color=color, lw=2 if k == "loss" else 1.3, label=k, gid=f"smooth:{k}")
    ax_total.set(title=f"total loss ({what})", xlabel=xlabel)
    ax_loss.set(title="loss components", xlabel=xlabel, yscale="log")
    for axis in (ax_loss.yaxis.set_major_formatter, ax_loss.yaxis.set_minor_formatter):
        axis(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.3, not 3 x 10^-1
    if losses:
        ax_loss.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    lr = [(x_of(r), r["lr"]) for r in points if "lr" in r]
    if lr:
        ax_lr.plot(*zip(*lr, strict=True), color="C0", gid="lr")
        top = 1.1 * max(v for _, v in lr)
        if top > 0:  # an lr of 0 throughout (a frozen run) leaves matplotlib's own limits
            ax_lr.set_ylim(0, top)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.set(title="learning rate (first parameter group)", xlabel=xlabel)
    evals = [r for r in metrics if "val_AP" in r]
    for key, label, color in (("val_AP50", "AP50", "C1"), ("val_AP", "AP (0.5:0.95)", "C0")):
        xs, ys = [x_of(r) for r in evals], [100 * r[key] for r in evals]
        ax_ap.plot(xs, ys, marker="o", ms=6, color=color, label=label, gid=key)
        if xs:
            ax_ap.annotate(f"{ys[-1]:.1f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(-8, 6), ha="right",
                           color=color, fontweight="bold")
    top = max([100 * r[k] for r in evals for k in ("val_AP", "val_AP50")], default=1.0)
    ax_ap.set(title="validation AP (%)", xlabel=xlabel, ylim=(0, max(1.0, 1.15 * top)))
    if evals:
        ax_ap.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    right = max([*x, *(x_of(r) for r in metrics)], default=1.0)
    for ax in (ax_total, ax_loss, ax_lr, ax_ap):
        ax.set_xlim(0, max(right, 1e-9) * 1.02)  # from the start: one evaluation is a point on the whole run
        ax.grid(alpha=0.3)
        if per_epoch:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_training_curves(metrics_jsonl: str | Path, path: str | Path, steps_jsonl: str | Path | None = None
                         ) -> Path | None:
    """:func:`training_curves_figure` of a run's ``metrics.jsonl`` and ``steps.jsonl`` (by default the one beside
    it), written to ``path``; None when the logs hold nothing yet."""
    steps_jsonl = Path(metrics_jsonl).with_name("steps.jsonl") if steps_jsonl is None else steps_jsonl
    fig = training_curves_figure(_read_jsonl(metrics_jsonl), _read_jsonl(steps_jsonl))
    return None if fig is None else _save(fig, path)


def plot_pr_curves(curves: dict, names: list[str], path: str | Path) -> Path:
    """Precision-recall per class at IoU 0.5 and averaged over IoU 0.5:0.95 (from
    :func:`~detrkit.engine.evaluate.pr_curves`), with the mean over classes in bold."""
    fig = Figure(figsize=(12, 5))
    axes = fig.subplots(1, 2)
    recall = curves["recall"]
    for ax, key, title in zip(axes, ("precision50", "precision"), ("IoU 0.5", "IoU 0.5:0.95 (mean)"), strict=True):
        valid = [k for k in range(len(names)) if (curves[key][k] > -1).all()]
        for k in valid:
            p = curves[key][k]
            ax.plot(recall, p, lw=1, alpha=0.8, label=f"{_short([names[k]])[0]} {100 * p.mean():.1f}")
        if valid:
            mean = curves[key][valid].mean(0)
            ax.plot(recall, mean, lw=3, color="black", label=f"all classes {100 * mean.mean():.1f}")
        ax.set(title=f"precision-recall, {title}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if len(valid) <= 20:
            ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_per_class_ap(rows: list[dict], path: str | Path) -> Path:
    """Horizontal bars of AP and AP50 per class (rows of :func:`~detrkit.engine.evaluate.per_class_ap`), with the
    number of ground-truth boxes next to each name."""
    rows = [r for r in rows if r["AP"] is not None]
    fig = Figure(figsize=(8, 1 + 0.3 * max(1, len(rows))))
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y + 0.2, [100 * r["AP50"] for r in rows], height=0.4, label="AP50")
    ax.barh(y - 0.2, [100 * r["AP"] for r in rows], height=0.4, label="AP (0.5:0.95)")
    ax.set_yticks(y, [f"{n} ({r['num_gt']})" for n, r in zip(_short([r["name"] for r in rows]), rows, strict=True)])
    ax.invert_yaxis()
    ax.set(title="AP per class (boxes in the split)", xlabel="%", xlim=(0, 100))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, names: list[str], path: str | Path, *, iou_threshold: float = 0.5,
                          score_threshold: float = 0.25) -> Path:
    """The detection confusion matrix (:func:`~detrkit.engine.evaluate.confusion_matrix`), each true-class row
    normalised to 1 (the counts are printed in the cells)."""
    labels = [*_short(names), "background"]
    n = len(labels)
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(2 + 0.55 * n, 1.5 + 0.5 * n))
    ax = fig.subplots()
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true-class row")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set(xlabel="predicted (background = missed)", ylabel="true (background = false positive)",
           title=f"confusion matrix, IoU >= {iou_threshold}, score >= {score_threshold}")
    return _save(fig, path)


def plot_labels(coco: dict, path: str | Path) -> Path:
    """What a dataset's boxes look like: boxes per class, box centres and box sizes (relative to the image)."""
    sizes = {img["id"]: (img.get("width") or 1, img.get("height") or 1) for img in coco["images"]}
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: k for k, c in enumerate(cats)}
    anns = [a for a in coco.get("annotations", []) if a["image_id"] in sizes and a["category_id"] in index
            and len(a.get("bbox", ())) == 4]
    counts = np.bincount([index[a["category_id"]] for a in anns], minlength=len(cats))
    rel = np.array([[(x + w / 2) / sizes[a["image_id"]][0], (y + h / 2) / sizes[a["image_id"]][1],
                     w / sizes[a["image_id"]][0], h / sizes[a["image_id"]][1]]
                    for a in anns for x, y, w, h in [a["bbox"]]]).reshape(-1, 4)
    fig = Figure(figsize=(15, 4.5))
    ax_count, ax_centre, ax_size = fig.subplots(1, 3)
    ax_count.bar(range(len(cats)), counts, color="tab:blue")
    ax_count.set_xticks(range(len(cats)), _short([c.get("name", str(c["id"])) for c in cats]), rotation=60,
                        ha="right", fontsize=8 if len(cats) <= 30 else 5)
    ax_count.set(title=f"boxes per class ({len(anns)} boxes, {len(sizes)} images)")
    ax_centre.hist2d(rel[:, 0], rel[:, 1], bins=40, range=[[0, 1], [0, 1]], cmap="Blues")
    ax_centre.set(title="box centres (share of the image)", xlabel="x", ylabel="y", aspect="equal")
    ax_centre.invert_yaxis()
    ax_size.hist2d(rel[:, 2], rel[:, 3], bins=40, range=[[0, 1], [0, 1]], cmap="Blues")
    ax_size.set(title="box sizes (share of the image)", xlabel="width", ylabel="height", aspect="equal")
    return _save(fig, path)


def batch_figure(images: torch.Tensor, padding_mask: torch.Tensor | None, boxes: list[dict], names: list[str], *,
                 max_images: int = 16, title: str = "image", preprocess: str = "detr") -> Figure:
    """A grid of model inputs (un-normalised for display) with boxes: per image a dict of ``boxes`` (n, 4)
    normalised cxcywh of the unpadded image (as targets and predictions are), ``labels`` (n,), optionally
    ``scores`` (n,) and ``image_id``."""
    n = min(len(images), max_images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4 * cols, 4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= n:
            continue
        img = denormalize(images[i].detach().float().cpu(), preprocess)
        h, w = img.shape[-2:]
        if padding_mask is not None:  # the boxes are relative to the unpadded part
            valid = ~padding_mask[i].cpu()
            h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
        ax.imshow(img.permute(1, 2, 0).numpy())
        scores = boxes[i].get("scores")
        for j, (box, label) in enumerate(zip(boxes[i]["boxes"].tolist(), boxes[i]["labels"].tolist(), strict=True)):
            cx, cy, bw, bh = box
            color = f"C{label % 10}"
            ax.add_patch(Rectangle(((cx - bw / 2) * w, (cy - bh / 2) * h), bw * w, bh * h, fill=False, lw=1.2,
                                   edgecolor=color))
            text = names[label] if label < len(names) else str(label)
            if scores is not None:
                text += f" {float(scores[j]):.2f}"
            ax.text((cx - bw / 2) * w, (cy - bh / 2) * h, text, fontsize=6, color="white", va="bottom",
                    bbox={"facecolor": color, "pad": 0.5, "lw": 0})
        ax.set_title(f"{title} {int(boxes[i].get('image_id', i))}", fontsize=8)
    return fig


def plot_batch(images: torch.Tensor, padding_mask: torch.Tensor | None, targets: list[dict], names: list[str],
               path: str | Path, *, max_images: int = 16, preprocess: str = "detr") -> Path:
    """A grid of training samples as the model gets them (after augmentation) with their target boxes."""
    return _save(batch_figure(images, padding_mask, targets, names, max_images=max_images, preprocess=preprocess),
                 path)
