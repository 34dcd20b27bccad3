"""Run by tests/test_distributed.py, alone or under torchrun: train, then save this process's parameters."""

import json
import sys

import torch

from detrkit.config import TrainConfig
from detrkit.engine.train import Trainer

if __name__ == "__main__":
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    trainer = Trainer(cfg)
    rank = trainer.dist.rank
    trainer.fit()
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, f"{cfg.output_dir}/rank{rank}.pt")
