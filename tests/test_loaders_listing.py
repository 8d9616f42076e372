"""The folder loaders (torch, DALI in its CPU mode, resident) on a listing their caller made
(LoaderArgs.splits): they read it instead of listing --data again, and refuse one made with other
options than theirs. The bench's use of it (one listing for all its rows): test_bench.py."""

import pytest
import torch
from moco_fast.loaders import LoaderArgs, create_loader

import moco_fast.data
from moco_fast.augment import MOCO_CIFAR
from moco_fast.data import load_splits

FOLDER_LOADERS = ["torch", "resident", "dali"]


def args(root, **kw) -> LoaderArgs:
    return LoaderArgs(str(root), MOCO_CIFAR, batch_size=8, device=torch.device("cpu"), workers=0, **kw)


def no_listing(*a, **k):
    raise AssertionError("the loader listed the folder again")


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
def test_a_folder_loader_given_a_listing_reads_it_not_the_folder(tiny_root, loader, monkeypatch):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    listed = load_splits(str(tiny_root))
    # the first class's 16 images of the folder's 32: what the loader reads tells which it took
    listed.train = listed.train.keeping(list(range(16)), [])
    monkeypatch.setattr(moco_fast.data, "list_images", no_listing)
    made = create_loader(loader, args(tiny_root, splits=listed))
    assert made.splits is listed and made.num_images == 16 and len(made) == 2
    if loader != "dali":  # DALI's batches: test_dali.py; building its pipeline here would cost seconds
        assert {i for b in made for i in b.index.tolist()} == set(range(16))


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
@pytest.mark.parametrize(
    "listing, loader_lists",
    [
        ({"check": False}, {"check_images": True}),  # unchecked where the loader header-checks
        ({"eval_split": "skip"}, {"eval_split": "list"}),  # without the eval split it would list
        ({"eval_split": "try"}, {"eval_split": "list"}),  # an eval split it would have refused
    ],
)
def test_a_listing_made_with_other_options_is_refused(tiny_root, loader, listing, loader_lists):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    listed = load_splits(str(tiny_root), **listing)
    with pytest.raises(ValueError, match=r"LoaderArgs\.splits was listed with"):
        create_loader(loader, args(tiny_root, splits=listed, **loader_lists))


@pytest.mark.parametrize("loader_lists", ["try", "skip"])
def test_a_listing_of_the_whole_eval_split_serves_a_loader_that_tries_or_skips_it(tiny_root, loader_lists):
    # what a sweep hands each setting's training: the listing its kNN reads
    listed = load_splits(str(tiny_root), eval_split="list")
    assert create_loader("torch", args(tiny_root, splits=listed, eval_split=loader_lists)).splits is listed
