"""`set_epoch(epoch, start_step)`: an epoch resumed at step s yields the batches s.. of the full epoch
(indices and labels, and the views), for the torch, resident and synthetic backends; the torch
loader's views are the same with any number of DataLoader workers. FFCV's and DALI's are in their own test files (their fixtures)."""

import multiprocessing
import warnings

import pytest
import torch
from conftest import make_image_root
from moco_fast.loaders import LoaderArgs, create_loader, torch_loader

from moco_fast.augment import MOCO_CIFAR

CPU = torch.device("cpu")


def loader(name, root, world=1, rank=0, batch=4, workers=0, epochs=None):
    args = LoaderArgs(
        None if name == "synthetic" else str(root),
        MOCO_CIFAR,
        batch_size=batch,
        device=CPU,
        workers=workers,
        seed=5,
        rank=rank,
        world_size=world,
        synthetic_steps=6,
        epochs=epochs,
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
    for a, b in zip(full[2:], rest, strict=True):  # the same views as well
        assert torch.equal(a.im_q, b.im_q) and torch.equal(a.im_k, b.im_k)
    # the next epoch starts at its first step again
    assert [b.index.tolist() for b in epoch(ld, 2)] == [
        b.index.tolist() for b in epoch(loader(name, tiny_root, world, rank), 2)
    ]


def same_batches(a, b):
    return all(
        torch.equal(x.index, y.index) and torch.equal(x.im_q, y.im_q) and torch.equal(x.im_k, y.im_k)
        for x, y in zip(a, b, strict=True)
    )


def test_the_torch_loaders_views_are_the_same_with_any_workers_and_from_any_step(tiny_root, monkeypatch):
    # each image's draws come from (seed, epoch, image): not from which worker made it, nor from
    # the images that worker made before (which a start step and --workers change)
    full = epoch(loader("torch", tiny_root), 1)
    with_workers = loader("torch", tiny_root, workers=2)
    assert same_batches(full, epoch(with_workers, 1))
    assert same_batches(full[2:], epoch(with_workers, 1, start=2))
    # each worker makes a part of every batch, joined in order: 2 workers, a batch of 5 in parts of 2 and 3
    monkeypatch.setattr(torch_loader, "MIN_PART", 1)
    fives = [loader("torch", tiny_root, batch=5, workers=w) for w in (0, 2)]
    assert same_batches(*(epoch(ld, 1, start=1) for ld in fives))
    assert not torch.equal(full[0].im_q, full[0].im_k)  # two draws, not one view twice
    # another epoch draws other views of an image
    other = {int(i): q for b in epoch(with_workers, 2) for i, q in zip(b.index, b.im_q, strict=True)}
    assert not any(torch.equal(other[int(i)], q) for i, q in zip(full[0].index, full[0].im_q, strict=True))


def test_an_unreadable_images_stand_in_draws_from_the_seed_of_the_index_asked_for(tmp_path):
    # ImageDataset replaces a file that fails to decode by the next good one: its views come from the
    # bad image's seed (not the stand-in's, which the epoch draws too), with any workers
    root = make_image_root(tmp_path / "data", per_class=8, classes=2, test_per_class=2)
    bad = sorted((root / "train").rglob("*.jpg"))[3]
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * 0.8)])  # passes the listing's check, fails to decode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = epoch(loader("torch", root), 0)
        assert same_batches(full, epoch(loader("torch", root, workers=2), 0))
    views = [(int(i), q) for b in full for i, q in zip(b.index, b.im_q, strict=True)]
    stand_in = [q for i, q in views if i == 4]  # the next good image, once for itself, once for image 3
    assert 3 not in [i for i, _ in views] and len(stand_in) == 2
    assert not torch.equal(stand_in[0], stand_in[1])


