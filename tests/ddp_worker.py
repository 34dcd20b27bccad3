"""Run by tests/test_distributed.py, alone or under torchrun: train, then save this process's parameters."""

import json
import sys

import torch

from detrkit.engine.config import TrainConfig
from detrkit.engine.train import Trainer


def nan_on(trainer: Trainer, call: int) -> None:
    """Fault injection: this process's criterion returns a NaN loss on its ``call``-th call."""
    original, calls = trainer.criterion, [0]

    def criterion(outputs, targets):
        calls[0] += 1
        losses = original(outputs, targets)
        if calls[0] == call:
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses

    trainer.criterion = criterion


if __name__ == "__main__":
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    fault = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    trainer = Trainer(cfg)
    rank = trainer.dist.rank
    if fault.get("nan_rank") == rank:
        nan_on(trainer, fault["nan_call"])
    trainer.fit()
    torch.save(
        {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, f"{cfg.output_dir}/rank{rank}.pt"
    )
