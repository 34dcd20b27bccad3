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


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX): there oneDNN's bf16 convolutions are faster
    than fp32 ones; elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes
        return False


def amp_dtype(amp: str, device: torch.device, *, training: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None = full precision). ``auto``: on CUDA bf16 where supported,
    else fp16; on a CPU, for training only, bf16 where the CPU computes it natively (:func:`cpu_has_bf16`: 0.78x
    the demo's step on an AVX512-BF16 EPYC at the same AP, ``benchmarks/cpu_bf16.py``), else full precision.
    Inference on a CPU stays in fp32 unless asked (its outputs match the exported models'). fp16 is CUDA's alone."""
    if amp == "none" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cpu":
        if amp == "auto":
            return torch.bfloat16 if training and cpu_has_bf16() else None
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
