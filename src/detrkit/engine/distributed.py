"""torch.distributed through ``torchrun``: process-group set-up and the few collectives training needs.

``torchrun --nproc_per_node 8 -m detrkit.cli train ...`` (or ``torchrun ... $(which detrkit) train ...``) sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; :func:`init_distributed` reads them, picks NCCL
on GPUs and gloo on CPU, and every helper here is a no-op in a single process, so the training loop has one
code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (nothing to do for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank)


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over all processes (``values`` itself in one process)."""
    if not is_enabled():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def any_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every process if ``flag`` is True on any (so that all processes take the same branch)."""
    if not is_enabled():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects; ``[obj]`` in one process)."""
    if not is_enabled():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process."""
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
