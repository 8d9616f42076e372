"""What the FFCV test files share (not a test module: pytest does not collect it): the loader
arguments of their tests and what a .beton or an epoch holds."""

import torch
from moco_fast.loaders import LoaderArgs

from moco_fast.augment import MOCO_CIFAR

BATCH = 8


def beton_labels(path) -> list[int]:
    from ffcv.reader import Reader

    return Reader(str(path)).metadata["f1"].tolist()


def loader_args(beton, **kw) -> LoaderArgs:
    base = dict(
        data=None if beton is None else str(beton),
        aug=MOCO_CIFAR,
        batch_size=BATCH,
        device=torch.device("cpu"),
        workers=1,
        seed=3,
    )
    return LoaderArgs(**{**base, **kw})


def epoch_indices(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [i for b in loader for i in b.index.tolist()]
