"""`set_epoch(epoch, start_step)`: an epoch resumed at step s yields the batches s.. of the full epoch
(indices and labels; the views too where the loader's draws are positional), for the torch,
resident and synthetic backends. FFCV's and DALI's are in their own test files (their fixtures)."""

import pytest
import torch
from moco_fast.loaders import LoaderArgs, create_loader

from moco_fast.augment import MOCO_CIFAR

CPU = torch.device("cpu")


def loader(name, root, world=1, rank=0, batch=4):
    args = LoaderArgs(
        None if name == "synthetic" else str(root),
        MOCO_CIFAR,
        batch_size=batch,
        device=CPU,
        workers=0,
        seed=5,
        rank=rank,
        world_size=world,
        synthetic_steps=6,
    )
    return create_loader(name, args)


def epoch(ld, e, start=0):
    ld.set_epoch(e, start)
    return list(ld)


@pytest.mark.parametrize("name", ["torch", "resident", "synthetic"])
@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_an_epoch_started_at_a_step_yields_the_rest_of_that_epoch(tiny_root, name, world, rank):
    ld = loader(name, tiny_root, world, rank)
    full = epoch(ld, 1)
    assert len(full) == len(ld) >= 3
    rest = epoch(ld, 1, start=2)
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.label, b.label)
    if name in ("resident", "synthetic"):  # positional draws: the same views as well
        for a, b in zip(full[2:], rest, strict=True):
            assert torch.equal(a.im_q, b.im_q) and torch.equal(a.im_k, b.im_k)
    # the next epoch starts at its first step again
    assert [b.index.tolist() for b in epoch(ld, 2)] == [
        b.index.tolist() for b in epoch(loader(name, tiny_root, world, rank), 2)
    ]


def test_a_start_step_outside_the_epoch_is_refused(tiny_root):
    ld = loader("synthetic", tiny_root)
    with pytest.raises(ValueError, match="start_step 6"):
        ld.set_epoch(0, 6)
