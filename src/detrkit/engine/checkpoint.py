"""Checkpoints: weights in safetensors (with the model's description in its metadata), training state beside.

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
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME, STATE_NAME = "model.safetensors", "state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def _state_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    weights, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().contiguous().cpu()
        if v.data_ptr() in seen:  # heads shared across decoder layers: safetensors stores each tensor once
            v = v.clone()
        seen.add(v.data_ptr())
        weights[k] = v
    return weights


def save_weights(file: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write ``model``'s weights and ``meta`` to one ``.safetensors`` file, atomically (temporary file + rename)."""
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    save_file(_state_for_safetensors(model), str(tmp), metadata={"detrkit": json.dumps(meta)})
    tmp.replace(file)
    return file


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, state: dict | None = None) -> Path:
    """Write ``path/`` atomically: model.safetensors (+ meta) and, when given, state.pt."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state_for_safetensors(model), str(tmp / WEIGHTS_NAME), metadata={"detrkit": json.dumps(meta)})
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


_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete ``checkpoints/step_<n>`` folders of a run, oldest first (half-written ones end in .tmp)."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*") if (m := _STEP_DIR.match(p.name))
             and (p / WEIGHTS_NAME).is_file() and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


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


def resolve_weights_file(path: str | Path) -> Path:
    """A safetensors file from: the file itself, a checkpoint folder, or a run folder (best, else last)."""
    path = Path(path)
    candidates = [path, path / WEIGHTS_NAME, path / "checkpoints" / "best" / WEIGHTS_NAME,
                  *(p / WEIGHTS_NAME for p in reversed(step_checkpoints(path)))]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(f"no detrkit checkpoint at {path}: expected a .safetensors file, a checkpoint folder with "
                          f"{WEIGHTS_NAME}, or a training run folder (with checkpoints/best or checkpoints/step_*).")


def read_meta(path: str | Path) -> dict:
    """The model description stored in a checkpoint's safetensors metadata."""
    file = resolve_weights_file(path)
    with safe_open(str(file), framework="pt") as f:
        meta = (f.metadata() or {}).get("detrkit")
    if meta is None:
        raise CheckpointError(f"{file} has no detrkit metadata; load it with create_model(NAME, weights=...) instead.")
    return json.loads(meta)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a detrkit checkpoint into ``model`` strictly; mismatches are listed in a :class:`CheckpointError`."""
    from detrkit.convert.formats import load_converted, read_checkpoint

    load_converted(model, read_checkpoint(resolve_weights_file(path)))
    return model


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model a detrkit checkpoint describes and load its weights. Returns (model, meta)."""
    from detrkit.registry import create_model

    meta = read_meta(path)
    model = create_model(meta["model"], num_classes=meta["num_classes"], **meta.get("model_args", {}))
    load_weights(model, path)
    return model, meta


def load_state(path: str | Path) -> dict:
    """The training state of a checkpoint folder (never unpickles arbitrary objects)."""
    file = Path(path) / STATE_NAME
    if not file.is_file():
        raise CheckpointError(f"{Path(path)} has no {STATE_NAME}; it holds weights only and cannot resume training.")
    return torch.load(file, map_location="cpu", weights_only=True)
