"""Data order that a killed run can reproduce exactly, on one process or many.

Two things make a sample's content depend on more than its index: the epoch's shuffle and the random
augmentation. :class:`EpochSampler` draws each epoch's order from ``(seed, epoch)`` alone (as
``DistributedSampler`` does), gives every process its own shard, and can start mid-epoch; it yields
``(epoch, index)`` keys. :class:`SeededSamples` seeds torch's generator from ``(seed, epoch, index)``
around each sample, so its augmentation is the same whatever worker loads it and whatever came before.
Together: resuming at batch k of epoch e sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler, Subset


class EpochSampler(Sampler):
    """Yields ``(epoch, index)``: the epoch's permutation (or 0..n-1), padded to a multiple of ``world_size``
    by repeating its start, then every ``world_size``-th element from ``rank`` on, skipping ``start``."""

    def __init__(self, size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch``, skipping the first ``start`` samples of this process's shard."""
        self.epoch, self.start = epoch, start

    def _shard(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        padded = -(-self.size // self.world_size) * self.world_size
        order += order[: padded - self.size]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self._shard()[self.start:]])

    def __len__(self) -> int:
        return max(0, -(-self.size // self.world_size) - self.start)


class SeededSamples(Dataset):
    """``dataset[index]`` for a key ``(epoch, index)``, with torch's generator seeded from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63)
            dataset = self.dataset
            if isinstance(dataset, Subset):  # --max_train_images
                dataset, index = dataset.dataset, dataset.indices[index]
            if hasattr(dataset, "sample"):  # samples that depend on the epoch (a mosaic schedule)
                return dataset.sample(index, epoch)
            return dataset[index]
