"""What every loader backend shares: its arguments, its output, and the device-side prefetcher."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from moco_fast.kernels.augment_gpu import KERNELS, apply, augment_into, sample_params

from moco_fast.augment import AugSpec
from moco_fast.data import DataError, DataSplits, load_splits
from moco_fast.text import plural


class Batch(NamedTuple):
    im_q: torch.Tensor  # N x 3 x H x W, on the device, trainer dtype and memory format
    im_k: torch.Tensor  # N x 3 x H x W, a second independent view of the same images
    label: torch.Tensor  # N, long
    index: torch.Tensor  # N, long: position of each sample in the dataset


@dataclass
class LoaderArgs:
    data: str | None  # a data root (see moco_fast.data), a backend-specific file, or None: demo set
    aug: AugSpec
    batch_size: int  # per process
    device: torch.device
    dtype: torch.dtype = torch.float32
    channels_last: bool = True
    workers: int = 4
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    synthetic_steps: int = 100
    # The run's epoch count: the torch loader's workers start the next epoch's first batches while
    # an epoch's last ones are taken, up to this many epochs (None: each epoch starts its own)
    epochs: int | None = None
    check_images: bool = True
    # The eval split beside train/ (moco_fast.data.load_splits): "list" it, "try" (only the final
    # kNN uses it), or "skip" it (nothing evaluates). Folder loaders only.
    eval_split: str = "list"
    # The data as its caller listed it already (load_splits of `data` with check_images as above,
    # and eval_split as above or "list": a bench lists --data before its rows, a sweep before its
    # settings); None: the loader lists `data` itself. Folder loaders only (listed_splits).
    splits: DataSplits | None = None
    # Backend-specific knobs (e.g. DALI's hw_decoder_load), from `--loader-option KEY=VALUE`. Each
    # backend documents and validates its own keys; the augmentation recipe never goes here.
    options: dict[str, str] = field(default_factory=dict)


def stream_seed(seed: int, position: int, rank: int) -> int:
    """The seed of one rank's random stream at one epoch (or step). Every backend mixes (run seed,
    position, rank) the same way, so that a resumed run draws what an uninterrupted one would."""
    return (seed * 1_000_003 + position) * 1009 + rank


def listed_splits(args: LoaderArgs) -> DataSplits:
    """The image folder's train and eval lists of a folder loader (torch, DALI, resident): the
    caller's listing (`args.splits`) where it made one, else `args.data` listed here. On ImageNet a
    listing takes minutes, and a caller that listed the folder already (a bench checks --data before
    its rows, a sweep before its settings, each of which builds a loader) would otherwise pay it
    again per loader.

    The listing must be one the loader would make: header-checked as `args.check_images` says, and
    its eval split listed as `args.eval_split` says, or fully ("list": an eval split that could not
    be listed was an error), which holds what "try" would and more than "skip" reads (the trainer's
    kNN reads it only where asked). Any other is a ValueError, not listed again: it is the caller's
    mistake, said, where listing anew would silently cost the minutes it meant to save."""
    splits = args.splits
    if splits is None:
        return load_splits(args.data, check=args.check_images, eval_split=args.eval_split)
    given, wanted = (splits.checked, splits.eval_split), (args.check_images, args.eval_split)
    if splits.checked != args.check_images or splits.eval_split not in ("list", args.eval_split):
        raise ValueError(f"LoaderArgs.splits was listed with (check, eval_split) {given}; the loader lists {wanted}")
    return splits


def check_one_batch(num_images: int, args: LoaderArgs) -> None:
    """A DataError where each process's share of the images (1/world of them, drop_last) holds less
    than one --batch-size. Each backend said "48 images give fewer than one batch of 32 per process:
    lower --batch-size" to 2 processes, where 48 images at 32 train in one: the line gives each one's
    share, the largest --batch-size that fits, and how many processes fit one --batch-size each where
    some do (20 images at 32 fit none: fewer processes would not help). Fewer images than processes
    leave each one none, which no --batch-size mends: the line gives the processes that fit it, or
    one process at a --batch-size that fits (1 image in 2 processes was told "lower --batch-size")."""
    world, batch = args.world_size, args.batch_size
    share = num_images // world
    if share >= batch:
        return
    ways = [f"lower --batch-size (to {share} at most)"] if share else []
    if world > 1 and num_images >= batch:
        ways.append(f"start at most {plural(num_images // batch, 'process', 'processes')}")
    elif world > 1 and not share and num_images:  # fewer images than processes: no --batch-size fits them all
        ways.append(f"lower --batch-size (to {num_images} at most) in 1 process")
    fix = ", or ".join(ways) or "lower --batch-size"
    images = f"{plural(num_images, 'image')} give{'s' * (num_images == 1)}"  # "1 images give" was said
    if world > 1:
        raise DataError(
            f"{images} fewer than one batch of {batch} per process ({world} processes, "
            f"{plural(share, 'image')} each): {fix}"
        )
    raise DataError(f"{images} fewer than one batch of {batch}: {fix}")


def check_start_step(start_step: int, steps: int) -> None:
    if not 0 <= start_step < steps:
        raise ValueError(f"start_step {start_step} is not a step of an epoch of {steps}")


class TrainLoader(Protocol):
    num_images: int
    classes: list[str]
    # the image folder's train and eval lists as the loader found them (the kNN monitor's data),
    # None where the data is not an image folder (a shard set, a .beton, synthetic)
    splits: DataSplits | None

    # False where an epoch can only start at its first step (DALI's reader on a shard set, whose
    # order lives inside DALI): the trainer then saves at epoch ends only
    starts_mid_epoch: bool

    def __len__(self) -> int: ...  # steps per epoch (drop_last: every rank runs the same number)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next __iter__ yields epoch `epoch` from its step `start_step` on (len - start_step
        batches, those an uninterrupted epoch yields there), without reading the skipped ones: a run
        resumed from a checkpoint saved within an epoch."""

    def __iter__(self) -> Iterator[Batch]: ...


