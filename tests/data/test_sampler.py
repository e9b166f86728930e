"""The training order is a function of (seed, epoch) alone, whatever the global RNG does."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from piggyback.data.base import TaskDataModule
from piggyback.data.sampler import EpochSeededSampler


def _order(sampler: EpochSeededSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    torch.manual_seed(torch.randint(1 << 30, ()).item())  # whatever the global RNG holds
    return list(sampler)


def test_order_depends_on_seed_and_epoch_only():
    data = list(range(50))
    a, b = EpochSeededSampler(data, seed=7), EpochSeededSampler(data, seed=7)
    assert _order(a, 0) == _order(b, 0)
    assert _order(a, 3) == _order(b, 3)
    assert _order(a, 1) == _order(a, 1)  # re-iterating an epoch repeats it
    assert _order(a, 0) != _order(a, 1)
    assert _order(a, 0) != _order(EpochSeededSampler(data, seed=8), 0)
    assert sorted(_order(a, 2)) == data


def test_train_loader_leaves_the_global_rng_alone():
    """Creating an epoch's iterator must not draw from the global RNG: Lightning creates it
    before on_train_epoch_start in a resumed run's first epoch and after it otherwise."""
    dm = TaskDataModule("t", num_classes=2, batch_size=4, shuffle_seed=3)
    dm.train_set = TensorDataset(torch.arange(10.0))
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSeededSampler)
    before = torch.get_rng_state()
    batches = [b[0].tolist() for b in loader]
    assert torch.equal(torch.get_rng_state(), before)
    assert sorted(x for b in batches for x in b) == list(map(float, range(10)))
    assert [b[0].tolist() for b in dm.train_dataloader()] == batches


def test_default_shuffle_seed_is_the_run_seed():
    torch.manual_seed(1234)
    assert TaskDataModule("t", num_classes=2).shuffle_seed == 1234


def test_skip_drops_the_start_of_one_epoch_once():
    data = list(range(20))
    plain = EpochSeededSampler(data, seed=5)
    full = _order(plain, 2)
    resumed = EpochSeededSampler(data, seed=5, skip=(2, 8))
    resumed.set_epoch(2)
    assert len(resumed) == 20  # Lightning sizes later epochs from it
    assert list(resumed) == full[8:]  # the samples the interrupted epoch had left
    resumed.set_epoch(2)
    assert len(resumed) == 20 and list(resumed) == full  # once only
    assert _order(resumed, 3) == _order(plain, 3)


def test_resume_at_reaches_the_next_train_loader_only():
    dm = TaskDataModule("t", num_classes=2, batch_size=4, shuffle_seed=3)
    dm.train_set = TensorDataset(torch.arange(10.0))
    full = [b[0].tolist() for b in dm.train_dataloader()]
    dm.resume_at(epoch=0, batches_done=2)
    assert [b[0].tolist() for b in dm.train_dataloader()] == full[2:]
    assert [b[0].tolist() for b in dm.train_dataloader()] == full
