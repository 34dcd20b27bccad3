"""``detrkit demo``, ``detrkit train`` and ``detrkit eval``."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from detrkit.cli.common import CommandError
from detrkit.data.coco import DatasetError
from detrkit.data.formats import describe_layout, resolve_split
from detrkit.data.synthetic import make_synthetic_dataset
from detrkit.engine.config import TrainConfig, read_val_split
from detrkit.engine.evaluate import (
    UnpredictedCategoriesWarning,
    evaluate_checkpoint,
    format_metrics,
    format_per_class,
    write_metrics,
)
from detrkit.engine.recipes import describe_recipes
from detrkit.engine.train import train
from detrkit.inference.detector import Detector
from detrkit.inference.predict import predict_files, prediction_sheet
from detrkit.weights.files import resolve_weights_file

# The demo: the built-in synthetic dataset, trained with the fast-cpu recipe (detrkit.engine.recipes: the preset and
# settings that learned most in ~10 minutes on 2 cores, each measured one change at a time on a tuning copy of the
# data, benchmarks/demo_recipe.py); the recipe sizes the schedule from the 800 training images of 224 px: 3 epochs.
# `--quick` shrinks everything for smoke tests.
DEMO = dict(recipe="fast-cpu", num_train=800, num_val=200, image_size=224)
DEMO_QUICK = dict(num_train=8, num_val=4, image_size=128, epochs=1, batch_size=4)


def demo_config(data: str | Path, output_dir: str | Path, *, model: str | None = None, image_size: int | None = None,
                epochs: int | None = None, batch_size: int | None = None, device: str = "auto") -> TrainConfig:
    """The demo's training run on the dataset at ``data`` (the demo's own, or any other: the benchmarks train it
    unchanged on data it was never tuned on): ``detrkit train --recipe fast-cpu`` (the options left unset take the
    recipe's values, sized from the dataset; ``detrkit recipes`` lists them)."""
    return TrainConfig(recipe=DEMO["recipe"], model=model, data=str(data), output_dir=str(output_dir),
                       image_size=image_size, epochs=epochs, batch_size=batch_size, device=device)


def demo_parser() -> ArgumentParser:
    demo = ArgumentParser(description="Generate the synthetic dataset, train a lite detector on it with the fast-cpu "
                                      "recipe, evaluate (COCO AP) and draw predictions, all on this machine (CPU is "
                                      "fine).")
    demo.add_argument("--output", default="detrkit-demo", help="folder for the dataset, the run and the predictions")
    demo.add_argument("--model", type=str | None, default=None, help="preset to train (default: the recipe's)")
    demo.add_argument("--epochs", type=int | None, default=None, help="default: the recipe's, sized from the data")
    demo.add_argument("--batch_size", type=int | None, default=None, help="default: the recipe's")
    demo.add_argument("--image_size", type=int, default=DEMO["image_size"], help="synthetic image size and training "
                                                                                 "scale")
    demo.add_argument("--num_train", type=int, default=DEMO["num_train"])
    demo.add_argument("--num_val", type=int, default=DEMO["num_val"])
    demo.add_argument("--device", default="auto")
    demo.add_argument("--quick", type=bool, default=False, help="a tiny smoke-test budget (seconds, not minutes)")
    return demo


def recipes_parser() -> ArgumentParser:
    return ArgumentParser(description="The named training recipes (detrkit train --recipe NAME) and what each sets.")


def cmd_recipes(_: Namespace) -> None:
    print(describe_recipes())


def train_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Train a detector on your dataset folder (COCO, COCO per split / Roboflow, "
                                        "YOLO or Pascal VOC). With only --data it trains the recipe measured best for "
                                        "this device (--recipe auto; `detrkit recipes` lists them) with a schedule "
                                        "sized from the dataset; every option given overrides the recipe. Options "
                                        "can also come from a YAML file (--config); the resolved config is saved in "
                                        "the output folder.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of options")
    parser.add_class_arguments(TrainConfig, nested_key=None, as_group=False)
    return parser


def eval_parser() -> ArgumentParser:
    ev = ArgumentParser(description="COCO box AP of a checkpoint on a COCO-format split.")
    ev.add_argument("--checkpoint", required=True, help="checkpoint folder, model.safetensors or training run folder")
    ev.add_argument("--data", help="dataset folder (as for train); evaluates its val split, or, where it has none, "
                                   "the images a --val_split run held out")
    ev.add_argument("--images", help="image folder (instead of --data)")
    ev.add_argument("--ann", help="COCO annotation json (instead of --data)")
    ev.add_argument("--batch_size", type=int, default=4)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--output", help="file or folder to write metrics.json to (default: next to the checkpoint)")
    return ev


def cmd_train(args: Namespace) -> dict:
    fields = TrainConfig.__dataclass_fields__
    if args.data and Path(args.data).exists() and not (args.train_ann or args.val_ann):
        with contextlib.suppress(DatasetError):  # not a dataset: training says so, after the checks before it
            print(f"{args.data}: {describe_layout(args.data)}")
    return train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))


