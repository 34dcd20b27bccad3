"""Training-state checkpoints: the weights file (:mod:`detrkit.weights.files`) and the training state beside it.

A checkpoint is a folder::

    model.safetensors   weights; metadata["detrkit"] = json of {model, num_classes, model_args, class_names,
                        label_to_cat, image_size}: enough to rebuild the model and name its predictions
    state.pt            optimizer / scaler / EMA / epoch / batch / step / RNG state (tensors and plain data
                        only, so it loads with torch.load(weights_only=True))

The model file alone is enough for inference: ``Detector("model.safetensors")`` works.
Folders are written to a temporary name, flushed to disk and renamed, so a crash (or SIGKILL) at any moment
leaves either the previous checkpoint or the new one, never half of one. A training run keeps its last N
checkpoints as ``checkpoints/step_<step>/`` (the newest resumes) and the best by AP as ``checkpoints/best/``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from detrkit.weights.files import STATE_NAME, WEIGHTS_NAME, CheckpointError, step_checkpoints, write_weights


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, state: dict | None = None) -> Path:
    """Write ``path/`` atomically: model.safetensors (+ meta) and, when given, state.pt."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp / WEIGHTS_NAME, model, meta)
    if state is not None:
        torch.save(state, tmp / STATE_NAME)
    for f in tmp.iterdir():  # on disk before the rename makes the folder count (a power cut, not only a kill)
        _fsync(f)
    _fsync(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest resumable checkpoint of a training run folder."""
    found = step_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from (checkpoints/step_*/ with {WEIGHTS_NAME} "
                              f"and {STATE_NAME}); start the run without --resume.")
    return found[-1]


def save_step_checkpoint(run_dir: str | Path, step: int, model: nn.Module, meta: dict, state: dict,
                         keep: int) -> Path:
    """Write ``checkpoints/step_<step>/`` atomically, then delete all but the newest ``keep`` of them."""
    path = save_checkpoint(Path(run_dir) / "checkpoints" / f"step_{step:08d}", model, meta, state)
    for old in step_checkpoints(run_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_state(path: str | Path) -> dict:
    """The training state of a checkpoint folder (never unpickles arbitrary objects)."""
    file = Path(path) / STATE_NAME
    if not file.is_file():
        raise CheckpointError(f"{Path(path)} has no {STATE_NAME}; it holds weights only and cannot resume training.")
    return torch.load(file, map_location="cpu", weights_only=True)


def truncate_log(file: Path, key: str, upto: int) -> None:
    """Keep the records of ``file`` up to ``upto`` (what a resumed run will write again comes after)."""
    if not file.is_file():
        return
    keep = [line for line in file.read_text().splitlines() if line.strip() and json.loads(line).get(key, 0) <= upto]
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(file)