def pins(device: torch.device | None) -> bool:
    """Whether host batches bound for `device` are pinned (pinned_copy, the DataLoaders' pin_memory,
    knn.eval_batches' pin): on CUDA, where a copy from pageable memory may wait for every step queued
    before it (pinned_copy); elsewhere (a CPU run, or None: no device) pinning is a host copy that
    buys nothing."""
    return device is not None and device.type == "cuda"


def pinned_copy(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device` without the host waiting for the GPU. CUDA may synchronise
    with the stream before a copy from pageable memory starts (its "API synchronization behavior"
    page), non_blocking or not: the host would wait there for every step queued before it. From
    pinned memory the copy is asynchronous; pinning is a host-side copy into the caching host
    allocator's memory, reused once the copy that used it last has run. Elsewhere a plain copy."""
    if pins(device):
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def on_device(x: torch.Tensor | Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device` (non-blocking), or a batch's parts in order (a tuple: the torch
    loader's workers make each batch together) copied there and joined there: a join on the host would
    copy the batch once more, into memory that is not pinned."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    parts = [p.to(device, non_blocking=True) for p in x]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def normalize_on_device(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype, memory_format: torch.memory_format
) -> torch.Tensor:
    """uint8 N x 3 x H x W (any device) -> normalised `dtype` on mean's device. mean/std: 1x3x1x1, 0-255."""
    x = x.to(mean.device, non_blocking=True)
    return ((x.float() - mean) / std).to(dtype).contiguous(memory_format=memory_format)


