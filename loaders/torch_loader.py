"""The reference backend: PIL + torchvision transforms in DataLoader workers.

Workers decode and augment to uint8 tensors (4x less to copy than float), each batch cut into a
part per worker (`BatchParts`) of MIN_PART images or more, so fewer parts where the batch is small;
`DevicePrefetcher` joins the parts and normalises on the device. The workers are started once per
run and persist across epochs: starting them each epoch cost 0.3-0.4 s of every epoch's first batch
on a 2-core CPU with 2 workers, more with 8 workers forked from a process holding a GPU's context.
Randomness: each epoch's order comes from (seed, epoch); the draws of an image's two views from
(seed, epoch, its index in the data set) alone (`KeyedImages`, asked for by `EpochShardKeys`'
(epoch, index) keys: the persistent workers hold a copy of the dataset made once, so the epoch
travels with each index), whichever worker or rank makes it and whatever it made before. So the
views are the same with any --workers, and an epoch resumed at a step (`set_epoch(epoch,
start_step)`) reads the same images from there on with the same views: a resumed run trains as an
uninterrupted one. Given the run's epoch count (`LoaderArgs.epochs`, as the trainer gives it), the
workers start the next epoch's first batch parts while an epoch's last batches are taken (its order
and draws known from (seed, epoch) alone), and none past the last epoch; an epoch set at a step, or
after one left before its end, starts its own. (lincls and finetune have their own training loader,
resumed at epoch ends and seeded the same way: moco_fast/seeded_images.py.)
"""

from __future__ import annotations

import atexit
import functools
import itertools
import signal
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from moco_fast.kernels.augment_gpu import gaussian_kernels
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T

from moco_fast.augment import AugSpec
from moco_fast.data import DataSplits
from moco_fast.image_dataset import ImageDataset
from moco_fast.seeded_images import KeyedImages
from moco_fast.shared_memory import stack_shared, start_workers, tensor_shared, warn_if_short, worker_start
from moco_fast.signals import STOP_SIGNALS
from moco_fast.stop_watch import end_daemonic_children

from . import register_loader
from .base import DevicePrefetcher, LoaderArgs, check_one_batch, check_start_step, listed_splits, pins, stream_seed
from .center_crop import ResizeCenterCrop
from .color_jitter import ColorJitter
from .options import parse_loader_options
from .wds import refuse_shard_set


