"""Predict files and videos with a :class:`~detrkit.Detector`: annotated copies, per-image detections and COCO
results files. The ``detrkit predict`` command calls these; they are the library's, usable without the CLI."""

from __future__ import annotations

import glob
import json
from pathlib import Path

from tqdm import tqdm

from detrkit.data.coco import to_coco_results
from detrkit.data.image import IMAGE_SUFFIXES, to_pil
from detrkit.inference.detector import Detector
from detrkit.inference.draw import contact_sheet, draw_detections

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def is_video(source: str | Path) -> bool:
    """Whether ``source`` is a video file that :func:`predict_video` reads."""
    return Path(source).suffix.lower() in VIDEO_SUFFIXES and Path(source).is_file()


def require_video_support() -> None:
    """Raise ImportError naming the extra when PyAV (``detrkit[video]``) is not installed."""
    try:
        import av  # noqa: F401  (optional dependency: the video extra)
    except ImportError:
        raise ImportError("video input needs PyAV: pip install 'detrkit[video]'") from None


def image_files(source: str) -> list[Path]:
    """The images a predict SOURCE names: one file, a folder's images, or a glob pattern (``"shots/*.png"``)."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True)
                       if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise FileNotFoundError(f"no such image, folder or glob match: {source}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
    return files


def image_ids(files: list[Path], ann: str | Path | None) -> list[int]:
    """Image ids for results.json: from a COCO annotation file (by file name), else COCO's naming
    (000000039769.jpg -> 39769), else 1, 2, 3..."""
    if ann:
        by_name = {Path(im["file_name"]).name: im["id"] for im in json.loads(Path(ann).read_text())["images"]}
        missing = [f.name for f in files if f.name not in by_name]
        if missing:
            raise FileNotFoundError(f"{ann} lists no image named {', '.join(missing[:5])}")
        return [by_name[f.name] for f in files]
    return [int(f.stem) if f.stem.isdigit() else i + 1 for i, f in enumerate(files)]


def predict_files(detector: Detector, files: list[Path], out: str | Path, *, batch_size: int = 1,
                  max_detections: int = 100, ann: str | Path | None = None, tile: int | None = None,
                  overlap: float = 0.2, min_side: int | None = 640) -> int:
    """Annotated images (``<stem>.jpg``, upscaled to ``min_side`` pixels on the long side where smaller, the score
    threshold in a corner), ``detections.json`` (per image) and ``results.json`` (COCO results, image ids
    from ``ann`` or the file names) in ``out``; ``tile`` / ``overlap``: predict by tiles (``Detector.predict``).
    Returns the number of detections."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = dict(zip(detector.label_to_cat, detector.class_names, strict=False))
    per_image, coco_results = {}, []
    batch, ids = max(1, batch_size), image_ids(files, ann)
    with tqdm(total=len(files), desc="predict", unit="img", disable=len(files) < 2) as bar:
        for start in range(0, len(files), batch):
            chunk = files[start : start + batch]
            images = [to_pil(f) for f in chunk]
            found = detector.predict(images, max_detections=max_detections, tile=tile, overlap=overlap,
                                     batch_size=batch)
            for i, (f, image, det) in enumerate(zip(chunk, images, found, strict=True)):
                draw_detections(image, det.boxes, det.labels.tolist(), det.scores.tolist(), names, min_side=min_side,
                                caption=f"score >= {detector.threshold:g}").save(out / f"{f.stem}.jpg", quality=92)
                per_image[f.name] = det.to_list()
                coco_results += to_coco_results(ids[start + i], det.boxes, det.scores, det.labels, rounded=True)
            bar.update(len(chunk))
    (out / "detections.json").write_text(json.dumps(per_image, indent=1))
    (out / "results.json").write_text(json.dumps(coco_results))
    return len(coco_results)


def prediction_sheet(detector: Detector, files: list[Path], ann: str | Path, path: str | Path, *,
                     columns: int = 4, max_detections: int = 100) -> Path:
    """One picture of ``files`` with the detector's predictions beside the ground truth of COCO json ``ann`` (the
    images matched by file name): what a run learned, seen at once."""
    coco = json.loads(Path(ann).read_text())
    by_name = {Path(im["file_name"]).name: im["id"] for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    truth: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        truth.setdefault(a["image_id"], []).append(a)
    pred_names = dict(zip(detector.label_to_cat, detector.class_names, strict=False))
    images = [to_pil(f) for f in files]
    found = detector.predict(images, max_detections=max_detections, batch_size=4)
    panels = []
    for f, image, det in zip(files, images, found, strict=True):
        gt = truth.get(by_name.get(f.name, -1), [])
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in gt)]
        panels.append((draw_detections(image, det.boxes, det.labels.tolist(), det.scores.tolist(), pred_names,
                                       min_side=640), f"predicted ({len(det.boxes)}): {f.name}"))
        panels.append((draw_detections(image, boxes, [a["category_id"] for a in gt], None, names, min_side=640),
                       f"ground truth ({len(gt)}): {f.name}"))
    sheet = contact_sheet(panels, columns=columns,
                          title=f"predictions (score >= {detector.threshold:g}) beside the ground truth")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, quality=92)
    return path


def predict_video(detector: Detector, source: str | Path, out: str | Path, *, batch_size: int = 1,
                  max_detections: int = 100) -> tuple[int, int, Path]:
    """An annotated copy of a video (``<stem>.mp4``: same frame rate, H.264), ``detections.json`` (per frame) and
    ``results.json`` (COCO results, image_id = frame number from 1) in ``out``, read and written with PyAV
    (``pip install 'detrkit[video]'``). Returns (frames, detections, the video written)."""
    require_video_support()
    import av  # optional dependency: the video extra

    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = dict(zip(detector.label_to_cat, detector.class_names, strict=False))
    target = out / f"{source.stem}.mp4"
    per_frame, coco_results, index = {}, [], 0
    with av.open(str(source)) as reader, av.open(str(target), "w") as writer:
        stream = reader.streams.video[0]
        encoder = writer.add_stream("libx264", rate=stream.average_rate or 25)
        encoder.width, encoder.height = stream.codec_context.width, stream.codec_context.height
        encoder.pix_fmt = "yuv420p"
        frames = (frame.to_image() for frame in reader.decode(stream))
        with tqdm(total=stream.frames or None, desc="predict", unit="frame") as bar:
            while chunk := [f for _, f in zip(range(max(1, batch_size)), frames, strict=False)]:
                for image, det in zip(chunk, detector.predict(chunk, max_detections=max_detections), strict=True):
                    drawn = draw_detections(image, det.boxes, det.labels.tolist(), det.scores.tolist(), names)
                    for packet in encoder.encode(av.VideoFrame.from_image(drawn)):
                        writer.mux(packet)
                    per_frame[index] = det.to_list()
                    coco_results += to_coco_results(index + 1, det.boxes, det.scores, det.labels, rounded=True)
                    index += 1
                bar.update(len(chunk))
        for packet in encoder.encode():  # flush
            writer.mux(packet)
    (out / "detections.json").write_text(json.dumps(per_frame, indent=1))
    (out / "results.json").write_text(json.dumps(coco_results))
    return index, len(coco_results), target
