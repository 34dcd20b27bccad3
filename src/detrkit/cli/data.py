"""``detrkit data``: generate the synthetic dataset, check a dataset (the doctor), convert YOLO / VOC to COCO."""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from detrkit.data.check import check_dataset
from detrkit.data.coco import DatasetError, load_coco_json, validate_coco
from detrkit.data.formats import convert_dataset, describe_layout, resolve_split
from detrkit.data.synthetic import make_synthetic_dataset
from detrkit.engine.plots import plot_labels


def add_data_commands(sub) -> None:
    """Add ``data synth | check | convert`` to the ``detrkit`` subcommands ``sub``."""
    data = ArgumentParser(description="Dataset tools.")
    sub.add_subcommand("data", data, help="dataset tools (synth, check, convert)")
    data_sub = data.add_subcommands(dest="data_command")
    synth = ArgumentParser(description="Write the built-in synthetic shapes dataset in COCO format "
                                       "(DIR/train, DIR/val, DIR/annotations/instances_{train,val}.json).")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--num_train", type=int, default=1000)
    synth.add_argument("--num_val", type=int, default=200)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image_size", type=int, default=320, help="nominal image side (each image varies by +-20%%)")
    synth.add_argument("--max_objects", type=int, default=20)
    data_sub.add_subcommand("synth", synth, help="generate the synthetic dataset")
    check = ArgumentParser(
        description="The dataset doctor: missing, unreadable or truncated images, boxes with zero or "
        "negative size or outside the image, category ids not in 'categories', "
        "duplicate ids, images without annotations, class counts. Prints a report and "
        "exits with status 1 when there are errors (warnings alone: 0)."
    )
    check.add_argument(
        "path",
        help="a dataset folder (COCO: annotations/instances_*.json; YOLO: data.yaml; Pascal VOC: "
        "Annotations/ + JPEGImages/), or one COCO json with --images",
    )
    check.add_argument("--images", help="with a json PATH: the folder its file_names are relative to")
    check.add_argument("--splits", type=list[str], default=["train", "val"], help="splits of a dataset folder")
    check.add_argument("--images_check", default="full", help="full (decode every image), header (fast) or none")
    check.add_argument("--examples", type=int, default=10, help="examples printed per kind of problem")
    check.add_argument("--report", help="also write the report as JSON here")
    check.add_argument("--plots", default="detrkit-data-check", help="folder for a labels picture per split "
                       "(labels_<split>.png: boxes per class, box centres and sizes); 'none' = no pictures")
    data_sub.add_subcommand("check", check, help="check a dataset for errors before training")
    conv = ArgumentParser(description="Convert a YOLO (data.yaml or classes.txt + images/ + labels/), Pascal VOC "
                                      "(Annotations/ + JPEGImages/ + ImageSets/Main/, or flat) or per-split COCO "
                                      "(Roboflow) dataset to a COCO folder: "
                                      "OUT/annotations/instances_{train,val}.json and OUT/{train,val}/ images. "
                                      "(Training reads those layouts directly too: --data DIR.)")
    conv.add_argument("source", help="YOLO dataset folder or data.yaml, a Pascal VOC folder, or a per-split COCO one")
    conv.add_argument("-o", "--output", required=True, help="output folder")
    conv.add_argument("--images", default="link", help="link (symlink the image folders), copy, or none")
    conv.add_argument("--val_split", type=float, default=0.0, help="where the source has no val split, hold out "
                                                                  "this share of the train images as one (e.g. 0.1)")
    conv.add_argument("--seed", type=int, default=42, help="seed of the --val_split draw")
    data_sub.add_subcommand("convert", conv, help="convert YOLO / Pascal VOC datasets to COCO json")


def run_data_command(args: Namespace) -> int:
    """Run the ``detrkit data`` subcommand in ``args`` (the parsed ``data`` namespace); returns the exit status."""
    sub = args.data_command
    return {"synth": cmd_synth, "check": cmd_data_check, "convert": cmd_data_convert}[sub](args[sub]) or 0


def _check_targets(args: Namespace) -> list[tuple[str | None, Path, object, str | None]]:
    """(split name, images, annotations, source) of each split ``detrkit data check`` should look at."""
    path = Path(args.path)
    if path.suffix == ".json":
        if not args.images:
            raise DatasetError(
                f"{path} is a json file: pass --images FOLDER, the folder its file_names are relative to"
            )
        return [(None, Path(args.images), path, None)]
    targets = []
    print(f"{path}: {describe_layout(path)}")
    for split in args.splits:
        try:
            found = resolve_split(path, split)
            if split != args.splits[0] and isinstance(found[1], Path) and not found[1].is_file():
                raise DatasetError(f"no {split} split ({found[1]} does not exist); training can hold out part of "
                                   "the train images: --val_split 0.1")
            targets.append((split, *found))
        except DatasetError as e:
            if split == args.splits[0]:
                raise
            print(f"({split}: {e})")
    return targets


def cmd_data_check(args: Namespace) -> int:
    reports = []
    for split, images, ann, source in _check_targets(args):
        coco = validate_coco(ann, source) if isinstance(ann, dict) else load_coco_json(ann)
        if not images.is_dir():
            raise DatasetError(f"image folder not found: {images} (images of {source or ann})")
        report = check_dataset(coco, images, source=str(source or ann), images=args.images_check)
        print(report.format(examples=args.examples))
        reports.append(report)
        if args.plots != "none":
            name = f"labels_{split}.png" if split else "labels.png"
            print(f"labels picture: {plot_labels(coco, Path(args.plots) / name)}")
    if args.report:
        Path(args.report).write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    errors = sum(len(r.errors) for r in reports)
    print(f"{'FAILED' if errors else 'OK'}: {errors} errors, {sum(len(r.warnings) for r in reports)} warnings"
          + (" (train with --skip_invalid true to drop what has errors)" if errors else ""))
    return 1 if errors else 0


def cmd_data_convert(args: Namespace) -> None:
    written = convert_dataset(args.source, args.output, images=args.images, val_split=args.val_split,
                              seed=args.seed)
    out = Path(args.output)
    for split, n in written.items():
        print(f"{split}: {n} images -> {out / 'annotations' / f'instances_{split}.json'}")
    if "val" not in written:
        print("no val split in the source: convert with --val_split 0.1, or train with --val_split 0.1, to hold out "
              "part of the train images")
    print(f"check it with: detrkit data check {out}")


def cmd_synth(args: Namespace) -> None:
    out = make_synthetic_dataset(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                                 image_size=args.image_size, max_objects=args.max_objects)
    print(f"wrote {args.num_train} train + {args.num_val} val images to {out}")
