"""Training configuration: one dataclass, readable in YAML, overridable from the command line.

The CLI (jsonargparse) turns every field into a flag (``--epochs 12``, ``--lr 2e-4``) and reads YAML
files with ``--config run.yaml``; a run's resolved config is saved as ``config.yaml`` in its output
folder so that it can be repeated exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from detrkit.data import CocoDetection, build_transforms
from detrkit.data.coco import DatasetError, load_coco_json
from detrkit.data.formats import resolve_split, split_coco, subset_coco
from detrkit.data.transforms import scales_for, val_transforms
from detrkit.registry import image_size_of, preprocess_of


@dataclass
class TrainConfig:
    """Everything a training run needs.

    Attributes:
        recipe: the named recipe that fills every option left unset (``detrkit recipes`` lists them): ``auto``
            (``fast-cpu`` on a CPU, ``gpu`` on CUDA), ``fast-cpu`` (the demo's), ``gpu``, ``paper`` (the preset's
            published schedule: it sets epochs / lr / lr_backbone / lr_drop, as ``--recipe true`` did) or ``none``.
            Options shown as ``null`` below take the recipe's value (or a plain default).
        model: registered preset name (``detrkit models`` lists them); unset: the recipe's (``rtdetr_lite``).
        data: the dataset folder: COCO (``annotations/instances_{train,val}.json`` + ``train/`` ``val/``, what
            ``detrkit data synth`` writes), COCO per split (Roboflow: ``train/`` ``valid/`` each with its json),
            YOLO (``data.yaml`` or ``classes.txt``) or Pascal VOC; or set the four explicit paths below.
        output_dir: where checkpoints, metrics.jsonl, metrics.json and config.yaml go.
        model_args: builder overrides, e.g. ``{num_queries: 50, pretrained_backbone: true}``.
        weights: weights to start from (fine-tuning): any checkpoint ``create_model`` reads (detrkit, official,
            detrex, HF transformers, a URL) or ``coco`` for the preset's released COCO weights. The class heads
            are re-initialised (with a warning) when the dataset's number of classes differs.
        image_size: training scale; unset: the recipe's size for the dataset's images and boxes, else the preset's
            (800 for the papers' models, 640 for lite ones). Train
            scales are 0.6..1.0 of it (multi-scale, step 32), the longer side is capped at 1333/800 of it, validation
            resizes to it (DETR's 480-800 / 1333 / 800 recipe at 800).
        augment: train with DETR's augmentation (flip, multi-scale, crop); false = validation transforms
            (debugging, overfitting tests).
        crop: the augmentation's geometric crops: DETR's random-crop branch; RT-DETR's zoom-out and IoU crop.
        epochs, batch_size, lr, lr_backbone, weight_decay, clip_max_norm: the optimiser (AdamW, DETR's values).
        lr_schedule: ``step`` (x ``lr_gamma`` every ``lr_drop`` epochs: the DETR family's recipe), ``multistep``
            (x ``lr_gamma`` at each epoch of ``lr_milestones``), ``cosine`` (down to ``min_lr_ratio`` * lr) or
            ``flat-cosine`` (DEIM's: flat until ``lr_drop``, then a cosine down to ``lr_gamma`` * lr at
            ``aug_stop_epoch``, or at the end).
        lr_drop: epoch at which the learning rate is multiplied by ``lr_gamma`` (flat-cosine: starts to decay);
            None = 2/3 of ``epochs``.
        warmup_steps: linear learning-rate warm-up over the first optimizer steps (0 = none).
        accumulate: gradient accumulation steps (effective batch = batch_size * accumulate * processes).
        amp: ``auto`` (on CUDA bf16 where supported, else fp16; on a CPU bf16 where it computes bf16 natively,
            AVX512-BF16 or AMX, else none), ``bf16``, ``fp16`` (CUDA only) or ``none``. fp16 trains with a dynamic
            loss scaler; bf16 needs none.
        ema: keep an exponential moving average of the weights (``ema_decay``, ramped up over ``ema_warmup``
            steps); it is what is evaluated and saved as ``model.safetensors`` (the raw weights resume).
            None = the recipe's (fast-cpu: on, 0.99 over 50 steps), else off (0.9997 over 2000 steps).
        compile: train and evaluate through ``torch.compile`` (checkpoints keep the plain module's names).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        eval_every: evaluate on the val split every N epochs (and always after the last).
        resume: a checkpoint folder (or ``last``/``true`` for the output folder's latest) to continue from,
            exactly where it stopped: mid-epoch data order, RNG, optimizer, schedule, EMA and loss scaler.
        checkpoint_every: also write a checkpoint every N optimizer steps inside an epoch (0 = at epoch ends
            only); ``keep_checkpoints`` newest are kept (``checkpoints/step_<n>/``), plus ``checkpoints/best/``.
        log_every: append the losses to ``steps.jsonl`` every N optimizer steps (0 = never).
        max_bad_steps: a step with a non-finite loss or gradient is skipped with a warning; this many in a row
            stop training (the last good checkpoint stays).
        batch_size: images per process (per GPU) and step; the global batch is batch_size * processes.
        sync_bn: with several GPUs, trainable BatchNorm layers compute statistics over the global batch.
        find_unused_parameters: DDP's option, for models with parameters a step does not use.
        max_train_images / max_val_images: use only the first N images (quick experiments, tests).
        time_limit: stop training after this many minutes (then evaluate and save, as at the end); None = none.
        check_images: before training, the dataset doctor reads each image's ``header`` (exists, readable,
            size; fast), decodes it (``full``: also finds truncated files) or skips the files (``none``).
            Annotations are always checked; ``detrkit data check DIR`` prints the full report.
        class_loss: the class term of the loss: None = the family's (focal for sigmoid models, cross-entropy for
            DETR); ``varifocal`` (RT-DETR) or ``mal`` (DEIM) train a sigmoid model's scores towards the IoU of the
            matched box, so that they rank boxes by how well they fit.
        mosaic: probability that a training image is a mosaic of four (DEIM's dense one-to-one: more objects per
            image and step); ``mosaic_epochs``: mosaics in the first N epochs only (None: all but the last).
            ``mosaic_crop``: a mosaic is a window of one image's size cut from the four, so objects keep their
            scale (YOLOv5's), instead of the four images shrunk into one (DEIM's, which halves every object).
        scale_jitter: each training image is scaled by a random factor in [1 - s, 1 + s] and shifted by up to a
            tenth of its side, on a grey canvas of its own size (YOLO's random affine, without rotation or shear);
            0 = off. For the RT-DETR family's square inputs.
        photometric: the colour changes of training images: ``rtdetr`` (RT-DETR's photometric distortion, each
            change with probability 0.5), ``yolo`` (YOLO's stronger HSV gains on every image), ``none``; unset = the
            family's own (RT-DETR's for the RT-DETR family, none for DETR's).
        mixup: probability that a training image is blended with another one, half and half, with the boxes of
            both (DEIM's MixUp, in the same epochs as mosaics).
        aug_stop_epoch: from this epoch on, training images are only resized (no flips, crops, colour changes,
            mosaics or MixUp): the clean final epochs of DEIM and RT-DETRv2 (None: augment to the end).
        val_split: hold out this share of the training images (e.g. 0.1) as the validation split, for a dataset
            that has none: drawn with ``seed``, the same on resume; the held-out image ids are written to
            ``output_dir/val_split.json`` (``detrkit eval --checkpoint RUN --data DIR`` uses them again).
        patience: early stopping: end training after this many evaluations in a row without a better val AP
            (``checkpoints/best/`` keeps the best); None = train all ``epochs``.
        tensorboard: write TensorBoard event files into ``output_dir/tensorboard`` (losses, lr, images/s, val AP
            and per-class AP, validation images with their predictions); needs the ``tensorboard`` extra, and
            training without it says so once and goes on.
        plots: write pictures into ``output_dir``: ``train_batch.png`` (the first augmented batch, as the model
            sees it) at the start; at the end ``training_curves.png``, ``pr_curves.png``, ``per_class_ap.png`` and
            ``confusion_matrix.png``.
        skip_invalid: drop the images and annotations the doctor finds errors in (counted in a warning)
            instead of stopping with its report.
    """

    model: str | None = None
    data: str | None = None
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    output_dir: str = "runs/train"
    model_args: dict = field(default_factory=dict)
    weights: str | None = None
    image_size: int | None = None
    augment: bool = True
    crop: bool | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_backbone: float | None = None
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: int | None = None
    lr_gamma: float = 0.1
    accumulate: int = 1
    amp: str = "auto"
    compile: bool = False
    device: str = "auto"
    num_workers: int | None = None
    eval_every: int | None = None
    resume: str | None = None
    seed: int = 42
    max_train_images: int | None = None
    max_val_images: int | None = None
    progress: bool = True
    recipe: bool | str = "auto"
    time_limit: float | None = None
    check_images: str = "header"
    skip_invalid: bool = False
    lr_schedule: str = "step"
    lr_milestones: list[int] = field(default_factory=list)
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    ema: bool | None = None
    ema_decay: float | None = None
    ema_warmup: int | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 20
    max_bad_steps: int = 5
    sync_bn: bool = True
    find_unused_parameters: bool = False
    class_loss: str | None = None
    mosaic: float = 0.0
    mosaic_epochs: int | None = None
    mosaic_crop: bool = False
    scale_jitter: float = 0.0
    photometric: str | None = None
    mixup: float = 0.0
    aug_stop_epoch: int | None = None
    val_split: float = 0.0
    patience: int | None = None
    tensorboard: bool = True
    plots: bool = True

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))


def dataset_split(cfg: TrainConfig, split: str) -> tuple[Path, Path | dict, str | None]:
    """(images folder, annotations, source name) of ``split`` ("train" / "val") of ``cfg`` (see ``resolve_split``).

    With ``cfg.val_split`` both come from the training split: the held-out share is "val", the rest "train"."""
    if not cfg.val_split:
        found = resolve_split(cfg.data, split, images=getattr(cfg, f"{split}_images"),
                              ann=getattr(cfg, f"{split}_ann"))
        if split == "val" and isinstance(found[1], Path) and not found[1].is_file():
            raise DatasetError(f"no validation split: {found[1]} does not exist. Give one (--val_images --val_ann), "
                               "or hold out part of the training images: --val_split 0.1")
        return found
    images, ann, source = resolve_split(cfg.data, "train", images=cfg.train_images, ann=cfg.train_ann)
    coco = ann if isinstance(ann, dict) else load_coco_json(ann)
    train_part, val_part = split_coco(coco, cfg.val_split, cfg.seed)
    source = f"{source or ann} ({split} part of --val_split {cfg.val_split})"
    return images, train_part if split == "train" else val_part, source


def write_val_split(cfg: TrainConfig, val_image_ids: list[int], path: Path) -> None:
    """What ``--val_split`` held out, so that ``detrkit eval`` can find the same images again."""
    path.write_text(json.dumps({"val_split": cfg.val_split, "seed": cfg.seed, "data": cfg.data,
                                "train_images": cfg.train_images, "train_ann": cfg.train_ann,
                                "val_image_ids": sorted(val_image_ids)}, indent=1))


def read_val_split(path: Path) -> tuple[Path, dict, str]:
    """(images folder, COCO dict, source) of the validation images a ``--val_split`` run held out."""
    info = json.loads(path.read_text())
    images, ann, source = resolve_split(info["data"], "train", images=info["train_images"], ann=info["train_ann"])
    coco = ann if isinstance(ann, dict) else load_coco_json(ann)
    keep = set(info["val_image_ids"])
    chosen = [img for img in coco["images"] if img["id"] in keep]
    if len(chosen) != len(keep):
        raise DatasetError(f"{path}: {len(keep) - len(chosen)} of the held-out validation images are no longer in "
                           f"{source or ann}; the dataset changed since training")
    return images, subset_coco(coco, keep), f"{path}"


class ConfigError(ValueError):
    """A training option that does not fit the model (e.g. ``scale_jitter`` on DETR): the user's to fix."""


def build_datasets(cfg: TrainConfig, progress: bool = True) -> tuple[CocoDetection, CocoDetection]:
    """The (train, val) datasets of ``cfg``: its splits, DETR's augmentation at its image size (validation
    transforms for val, and for train with ``augment`` off), mosaics, the doctor's image check."""
    size = cfg.image_size or image_size_of(cfg.model)
    recipe = scales_for(size)
    preprocess = preprocess_of(cfg.model)  # the model's own input (ImageNet-normalized, or RT-DETR's [0, 1] square)
    val_tf = val_transforms(size, preprocess=preprocess)
    try:
        train_tf = build_transforms(True, crop=cfg.crop, preprocess=preprocess, scale_jitter=cfg.scale_jitter,
                                    photometric=cfg.photometric, **recipe) if cfg.augment else val_tf
    except ValueError as e:  # an augmentation option that does not fit the model, e.g. --scale_jitter on DETR
        raise ConfigError(str(e)) from None
    opts = dict(skip_invalid=cfg.skip_invalid, check_images=cfg.check_images, progress=cfg.progress and progress)
    (ti, ta, ts), (vi, va, vs) = dataset_split(cfg, "train"), dataset_split(cfg, "val")
    last = max(1, cfg.epochs - 1) if cfg.epochs else None  # epochs unset (no recipe resolved): mosaics throughout
    mosaic = dict(mosaic=cfg.mosaic, mixup=cfg.mixup, mosaic_epochs=cfg.mosaic_epochs if cfg.mosaic_epochs is
                  not None else last, aug_stop_epoch=cfg.aug_stop_epoch, plain_transforms=val_tf,
                  mosaic_crop=cfg.mosaic_crop) if cfg.augment else {}
    train = CocoDetection(ti, ta, transforms=train_tf, source=ts, **opts, **mosaic)
    val = CocoDetection(vi, va, transforms=val_tf, source=vs, **opts)
    if train.cat_ids != val.cat_ids:
        raise DatasetError(f"train and val list different categories ({train.ann_file} vs {val.ann_file}); "
                         "both splits need the same 'categories'.")
    return train, val