def mean_std_255(spec: AugSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255
    return mean, std


class DevicePrefetcher:
    """Moves uint8 NCHW batches to the device, normalises them there, and casts to the trainer's
    dtype and memory format. On CUDA the copy and the normalisation run on a side stream one batch
    ahead, so they overlap the step (timm's PrefetchLoader idea).

    Made once per loader and called with each epoch's `source`, which yields (view1_uint8,
    view2_uint8, label, index) on the host, each a tensor or a tuple of a batch's parts
    (`on_device`). Its mean and std reach the device by a blocking copy (the host waits for every
    step queued before it): made for each epoch, they stopped the host at every epoch's start, at
    every step where an epoch is one batch.
    """

    def __init__(self, spec: AugSpec, device: torch.device, dtype: torch.dtype, channels_last: bool):
        self.device = device
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean, self.std = mean_std_255(spec, device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _prepare(self, item) -> Batch:
        v1, v2, label, index = (on_device(x, self.device) for x in item)
        v1, v2 = (normalize_on_device(v, self.mean, self.std, self.dtype, self.memory_format) for v in (v1, v2))
        return Batch(v1, v2, label, index)

    def __call__(self, source: Iterable) -> Iterator[Batch]:
        if self.stream is None:
            # map keeps no host item while its batch is in use (the torch loader's parts, in /dev/shm)
            yield from map(self._prepare, source)
            return
        # the side stream starts after what the current one has queued (mean and std, made on it in
        # __init__; the last epoch's steps): an event, not a host sync
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        it = iter(source)
        nxt = self._next_on_stream(it)
        while nxt is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            batch = nxt
            for t in batch:
                t.record_stream(torch.cuda.current_stream(self.device))
            nxt = self._next_on_stream(it)
            yield batch

    def _next_on_stream(self, it) -> Batch | None:
        try:
            item = next(it)
        except StopIteration:
            return None
        with torch.cuda.stream(self.stream):
            return self._prepare(item)


class DeviceAugment:
    """The device half of the FFCV and resident backends: the batched colour pass of
    `kernels/augment_gpu.py` (jitter, grayscale, blur, and flip unless the loader flipped already)
    over both views at once, then normalisation into the trainer's dtype and memory format.

    Called with float 2N x 3 x S x S in [0, 1] on the device (view 1 of the N images, then view 2)
    and the device generator of the epoch; returns (im_q, im_k), N each. `from_uint8` takes the
    views as uint8 instead (FFCV's batch). `kernel="triton"` (opt-in, for the benches: its GPU speed
    is unmeasured) runs the whole pass in fused Triton kernels: jitter and grayscale
    (`kernels/augment_triton.py`), then blur, flip, normalisation, cast and layout
    (`kernels/blur_triton.py`), on a GPU or under TRITON_INTERPRET=1 (refused here otherwise, not at
    the first batch)."""

    def __init__(self, args: LoaderArgs, jitter_order: str, flip: bool = True, kernel: str = "torch"):
        self.spec, self.device, self.dtype = args.aug, args.device, args.dtype
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "triton":  # imported only here: the torch pass needs no triton
            from moco_fast.kernels.momentum_triton import check_device

            check_device(torch.device(args.device), "DeviceAugment(kernel='triton')")
        self.jitter_order, self.flip, self.kernel = jitter_order, flip, kernel
        self.mean = torch.tensor(args.aug.mean, device=args.device).view(1, 3, 1, 1)
        self.std = torch.tensor(args.aug.std, device=args.device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self._augment(x, x.shape[0], generator)

    def from_uint8(self, views: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from uint8 2 x N x 3 x S x S on the device, any strides (FFCV's N x 2 x S x S x 3
        batch permuted (1, 0, 4, 2, 3), a view): the pass of `views` as floats, view-major (row
        v * N + i), divided by 255. The torch pass reads those floats, made here by a copy, a float()
        and a div_ pass, as FFCVLoader made them before; the Triton kernels read the uint8 where it
        lies and divide as they load it, three passes fewer (correctly rounded: torch's floats on
        the CPU; on a GPU torch multiplies by 1/255, up to one ulp apart, see docs/ffcv.md)."""
        if self.kernel == "torch":
            return self(views.reshape(-1, *views.shape[2:]).float().div_(255.0), generator)
        return self._augment(views, views.shape[0] * views.shape[1], generator)

    def _augment(self, x: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass of the n images of x (2N x 3 x S x S, or views that only the triton kernels read)."""
        # With jitter_order=batch the batch's one order is drawn on the host (no device sync).
        params = sample_params(n, self.spec, self.device, generator, order=self.jitter_order, flip=self.flip)
        if self.kernel == "triton":
            from moco_fast.kernels.blur_triton import augment_normalize

            x = augment_normalize(x, params, self.mean, self.std, self.dtype, self.memory_format)
        elif x.device.type == "cpu":
            x = self._on_the_cpu(x, params)
        else:
            x = apply(x, params)
            x = ((x - self.mean) / self.std).to(self.dtype).contiguous(memory_format=self.memory_format)
        n = x.shape[0] // 2
        return x[:n], x[n:]  # slices along N of a channels-last batch are channels-last: no copy

    def _on_the_cpu(self, x: torch.Tensor, params) -> torch.Tensor:
        """The same on the CPU, a chunk of the batch at a time to the end, normalisation included,
        into the one output tensor: no temporary is a whole batch's (each would cost page faults, see
        kernels/augment_gpu.CPU_CHUNK_PIXELS) and the normalisation is done in place."""
        out = torch.empty(x.shape, dtype=self.dtype, memory_format=self.memory_format)
        return augment_into(out, x, params, finish=lambda y: y.sub_(self.mean).div_(self.std))