def test_the_torch_loader_without_workers_leaves_the_trainers_random_stream_alone(tiny_root):
    # the main process's generator is the trainer's (its state is in the checkpoint): the per-image
    # seeding puts it back
    ld = loader("torch", tiny_root)
    before = torch.get_rng_state()
    epoch(ld, 0)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_start_step_outside_the_epoch_is_refused(tiny_root):
    ld = loader("synthetic", tiny_root)
    with pytest.raises(ValueError, match="start_step 6"):
        ld.set_epoch(0, 6)


def test_the_torch_loaders_workers_are_started_once_per_run_and_an_epoch_left_early_is_dropped(tiny_root):
    # Starting the workers each epoch cost every epoch's first batch their start (0.3-0.4 s with 2
    # workers on a 2-core CPU): they persist. An epoch left before its end (a test's partial read)
    # leaves batches made ahead in them, which the next epoch must not yield.
    before = {p.pid for p in multiprocessing.active_children()}
    ld = loader("torch", tiny_root, workers=2)
    workers = []
    for e in range(3):
        ld.set_epoch(e)
        batches = iter(ld)
        next(batches)
        workers.append({p.pid for p in multiprocessing.active_children()} - before)
        if e < 2:
            list(batches)
    assert len(workers[0]) == 2 and workers[0] == workers[1] == workers[2]
    fresh = loader("torch", tiny_root)
    assert same_batches(epoch(fresh, 3, start=1), epoch(ld, 3, start=1))


def parts_asked_for(monkeypatch) -> list[int]:
    """The epoch of each batch part the torch loader's DataLoader takes from its sampler (to give its
    workers), in order, from here on."""
    asked = []
    cut = torch_loader.BatchParts._cut

    def logged(self, keys):
        for part in cut(self, keys):
            asked.append(part[0][0])
            yield part

    monkeypatch.setattr(torch_loader.BatchParts, "_cut", logged)
    return asked


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_the_torch_loaders_workers_start_the_next_epoch_before_the_epoch_ends(tiny_root, monkeypatch, world, rank):
    # each epoch's first batch waited for its parts, the workers idle while the last epoch's last
    # batches were taken: they start the next epoch's parts then, and none for an epoch that never runs
    asked = parts_asked_for(monkeypatch)
    ld = loader("torch", tiny_root, world, rank, workers=2, epochs=3)
    try:
        for e in range(3):
            ld.set_epoch(e)
            batches = iter(ld)
            for _ in range(len(ld)):
                next(batches)
            ahead = asked.count(e + 1)  # before the epoch's iteration ends
            assert ahead > 0 if e < 2 else ahead == 0
            assert next(batches, None) is None
        assert set(asked) == {0, 1, 2}
        # the next epoch takes on the parts made ahead: a new iterator there had the workers finish
        # them, dropped them and asked for the epoch's every part again, its first batch waiting as before
        assert [asked.count(e) for e in range(3)] == [len(ld.batch_parts)] * 3, asked
    finally:
        ld.close()


def test_the_torch_loaders_look_ahead_keeps_the_views_and_a_resumed_step(tiny_root):
    # the same views, epoch after epoch, as a loader that starts each epoch anew (with no workers);
    # an epoch set at a step (a resumed run), or after one left early, is not the one made ahead, nor
    # is one other than the next after an epoch read to its end (the same again, one further on)
    ahead = loader("torch", tiny_root, workers=2, epochs=7)
    anew = loader("torch", tiny_root)
    try:
        for e in range(2):
            assert same_batches(epoch(ahead, e), epoch(anew, e))
        assert same_batches(epoch(ahead, 2, start=1), epoch(anew, 2, start=1))
        ahead.set_epoch(3)
        next(iter(ahead))  # left after its first batch
        assert same_batches(epoch(ahead, 4), epoch(anew, 4))
        assert same_batches(epoch(ahead, 4), epoch(anew, 4))
        assert same_batches(epoch(ahead, 6), epoch(anew, 6))
    finally:
        ahead.close()
