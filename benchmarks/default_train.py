"""Does ``detrkit train --data DIR`` with no other option learn like ``detrkit demo`` on the demo's data?

Runs, one after the other on this machine's cores, the two commands a new user types: ``detrkit demo`` (which
generates the synthetic dataset and trains the fast-cpu recipe on it) and ``detrkit train --data <the demo's
dataset>`` with nothing else (the recipe chosen for the device, sized from the dataset), each in its own process
and timed from outside (Python's start-up included). Reports AP50 / AP on the 200 held-out images, the wall time
of each and the ratios train / demo.

    python benchmarks/default_train.py                    # about 2 x 9 minutes on 2 CPU cores

Writes benchmarks/results/default_train.json.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return round(time.perf_counter() - t0, 1)


def main(work_dir: str = "runs/default_train", out: str = "benchmarks/results/default_train.json") -> dict:
    work = Path(work_dir)
    shutil.rmtree(work, ignore_errors=True)
    detrkit = [sys.executable, "-m", "detrkit.cli"]
    rows = {}
    commands = {"detrkit demo": ["demo", "--output", str(work / "demo")],
                "detrkit train --data DIR": ["train", "--data", str(work / "demo" / "data"), "--output_dir",
                                             str(work / "train"), "--progress", "false"]}
    runs = {"detrkit demo": work / "demo" / "run", "detrkit train --data DIR": work / "train"}
    for name, args in commands.items():  # the demo first: it writes the dataset the second command trains on
        wall = timed(detrkit + args)
        metrics = json.loads((runs[name] / "metrics.json").read_text())
        rows[name] = {"command": "detrkit " + " ".join(args), "AP50": metrics["AP50"], "AP": metrics["AP"],
                      "wall_s": wall, "train_s": metrics.get("train_time_s"),
                      "config": (runs[name] / "config.yaml").read_text()}
    a, b = rows["detrkit train --data DIR"], rows["detrkit demo"]
    ratios = {"AP50": a["AP50"] / max(b["AP50"], 1e-9), "AP": a["AP"] / max(b["AP"], 1e-9),
              "wall_s": a["wall_s"] / b["wall_s"]}
    result = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "command": "python benchmarks/default_train.py", "rows": rows, "train_over_demo": ratios}
    print(f"{'command':28s} {'AP50':>6s} {'AP':>6s} {'wall':>7s}")
    for name, r in rows.items():
        print(f"{name:28s} {100 * r['AP50']:6.2f} {100 * r['AP']:6.2f} {r['wall_s']:6.0f} s")
    print(f"train / demo: AP50 {ratios['AP50']:.3f}  AP {ratios['AP']:.3f}  time {ratios['wall_s']:.3f}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
