"""lincls and finetune's training batches: each image's crop and flip from (seed, epoch, index) alone."""

from __future__ import annotations

import shutil
import warnings

import torch

from moco_fast.data import list_images
from moco_fast.lincls import image_batches


def run_epochs(images, workers: int, epochs: range, order_state: torch.Tensor | None = None):
    """(each epoch's (x, y) batches, the order generator's state after each) from one loader, its
    workers kept across the epochs; `order_state`: the generator's state to start from (a resume)."""
    loader = image_batches(images, 16, True, batch_size=4, workers=workers, seed=3)
    if order_state is not None:
        loader.sampler.generator.set_state(order_state)
    batches, states = [], []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        batches.append(list(loader))
        states.append(loader.sampler.generator.get_state())
    return batches, states


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_training_batches_are_the_same_with_any_workers_and_when_resumed(fresh_root):
    cls = sorted((fresh_root / "train").iterdir())[0]
    bad = cls / "000_bad.jpg"  # replaced by the next image, drawn from the seed of its own index
    shutil.copy(sorted(cls.iterdir())[0], bad)
    good = bad.read_bytes()
    bad.write_bytes(good[: int(len(good) * 0.9)])  # cut short: its header passes the check, the decode fails
    images = list_images(fresh_root / "train", check=True)
    k = images.files.index(str(bad))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "skipping unreadable image" (tested in test_data.py)
        before = torch.get_rng_state()
        inline, states = run_epochs(images, 0, range(2))
        assert torch.equal(torch.get_rng_state(), before)  # the process's stream is left as it was
        workers, _ = run_epochs(images, 2, range(2))
        assert all(same(a, b) for a, b in zip(inline, workers, strict=True))
        # resumed after epoch 1: new workers, the order generator as saved then, the epoch count on
        resumed, _ = run_epochs(images, 2, range(1, 2), order_state=states[0])
        assert same(resumed[0], inline[1])
        # the epoch is part of each image's seed: epoch 1 crops anew (here the image after the bad one)
        dataset = image_batches(images, 16, True, batch_size=4, workers=0, seed=3).dataset
        a, b = dataset[(0, k)], dataset[(1, k)]
    assert a[2] == b[2] == k + 1 and not torch.equal(a[0], b[0])