def view_transform(spec: AugSpec) -> T.Compose:
    """One random view as the spec describes it, on a PIL image; returns uint8 3 x H x W.

    torchvision's transforms and draws, two of them re-implemented for speed: the blur
    (SeparableBlur, to one grey level) and ColorJitter's hue step (color_jitter.py, the same bytes)."""
    jitter = T.RandomApply([ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_prob)
    gray = T.RandomGrayscale(p=spec.gray_prob)
    ops = [T.RandomResizedCrop(spec.image_size, scale=spec.crop_scale, ratio=spec.crop_ratio)]
    ops += [gray, jitter] if spec.gray_before_jitter else [jitter, gray]
    if spec.blur_prob > 0:
        ops.append(T.RandomApply([SeparableBlur(spec.blur_kernel_size, spec.blur_sigma)], p=spec.blur_prob))
    ops += [T.RandomHorizontalFlip(spec.flip_prob), T.PILToTensor()]
    return T.Compose(ops)


class SeparableBlur(torch.nn.Module):
    """torchvision's GaussianBlur(kernel_size, sigma) on a PIL image, as two 1-D passes.

    Same kernel (kernel_size taps, sigma ~ U(sigma) from torch's generator, mirrored border), to
    within one grey level. torchvision convolves with the k x k kernel (529 products a pixel at 224
    px), and at small sigmas the kernel's tails are denormal floats, which x86 multiplies slowly:
    that blur was most of this loader's time (about 40 of 60 ms an image at 224 px, one core). Two
    passes over the taps that carry weight cost a few ms."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float]):
        super().__init__()
        self.kernel_size, self.sigma = kernel_size, sigma

    def forward(self, img: Image.Image) -> Image.Image:
        s = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        w = gaussian_taps(self.kernel_size, s)
        a = np.asarray(img, dtype=np.float32)  # H x W x 3
        for axis in (0, 1):
            a = _convolve(a, w, axis)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def gaussian_taps(kernel_size: int, sigma: float) -> np.ndarray:
    """torchvision's 1-D Gaussian kernel (kernels.augment_gpu.gaussian_kernels: kernel_size taps,
    normalised over them, float32) without the end taps under 1e-6: together they weigh under
    2.5e-5, a 160th of a grey level at most."""
    w = gaussian_kernels(torch.tensor([sigma]), None, kernel_size)[0].numpy()
    r = int(np.count_nonzero(w[: kernel_size // 2] >= 1e-6))  # taps each side of the centre
    return w[kernel_size // 2 - r : kernel_size // 2 + r + 1]


def _convolve(a: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """a (H x W x C) convolved with the symmetric taps w along axis, mirrored at the border as
    torchvision pads ("reflect": the edge pixel itself is not repeated)."""
    r = len(w) // 2
    if r == 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="reflect")
    n = a.shape[axis]

    def shifted(i: int) -> np.ndarray:
        return p[(slice(None),) * axis + (slice(i, i + n),)]

    out = w[0] * shifted(0)
    for i in range(1, len(w)):
        out += w[i] * shifted(i)
    return out


def eval_transform(image_size: int) -> T.Compose:
    """Resize + center crop (ImageNet's 0.875 ratio), or a plain resize for small images; a very
    thin image is cut before its resize (center_crop.ResizeCenterCrop)."""
    size = image_size if image_size <= 64 else round(image_size / 0.875)
    return T.Compose([ResizeCenterCrop(size, image_size), T.PILToTensor()])


class TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), self.transform(img)


class EpochShardSampler(Sampler[int]):
    """A per-epoch permutation, cut into equal rank shards (every rank runs the same steps)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch = 0
        self.per_rank = n // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's share of the order of `epoch` (None: the epoch set): per_rank dataset positions
        (long, on the host)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + (self.epoch if epoch is None else epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return order[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def __iter__(self):
        return iter(self.indices().tolist())


class EpochShardKeys(Sampler[tuple[int, int]]):
    """This rank's share of the epoch set last (`EpochShardSampler`), from the first sample of step
    `start_step` on, as (epoch, index) keys for KeyedImages. A DataLoader's sampler runs in the main
    process, persistent workers or not: each epoch's iteration reads the epoch and step set here."""

    def __init__(self, sampler: EpochShardSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size
        self.start_step = 0

    def __len__(self) -> int:
        return len(self.sampler) - self.start_step * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.of(self.sampler.epoch, self.start_step)  # the epoch fixed when its iteration starts

    def of(self, epoch: int, start_step: int) -> Iterator[tuple[int, int]]:
        """The keys of `epoch` from step `start_step` on, whichever epoch is set."""
        order = self.sampler.indices(epoch)[start_step * self.batch_size :].tolist()  # the skipped ones not read
        return ((epoch, i) for i in order)


class BatchParts(Sampler[list[tuple[int, int]]]):
    """The whole batches of `keys` (drop_last), each cut into `parts` consecutive lists of keys of
    near-equal length: the DataLoader's items, one batch's parts in a row (`JoinedParts` puts them back
    together). With a part per worker, every worker makes a share of every batch. A whole batch per
    worker made each batch at one core's speed: every epoch's first batch waited for one worker
    alone, and a data set of one batch an epoch (407 images, batch 256) ran as fast with 8 workers
    as with one (92 img/s on a 16-core machine).

    Its iteration goes on past the epoch set into the next ones, up to `epochs` (None: none): the
    DataLoader's workers then start the next epoch's first parts (its prefetch) while the trainer
    takes an epoch's last batches, and TorchLoader hands out one epoch's parts at a time. `len` is
    the epoch's."""

    def __init__(self, keys: EpochShardKeys, parts: int, epochs: int | None = None):
        self.keys, self.parts, self.epochs = keys, parts, epochs

    def __len__(self) -> int:
        return len(self.keys) // self.keys.batch_size * self.parts

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.keys.sampler.epoch
        yield from self._cut(list(self.keys))
        for later in range(epoch + 1, self.epochs or 0):
            yield from self._cut(list(self.keys.of(later, 0)))

    def _cut(self, keys: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
        n = self.keys.batch_size
        for start in range(0, len(keys) - n + 1, n):
            batch = keys[start : start + n]
            yield from (batch[p * n // self.parts : (p + 1) * n // self.parts] for p in range(self.parts))


# The fewest images in a batch's part. A part costs the main process about the same whatever its
# size: its four tensors' shared memory comes over as four file descriptors, each fetched from its
# worker's process in turn (torch's file_descriptor sharing; the worker's thread that hands them out
# waits for its own GIL). On the 2-core test machine, under load, a part took 6-9 ms of wall time and
# 1-2.5 ms of CPU time of the main process for 2 images as for 64; a whole batch was one such item.
# Parts of 2 (batch 32, 16 workers) would make that cost a batch's 16 times over, at a few ms an
# image, where a worker makes an image in tens of ms. From 16 images up it stays a small share, and a
# batch of 256 is still cut for 16 workers; a batch too small to cut is made whole by one worker,
# the batches of an epoch by all of them.
MIN_PART = 16


def batch_parts(batch_size: int, workers: int) -> int:
    """How many parts each batch is cut into: one per worker, of MIN_PART images or more, one at least."""
    return max(1, min(workers, batch_size // MIN_PART))


class JoinedParts:
    """Each `parts` consecutive items (collate_views' tuples of one batch's parts, in order) as one
    tuple of their fields' parts: (view 1's, view 2's, labels', indices'), which DevicePrefetcher
    joins on the device. It keeps no reference to a batch's parts once it has handed them on (a
    generator's frame and zip's last tuple do): on the CPU, where the join and the normalisation
    copy them, they leave /dev/shm before their batch's step, not after it (a batch of one part is
    not joined: its labels and indices, 16 bytes an image, stay there with it). On CUDA the
    DataLoader's pin thread has copied them out of /dev/shm already."""

    def __init__(self, items: Iterator, parts: int):
        self.items, self.parts = iter(items), parts

    def __iter__(self) -> JoinedParts:
        return self

    def __next__(self) -> tuple:
        return tuple(zip(*[next(self.items) for _ in range(self.parts)], strict=True))


def leave_stops_to_the_trainer(worker_id: int) -> None:
    """A training DataLoader worker ignores Ctrl-C and the stop signals. A signal to the whole
    process group (a terminal's Ctrl-C, SLURM, `docker stop`) reaches the workers too, while the
    trainer goes on to its next sync point to save the step (moco_fast.stops) and needs their
    batches: torch's own SIGTERM handler in a worker ends it, and the epoch then failed with "DataLoader
    worker exited unexpectedly". The trainer's process ends its workers as at any epoch's end; a
    worker whose process died ends of itself (torch's watchdog)."""
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)


@functools.cache
def end_workers_at_exit() -> None:
    """Registers end_daemonic_children once per process (at the first loader with workers)."""
    atexit.register(end_daemonic_children)


def _close_at_exit(ref: weakref.ref[TorchLoader]) -> None:
    if (loader := ref()) is not None:
        loader.close()


def collate_views(items):
    """(N x 3 x S x S uint8 view 1, view 2, N labels, N indices), in shared memory in a worker
    (shared_memory: a full /dev/shm is then an error, not a batch dropped for ever)."""
    views, label, index = zip(*items, strict=True)
    v1, v2 = zip(*views, strict=True)
    return stack_shared(v1), stack_shared(v2), tensor_shared(label), tensor_shared(index)


# Batch parts each DataLoader worker makes ahead of the trainer (torch's prefetch_factor): with a
# part of every batch per worker (BatchParts), as many batches ahead in all; more where a batch has
# fewer parts than there are workers (MIN_PART).
PREFETCH = 4


class TorchLoader:
    starts_mid_epoch = True

    def __init__(self, splits: DataSplits, args: LoaderArgs):
        images = splits.train
        check_one_batch(len(images), args)
        self.args = args
        self.splits = splits
        self.num_images = len(images)
        self.classes = images.classes
        self.dataset = KeyedImages(ImageDataset(images, TwoViews(view_transform(args.aug))), args.seed)
        self.sampler = EpochShardSampler(len(images), args.seed, args.rank, args.world_size)
        self.keys = EpochShardKeys(self.sampler, args.batch_size)
        self.parts = batch_parts(args.batch_size, args.workers)
        self._batches: DataLoader | None = None  # made at the first __iter__, its workers kept to the end
        self.batch_parts = BatchParts(self.keys, self.parts, args.epochs)
        # (the DataLoader's iterator, the epoch it goes on into) once an epoch was read to its end
        # with a next epoch to run: that epoch's __iter__ takes it on, its first parts made ahead
        self._goes_on: tuple[Iterator, int] | None = None
        self._prefetch: DevicePrefetcher | None = None  # made at the first __iter__, after the fork; kept
        # before the epoch's progress bar: a part's two uint8 views, its labels and indices (int64)
        part = -(-args.batch_size // self.parts)
        part_bytes = part * (2 * 3 * args.aug.image_size**2 + 2 * 8)
        item = ("batch", "batches") if self.parts == 1 else ("batch part", "batch parts")
        warn_if_short(args.workers, PREFETCH, part_bytes, "--loader torch", item)

    def __len__(self) -> int:
        return len(self.sampler) // self.args.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        check_start_step(start_step, len(self))
        self.sampler.set_epoch(epoch)
        self.keys.start_step = start_step

    def __iter__(self):
        a = self.args
        first = self._batches is None
        if first:
            if a.workers > 0:
                end_workers_at_exit()
                # registered after end_daemonic_children, so it runs before it (atexit: LIFO)
                atexit.register(_close_at_exit, weakref.ref(self))
            batches = DataLoader(
                self.dataset,
                batch_sampler=self.batch_parts,
                num_workers=a.workers,
                collate_fn=collate_views,
                pin_memory=pins(a.device),
                # the workers' base seed, drawn once from this generator rather than the trainer's
                # stream (the views do not depend on it: KeyedImages)
                generator=torch.Generator().manual_seed(stream_seed(a.seed, 0, a.rank)),
                prefetch_factor=PREFETCH if a.workers > 0 else None,
                # a new epoch's iteration drops what the workers made ahead for an epoch left before
                # its end (a test's partial read): torch's _reset discards it
                persistent_workers=a.workers > 0,
                worker_init_fn=leave_stops_to_the_trainer,
                # forked whatever the default: a stop signal to the process group ends a fork server,
                # not the workers (leave_stops_to_the_trainer), whose parent must live (WORKER_START)
                multiprocessing_context=worker_start(a.workers),
            )
            self._batches = batches
        goes_on, self._goes_on = self._goes_on, None
        if goes_on is not None and goes_on[1] == self.sampler.epoch and self.keys.start_step == 0:
            it = goes_on[0]
        else:
            # the DataLoader's iterator made here, not at DevicePrefetcher's first batch: see
            # `start_workers`; its persistent workers start at the first iterator only, the one that
            # needs /dev/shm checked. A new iterator drops what the workers made for another epoch.
            it = start_workers(self._batches, check=first)
        if self._prefetch is None:  # once: its constants' copy to the device waits for the GPU
            self._prefetch = DevicePrefetcher(a.aug, a.device, a.dtype, a.channels_last)
        return self._prefetch(JoinedParts(self._one_epoch(it, self.sampler.epoch), self.parts))

    def _one_epoch(self, it: Iterator, epoch: int) -> Iterator:
        """The epoch's parts from `it`, which goes on into the next epoch's (BatchParts): left to that
        epoch's __iter__ once this one is read to its end."""
        yield from itertools.islice(it, len(self.batch_parts))
        if epoch + 1 < (self.args.epochs or 0):
            self._goes_on = (it, epoch + 1)

    def close(self) -> None:
        """Ends the workers as a finished DataLoader does (they leave their loop and exit), also at
        exit while the loader is alive (a stop's or an error's traceback holds it): they ignore
        SIGTERM (leave_stops_to_the_trainer), so end_daemonic_children would wait out its grace for
        them and SIGKILL them, 2 s more of every stop. torch has no public call for it: dropping the
        DataLoader does not end workers whose iterator a traceback's frame still holds."""
        batches, self._batches, self._goes_on = self._batches, None, None
        it = getattr(batches, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


@register_loader("torch")
def build_torch_loader(args: LoaderArgs) -> TorchLoader:
    parse_loader_options("torch", args.options)
    refuse_shard_set(args.data, "torch")
    return TorchLoader(listed_splits(args), args)
