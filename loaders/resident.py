"""Resident backend: the training set decoded once into device memory and augmented there.

For data that fits on the GPU (CIFAR-10's 50,000 images take 154 MB as uint8). Nothing happens on
the host per step: no worker processes, no decode, no host-to-device copy. Each step indexes the
resident uint8 tensor with this rank's slice of the epoch permutation, then augments both views of
every image in one pass (2N images, each with its own random parameters), in batched device ops
without a host sync:

    random resized crop          kernels/resized_crop.py   (torchvision's get_params, antialiased)
    jitter, grayscale, blur, flip kernels/augment_gpu.py    (the FFCV backend's colour pass)
    normalise, cast, channels-last

Order: the torch loader's per-epoch permutation (seed, epoch), cut into equal rank shards; every
rank holds the whole set. Randomness of the views: a device generator seeded by (seed, global step,
rank) at each step, so a resumed run, also one resumed within an epoch, draws what an uninterrupted
one would.

Images that all share one size are kept as they are. Otherwise (or with `size=S`) each image is
resized, shorter side to S, and centre-cropped to S x S when loaded; the default S is
image_size / 0.875 (256 for 224), the usual resize before a 224 crop. Unreadable files are named and
left out when the set is loaded.

Backend options (`--loader-option KEY=VALUE`):
    size=0              0: keep the images' own size when they all share one, else image_size / 0.875
    jitter_order=sample ColorJitter order per image as torchvision (sample) or one per batch, both
                        views together (batch)
    memory_fraction=0.5 the largest share of the device's free memory (or of the host's RAM on a
                        CPU run) that the images may take; past it the loader refuses to start
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from moco_fast.kernels.resized_crop import resized_crop, sample_boxes
from PIL import Image

from moco_fast.data import DataError, ImageList
from moco_fast.image_dataset import load_rgb
from moco_fast.metrics import tqdm

from . import register_loader
from .base import (
    Batch,
    DeviceAugment,
    LoaderArgs,
    check_one_batch,
    check_start_step,
    listed_splits,
    pinned_copy,
    stream_seed,
)
from .center_crop import ResizeCenterCrop
from .options import ResidentOptions, parse_loader_options
from .torch_loader import EpochShardSampler
from .wds import refuse_shard_set

log = logging.getLogger("moco_fast")

GiB = 1024**3


def human_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def available_bytes(device: torch.device) -> int:
    """Free memory of the device the images will live on (host RAM for a CPU run)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def _decode(path: str, size: int) -> np.ndarray | str:
    """H x W x 3 uint8 (resized and centre-cropped to size x size when size > 0), or why it failed."""
    try:
        img = load_rgb(path)
        if size:
            img = ResizeCenterCrop(size, size)(img)  # a thin image is cut before its resize
        return np.asarray(img)
    except Exception as e:  # PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"


def _header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header (no decode), or None when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # PIL raises many types for bad files; the decode names the file
        return None


