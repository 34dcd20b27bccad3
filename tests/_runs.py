"""Test helpers: training runs in a subprocess (so that they can be killed), and their logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY


def train_argv(data: Path, out: Path, **overrides) -> list[str]:
    """``detrkit train`` arguments of a tiny deformable run with a checkpoint and a log line every step."""
    opts = dict(recipe="none", model="deformable_detr_lite", model_args=json.dumps(TINY), image_size=96,
                batch_size=2, epochs=2,
                num_workers=0, progress="false", checkpoint_every=1, log_every=1, keep_checkpoints=2, lr=1e-3,
                lr_backbone=1e-3, max_train_images=8, max_val_images=2, device="cpu")
    opts.update(overrides)
    argv = ["train", "--data", str(data), "--output_dir", str(out)]
    for k, v in opts.items():
        argv += [f"--{k}", str(v)]
    return argv


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


def run(argv: list[str], script: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, script] if script else [sys.executable, "-m", "detrkit.cli"]
    return subprocess.run(cmd + argv, env=env(), capture_output=True, text=True, timeout=timeout)


def run_and_kill(argv: list[str], after_steps: int, delay: float = 0.0, timeout: float = 300) -> int:
    """Start a run, SIGKILL it ``delay`` seconds after its ``after_steps``-th logged step; returns the last step
    logged before the kill."""
    proc = subprocess.Popen([sys.executable, "-m", "detrkit.cli", *argv], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = Path(argv[argv.index("--output_dir") + 1]) / "steps.jsonl"
    deadline = time.monotonic() + timeout
    try:
        while len(steps(log)) < after_steps:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before step {after_steps}")
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the run")
            time.sleep(0.02)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return len(steps(log))


def steps(log: Path) -> list[dict]:
    """The complete lines of a JSONL log (a kill can leave half a line)."""
    if not log.is_file():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]