def _held_out_split(checkpoint: str) -> Path | None:
    """The ``val_split.json`` of the run a checkpoint belongs to (a ``--val_split`` run), if any."""
    start = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    return next((d / "val_split.json" for d in (start, *list(start.parents)[:3]) if (d / "val_split.json").is_file()),
                None)


def cmd_eval(args: Namespace) -> dict:
    held_out = None if args.images or args.ann else _held_out_split(args.checkpoint)
    try:
        images, ann, source = resolve_split(args.data, "val", images=args.images, ann=args.ann)
        if held_out and isinstance(ann, Path) and not ann.is_file():
            raise DatasetError(f"{ann} does not exist")
    except DatasetError:
        if held_out is None:
            raise
        images, ann, source = read_val_split(held_out)  # the images the run held out with --val_split
        print(f"evaluating on the validation images the run held out ({held_out})")
    out = Path(args.output) if args.output else resolve_weights_file(args.checkpoint).parent / "metrics.json"
    if out.is_dir() or (args.output and args.output.endswith(("/", os.sep))):  # --output FOLDER[/]: inside it
        out = out / "metrics.json"
    blocking = next((p for p in out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():  # said before the evaluation, not after it
        raise CommandError(f"--output {out}: {blocking} is a file, not a folder; give a file name or a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnpredictedCategoriesWarning)
        metrics = evaluate_checkpoint(args.checkpoint, images, ann, source=source, device=args.device,
                                      batch_size=args.batch_size, report_dir=out.parent)
    for w in caught:  # one plain line for ours; anything else as Python shows warnings
        if issubclass(w.category, UnpredictedCategoriesWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    write_metrics(metrics, out)
    print(format_per_class(metrics["per_class"]))
    print(format_metrics(metrics))
    print(f"metrics written to {out}; PR curves, per-class AP and the confusion matrix to {out.parent}/*.png")
    return metrics


def cmd_demo(args: Namespace) -> dict:
    opts = {**vars(args), **(DEMO_QUICK if args.quick else {})}
    out = Path(args.output)
    data = out / "data"
    marker = data / f"synth-{opts['num_train']}-{opts['num_val']}-{opts['image_size']}.done"
    t0 = time.perf_counter()
    if not marker.exists():
        print(f"[1/3] generating the synthetic dataset in {data}")
        make_synthetic_dataset(data, num_train=opts["num_train"], num_val=opts["num_val"],
                               image_size=opts["image_size"])
        marker.touch()
    else:
        print(f"[1/3] reusing the synthetic dataset in {data}")
    print(f"[2/3] training with the {DEMO['recipe']} recipe")
    metrics = train(demo_config(data, out / "run", model=opts["model"], image_size=opts["image_size"],
                                epochs=opts["epochs"], batch_size=opts["batch_size"], device=opts["device"]))
    print(f"[3/3] drawing predictions on validation images into {out / 'predictions'}")
    val_images = sorted((data / "val").glob("*.jpg"))[:8]
    # A short CPU run gives modest confidences (scores of 0.2-0.5 for the boxes it finds): draw what clears 0.2.
    detector = Detector(str(out / "run"), device=opts["device"], threshold=0.2)
    predict_files(detector, val_images, out / "predictions", batch_size=4, max_detections=20)
    sheet = prediction_sheet(detector, val_images, data / "annotations" / "instances_val.json",
                             out / "contact_sheet.jpg", max_detections=20)
    run = out / "run"
    print(f"done in {time.perf_counter() - t0:.0f} s: metrics in {run / 'metrics.json'}, checkpoint in "
          f"{run / 'checkpoints'}; pictures: {run / 'training_curves.png'}, {run / 'pr_curves.png'}, "
          f"{run / 'per_class_ap.png'}, {run / 'confusion_matrix.png'}, {run / 'train_batch.png'}, predictions in "
          f"{out / 'predictions'}, all of them beside the ground truth in {sheet}")
    return metrics
