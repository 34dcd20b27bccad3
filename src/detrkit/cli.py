"""The ``detrkit`` command: demo, train, eval, predict, explain, convert, export, models, data synth."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from detrkit.config import TrainConfig
from detrkit.data.commands import add_data_commands, run_data_command
from detrkit.registry import image_size_of

# The demo: the built-in synthetic dataset and the lite preset that learns best on a CPU in about
# 12 minutes of training on 2 cores (the whole demo stays under 15). Deformable DETR converges far
# faster than DETR here (see benchmarks/convergence.py). `--quick` shrinks everything for smoke tests.
# Batch 4 beats batch 8 here: twice the updates, and less padding per batch (6.1 vs 4.4 img/s).
DEMO = dict(model="deformable_detr_lite", num_train=1000, num_val=200, image_size=224, epochs=4, batch_size=4, lr=2e-4)
DEMO_QUICK = dict(num_train=8, num_val=4, image_size=128, epochs=1, batch_size=4)


def _add_model_source(parser: ArgumentParser) -> None:
    """The model of predict / explain / export: a detrkit --checkpoint, or --model with any --weights."""
    parser.add_argument("--checkpoint", help="detrkit checkpoint folder, model.safetensors or training run folder")
    parser.add_argument("--model", help="preset of --weights, e.g. dino_r50_4scale")
    parser.add_argument("--weights", help="with --model: an official / detrex / HF checkpoint file, a URL, or 'coco' "
                                          "for the preset's released COCO weights")


def _demo_parser() -> ArgumentParser:
    demo = ArgumentParser(description="Generate the synthetic dataset, train a lite detector on it, evaluate (COCO AP) "
                                      "and draw predictions, all on this machine (CPU is fine).")
    demo.add_argument("--output", default="detrkit-demo", help="folder for the dataset, the run and the predictions")
    demo.add_argument("--model", default=DEMO["model"], help="preset to train")
    demo.add_argument("--epochs", type=int, default=DEMO["epochs"])
    demo.add_argument("--batch_size", type=int, default=DEMO["batch_size"])
    demo.add_argument(
        "--image_size", type=int, default=DEMO["image_size"], help="synthetic image size and training scale"
    )
    demo.add_argument("--num_train", type=int, default=DEMO["num_train"])
    demo.add_argument("--num_val", type=int, default=DEMO["num_val"])
    demo.add_argument("--device", default="auto")
    demo.add_argument("--quick", type=bool, default=False, help="a tiny smoke-test budget (seconds, not minutes)")
    return demo


def _train_parser() -> ArgumentParser:
    train = ArgumentParser(description="Train a detector on a COCO-format dataset. Every option can also come from "
                                       "a YAML file (--config); the resolved config is saved in the output folder.")
    train.add_argument("--config", action=ActionConfigFile, help="YAML file of options")
    train.add_class_arguments(TrainConfig, nested_key=None, as_group=False)
    return train


def _eval_parser() -> ArgumentParser:
    ev = ArgumentParser(description="COCO box AP of a checkpoint on a COCO-format split.")
    ev.add_argument("--checkpoint", required=True, help="checkpoint folder, model.safetensors or training run folder")
    ev.add_argument("--data", help="dataset folder (as for train); evaluates its val split")
    ev.add_argument("--images", help="image folder (instead of --data)")
    ev.add_argument("--ann", help="COCO annotation json (instead of --data)")
    ev.add_argument("--batch_size", type=int, default=4)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--output", help="where to write metrics.json (default: next to the checkpoint)")
    return ev


def _predict_parser() -> ArgumentParser:
    pr = ArgumentParser(description="Detect objects in images or a video; writes annotated images (or video) and JSON. "
                                    "Give a detrkit --checkpoint, or --model with --weights for any other checkpoint.")
    pr.add_argument("source", help="an image file, a folder of images, a glob pattern in quotes ('shots/*.png'), or a "
                                   "video file (.mp4 .avi .mov .mkv .webm; needs pip install 'detrkit[video]')")
    _add_model_source(pr)
    pr.add_argument("--output", default="predictions", help="folder for annotated images and detections.json")
    pr.add_argument("--threshold", type=float, default=0.5, help="minimum score to keep a detection")
    pr.add_argument("--max_detections", type=int, default=100)
    pr.add_argument("--batch_size", type=int, default=4, help="images per forward pass")
    pr.add_argument("--amp", default="auto", help="autocast on CUDA: auto (bf16, else fp16), bf16, fp16 or none; "
                                                  "CPU runs fp32")
    pr.add_argument("--compile", type=bool, default=False, help="torch.compile the model (pays off on many images)")
    pr.add_argument(
        "--ann",
        help="COCO annotation json whose image ids results.json should use (matched by file name); "
        "default: digit-only file names are the ids (COCO's naming), others numbered from 1",
    )
    pr.add_argument("--device", default="auto")
    return pr


def _models_parser() -> ArgumentParser:
    return ArgumentParser(description="List the registered model presets.")


def _explain_parser() -> ArgumentParser:
    xp = ArgumentParser(
        description="Draw what each detection looked at, one image per detection: DETR's last decoder "
        "layer cross-attention over the feature map (a heat map), or for deformable models "
        "(Deformable DETR, DINO) the last decoder layer's sampling points, coloured and sized "
        "by attention weight. Also writes explain.json."
    )
    xp.add_argument("image", help="an image file")
    _add_model_source(xp)
    xp.add_argument("--output", default="explain", help="output folder")
    xp.add_argument("--threshold", type=float, default=0.5, help="minimum score of the detections explained")
    xp.add_argument("--max_detections", type=int, default=5)
    xp.add_argument("--device", default="auto")
    return xp


def _export_parser() -> ArgumentParser:
    ex = ArgumentParser(
        description="Export a detector with its postprocessing to ONNX: input `images` (B, 3, H, W) "
        "normalized with ImageNet mean/std; outputs `boxes` (B, K, 4) xyxy pixels, `scores` "
        "(B, K), `labels` (B, K) category ids. Then runs the file in onnxruntime on random "
        "images and compares it with PyTorch, failing above 1e-3. Needs pip install "
        "'detrkit[onnx]'."
    )
    _add_model_source(ex)
    ex.add_argument("--format", default="onnx", help="export format (onnx)")
    ex.add_argument("--output", help="output file (default: <model>.onnx)")
    ex.add_argument("--image_size", type=int, help="side of the square sample image traced (default: the checkpoint's)")
    ex.add_argument("--batch_size", type=int, default=1, help="batch size of the traced sample")
    ex.add_argument("--top_k", type=int, default=100, help="detections per image in the graph's outputs")
    ex.add_argument("--dynamic", type=bool, default=True, help="dynamic batch and image size axes")
    ex.add_argument("--opset", type=int, default=18)
    ex.add_argument("--fp16", type=bool, default=False, help="float16 weights and input (half the file); checked "
                                                             "against the PyTorch model run in float16")
    return ex


def _convert_parser() -> ArgumentParser:
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


_SUBCOMMANDS = [  # name, parser, one-line help
    ("demo", _demo_parser, "end-to-end demo on built-in synthetic data"),
    ("train", _train_parser, "train on your own COCO-format data"),
    ("eval", _eval_parser, "evaluate a checkpoint (COCO AP)"),
    ("predict", _predict_parser, "predict on images, folders, globs or a video"),
    ("models", _models_parser, "list presets"),
    ("explain", _explain_parser, "draw what each detection attended to"),
    ("export", _export_parser, "export to ONNX (with an onnxruntime parity check)"),
    ("convert", _convert_parser, "convert official / detrex / HF checkpoints to detrkit"),
]


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="detrkit", description="DETR-family object detectors: train, evaluate, predict.")
    sub = parser.add_subcommands(dest="command")
    for name, build, help_ in _SUBCOMMANDS:
        sub.add_subcommand(name, build(), help=help_)
    add_data_commands(sub)
    return parser


def cmd_models(_: Namespace) -> None:
    from detrkit.registry import list_models, model_info

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


class CommandError(Exception):
    """A command that cannot do what it was asked (printed without a traceback, exit status 2)."""


def cmd_export(args: Namespace) -> None:
    from detrkit.detector import load_for_inference

    if args.format != "onnx":
        raise CommandError(f"unknown export format {args.format!r}; supported: onnx")
    try:
        from detrkit.export import ExportMismatchError, export_onnx, verify_onnx
    except ImportError as e:
        raise CommandError(f"ONNX export needs extra packages ({e}): pip install 'detrkit[onnx]'") from None
    if not (args.checkpoint or (args.model and args.weights)):
        raise FileNotFoundError("give --checkpoint (a detrkit checkpoint) or --model with --weights")
    model, meta = load_for_inference(args.checkpoint or args.weights, None if args.checkpoint else args.model)
    size = args.image_size or image_size_of(meta)
    out = Path(args.output or f"{meta['model']}.onnx")
    print(f"exporting {meta['model']} ({meta['num_classes']} classes) at {args.batch_size}x3x{size}x{size}"
          f"{', dynamic batch and size' if args.dynamic else ''} to {out}")
    t0 = time.perf_counter()
    options = dict(image_size=(size, size), batch_size=args.batch_size, label_to_cat=meta["label_to_cat"],
                   top_k=args.top_k, dynamic=args.dynamic)
    export_onnx(model, out, opset=args.opset, fp16=args.fp16, **options)
    print(f"exported in {time.perf_counter() - t0:.1f} s ({out.stat().st_size / 2**20:.1f} MiB)")
    try:
        rows = verify_onnx(out, model, **options)
    except ExportMismatchError as e:
        raise CommandError(str(e)) from None
    for row in rows:
        print(f"onnxruntime vs PyTorch at {'x'.join(map(str, row['shape']))}: max abs difference scores "
              f"{row['scores']:.2e}, boxes {row['boxes']:.2e} (relative to the image size)")


def cmd_convert(args: Namespace) -> None:
    import warnings

    from detrkit.convert.formats import load_pretrained, read_checkpoint
    from detrkit.engine.checkpoint import save_weights
    from detrkit.registry import resolve_weights

    conv = read_checkpoint(resolve_weights(args.model, args.source, **args.model_args))
    fmt = conv.format
    print(f"read {conv.file}: {conv.num_source_keys} tensors, layout {fmt.name} ({fmt.source})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-initialised heads are reported below
        model, meta = load_pretrained(args.model, conv, num_classes=args.num_classes, **args.model_args)
    own = model.state_dict()
    reinit = meta["source"]["reinitialised"]
    print(f"mapped: {conv.num_source_keys - len(conv.ignored)} checkpoint tensors -> {len(own) - len(reinit)} of the "
          f"{len(own)} tensors of {args.model}")
    print(f"ignored: {len(conv.ignored)}")
    for reason in sorted({r for _, r in conv.ignored}):
        keys = [k for k, r in conv.ignored if r == reason]
        print(f"  {len(keys)} x {reason}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    print(
        f"missing: {len(reinit)}"
        + (
            f" (class heads re-initialised for {meta['num_classes']} classes: "
            f"{', '.join(reinit[:4])}{' ...' if len(reinit) > 4 else ''})"
            if reinit
            else ""
        )
    )
    names = meta["class_names"]
    print(f"classes: {meta['num_classes']} ({', '.join(n for n in names[:6] if n != 'N/A')}, ...)")
    out = Path(args.output)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(out, model, meta)
    print(f"wrote {out}: use it with `detrkit predict IMAGE --checkpoint {out}` or detrkit.Detector('{out}')")


def cmd_train(args: Namespace) -> dict:
    from detrkit.engine.train import train

    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    return train(cfg)


def cmd_eval(args: Namespace) -> dict:
    from detrkit.config import dataset_split
    from detrkit.engine.checkpoint import resolve_weights_file
    from detrkit.engine.evaluate import UnpredictedCategoriesWarning, evaluate_checkpoint, format_metrics, write_metrics

    if args.images and args.ann:
        images, ann, source = Path(args.images), Path(args.ann), None
    else:
        images, ann, source = dataset_split(TrainConfig(data=args.data), "val")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnpredictedCategoriesWarning)
        metrics = evaluate_checkpoint(args.checkpoint, images, ann, source=source, device=args.device,
                                      batch_size=args.batch_size)
    for w in caught:  # one plain line for ours; anything else as Python shows warnings
        if issubclass(w.category, UnpredictedCategoriesWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    out = Path(args.output) if args.output else resolve_weights_file(args.checkpoint).parent / "metrics.json"
    write_metrics(metrics, out)
    print(format_metrics(metrics))
    print(f"metrics written to {out}")
    return metrics


VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def cmd_predict(args: Namespace) -> None:
    from detrkit.predict import image_files, predict_files, predict_video

    source, out = Path(args.source), Path(args.output)
    if source.suffix.lower() in VIDEO_SUFFIXES and source.is_file():
        try:
            import av  # noqa: F401
        except ImportError:
            raise CommandError("video input needs PyAV: pip install 'detrkit[video]'") from None
        frames, found, target = predict_video(_detector(args), source, out, batch_size=args.batch_size,
                                              max_detections=args.max_detections)
        print(f"{found} detections in {frames} frame(s); annotated video {target}, detections.json (per frame) "
              f"and results.json (COCO results, image_id = frame number from 1) in {out}")
        return
    files = image_files(args.source)
    found = predict_files(_detector(args), files, out, batch_size=args.batch_size, max_detections=args.max_detections,
                          ann=getattr(args, "ann", None))
    print(f"{found} detections in {len(files)} image(s); annotated images, detections.json (per image) "
          f"and results.json (COCO results format) in {out}")


def _detector(args: Namespace):
    from detrkit.detector import Detector

    options = dict(device=args.device, threshold=args.threshold, amp=getattr(args, "amp", "auto"),
                   compile=getattr(args, "compile", False))
    if args.checkpoint:
        return Detector(args.checkpoint, **options)
    if args.model and args.weights:
        return Detector(args.weights, model=args.model, **options)
    raise FileNotFoundError("give --checkpoint (a detrkit checkpoint) or --model with --weights")


def cmd_explain(args: Namespace) -> None:
    from detrkit.detector import to_pil
    from detrkit.explain import draw_explanation, explain

    image = to_pil(args.image)
    try:
        found = explain(_detector(args), image, threshold=args.threshold, max_detections=args.max_detections)
    except NotImplementedError as e:
        raise CommandError(str(e)) from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem, summary = Path(args.image).stem, []
    for i, exp in enumerate(found):
        file = out / f"{stem}_{i}_{exp.name.replace(' ', '_')}.jpg"
        draw_explanation(image, exp).save(file)
        summary.append({"file": file.name, "box": [round(v, 2) for v in exp.box], "score": round(exp.score, 4),
                        "label": exp.label, "name": exp.name, "query": exp.query})
    (out / "explain.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(found)} detection(s) above {args.threshold} explained in {out}" +
          ("" if found else "; lower --threshold to see more"))


def cmd_demo(args: Namespace) -> dict:
    from detrkit.data import make_synthetic_dataset
    from detrkit.detector import Detector
    from detrkit.engine.train import train
    from detrkit.predict import predict_files

    opts = {**vars(args)}
    if args.quick:
        opts.update(DEMO_QUICK)
    out = Path(args.output)
    data = out / "data"
    marker = data / f"synth-{opts['num_train']}-{opts['num_val']}-{opts['image_size']}.done"
    t0 = time.perf_counter()
    if not marker.exists():
        print(f"[1/3] generating the synthetic dataset in {data}")
        make_synthetic_dataset(
            data, num_train=opts["num_train"], num_val=opts["num_val"], image_size=opts["image_size"]
        )
        marker.touch()
    else:
        print(f"[1/3] reusing the synthetic dataset in {data}")
    print(f"[2/3] training {opts['model']} for {opts['epochs']} epochs")
    cfg = TrainConfig(
        model=opts["model"], data=str(data), output_dir=str(out / "run"), image_size=opts["image_size"],
        epochs=opts["epochs"], batch_size=opts["batch_size"], lr=DEMO["lr"], lr_backbone=DEMO["lr"],
        lr_drop=max(1, opts["epochs"] - 1), device=opts["device"], num_workers=1, eval_every=opts["epochs"],
    )
    metrics = train(cfg)
    print(f"[3/3] drawing predictions on validation images into {out / 'predictions'}")
    val_images = sorted((data / "val").glob("*.jpg"))[:8]
    # A short CPU run gives modest confidences (focal-loss scores near 0.2): draw what clears 0.2.
    detector = Detector(str(out / "run"), device=opts["device"], threshold=0.2)
    predict_files(detector, val_images, out / "predictions", batch_size=4, max_detections=20)
    print(f"done in {time.perf_counter() - t0:.0f} s: metrics in {out / 'run' / 'metrics.json'}, "
          f"checkpoint in {out / 'run' / 'checkpoints'}")
    return metrics


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "models": cmd_models,
            "convert": cmd_convert, "export": cmd_export, "explain": cmd_explain}


def _underscored(option: str) -> str:
    name, eq, value = option[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def main(argv: list[str] | None = None) -> int:
    from detrkit.data import DatasetError
    from detrkit.engine.checkpoint import CheckpointError
    from detrkit.engine.train import TrainingError
    from detrkit.registry import UnknownModelError

    argv = sys.argv[1:] if argv is None else list(argv)
    # --skip-invalid and --skip_invalid both work: options are spelled with underscores
    argv = [_underscored(a) if a.startswith("--") else a for a in argv]
    args = _parser().parse_args(argv)
    command = args.command
    try:
        if command == "data":
            return run_data_command(args.data)
        else:
            COMMANDS[command](args[command])
    except (DatasetError, CheckpointError, UnknownModelError, FileNotFoundError, CommandError, TrainingError) as e:
        print(f"detrkit {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"detrkit {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
