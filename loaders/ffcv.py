"""FFCV backend: `.beton` files (written by `moco-fast convert SRC X.beton --format ffcv`).

The CPU work runs in FFCV's compiled Numba pipeline, in threads: each JPEG is decoded once and cut
into two independent random resized crops with MoCo's scale and ratio (`ResizedCrops`), and each
view is flipped on its own (`FlipViews`; the operations are in `ffcv_ops.py`). Colour jitter,
grayscale and blur of both views then run in one batched pass of `moco_fast.kernels.augment_gpu` on
the training device (on a CPU run: the CPU), followed by normalisation into the trainer's dtype and
memory format.

Order: the same per-epoch permutation as the torch loader (seeded by `seed` and the epoch), cut into
equal rank shards when `world_size > 1` (FFCV's `distributed=True`; every rank runs the same number
of steps). Randomness of the views: each image's crops and flips come from its own stream, seeded
by (seed, epoch, its index in the .beton) (`ffcv_ops.EpochKey`; whatever the thread that takes
it), the colour pass from a device generator seeded by (seed, global step, rank) at each step, as
the resident loader's: a run resumed within an epoch trains on the views of an uninterrupted one.

Differs from torchvision: a crop is resized by FFCV's `resize_crop`, which is OpenCV's INTER_AREA
(checked against cv2.resize, exactly equal), where torchvision uses antialiased bilinear; and the
pixels are the JPEG that `convert` re-encoded (`--jpeg-quality`, default 90), not the source file.

An image that cannot be read (a JPEG that does not decode or whose size is not the recorded one;
raw pixels that do not fit their record) does not stop a run, and is not trained on: the decoder
zeroes its views and marks it in a status output read on the host (no device sync); the loader logs
it once by its index in the .beton, its source file (see below) and its class, and hands on the
next image of the batch that was read instead, with its label and index, as the other loaders use
the next good file. A run gives up when more than MAX_BAD_FRACTION of the images (and more than
MAX_BAD_MIN) cannot be read, or when no image of a batch can. Any other error in FFCV's epoch
thread (a fault in a pipeline stage) ends the epoch with that error, where FFCV alone would hang; a
.beton gone at the start of an epoch is one line (FFCV's page readers, with os_cache=0, would die
opening it and hang the epoch too). Read errors later are FFCV's to ignore: the pages then fail to
decode and count as unreadable images.

Backend options (`--loader-option KEY=VALUE`):
    os_cache=1          map the file through the OS page cache (best when it fits in RAM, and shared
                        by the processes of a machine); 0: FFCV's own process cache
    batches_ahead=3     batches FFCV prepares ahead of the one in use, 1-32
    jitter_order=sample ColorJitter order per image as torchvision (sample) or one per batch (batch:
                        cheaper, see kernels/augment_gpu.py)
    decode=once         once: one JPEG decode for both views; twice: one decode per view, one
                        pipeline each (the work of FFCV's stock RandomResizedCropRGBImageDecoder)
The sidecar `X.beton.json` (written by convert) holds the class names; without it classes are the
label numbers. The .beton records no file names: convert writes them beside it, `X.beton.files.txt`
(FileNames), read at the first image skipped, never at the start (ImageNet's is ~40 MB); without it
(an older convert's .beton, another tool's) a skipped image is named by its index and class only.
A .beton from another writer needs the field types convert writes: `image` an RGBImageField,
`label` an IntField.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from queue import Full

import numpy as np
import torch

from moco_fast.threads import handle_thread_errors, kept_ffcv_import_threads, kept_torch_threads

with kept_ffcv_import_threads():  # FFCV's import sets torch's and Numba's thread counts to 1
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.pipeline_spec import PipelineSpec
    from ffcv.reader import Reader
    from ffcv.transforms import ToDevice, ToTensor
    from ffcv.traversal_order.base import TraversalOrder

from moco_fast.convert_dst import (
    NAMES_HEADER,
    beton_fingerprint,
    names_fingerprint,
    names_path,
    refuse_unless_regular,
    sidecar_of,
    sidecar_path,
    stale,
)
from moco_fast.data import DataError
from moco_fast.distributed import local_world_size
from moco_fast.image_dataset import MAX_BAD_FRACTION, MAX_BAD_MIN

from . import register_loader
from .base import Batch, DeviceAugment, LoaderArgs, check_one_batch, check_start_step, pinned_copy, stream_seed
from .ffcv_cache import use_page_cache_manager
from .ffcv_ops import FAILURES, DecodeStatus, EpochKey, FlipViews, ResizedCrops, SampleIndexDecoder
from .options import FFCVOptions, parse_loader_options
from .torch_loader import EpochShardSampler
from .wds import beton_file

log = logging.getLogger("moco_fast")


# ---- the order, options, class names, the loader (the operations are in ffcv_ops.py) -------------


class RankShardOrder(TraversalOrder):
    """The torch loader's per-epoch permutation (seed, epoch), this rank's equal shard of it.

    FFCV builds its traversal order by calling the object it is given with the loader; an instance
    returns itself, so the rank and world size come from us, not from torch.distributed."""

    def __init__(self, seed: int, rank: int, world_size: int):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start = 0  # the first sample of the shard that the next epoch reads (a resumed epoch)

    def __call__(self, loader):
        self.sampler = EpochShardSampler(len(loader.indices), self.seed, self.rank, self.world_size)
        self.batch_size = loader.batch_size
        return self

    def sample_order(self, epoch: int):
        self.sampler.set_epoch(epoch)
        order = self.sampler.indices()
        # FFCV cuts the order into batches as it is: a shorter one starts the epoch at a later step.
        # It drops the partial last batch by the length of its first epoch's order, not of this one:
        # a shard of 36 in batches of 8 resumed at step 3 read 12 images as 2 steps, the second of 4
        # images (an epoch of 5 steps). The order ends at the epoch's last whole batch.
        end = len(order) // self.batch_size * self.batch_size
        return order[self.start : end].numpy()


def read_classes(beton: Path, labels: np.ndarray, fingerprint: str | None) -> list[str]:
    """Class names from the sidecar written by convert; else the label numbers. A sidecar that
    convert_dst.sidecar_of ignores (unreadable, stale: it records another .beton's fingerprint than
    `fingerprint`, the .beton's) or that does not fit the labels is ignored with a line that says so."""
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    meta = sidecar_of(beton, fingerprint, warn=True)
    if meta is not None:
        try:
            classes = [str(c) for c in meta["classes"]]
            if meta.get("num_images") not in (None, len(labels)):
                raise ValueError(f"it describes {meta['num_images']} images, the .beton holds {len(labels)}")
            if len(classes) >= n_labels:
                return classes
            raise ValueError(f"{len(classes)} classes but labels up to {n_labels - 1}")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s: %s", sidecar_path(beton), e)
    return [str(i) for i in range(n_labels)]


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def warn_of_decode_buffers(
    beton: Path, images: np.ndarray, batch_size: int, batches_ahead: int, decoders: int, processes: int = 1
) -> None:
    """FFCV's decoder holds, for each image of batches_ahead + 2 batches (its EpochIterator's memory),
    a buffer of the .beton's widest x tallest image (RandomResizedCropRGBImageDecoder's temp): one
    large photo in a .beton converted without --max-resolution sizes them all, and a run was ended
    by the OOM killer without a word (6000 x 4000 at batch 256: 86 GiB). `processes`: this machine's
    (--gpus, torchrun's --nproc_per_node), each with buffers of its own: 8 under half each filled it."""
    w, h = int(images["width"].max()), int(images["height"].max())
    each, have = decoders * (batches_ahead + 2) * batch_size * w * h * 3, physical_memory()
    need = each * processes
    if need > have // 2:
        log.warning(
            "%s: FFCV's decode buffers take %.1f GiB%s, more than half of this machine's %.1f GiB (each image of "
            "batches_ahead + 2 = %d batches of %d has a buffer of the .beton's widest x tallest image, %d x %d): "
            "convert it again with --max-resolution (FFCV's recipes: 256-512), or lower --batch-size or "
            "--loader-option batches_ahead",
            beton,
            need / 2**30,
            "" if processes == 1 else f" ({processes} processes, {each / 2**30:.1f} GiB each)",
            have / 2**30,
            batches_ahead + 2,
            batch_size,
            w,
            h,
        )


class FileNames:
    """The source file of each image of a .beton, from the list convert writes beside it (names_path:
    a header line, then one name a line in .beton order). Read at the first lookup, not at the
    start: the list is scanned once for where its lines start (8 bytes an image are kept, not its
    ~40 MB for ImageNet), and each lookup reads its own line. None for every image where there is no
    list (an older convert's .beton, another tool's), or one that does not fit the .beton (said once):
    one of another count, or one whose header records another fingerprint than the .beton's,
    `fingerprint` (beton_fingerprint; a convert stopped between publishing the two). One that is no
    regular file is refused at the start (a FIFO would hang the first lookup), as the sidecar is."""

    def __init__(self, beton: Path, num_images: int, fingerprint: str | None):
        self.beton, self.path, self.num_images, self.fingerprint = beton, names_path(beton), num_images, fingerprint
        refuse_unless_regular(self.path, beton, "file list")
        self.starts: np.ndarray | None = None  # byte offset of each image's line, and the end of the last
        self.unusable = False

    def __getitem__(self, i: int) -> str | None:
        if self.starts is None and not self.unusable:
            self.starts = self._scan()
            self.unusable = self.starts is None
        if self.unusable:
            return None
        try:
            with open(self.path, "rb") as fh:
                fh.seek(int(self.starts[i]))
                line = fh.read(int(self.starts[i + 1] - self.starts[i]) - 1)
        except OSError:  # moved or deleted since: the name is a courtesy, the run goes on without it
            return None
        # a list whose line endings were made CRLF (copied through Windows): the \r would return the
        # cursor in the middle of the log line that names the file
        return line.removesuffix(b"\r").decode("utf-8", errors="backslashreplace")

    def _scan(self) -> np.ndarray | None:
        try:
            data = np.fromfile(self.path, dtype=np.uint8)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("ignoring %s: %s", self.path, e)
            return None
        ends = np.flatnonzero(data == ord("\n"))
        header = data[: ends[0] if len(ends) else len(data)].tobytes().decode("utf-8", errors="replace")
        if not header.startswith(NAMES_HEADER):
            why = "it is not a file list that convert wrote"
        elif names_fingerprint(header) not in (None, self.fingerprint):
            why = stale(self.beton) + "; images are named by their index"
        elif len(ends) - 1 != self.num_images:
            why = f"it names {len(ends) - 1} files, the .beton holds {self.num_images} images"
        else:
            return ends + 1  # image i's line: [ends[i] + 1, ends[i + 1]), after the header's line
        log.warning("ignoring %s: %s", self.path, why)
        return None


class FFCVLoader:
    starts_mid_epoch = True

    def __init__(self, args: LoaderArgs):
        path = beton_file(args.data)
        self.args = args
        self.opts: FFCVOptions = parse_loader_options("ffcv", args.options)
        self.device = args.device
        try:
            reader = Reader(str(path))
        except Exception as e:  # FFCV raises assorted errors for files that are not .beton
            raise DataError(f"{path} is not a readable .beton file ({type(e).__name__}: {e})") from e
        names = list(reader.handlers)
        # Checked before any pipeline is compiled: the decoders read the metadata of these two types
        # (another type's fails deep in FFCV with an IndexError, or is read as garbage).
        for name, kind in (("image", RGBImageField), ("label", IntField)):
            if name not in names:
                raise DataError(f"{path} has no {name!r} field (fields: {', '.join(names)})")
            field = reader.handlers[name]
            if not isinstance(field, kind):
                raise DataError(
                    f"{path}: its {name!r} field is {type(field).__name__}, --loader ffcv reads {name!r} as "
                    f"{kind.__name__} (as `moco-fast convert` writes it)"
                )
        self.splits = None  # a .beton: no image folder
        self.path = path
        self.num_images = int(reader.num_samples)  # FFCV's is a numpy uint64: arithmetic and text want an int
        self.labels = reader.metadata[f"f{names.index('label')}"]
        fingerprint = beton_fingerprint(path)  # what its sidecar and file list must record, if anything
        self.classes = read_classes(path, self.labels, fingerprint)
        self.bad: set[int] = set()  # .beton indices whose image could not be read (named once each)
        self.files = FileNames(path, self.num_images, fingerprint)
        check_one_batch(self.num_images, args)
        images = reader.metadata[f"f{names.index('image')}"]
        decoders = 1 if self.opts.decode == "once" else 2
        processes = local_world_size()  # this machine's, each with its own buffers
        warn_of_decode_buffers(path, images, args.batch_size, self.opts.batches_ahead, decoders, processes)
        self.augment = DeviceAugment(args, self.opts.jitter_order, flip=False)  # FFCV flipped already
        self.key = EpochKey(args.seed)  # the epoch of the crops and flips, which FFCV's ops read
        # FFCV sets torch's thread count to its worker count (Compiler.set_num_threads) in its
        # Loader's __init__ and at each epoch's start: the process's own count, taken before, is put
        # back after each (a `--gpus` worker's 1 thread: 2 on 2 processes made each CPU step 5-10x slower)
        self.threads = torch.get_num_threads()
        with kept_torch_threads():
            self.ffcv = self._build(path)

    def _pipelines(self) -> dict:
        spec = self.args.aug
        size = (spec.image_size, spec.image_size)
        to = [ToTensor()] + ([ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else [])
        pipes = {
            "label": [IntDecoder(), *to],
            "index": PipelineSpec("label", decoder=SampleIndexDecoder(), transforms=list(to)),
        }
        # once: one decoder cuts both views; twice: one decode per view (FFCV's stock pipeline's work),
        # each its own pipeline. Each decoder's status is an output of its own, on the host.
        once = self.opts.decode == "once"
        for first, name in enumerate(("image",) if once else ("image", "image2")):
            crops = ResizedCrops(
                size, spec.crop_scale, spec.crop_ratio, self.key, views=2 if once else 1, first_view=first
            )
            flips = FlipViews(self.key, spec.flip_prob, first_view=first)
            pipes[name] = PipelineSpec("image", decoder=crops, transforms=[flips, *to])
            pipes[f"{name}_status"] = PipelineSpec(crops, transforms=[DecodeStatus()])
        return pipes

    def _build(self, path: Path) -> Loader:
        a = self.args
        use_page_cache_manager()  # FFCV's os_cache reader changes a Numba type that compiled code shares
        return Loader(
            str(path),
            batch_size=a.batch_size,
            num_workers=max(1, a.workers),
            os_cache=self.opts.os_cache,
            order=RankShardOrder(a.seed, a.rank, a.world_size),
            distributed=a.world_size > 1,
            seed=a.seed,
            pipelines=self._pipelines(),
            drop_last=True,
            batches_ahead=self.opts.batches_ahead,
        )

    def __len__(self) -> int:
        return len(self.ffcv)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        check_start_step(start_step, len(self))
        self.ffcv.next_epoch = epoch  # FFCV counts its epochs itself, one per __iter__
        self.ffcv.traversal_order.start = start_step * self.args.batch_size

    def _replacements(self, status: np.ndarray) -> torch.Tensor:
        """The row each row of a batch is read from: itself, or for a sample whose image could not be
        read (status: failure code, .beton index; see ResizedCrops) the next row that was read, as
        the other loaders use the next good image. Names each such sample once; stops the run when
        more than MAX_BAD_FRACTION of the images (and more than MAX_BAD_MIN) could not be read, or
        when no image of the batch could."""
        failed = np.flatnonzero(status[:, 0])
        for row in failed:
            code, sample = (int(x) for x in status[row])
            if sample not in self.bad:
                self.bad.add(sample)
                name = self.files[sample]
                log.warning(
                    "skipping unreadable image %d of %s (%sclass %s): %s; using another image of its batch",
                    sample,
                    self.path,
                    "" if name is None else f"file {name}, ",
                    self.classes[self.labels[sample]],
                    FAILURES.get(code, f"failure {code}"),
                )
        bad, n = len(self.bad), self.num_images
        if bad > max(MAX_BAD_MIN, MAX_BAD_FRACTION * n):
            raise DataError(
                f"{bad} of the {n} images in {self.path} could not be decoded (more than "
                f"{MAX_BAD_FRACTION:.0%}): check the data set"
            )
        read = np.flatnonzero(status[:, 0] == 0)
        if not len(read):
            raise DataError(
                f"no image of a batch of {len(status)} from {self.path} could be decoded (images "
                f"{', '.join(str(int(i)) for i in status[:, 1])}): check the data set"
            )
        rows = np.arange(len(status))
        rows[failed] = read[np.searchsorted(read, failed) % len(read)]
        return torch.from_numpy(rows)

    def __iter__(self):
        a = self.args
        epoch = self.ffcv.next_epoch
        self.key.set(epoch)  # before FFCV's epoch thread starts (at the loop below)
        first = epoch * len(self) + self.ffcv.traversal_order.start // a.batch_size  # global step of the first batch
        g = torch.Generator(device=self.device)
        names = list(self.ffcv.pipeline_specs)
        handle_thread_errors(_to_the_consumer)
        try:  # FFCV's page readers (os_cache=0) open it in threads of their own, where its loss hangs the epoch
            open(self.path, "rb").close()
        except OSError as e:
            raise DataError(
                f"cannot read {self.path} at epoch {epoch + 1} ({e.strerror}): was it moved or deleted?"
            ) from e
        for i, batch in enumerate(self.ffcv):
            if isinstance(batch, _ThreadFailed):
                e = batch.error
                raise RuntimeError(f"FFCV's loader thread stopped reading {self.path}: {type(e).__name__}: {e}") from e
            if i == 0:  # FFCV's thread has started (and set its count): the process's own back
                torch.set_num_threads(self.threads)
            out = dict(zip(names, batch, strict=True))
            # seeded by the global step (host state only, no sync): a step draws the same colour pass
            # whichever step its epoch started at
            g.manual_seed(stream_seed(a.seed, first + i, a.rank))
            if self.opts.decode == "once":
                u8, status = out["image"], out["image_status"].numpy()  # N x 2 x S x S x 3; N x 2
            else:  # the two decoders read the same images: a failure is in both statuses
                u8 = torch.cat((out["image"], out["image2"]), dim=1)
                status = np.maximum(out["image_status"].numpy(), out["image2_status"].numpy())
            # On a GPU they arrive as FFCV's device copies; on the CPU they are FFCV's batch buffers,
            # which it reuses a few batches later: copied, so that a batch held by the caller stays whole.
            label, index = (out[k].view(-1) if out[k].is_cuda else out[k].view(-1).clone() for k in ("label", "index"))
            if status[:, 0].any():  # the status is on the host: no device sync
                rows = pinned_copy(self._replacements(status), self.device)
                u8 = u8.to(self.device, non_blocking=True)
                u8, label, index = (t.index_select(0, rows) for t in (u8, label, index))
            # N x 2 x S x S x 3 as 2 x N x 3 x S x S, a view: the torch pass makes floats of it
            # (2N x 3 x S x S in [0, 1]), the triton kernels read it where it lies
            u8 = u8.to(self.device, non_blocking=True).permute(1, 0, 4, 2, 3)
            im_q, im_k = self.augment.from_uint8(u8, g)
            yield Batch(im_q, im_k, label, index)


@dataclass
class _ThreadFailed:
    """What the hook below hands to the consumer of an FFCV epoch whose thread died."""

    error: BaseException


def _to_the_consumer(args: threading.ExceptHookArgs) -> bool:
    """FFCV's epoch thread (EpochIterator.run) catches StopIteration only: any other error there (a
    fault in a pipeline stage) ends the thread after printing its traceback, and the training loop
    then waits on the thread's queue forever, a job that hangs without a word. This handler of
    moco_fast.threads puts the error into that queue instead, in the (slot, batch) form that
    EpochIterator.__next__ returns, and FFCVLoader raises it."""
    t = args.thread
    if not isinstance(t, EpochIterator) or args.exc_value is None:
        return False
    while not t.terminate_event.is_set():  # the consumer stopped reading: nobody is waiting
        try:
            t.output_queue.put((0, _ThreadFailed(args.exc_value)), timeout=0.5)  # slot 0 always exists
            break
        except Full:
            pass
    return True


@register_loader("ffcv")
def build_ffcv_loader(args: LoaderArgs) -> FFCVLoader:
    return FFCVLoader(args)
