"""Each image's random draws from (seed, epoch, its index in the data set) alone.

torchvision's transforms draw from the process's default CPU generator (they take no generator
argument). In a DataLoader worker that stream depends on which images the worker made before:
--workers, an epoch resumed at a step and workers kept across epochs all change it, and it is not
saved. Seeding the generator per image (`seeded_draws`) makes an image's augmentation the same
whoever makes it, so a resumed run draws what the uninterrupted one drew. Cost: 5 to 15 us an
image (a busy 2-core machine), against about 4 ms for lincls's crop and flip of a 500 x 375 image to
224 px, decoding not counted.

`KeyedImages` uses it, asked for by (epoch, index) keys: the DataLoader workers of the pretraining
torch loader (loaders/torch_loader.py, keys from `EpochShardKeys`) and of lincls and finetune's
training data (keys from `EpochKeys`) persist across epochs and hold a copy of the dataset made
once, so the epoch travels with each index.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import RandomSampler, Sampler

from moco_fast.image_dataset import ImageDataset


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's draws at one epoch: distinct for index < 1e9 and epoch < 1e6 (as
    base.stream_seed mixes a rank, whose place is too small for an image index)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**64


@contextmanager
def seeded_draws(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Inside: torch's default CPU generator seeded with image_seed(seed, epoch, index). Its state is
    put back after: without workers this is the training process, whose stream a checkpoint holds."""
    g = torch.default_generator  # the CPU's only: CUDA's streams are the trainer's
    state = g.get_state()
    g.manual_seed(image_seed(seed, epoch, index))
    try:
        yield
    finally:
        g.set_state(state)


class KeyedImages:
    """An ImageDataset asked for by (epoch, index) keys (EpochKeys): item (e, i) is dataset[i] drawn
    from seeded_draws(seed, e, i). A replaced unreadable image (ImageDataset) draws from the seed of
    the index asked for."""

    def __init__(self, dataset: ImageDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        with seeded_draws(self.seed, epoch, i):
            return self.dataset[i]


class EpochKeys(Sampler[tuple[int, int]]):
    """A shuffled order of n images as (epoch, index) keys for KeyedImages. The order is a
    RandomSampler's, one permutation an epoch from `generator` (the one a classifier's state saves);
    `set_epoch` before each epoch. The sampler runs in the main process, also with persistent workers,
    so the epoch set here reaches every key."""

    def __init__(self, n: int, generator: torch.Generator):
        self.order = RandomSampler(range(n), generator=generator)
        self.generator = generator
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch  # fixed when the epoch's iteration starts
        return ((epoch, i) for i in self.order)
