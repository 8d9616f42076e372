"""Each image's random draws from (seed, epoch, its index in the data set) alone.

torchvision's transforms draw from the process's default CPU generator (they take no generator
argument). In a DataLoader worker that stream depends on which images the worker made before:
--workers and an epoch resumed at a step change it, and it is not saved. Seeding the generator per
image (`seeded_draws`) makes an image's augmentation the same whoever makes it, so a resumed run
draws what the uninterrupted one drew. Cost: a few us an image, against milliseconds of decoding
and augmenting. The pretraining torch loader's `SeededViews` (loaders/torch_loader.py) uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
