"""detrkit's weight files: safetensors with the model's description in the metadata, and where a run keeps them.

A detrkit checkpoint is ``model.safetensors`` whose ``metadata["detrkit"]`` is the json of {model, num_classes,
model_args, class_names, label_to_cat, image_size}: enough to rebuild the model and name its predictions. A
checkpoint folder holds it (and, for training, ``state.pt`` beside it: see :mod:`detrkit.engine.checkpoint`);
a training run keeps ``checkpoints/step_<n>/`` and ``checkpoints/best/``. This module reads and writes the
weights and finds them in those folders; it knows nothing of training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME, STATE_NAME = "model.safetensors", "state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def safetensors_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as safetensors stores it: contiguous CPU tensors, none sharing memory."""
    weights, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().contiguous().cpu()
        if v.data_ptr() in seen:  # heads shared across decoder layers: safetensors stores each tensor once
            v = v.clone()
        seen.add(v.data_ptr())
        weights[k] = v
    return weights


def write_weights(file: str | Path, model: nn.Module, meta: dict) -> None:
    """Write ``model``'s weights and ``meta`` to ``file`` (not atomic: see :func:`save_weights`)."""
    save_file(safetensors_state(model), str(file), metadata={"detrkit": json.dumps(meta)})


def save_weights(file: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write ``model``'s weights and ``meta`` to one ``.safetensors`` file, atomically (temporary file + rename)."""
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    write_weights(tmp, model, meta)
    tmp.replace(file)
    return file


_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete ``checkpoints/step_<n>`` folders of a run, oldest first (half-written ones end in .tmp)."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*") if (m := _STEP_DIR.match(p.name))
             and (p / WEIGHTS_NAME).is_file() and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


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
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = (f.metadata() or {}).get("detrkit")
    except Exception as e:  # safetensors raises its own error types for files that are not safetensors
        raise CheckpointError(f"cannot read {file} as a detrkit checkpoint (safetensors): {e}") from None
    if meta is None:
        raise CheckpointError(f"{file} has no detrkit metadata; load it with create_model(NAME, weights=...) instead.")
    return json.loads(meta)
