"""Training order that depends on the seed and the epoch only, so a resumed run sees the
same batches as the run it continues.

Why not the stock ``shuffle=True``: ``RandomSampler`` then draws its order from the global RNG
when an epoch's iterator is created, and Lightning creates the first iterator of every
``fit()`` before ``on_train_epoch_start`` but later ones after it. A run resumed from
``last.ckpt`` therefore drew its order from a different RNG state than the uninterrupted run,
even with the RNG state restored (issue 11, case 7). Seeding per epoch is what
``DistributedSampler`` does; Lightning calls ``set_epoch`` on a loader's sampler before each
epoch, and under DDP it replaces this sampler with a ``DistributedSampler`` seeded the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from itertools import islice

import torch
from torch.utils.data import RandomSampler


class EpochSeededSampler(RandomSampler):
    """``RandomSampler`` whose permutation for epoch ``e`` is drawn from ``seed + e``.

    ``skip`` = ``(epoch, n)`` drops the first ``n`` indices of that epoch's permutation, once:
    a run resumed from a mid-epoch checkpoint then sees exactly the samples the interrupted
    epoch had left. The length stays the full epoch's, because Lightning sizes every later
    epoch from it; it counts the batches already done and the shorter iteration ends the
    epoch at the same batch.
    """

    def __init__(self, data_source: Sized, seed: int, skip: tuple[int, int] | None = None) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = int(seed)
        self.skip = skip
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.generator.manual_seed(self.seed + self.epoch)

    def __iter__(self) -> Iterator[int]:
        order = super().__iter__()
        if self.skip is not None and self.skip[0] == self.epoch:
            order, self.skip = islice(order, self.skip[1], None), None
        yield from order


def loader_generator(seed: int) -> torch.Generator:
    """A private generator for a DataLoader's worker base seed, so creating an iterator never
    advances the global RNG that random augmentations in the main process draw from."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator
