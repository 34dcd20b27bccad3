"""CPU deployment latency: PyTorch eager against the exported graphs, same model and input, batch 1.

For each preset at its input size: detrkit in PyTorch eager, the ONNX export in onnxruntime (deformable attention
as GridSample and as gathers, `detrkit export --sampling`), the same two in OpenVINO's CPU runtime (f32), and HF
transformers eager where HF has the model (DETR-R50, Deformable-DETR two-stage; same random weights, converted as the
parity tests do). Every runtime gets the same number of threads (torch's). Each cell: the median of ``--iters``
timed calls after ``--warmup`` calls, the runtimes taking turns call by call (a slow spell of a shared machine hits
them alike); ratios are PyTorch eager's time over the cell's (above 1 = faster than eager).
Random weights: latency does not depend on them.

    python benchmarks/deploy_cpu.py                                    # the lite presets at 640 x 640
    python benchmarks/deploy_cpu.py --models detr_r50,deformable_detr_r50_two_stage --height 800 --width 1333

Prints a table and writes benchmarks/results/deploy_cpu.json (rows merged with an earlier run's, by preset and size).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detrkit import create_model
from detrkit.export import ExportableDetector, check_onnx, export_onnx

LITE = ["detr_lite", "deformable_detr_lite", "dab_detr_lite", "dino_lite"]


def timed_interleaved(calls: dict, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds of ``iters`` calls of each callable in ``calls``, after ``warmup`` calls of each. The calls
    go round-robin (one of each per round), so that a slow spell of a shared machine hits every runtime alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def hf_model(name: str):
    """(HF model, detrkit model with the same weights) for presets HF has, else (None, detrkit model)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from inference import hf_pair

        return hf_pair(name)
    except ImportError:  # transformers is not installed: no HF column
        return None, create_model(name).eval()


def bench(name: str, size: tuple[int, int], warmup: int, iters: int, work: Path, runtimes: list[str]) -> dict:
    threads = torch.get_num_threads()
    hf, model = hf_model(name) if name in ("detr_r50", "deformable_detr_r50_two_stage") else (
        None, create_model(name).eval())
    images = torch.randn(1, 3, *size)
    wrapper = ExportableDetector(model).eval()
    row = {"model": name, "size": list(size), "threads": threads}
    calls = {"pytorch_eager": lambda: wrapper(images)}
    if hf is not None:
        calls["hf_eager"] = lambda: hf(pixel_values=images)
    for sampling in ("grid_sample", "gather"):
        path = export_onnx(model, work / f"{name}-{sampling}.onnx", image_size=size, sampling=sampling)
        row[f"max_diff_{sampling}"] = max(check_onnx(path, model, images).values())
        if "onnxruntime" in runtimes:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"images": images.numpy()}
            calls[f"onnxruntime_{sampling}"] = lambda s=session, f=feed: s.run(None, f)
        if "openvino" in runtimes:
            import openvino as ov

            ir = work / f"{name}-{sampling}.xml"
            ov.save_model(ov.convert_model(str(path)), str(ir), compress_to_fp16=False)
            compiled = ov.Core().compile_model(str(ir), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                "INFERENCE_NUM_THREADS": threads})
            array = images.numpy()
            calls[f"openvino_{sampling}"] = lambda c=compiled, a=array: c(a)
    with torch.inference_mode():
        medians = timed_interleaved(calls, warmup, iters)
    for key, seconds in medians.items():
        row[f"{key}_ms"] = 1000 * seconds
        if key != "pytorch_eager":
            row[f"{key}_speedup"] = medians["pytorch_eager"] / seconds
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(LITE))
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--runtimes", default="onnxruntime,openvino")
    parser.add_argument("--out", default="benchmarks/results/deploy_cpu.json")
    args = parser.parse_args()
    runtimes = args.runtimes.split(",")
    out = Path(args.out)
    old = json.loads(out.read_text())["rows"] if out.is_file() else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            row = bench(name, (args.height, args.width), args.warmup, args.iters, Path(tmp), runtimes)
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    done = {(r["model"], tuple(r["size"])) for r in rows}
    merged = [r for r in old if (r["model"], tuple(r["size"])) not in done] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__}
    for package in ("onnxruntime", "openvino", "transformers"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    out.write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "versions": versions,
                               "rows": merged}, indent=2))
    cells = ["pytorch_eager", "hf_eager", "onnxruntime_grid_sample", "onnxruntime_gather", "openvino_grid_sample",
             "openvino_gather"]
    print(f"\nbatch 1, {torch.get_num_threads()} threads, median ms (speed-up over PyTorch eager)")
    print(f"{'model':<32}{'size':>10}" + "".join(f"{c:>24}" for c in cells))
    for r in merged:
        line = f"{r['model']:<32}{'x'.join(map(str, r['size'])):>10}"
        for c in cells:
            ms, up = r.get(f"{c}_ms"), r.get(f"{c}_speedup")
            line += f"{'-':>24}" if ms is None else f"{f'{ms:.0f} ({up:.2f}x)' if up else f'{ms:.0f}':>24}"
        print(line)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
