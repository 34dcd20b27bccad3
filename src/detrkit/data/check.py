"""The dataset doctor: every problem of a COCO-format detection dataset, found before training starts.

Bad annotations cost most when they surface hours into a run. :func:`check_dataset` looks at the whole
dataset at once and returns a :class:`CheckReport`: errors (the dataset cannot be trained on as it is),
warnings (it can, but probably not as meant) and statistics (class counts). ``detrkit data check DIR``
prints it; training runs the same checks first, and ``--skip_invalid true`` drops what is broken instead
of stopping. Annotations converted from YOLO / VOC files carry a ``source`` ("labels/a.txt line 3") that
the messages name.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import UnidentifiedImageError
from tqdm import tqdm

from detrkit.data.image import image_size, open_rgb

ERROR, WARNING = "error", "warning"
_EXAMPLES = 5  # examples printed per kind of problem
_OUTSIDE_TOLERANCE = 1.0  # pixels a box may stick out of its image before we call it "partly outside"


@dataclass
class Problem:
    """One finding. ``image_index`` / ``ann_index`` (positions in the json's lists) say what ``--skip_invalid``
    drops for an error: an image with its annotations, or one annotation."""

    severity: str
    kind: str
    message: str
    image_index: int | None = None
    ann_index: int | None = None


@dataclass
class CheckReport:
    """Everything :func:`check_dataset` found, plus the statistics it gathered."""

    source: str
    num_images: int = 0
    num_annotations: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def add(self, severity: str, kind: str, message: str, image_index: int | None = None,
            ann_index: int | None = None) -> None:
        self.problems.append(Problem(severity, kind, message, image_index, ann_index))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def bad_images(self) -> set[int]:
        """Positions of the images that cannot be used (missing, unreadable, a repeated id)."""
        return {p.image_index for p in self.errors if p.image_index is not None}

    def bad_annotations(self) -> set[int]:
        return {p.ann_index for p in self.errors if p.ann_index is not None}

    def format(self, examples: int = _EXAMPLES, *, errors_only: bool = False) -> str:
        """A readable report: a summary line, then each kind of problem with its count and a few examples,
        then the class counts (``errors_only``: the errors alone, for an exception's message)."""
        lines = [f"{self.source}: {self.num_images} images, {self.num_annotations} annotations, "
                 f"{len(self.errors)} errors, {len(self.warnings)} warnings"]
        by_kind: dict[tuple[str, str], list[Problem]] = defaultdict(list)
        for p in self.errors if errors_only else self.problems:
            by_kind[(p.severity, p.kind)].append(p)
        for (severity, kind), probs in sorted(by_kind.items(), key=lambda kv: (kv[0][0] != ERROR, kv[0][1])):
            lines.append(f"  {severity.upper()} {kind}: {len(probs)}")
            lines += [f"    - {p.message}" for p in probs[:examples]]
            if len(probs) > examples:
                lines.append(f"    ... and {len(probs) - examples} more")
        if self.class_counts and not errors_only:
            width = max(len(n) for n in self.class_counts)
            lines.append("  class counts (annotations):")
            lines += [f"    {name:<{width}}  {n}" for name, n in self.class_counts.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"source": self.source, "num_images": self.num_images, "num_annotations": self.num_annotations,
                "errors": len(self.errors), "warnings": len(self.warnings), "class_counts": self.class_counts,
                "problems": [{"severity": p.severity, "kind": p.kind, "message": p.message} for p in self.problems]}


def check_dataset(coco: dict, images_dir: str | Path, *, source: str = "dataset", images: str = "full",
                  progress: bool = True) -> CheckReport:
    """Check a COCO detection dict (as :func:`~detrkit.data.load_coco_json` returns it) and its image folder.

    Args:
        images: ``full`` decodes every image (finds truncated and corrupt files; what ``detrkit data check``
            does), ``header`` reads only headers (existence, format and size: fast, what training does first),
            ``none`` skips the files.
    """
    report = CheckReport(source, len(coco["images"]), len(coco["annotations"]))
    image_sizes = _check_images(coco, Path(images_dir), report, images, progress)
    _check_annotations(coco, image_sizes, report)
    return report


def _where_image(img: dict) -> str:
    where = f"image id {img.get('id')!r} ({img.get('file_name')!r})"
    return f"{where}, named in {img['source']}" if img.get("source") else where  # e.g. the VOC XML file


def _check_images(coco: dict, images_dir: Path, report: CheckReport, mode: str, progress: bool) -> dict:
    """Duplicate ids, missing / unreadable files, sizes that disagree with the json. Returns id -> (w, h)."""
    sizes, seen_ids, seen_names = {}, set(), {}
    for index, img in enumerate(coco["images"]):
        if "id" not in img or not img.get("file_name"):
            report.add(ERROR, "image entry without id or file_name", f"{img!r:.120}; every image needs both",
                       image_index=index)
            continue
        if img["id"] in seen_ids:
            report.add(ERROR, "duplicate image id", f"{_where_image(img)}: the id is used by another image too; "
                       "give every image its own id", image_index=index)
            continue
        seen_ids.add(img["id"])
        if img["file_name"] in seen_names:
            report.add(
                WARNING,
                "duplicate file_name",
                f"{_where_image(img)} and image id {seen_names[img['file_name']]!r} are the same file",
            )
        seen_names.setdefault(img["file_name"], img["id"])
        if img.get("width") and img.get("height"):
            sizes[img["id"]] = (img["width"], img["height"])
    if mode == "none":
        return sizes
    bar = tqdm(coco["images"], desc=f"checking images ({mode})", unit="img", disable=not progress, leave=False)
    for index, img in enumerate(bar):
        if "id" not in img or not img.get("file_name"):
            continue
        path = images_dir / img["file_name"]
        if not path.is_file():
            report.add(ERROR, "missing image", f"{_where_image(img)}: {path} does not exist", image_index=index)
            continue
        try:
            if mode == "full":
                w, h = open_rgb(path).size
            else:
                w, h = image_size(path)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            what = "truncated image" if "truncated" in str(e).lower() else "unreadable image"
            report.add(ERROR, what, f"{_where_image(img)}: {path} ({e}); replace the file or remove the image",
                       image_index=index)
            continue
        json_size = sizes.get(img["id"])
        if json_size and json_size != (w, h):
            hint = (" (width and height swapped: the file has an EXIF rotation the annotation tool did not apply; "
                    "the boxes were checked against the rotated image)") if json_size == (h, w) else ""
            report.add(WARNING, "image size differs from the json",
                       f"{_where_image(img)}: json says {json_size[0]}x{json_size[1]}, the file is {w}x{h}{hint}")
        sizes[img["id"]] = (w, h)
    return sizes


def _check_annotations(coco: dict, sizes: dict, report: CheckReport) -> None:
    categories = coco["categories"]
    cat_names = {}
    for c in categories:
        if c.get("id") in cat_names:
            report.add(ERROR, "duplicate category id", f"category id {c.get('id')!r} is listed twice "
                       f"({cat_names[c.get('id')]!r} and {c.get('name')!r})")
        cat_names.setdefault(c.get("id"), str(c.get("name", c.get("id"))))
    image_ids = {img.get("id") for img in coco["images"]}
    seen_ann_ids, counts, annotated = set(), Counter(), set()
    for index, ann in enumerate(coco["annotations"]):
        ann_id = ann.get("id", f"#{index}")
        where = ann.get("source") or f"annotation id {ann_id!r} (image_id {ann.get('image_id')!r})"
        if ann_id in seen_ann_ids:
            report.add(ERROR, "duplicate annotation id", f"{where}: the id is used by another annotation too",
                       ann_index=index)
            continue
        seen_ann_ids.add(ann_id)
        problem = _annotation_problem(ann, cat_names, image_ids, sizes)
        if problem:
            severity, kind, message = problem
            report.add(severity, kind, f"{where}: {message}", ann_index=index if severity == ERROR else None)
            if severity == ERROR:
                continue
        counts[ann["category_id"]] += 1
        annotated.add(ann["image_id"])
    unannotated = [img for img in coco["images"] if img.get("id") not in annotated]
    for img in unannotated:
        report.add(WARNING, "image without annotations", f"{_where_image(img)} (kept: it teaches the model to "
                   "predict nothing; remove it if it was left unlabelled by mistake)")
    report.class_counts = {cat_names[cid]: counts.get(cid, 0) for cid in sorted(cat_names, key=str)}
    for cid, name in cat_names.items():
        if counts.get(cid, 0) == 0:
            report.add(WARNING, "category without annotations", f"category {name!r} (id {cid!r}) has no valid "
                       "annotation; the model will never learn it")


def _annotation_problem(ann: dict, cat_names: dict, image_ids: set, sizes: dict) -> tuple[str, str, str] | None:
    """The first thing wrong with one annotation, as (severity, kind, message), or None."""
    if ann.get("category_id") not in cat_names:
        return ERROR, "unknown category", (f"category_id {ann.get('category_id')!r} is not in 'categories' "
                                          f"(ids {sorted(cat_names, key=str)}); add the category or fix the annotation")
    if ann.get("image_id") not in image_ids:
        return ERROR, "unknown image", f"image_id {ann.get('image_id')!r} is not in 'images'; remove the annotation"
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
            and all(math.isfinite(v) for v in bbox)):
        return ERROR, "malformed bbox", f"bbox {bbox!r}; COCO boxes are [x, y, width, height] in pixels"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return ERROR, "empty box", f"bbox {bbox} has zero or negative width / height"
    size = sizes.get(ann["image_id"])
    if size is None:
        return None
    iw, ih = size
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, iw), min(y + h, ih)
    if x1 <= x0 or y1 <= y0:
        return ERROR, "box outside the image", f"bbox {bbox} lies outside the {iw}x{ih} image"
    tol = _OUTSIDE_TOLERANCE
    if x < -tol or y < -tol or x + w > iw + tol or y + h > ih + tol:
        return WARNING, "box partly outside the image", f"bbox {bbox} sticks out of the {iw}x{ih} image (clipped to it)"
    return None


def drop_invalid(coco: dict, report: CheckReport) -> tuple[dict, dict[str, int]]:
    """``coco`` without the images and annotations ``report``'s errors name (an image takes its annotations
    with it); returns (cleaned copy, {"images": dropped, "annotations": dropped})."""
    bad_images, bad_anns = report.bad_images(), report.bad_annotations()
    images = [img for i, img in enumerate(coco["images"]) if i not in bad_images]
    kept_ids = {img["id"] for img in images}
    anns = [a for i, a in enumerate(coco["annotations"]) if i not in bad_anns and a.get("image_id") in kept_ids]
    counts = {"images": len(coco["images"]) - len(images), "annotations": len(coco["annotations"]) - len(anns)}
    return {**coco, "images": images, "annotations": anns}, counts
