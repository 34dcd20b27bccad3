"""detrkit's default against Ultralytics YOLO trained from scratch, for the same wall-clock on the same cores.

The peer users compare with. YOLO11n and YOLOv8n start from their model yaml (``yolo11n.yaml``: random weights, no
pretrained file) and train with Ultralytics' ``time`` budget (hours; it overrides ``epochs``) at the same image
size as detrkit's run, on the same dataset converted to YOLO labels. Both are scored by faster-coco-eval against
the same COCO val annotations (YOLO's own mAP interpolates differently): YOLO's predictions at conf 0.001, up to
300 boxes an image, its NMS as it ships. detrkit runs ``detrkit train --data DIR --time_limit M`` (the default
recipe); its evaluation is the one training ends with.

Ultralytics is AGPL: a benchmark-only peer, in the optional ``bench`` extra (``pip install -e ".[bench]"``); the
detrkit package and its tests never import it.

    python benchmarks/vs_yolo.py --dataset_name demo --minutes 12 --models '["yolo11n"]'  # the demo's data, whole run
    python benchmarks/vs_yolo.py --dataset_name trees --minutes 5       # the real photos of benchmarks/trees.py

When detrkit's run ends before ``--minutes`` (the demo's 3 epochs), YOLO gets the time detrkit took.

Writes benchmarks/results/vs_yolo.json (rows keyed by dataset, model and budget; ratios detrkit / YOLO).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trees import make_trees_dataset  # noqa: E402

from detrkit.data.coco import load_coco_json  # noqa: E402
from detrkit.data.synthetic import make_synthetic_dataset  # noqa: E402
from detrkit.engine.config import TrainConfig  # noqa: E402
from detrkit.engine.evaluate import coco_box_ap  # noqa: E402
from detrkit.engine.train import train  # noqa: E402


def dataset(name: str, root: Path) -> Path:
    data = root / name
    if name == "trees":
        make_trees_dataset(data)
    elif not (data / "annotations" / "instances_val.json").is_file():  # the demo's: seed 0, 800 / 200 at 224 px
        make_synthetic_dataset(data, num_train=800, num_val=200, image_size=224)
    return data


def to_yolo(coco_root: Path, out: Path) -> Path:
    """The COCO dataset as Ultralytics reads it: images/{split} (links), labels/{split}/*.txt, data.yaml."""
    if (out / "data.yaml").is_file():
        return out / "data.yaml"
    names = None
    for split in ("train", "val"):
        coco = load_coco_json(coco_root / "annotations" / f"instances_{split}.json")
        cats = sorted(c["id"] for c in coco["categories"])
        index = {c: i for i, c in enumerate(cats)}
        names = {index[c["id"]]: c["name"] for c in coco["categories"]}
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        lines: dict[int, list[str]] = {img["id"]: [] for img in coco["images"]}
        sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
        for a in coco["annotations"]:
            w, h = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            lines[a["image_id"]].append(f"{index[a['category_id']]} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                                        f"{bw / w:.6f} {bh / h:.6f}")
        for img in coco["images"]:
            src = (coco_root / split / img["file_name"]).resolve()
            dst = out / "images" / split / img["file_name"]
            if not dst.exists():
                dst.symlink_to(src)
            (out / "labels" / split / f"{Path(img['file_name']).stem}.txt").write_text("\n".join(lines[img["id"]]))
    spec = {"path": str(out.resolve()), "train": "images/train", "val": "images/val", "names": names}
    (out / "data.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return out / "data.yaml"


def run_yolo(model: str, data_yaml: Path, coco_root: Path, minutes: float, image_size: int, work: Path) -> dict:
    from ultralytics import YOLO  # the bench extra; never imported by detrkit

    yolo = YOLO(f"{model}.yaml")  # random weights: trained from scratch
    t0 = time.perf_counter()
    yolo.train(data=str(data_yaml), time=minutes / 60, epochs=1000, imgsz=image_size, device="cpu", workers=1,
               batch=16, pretrained=False, amp=False, plots=False, val=False, project=str(work.resolve()), name=model,
               exist_ok=True, verbose=False, seed=0, deterministic=False)
    train_s = time.perf_counter() - t0
    weights = Path(yolo.trainer.save_dir) / "weights" / "last.pt"  # Ultralytics may nest a relative project
    epochs = yolo.trainer.epoch + 1
    images = epochs * len(load_coco_json(coco_root / "annotations" / "instances_train.json")["images"])
    return {**score_yolo(weights, coco_root, image_size), "train_s": round(train_s, 1), "epochs": epochs,
            "images_per_s": round(images / train_s, 2), "weights": os.path.relpath(weights)}


def yolo_results(weights: Path, coco_root: Path, image_size: int) -> list[dict]:
    """A YOLO checkpoint's detections on the val split as COCO results (conf 0.001, up to 300 boxes an image)."""
    from ultralytics import YOLO

    trained = YOLO(str(weights))
    coco = load_coco_json(coco_root / "annotations" / "instances_val.json")
    cats = sorted(c["id"] for c in coco["categories"])
    results = []
    for img in coco["images"]:
        pred = trained.predict(str(coco_root / "val" / img["file_name"]), imgsz=image_size, conf=0.001, max_det=300,
                               device="cpu", verbose=False)[0]
        for (x1, y1, x2, y2), score, cls in zip(pred.boxes.xyxy.tolist(), pred.boxes.conf.tolist(),
                                                pred.boxes.cls.tolist(), strict=True):
            results.append({"image_id": img["id"], "category_id": cats[int(cls)], "score": score,
                            "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return results


def score_yolo(weights: Path, coco_root: Path, image_size: int) -> dict:
    """COCO AP50 / AP of a YOLO checkpoint on the val split, by faster-coco-eval (conf 0.001, 300 boxes)."""
    coco = load_coco_json(coco_root / "annotations" / "instances_val.json")
    metrics = coco_box_ap(coco, yolo_results(weights, coco_root, image_size))
    return {"AP50": metrics["AP50"], "AP": metrics["AP"]}


def run_detrkit(coco_root: Path, minutes: float, work: Path) -> dict:
    run = work / "detrkit"
    shutil.rmtree(run, ignore_errors=True)
    metrics = train(TrainConfig(data=str(coco_root), output_dir=str(run), time_limit=minutes, progress=False,
                                plots=False, tensorboard=False))
    config = dict(line.split(": ", 1) for line in (run / "config.yaml").read_text().splitlines() if ": " in line)
    steps = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]  # the last step, exactly
    return {"AP50": metrics["AP50"], "AP": metrics["AP"], "train_s": metrics["train_time_s"],
            "image_size": int(config["image_size"]), "steps": steps,
            "images_per_s": round(steps * int(config["batch_size"]) / metrics["train_time_s"], 2)}


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(dataset_name: str = "demo", minutes: float = 5.0, models: list[str] | None = None,
         work_dir: str = "runs/vs_yolo", out: str = "benchmarks/results/vs_yolo.json") -> dict:
    work = Path(work_dir)
    coco_root = dataset(dataset_name, work / "data")
    data_yaml = to_yolo(coco_root, work / "data" / f"{dataset_name}-yolo")
    results = json.loads(Path(out).read_text())["rows"] if Path(out).is_file() else {}
    meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
            "note": "YOLO from its model yaml (random init), Ultralytics' time budget; both scored by faster-coco-eval"}
    mine = run_detrkit(coco_root, minutes, work / f"{dataset_name}-{minutes:g}")
    mine["command"] = " ".join(["python", "benchmarks/vs_yolo.py", *sys.argv[1:]])
    results[f"{dataset_name} @ {minutes:g} min: detrkit default"] = mine
    print(f"detrkit default   AP50 {100 * mine['AP50']:5.1f}  AP {100 * mine['AP']:5.1f}  {mine['train_s']:.0f} s")
    # equal wall-clock: YOLO gets the time detrkit's run took when it ended before the budget (the demo's data)
    budget = min(minutes, mine["train_s"] / 60)
    for model in models or ["yolo11n", "yolov8n"]:
        r = run_yolo(model, data_yaml, coco_root, budget, mine["image_size"], work / f"{dataset_name}-{minutes:g}")
        r["detrkit_over_yolo"] = {k: (mine[k] / r[k] if r[k] > 0 else None) for k in ("AP50", "AP")}
        results[f"{dataset_name} @ {minutes:g} min: {model}"] = r
        print(f"{model:16s}  AP50 {100 * r['AP50']:5.1f}  AP {100 * r['AP']:5.1f}  {r['train_s']:.0f} s;  "
              f"detrkit / {model}: AP50 {r['detrkit_over_yolo']['AP50'] or float('nan'):.2f}", flush=True)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({**meta, "rows": results}, indent=2))
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
