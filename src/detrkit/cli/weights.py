"""``detrkit models`` and ``detrkit convert``."""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

from detrkit.api import list_models, model_info
from detrkit.weights.convert import convert_checkpoint


def models_parser() -> ArgumentParser:
    return ArgumentParser(description="List the registered model presets.")


def convert_parser() -> ArgumentParser:
    cv = ArgumentParser(description="Convert a checkpoint of the reference implementations (official DETR, "
                                    "Deformable-DETR, DAB-DETR, DN-DETR, DINO; detrex; HF transformers Detr / "
                                    "DeformableDetr / DabDetr) to a detrkit .safetensors checkpoint. The layout is "
                                    "detected from the keys; prints what was mapped, ignored and missing. Never "
                                    "unpickles code (torch.load weights_only=True).")
    cv.add_argument("source", help="checkpoint file or folder (.pth, .bin, .safetensors), a URL, or 'coco'")
    cv.add_argument("--model", required=True, help="the preset the checkpoint was trained as, e.g. dino_r50_4scale")
    cv.add_argument("-o", "--output", required=True, help="output .safetensors file")
    cv.add_argument("--num_classes", type=int, help="re-initialise the class heads for this many classes (fine-tuning)")
    cv.add_argument("--model_args", type=dict, default={}, help="builder settings that differ from the preset, "
                                                                  "e.g. '{num_queries: 100}'")
    return cv


def cmd_models(_: Namespace) -> None:
    names = list_models()
    width = max(map(len, names))
    print(f"{'model':<{width}}  {'input':<9} {'COCO AP':>7}  {'weights':>7}  {'recipe':<15}  description")
    for name in names:
        info = model_info(name)
        ap = f"{100 * info.coco_ap:.1f}" if info.coco_ap else "-"
        size = f"{info.input_size[0]}x{info.input_size[1]}"
        recipe = f"{info.recipe['epochs']} ep, lr {info.recipe['lr']:.0e}" if info.recipe else "-"
        weights = f"{100 * info.weights['coco'].coco_ap:.1f}" if "coco" in info.weights else "-"
        print(f"{name:<{width}}  {size:<9} {ap:>7}  {weights:>7}  {recipe:<15}  {info.description}")
    print("\nCOCO AP: the paper's; weights: AP of the released COCO weights (weights=\"coco\", --weights coco).")


def cmd_convert(args: Namespace) -> None:
    report = convert_checkpoint(args.model, args.source, args.output, num_classes=args.num_classes,
                                **args.model_args)
    print("\n".join(report.lines()))
    out = report.output
    print(f"wrote {out}: use it with `detrkit predict IMAGE --checkpoint {out}` or detrkit.Detector('{out}')")
