"""``detrkit predict``, ``detrkit explain`` and ``detrkit export``: a trained model put to use."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from detrkit.cli.common import CommandError, add_model_source, detector, model_source
from detrkit.data.image import to_pil
from detrkit.export import (
    ExportMismatchError,
    ExportSettingError,
    export_onnx,
    export_openvino,
    verify_onnx,
    verify_openvino,
)
from detrkit.export.openvino import MISSING as OPENVINO_MISSING
from detrkit.inference.detector import load_for_inference
from detrkit.inference.explain import draw_explanation, explain
from detrkit.inference.predict import image_files, is_video, predict_files, predict_video, require_video_support
from detrkit.registry import image_size_of


def predict_parser() -> ArgumentParser:
    pr = ArgumentParser(description="Detect objects in images or a video; writes annotated images (or video) and JSON. "
                                    "Give a detrkit --checkpoint, or --model with --weights for any other checkpoint.")
    pr.add_argument("source", help="an image file, a folder of images, a glob pattern in quotes ('shots/*.png'), or a "
                                   "video file (.mp4 .avi .mov .mkv .webm; needs pip install 'detrkit[video]')")
    add_model_source(pr)
    pr.add_argument("--output", default="predictions", help="folder for annotated images and detections.json")
    pr.add_argument("--threshold", type=float, default=0.5, help="minimum score to keep a detection")
    pr.add_argument("--max_detections", type=int, default=100)
    pr.add_argument("--batch_size", type=int, default=4, help="images per forward pass")
    pr.add_argument("--amp", default="auto", help="autocast on CUDA: auto (bf16, else fp16), bf16, fp16 or none; "
                                                  "a CPU runs fp32 unless given bf16")
    pr.add_argument("--compile", type=bool, default=False, help="torch.compile the model (pays off on many images)")
    pr.add_argument("--ann", help="COCO annotation json whose image ids results.json should use (matched by file "
                                  "name); default: digit-only file names are the ids (COCO's naming), others "
                                  "numbered from 1")
    pr.add_argument("--tile", type=int, help="predict large images by overlapping square tiles of this many pixels "
                                             "(e.g. the size the model was trained on), merged in image coordinates")
    pr.add_argument("--overlap", type=float, default=0.2, help="with --tile: the share of a tile its neighbours "
                                                               "overlap; keep it above the largest object's size")
    pr.add_argument("--device", default="auto")
    return pr


def explain_parser() -> ArgumentParser:
    xp = ArgumentParser(description="Draw what each detection looked at, one image per detection: DETR's last decoder "
                                    "layer cross-attention over the feature map (a heat map), or for deformable models "
                                    "(Deformable DETR, DINO) the last decoder layer's sampling points, coloured and "
                                    "sized by attention weight. Also writes explain.json.")
    xp.add_argument("image", help="an image file")
    add_model_source(xp)
    xp.add_argument("--output", default="explain", help="output folder")
    xp.add_argument("--threshold", type=float, default=0.5, help="minimum score of the detections explained")
    xp.add_argument("--max_detections", type=int, default=5)
    xp.add_argument("--device", default="auto")
    return xp


def export_parser() -> ArgumentParser:
    ex = ArgumentParser(description="Export a detector with its postprocessing to ONNX: input `images` (B, 3, H, W) "
                                    "normalized with ImageNet mean/std; outputs `boxes` (B, K, 4) xyxy pixels, "
                                    "`scores` (B, K), `labels` (B, K) category ids. Then runs the file in onnxruntime "
                                    "on random images and compares it with PyTorch, failing above 1e-3. Needs pip "
                                    "install 'detrkit[onnx]'.")
    add_model_source(ex)
    ex.add_argument("--format", default="onnx", help="onnx, or openvino (the ONNX file converted to OpenVINO IR, "
                    "<output>.xml + .bin, checked in OpenVINO's CPU runtime; pip install 'detrkit[openvino]')")
    ex.add_argument("--output", help="output file (default: <model>.onnx, or <model>.xml for openvino)")
    ex.add_argument("--image_size", type=int, help="side of the square sample image traced (default: the checkpoint's)")
    ex.add_argument("--batch_size", type=int, default=1, help="batch size of the traced sample")
    ex.add_argument("--top_k", type=int, default=100, help="detections per image in the graph's outputs")
    ex.add_argument("--dynamic", type=bool, default=True, help="dynamic batch and image size axes")
    ex.add_argument("--opset", type=int, default=18)
    ex.add_argument("--fp16", type=bool, default=False, help="float16 weights and input (half the file); checked "
                                                             "against the PyTorch model run in float16")
    ex.add_argument("--sampling", default="grid_sample", help="how deformable attention reads its points: "
                    "grid_sample (ONNX GridSample) or gather (Gather + arithmetic, no GridSample node: for TensorRT "
                    "and runtimes without the op); the same numbers either way")
    return ex


def cmd_predict(args: Namespace) -> None:
    out = Path(args.output)
    if is_video(args.source):
        try:
            require_video_support()
        except ImportError as e:
            raise CommandError(str(e)) from None
        frames, found, target = predict_video(detector(args), args.source, out, batch_size=args.batch_size,
                                              max_detections=args.max_detections)
        print(f"{found} detections in {frames} frame(s); annotated video {target}, detections.json (per frame) "
              f"and results.json (COCO results, image_id = frame number from 1) in {out}")
        return
    files = image_files(args.source)
    if args.tile is not None and (args.tile < 1 or not 0 <= args.overlap < 1):
        raise CommandError(f"--tile {args.tile} --overlap {args.overlap}: need a tile of at least 1 pixel and an "
                           "overlap in [0, 1)")
    found = predict_files(detector(args), files, out, batch_size=args.batch_size, max_detections=args.max_detections,
                          ann=args.ann, tile=args.tile, overlap=args.overlap)
    print(f"{found} detections in {len(files)} image(s); annotated images, detections.json (per image) "
          f"and results.json (COCO results format) in {out}")


def cmd_explain(args: Namespace) -> None:
    image = to_pil(args.image)
    try:
        found = explain(detector(args), image, threshold=args.threshold, max_detections=args.max_detections)
    except NotImplementedError as e:
        raise CommandError(str(e)) from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem, summary = Path(args.image).stem, []
    for i, exp in enumerate(found):
        file = out / f"{stem}_{i}_{exp.name.replace(' ', '_')}.jpg"
        draw_explanation(image, exp).save(file)
        summary.append({"file": file.name, **exp.to_dict()})
    (out / "explain.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(found)} detection(s) above {args.threshold} explained in {out}" +
          ("" if found else "; lower --threshold to see more"))


def cmd_export(args: Namespace) -> None:
    if args.format not in ("onnx", "openvino"):
        raise CommandError(f"unknown export format {args.format!r}; supported: onnx, openvino")
    openvino = args.format == "openvino"
    if openvino and importlib.util.find_spec("openvino") is None:
        raise CommandError(OPENVINO_MISSING)
    if openvino and args.fp16:
        raise CommandError("--fp16 is for ONNX; OpenVINO picks its precision when it loads the model "
                           "(INFERENCE_PRECISION_HINT)")
    model, meta = load_for_inference(*model_source(args))
    size = args.image_size or image_size_of(meta)
    out = Path(args.output or f"{meta['model']}.onnx")
    out = out.with_suffix(".xml") if openvino else out
    print(f"exporting {meta['model']} ({meta['num_classes']} classes) at {args.batch_size}x3x{size}x{size}"
          f"{', dynamic batch and size' if args.dynamic else ''} to {out}")
    t0 = time.perf_counter()
    options = dict(image_size=(size, size), batch_size=args.batch_size, label_to_cat=meta["label_to_cat"],
                   top_k=args.top_k, dynamic=args.dynamic)
    try:
        if openvino:
            export_openvino(model, out, opset=args.opset, sampling=args.sampling, **options)
            size_mib = out.with_suffix(".bin").stat().st_size / 2**20
        else:
            export_onnx(model, out, opset=args.opset, fp16=args.fp16, sampling=args.sampling, **options)
            size_mib = out.stat().st_size / 2**20
        print(f"exported in {time.perf_counter() - t0:.1f} s ({size_mib:.1f} MiB)")
        rows = (verify_openvino if openvino else verify_onnx)(out, model, **options)
    except ImportError as e:  # onnx / onnxscript / onnxruntime
        raise CommandError(f"ONNX export needs extra packages ({e}): pip install 'detrkit[onnx]'") from None
    except (ExportMismatchError, ExportSettingError) as e:  # a mismatch; a bad --sampling or --image_size
        raise CommandError(f"{e}") from None
    for row in rows:
        print(f"{'OpenVINO' if openvino else 'onnxruntime'} vs PyTorch at {'x'.join(map(str, row['shape']))}: "
              "max abs difference scores "
              f"{row['scores']:.2e}, boxes {row['boxes']:.2e} (relative to the image size)")
