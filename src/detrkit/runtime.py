"""Where and in which precision to run: shared by training (engine/) and inference, which must not import it."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when CUDA is available, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None = full precision)."""
    if amp == "none" or device.type != "cuda":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