def load_resident(
    images: ImageList, size: int, side: int, device: torch.device, budget: int, workers: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, ImageList]:
    """Decode every image into one N x 3 x H x W uint8 tensor on `device` (labels: N long).

    size > 0: every image resized and centre-cropped to size x size. size == 0: the images' own size
    when the file headers all give one, else `side`. Refuses before decoding when the images would
    take more than `budget` bytes. Returns the images (channels-last strides: the decoded N x H x W x 3
    buffer as it is), their labels and the files kept (unreadable ones are named and dropped)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        if size == 0:
            sizes = set(pool.map(_header_size, images.files, chunksize=256)) - {None}
            if len(sizes) == 1:
                ((w, h),) = sizes
            else:
                size = side
                log.info("resident loader: images of %d sizes; loading them at %dx%d", len(sizes), side, side)
        if size:
            w = h = size
        need = len(images) * 3 * h * w
        if need > budget:
            raise DataError(
                f"--loader resident: {len(images)} images of {w}x{h} need {human_bytes(need)} on {device}, more "
                f"than the {human_bytes(budget)} allowed (memory_fraction of what is free); pass a smaller "
                "--loader-option size=S, or use --loader dali|ffcv|torch"
            )
        host = np.empty((len(images), h, w, 3), np.uint8)  # filled in place by the threads

        def load(i: int) -> str | None:
            out = _decode(images.files[i], size)
            if isinstance(out, str):
                return out
            if out.shape != (h, w, 3):
                return f"decoded as {out.shape[1]}x{out.shape[0]}, the header said {w}x{h}"
            host[i] = out
            return None

        it = pool.map(load, range(len(images)), chunksize=64)
        reasons = list(tqdm(it, total=len(images), desc="loading images", unit="img", disable=not progress))
    bad = [(f, r) for f, r in zip(images.files, reasons, strict=True) if r is not None]
    for path, reason in bad:
        log.warning("skipping unreadable image %s (%s)", path, reason)
    keep = [i for i, r in enumerate(reasons) if r is None]
    if not keep:
        raise DataError(f"no image in {images.root} could be decoded")
    if bad:
        host = host[keep]
    kept = images.keeping(keep, bad)
    data = torch.from_numpy(host).to(device).permute(0, 3, 1, 2)  # N x 3 x H x W view, no layout copy
    return data, torch.tensor(kept.labels, device=device), kept


class ResidentLoader:
    starts_mid_epoch = True

    def __init__(self, args: LoaderArgs):
        self.args = args
        self.start_step = 0
        self.opts: ResidentOptions = parse_loader_options("resident", args.options)
        refuse_shard_set(args.data, "resident")
        self.splits = listed_splits(args)
        images = self.splits.train
        side = round(args.aug.image_size / 0.875)  # the default side for images of mixed sizes
        budget = int(available_bytes(args.device) * self.opts.memory_fraction)
        self.data, self.labels, kept = load_resident(
            images, self.opts.size, side, args.device, budget, args.workers, progress=args.rank == 0
        )
        self.num_images = len(kept)
        self.classes = kept.classes
        check_one_batch(self.num_images, args)
        self.sampler = EpochShardSampler(self.num_images, args.seed, args.rank, args.world_size)
        self.augment = DeviceAugment(args, self.opts.jitter_order)
        h, w = self.data.shape[2:]
        log.info(
            "resident loader: %d images of %dx%d on %s (%s)",
            self.num_images,
            w,
            h,
            args.device,
            human_bytes(self.data.numel()),
        )

    def __len__(self) -> int:
        return len(self.sampler) // self.args.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        check_start_step(start_step, len(self))
        self.sampler.set_epoch(epoch)
        self.start_step = start_step

    def _views(self, raw: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 2N x 3 x H x W on the device (every image twice) -> (im_q, im_k). Both views go
        through in one call: half the kernel launches of two calls, and each of the 2N images draws
        its own crop and colour parameters, so the two views stay independent."""
        spec = self.args.aug
        m, _, h, w = raw.shape
        boxes = sample_boxes(m, h, w, spec.crop_scale, spec.crop_ratio, self.args.device, gen)
        x = resized_crop(raw.float().contiguous(), boxes, spec.image_size).div_(255.0)  # 2N x 3 x S x S, 0-1
        return self.augment(x, gen)

    def __iter__(self):
        a = self.args
        gen = torch.Generator(device=a.device)
        order = pinned_copy(self.sampler.indices(), a.device)  # this rank's share of the epoch, once an epoch
        b, first = a.batch_size, self.sampler.epoch * len(self)
        for step in range(self.start_step, len(self)):
            # seeded by the global step (host state only, no sync): a step draws the same views
            # whichever step its epoch started at (a run resumed within an epoch)
            gen.manual_seed(stream_seed(a.seed, first + step, a.rank))
            idx = order[step * b : (step + 1) * b]  # device slice: no sync
            im_q, im_k = self._views(self.data[idx.repeat(2)], gen)
            yield Batch(im_q, im_k, self.labels[idx], idx)


@register_loader("resident")
def build_resident_loader(args: LoaderArgs) -> ResidentLoader:
    return ResidentLoader(args)
