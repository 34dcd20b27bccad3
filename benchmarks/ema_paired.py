"""What a moving average of the weights buys the default's short CPU runs, paired on one training trajectory.

One run of the default (``detrkit train --data DIR`` with the fast-cpu recipe) keeps several exponential moving
averages of its weights at once (``engine/ema.py``; decay and warm-up per column) next to the raw weights it trains,
and evaluates each of them after every epoch on the same validation images. The averages do not change the
training, so every column sees the same steps: the differences are the averages' alone, free of the run-to-run
spread (12-18 AP50 between runs of the same default on the tree crowns) that one-run-per-setting ablations suffer.

    python benchmarks/ema_paired.py --dataset trees --minutes 5        # the tree crowns (benchmarks/trees.py)
    python benchmarks/ema_paired.py --dataset tuning                   # the demo's tuning copy (seed 1), 3 epochs
    python benchmarks/ema_paired.py --dataset trees-tuning             # the crowns' tuning copy (benchmarks/trees.py)
    python benchmarks/ema_paired.py --settings '{mosaic: 0.5, mosaic_crop: true}'   # one setting changed

Prints the AP50 / AP of every column at every evaluation and writes benchmarks/results/ema_paired.json.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import torch
from trees import make_trees_dataset

from detrkit.data import make_synthetic_dataset
from detrkit.engine import train as T
from detrkit.engine.config import TrainConfig
from detrkit.engine.ema import ModelEMA
from detrkit.engine.evaluate import evaluate

# column: (decay, warm-up in steps); the decay ramps as decay * (1 - exp(-updates / warm-up)). The last is the
# trainer's default (RT-DETR's 0.9999 / 2000 made a little shorter), which barely averages in a run of ~1000 steps.
AVERAGES = {"EMA 0.99 / 50": (0.99, 50), "EMA 0.995 / 100": (0.995, 100), "EMA 0.998 / 200": (0.998, 200),
            "EMA 0.9997 / 2000": (0.9997, 2000)}


class PairedTrainer(T.Trainer):
    """The trainer, with the averages of ``AVERAGES`` updated after every optimizer step and every one of them
    (and the raw weights) evaluated at each evaluation; the raw weights' metrics drive the run as usual."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.averages = {name: ModelEMA(self.model, d, w) for name, (d, w) in AVERAGES.items()}
        self.table: list[dict] = []

    def _train_step(self, *args, **kwargs):
        values, stepped = super()._train_step(*args, **kwargs)
        if stepped:
            for ema in self.averages.values():
                ema.update(self.model)
        return values, stepped

    def _evaluate(self) -> dict:
        row = {"epoch": self.epoch + self.batch / self.batches_per_epoch, "step": self.step}
        raw = None
        for name, model in [("raw weights", self.model), *((n, e.module) for n, e in self.averages.items())]:
            m = evaluate(model, self.val_loader, self.val_set, self.device, progress=False)
            raw = raw or m
            row[name] = {"AP50": round(100 * m["AP50"], 1), "AP": round(100 * m["AP"], 1)}
        print(f"step {row['step']:5d}  " + "  ".join(f"{k} {v['AP50']:5.1f} / {v['AP']:4.1f}"
                                                     for k, v in row.items() if isinstance(v, dict)), flush=True)
        self.table.append(row)
        return raw


def main(dataset: str = "trees", minutes: float | None = None, settings: dict | None = None,
         work_dir: str = "runs/ema_paired", out: str = "benchmarks/results/ema_paired.json") -> dict:
    work = Path(work_dir)
    if dataset in ("trees", "trees-tuning"):  # the crowns, or their tuning copy (the training image split in two)
        data = work / dataset
        make_trees_dataset(data, tuning=dataset == "trees-tuning")
        over = {}
    elif dataset == "tuning":  # the demo's budget on its tuning copy (benchmarks/demo_recipe.py's data)
        data = work / "data-seed1-224"
        if not (data / "annotations" / "instances_val.json").is_file():
            make_synthetic_dataset(data, num_train=1000, num_val=200, image_size=224, seed=1)
        over = {"max_train_images": 800}
    else:
        raise ValueError(f"--dataset: trees, trees-tuning or tuning, not {dataset!r}")
    over |= settings or {}
    name = ", ".join(f"{k} {v}" for k, v in (settings or {}).items())
    run = work / (f"{dataset}-run" + (f"-{name}".replace(" ", "_").replace(",", "") if name else ""))
    shutil.rmtree(run, ignore_errors=True)
    # the default (the fast-cpu recipe, schedule sized from the data), evaluated after every epoch
    cfg = TrainConfig(data=str(data), output_dir=str(run), time_limit=minutes, eval_every=1, progress=False,
                      plots=False, tensorboard=False, **over)
    trainer = PairedTrainer(cfg)
    trainer.fit()
    key = dataset + (f", {name}" if name else "") + (f" @ {minutes:g} min" if minutes else "")
    results = json.loads(Path(out).read_text())["rows"] if Path(out).is_file() else {}
    results[key] = {"averages": AVERAGES, "evaluations": trainer.table, "config": (run / "config.yaml").read_text()}
    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "command": "python benchmarks/ema_paired.py"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({**meta, "rows": results}, indent=2))
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
