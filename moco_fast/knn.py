"""Weighted kNN monitor (Wu et al. 2018; the official MoCo CIFAR demo): k=200, t=0.1 on the
L2-normalised features of the network it is given: the pooled backbone's, or the whole query
encoder's (its head's output, which the demo votes on; monitor.knn_figures measures both). The
train split is the memory bank, val/test the queries."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from moco_fast.augment import AugSpec
from moco_fast.data import DataError, ImageList
from moco_fast.image_dataset import ImageDataset, Unreadable
from moco_fast.loaders.base import mean_std_255, normalize_on_device, pins
from moco_fast.loaders.torch_loader import eval_transform
from moco_fast.metrics import progress
from moco_fast.shared_memory import stack_shared, start_workers, tensor_shared, warn_if_short, worker_start

log = logging.getLogger("moco_fast")

# A feature pass of this many batches or fewer ends too soon to need a progress bar.
PROGRESS_MIN_BATCHES = 4


def warn_if_single_class(train: ImageList) -> None:
    """The one warning of every kNN entry point (train's monitor, `moco-fast knn`, the sweep) for a
    memory bank of one class."""
    if len(train.classes) == 1:
        log.warning(
            "%s holds a single class (%s): every neighbour votes for it, so kNN top-1 is 100%% whatever the features",
            train.root,
            train.classes[0],
        )


def warn_few_neighbours(k: int, bank_size: int, train: ImageList) -> None:
    """The warning of a kNN whose memory bank holds fewer images than k: all of them vote. Shown
    once per process for the same bank (train's monitor measures every few epochs)."""
    warnings.warn(
        f"kNN: k={k} is more than the {bank_size} images of {train.root}: all {bank_size} are the neighbours",
        stacklevel=2,
    )


def collate_labeled(items):
    """ImageDataset items (image, label, index) -> (N x 3 x H x W uint8, N labels), in shared memory
    in a DataLoader worker (shared_memory: a full /dev/shm is then an error, not a hang)."""
    x, y, _ = zip(*items, strict=True)
    return stack_shared(x), tensor_shared(y)


def warn_if_shm_short(workers: int, batch_size: int, image_size: int, desc: str) -> None:
    """shared_memory.warn_if_short for a DataLoader of collate_labeled batches (uint8 images, int64
    labels) at torch's default prefetch_factor, 2: kNN, lincls and finetune's loaders."""
    warn_if_short(workers, 2, batch_size * (3 * image_size**2 + 8), desc)


def collate_decodable(items):
    """ImageDataset(substitute=False) items -> (N x 3 x H x W uint8 or None, N labels or None, the
    Unreadable items): the images that failed to decode are left out of the batch."""
    bad = [x for x, _, _ in items if isinstance(x, Unreadable)]
    good = [it for it in items if not isinstance(it[0], Unreadable)]
    if not good:
        return None, None, bad
    return (*collate_labeled(good), bad)


def warn_left_out(bad: list[Unreadable], images: ImageList, desc: str) -> None:
    """One warning per evaluation pass (kNN features, lincls/finetune evaluation) naming the images
    it left out because they failed to decode; the same text for the same files is shown once per
    process under the default warning filter."""
    if bad:
        warnings.warn(
            f"{desc}: left out {len(bad)} of {len(images)} images in {images.root} that failed to decode:\n"
            + "\n".join(f"  {u.path}: {u.reason}" for u in bad),
            stacklevel=2,
        )


class EvalBatches:
    """The (x, y) host batches of an evaluation pass over `images`: the images that failed to decode
    are left out and named in one warning when the pass ends; a batch where none decoded is empty
    (0 x 3 x S x S), so that the counts stay right. A pass where none decoded is a DataError when it
    ends (lincls and finetune scored it top-1 0% of 0 images; kNN had no features)."""

    def __init__(self, loader: DataLoader, images: ImageList, image_size: int, desc: str):
        self.loader, self.images, self.image_size, self.desc = loader, images, image_size, desc

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bad = []
        for x, y, unreadable in start_workers(self.loader):  # each pass starts its workers anew
            bad += unreadable
            if x is None:
                s = self.image_size
                x, y = torch.empty(0, 3, s, s, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
            yield x, y
        warn_left_out(bad, self.images, self.desc)
        if len(bad) == len(self.images):
            raise DataError(f"none of the {len(self.images)} images in {self.images.root} could be decoded")


def eval_batches(
    images: ImageList, image_size: int, batch_size: int, workers: int, desc: str, pin: bool = False
) -> EvalBatches:
    """Center-cropped uint8 batches of every decodable image of `images`, each once, in order: the
    one evaluation pass of kNN, lincls and finetune (and lincls's cached train features). `pin`:
    in pinned memory (loaders.base.pins says where, and why), pinned by the DataLoader: in its
    pinning thread, or in the caller's with no workers."""
    ds = ImageDataset(images, eval_transform(image_size), substitute=False)
    warn_if_shm_short(workers, batch_size, image_size, desc)
    dl = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_decodable,
        multiprocessing_context=worker_start(workers),
        pin_memory=pin,
    )
    return EvalBatches(dl, images, image_size, desc)


@torch.no_grad()
def extract_features(
    net: nn.Module,
    images: ImageList,
    spec: AugSpec,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 2,
    desc: str = "kNN features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x D L2-normalised fp32 features, N labels), both on `device`. `net` maps images to N x D.
    A progress bar (`desc`) shows when the pass has more than PROGRESS_MIN_BATCHES batches.

    Images that fail to decode (a listing made with `check=False`, or a truncated JPEG that passes
    the header check) are left out, not replaced by another image, and named in one warning: the
    features cover exactly the decodable images, each once, whatever the listing's check flag.
    """
    was_training = net.training
    net.eval()
    batches = eval_batches(images, spec.image_size, batch_size, workers, desc, pin=pins(device))
    mean, std = mean_std_255(spec, device)
    feats, labels = [], []
    bar = progress(total=len(batches), desc=desc, enabled=len(batches) > PROGRESS_MIN_BATCHES)
    for x, y in batches:  # the warning naming what was left out comes when the pass ends
        if len(y):
            x = normalize_on_device(x, mean, std, torch.float32, torch.contiguous_format)
            feats.append(F.normalize(net(x).float(), dim=1))
            labels.append(y.to(device, non_blocking=True))  # a blocking copy waited for the batch's forward
        bar.update(1)
    bar.close()
    net.train(was_training)
    return torch.cat(feats), torch.cat(labels)  # not empty: the pass raised where nothing decoded


@torch.no_grad()
def knn_predict(
    query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int = 200, t: float = 0.1
) -> torch.Tensor:
    """Top-1 class for each query row. query: Q x D, bank: N x D (both normalised), labels: N. A bank
    of fewer than k rows votes with all of them."""
    k = min(k, bank.shape[0])
    preds = []
    for chunk in query.split(1024):
        sim = chunk @ bank.t()  # q x N cosine similarity
        sim_k, idx = sim.topk(k, dim=1)  # q x k
        weights = ((sim_k - sim_k[:, :1]) / t).exp()  # shifted by the row's largest: no overflow at small t
        one_hot = F.one_hot(bank_labels[idx], num_classes).float()  # q x k x classes
        scores = (one_hot * weights.unsqueeze(-1)).sum(dim=1)
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds)


class KnnScore(NamedTuple):
    """What one weighted kNN measured: top-1 (%), the k used, and the images it used: the decodable
    ones of the memory (train) and the queries (eval), which a listing made before decoding may
    overstate (a truncated JPEG passes the header check)."""

    top1: float
    k: int
    memory: int
    queries: int


def knn_score(
    net: nn.Module,
    train: ImageList,
    test: ImageList,
    spec: AugSpec,
    device: torch.device,
    k: int = 200,
    t: float = 0.1,
    batch_size: int = 256,
    workers: int = 2,
) -> KnnScore:
    """Weighted kNN of `net`: the k used is every decodable train image where there are fewer than k
    (one warning says so). It draws nothing from the process's random streams (the feature passes'
    DataLoaders draw their seeds from it): train's monitor leaves the training as it would be without it."""
    with torch.random.fork_rng(devices=[]):
        bank, bank_labels = extract_features(net, train, spec, device, batch_size, workers, desc="kNN features (train)")
        query, query_labels = extract_features(net, test, spec, device, batch_size, workers, desc="kNN features (eval)")
    if k > len(bank):
        warn_few_neighbours(k, len(bank), train)
    pred = knn_predict(query, bank, bank_labels, len(train.classes), k, t)
    top1 = (pred == query_labels).float().mean().item() * 100  # host sync: once per evaluation
    return KnnScore(top1, min(k, len(bank)), len(bank), len(query))
