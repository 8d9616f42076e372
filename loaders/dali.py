"""The DALI backend: `moco-fast train --loader dali`, two MoCo views decoded and augmented by DALI.

On a GPU the JPEGs are decoded on the card ("mixed": nvJPEG, with the hardware decoder of
A100/H100-class cards taking `hw_decoder_load` of them) and every augmentation runs there; DALI
prepares `prefetch` batches ahead on its own CUDA stream while the step runs, and the views reach
torch through DLPack without a copy. On the CPU (`--device cpu`) the same graph runs in DALI's
CPU-only mode (`device_id=None`). The graph itself lives in `dali_pipeline.py`.

Sources (`--data`):
- an image folder (class subfolders, as `moco_fast.data.load_splits` reads it): the file list is
  built and checked there, bad files named and skipped; files of a kind DALI's decoder does not read
  (GIF, ...) are then left out, in one warning (`decodable_images`); `index` = position in that list;
- a WebDataset shard set: a folder with `meta.json` (the contract is in `wds.py`); each shard and
  its index are checked when the set is opened (`wds.shard_index`), and what DALI's reader still
  raises about a shard is one DataError naming it (`_unreadable_shard`).

Options (`--loader-option KEY=VALUE`):
    hw_decoder_load  share of JPEGs for the hardware decoder, 0-1 (default 0.9: 17,500 img/s of
                     two-view v2 batches on an H200, against 16,000 at DALI's default 0.65, by
                     a DALI pipeline other than this loader: ../shared/device/README.md)
    threads          DALI CPU threads (default: the resolved --workers, at least 1; at most 8 a core,
                     as --workers)
    prefetch         batches prepared ahead, 1-32 (default 2)
    decoder          auto | mixed | cpu (auto: mixed on a GPU, cpu without one)
    shuffle_buffer   samples in the shard reader's shuffle buffer (default 1024; shard sets only)

Epochs and ranks: every rank runs floor(num_images / world_size / batch_size) steps per epoch. For
a folder, each epoch is the torch loader's permutation (`EpochShardSampler`: the same on every rank,
cut into equal rank slices; the remainder waits for another epoch's permutation). DALI streams
across epoch ends, so the next epoch's first batches are already prepared when one ends; an epoch
resumed at a step starts its stream there (`set_epoch(epoch, start_step)`). For shards,
DALI's reader gives each rank its own share of the samples (`shard_id` = rank) and shuffles in a
buffer; each epoch starts a new reader stream (seeded by the epoch), which reads on past the end of
the rank's share when needed, so the same step count holds on every rank. Its order lives inside
DALI, whose reader starts at a shard's first sample only: a run on shards saves at epoch ends only
(`starts_mid_epoch` False).
Augmentation seeds differ per rank and per starting point: (seed, rank, first step of the stream).

A corrupt image does not stop a run: when DALI fails on a batch, the loader finds the file (named in
DALI's error, or found by decoding the files of the batches in flight one by one), logs it by name,
replaces it by the next good file of the epoch and rebuilds the pipeline at the same step. In a shard
set, the sample (named by DALI, or found by replaying the failed pipeline's reader up to the batches
in flight and decoding those one by one) is dropped from its shard's index the same way (`dali_recovery.py`). A run gives
up only when more than MAX_BAD_FRACTION of its images (and more than MAX_BAD_MIN) cannot be decoded.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter, deque
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from moco_fast.config import ConfigError
from moco_fast.data import DataError, DataSplits, ImageList
from moco_fast.image_dataset import MAX_BAD_FRACTION, MAX_BAD_MIN
from moco_fast.metrics import progress

from . import register_loader
from .base import Batch, LoaderArgs, check_one_batch, check_start_step, listed_splits, pinned_copy, stream_seed
from .dali_pipeline import PipelineSettings, decodable, folder_pipeline, wds_pipeline
from .dali_recovery import SkipsBadSamples, path_bytes
from .options import DaliOptions, parse_loader_options
from .torch_loader import EpochShardSampler
from .wds import WdsMeta, index_text, is_wds_root, read_meta, shard_index, split_name

log = logging.getLogger("moco_fast")
SHOW_LEFT_OUT = 5  # files or shards named in a warning on those left out or indexed again


def decodable_images(images: ImageList) -> ImageList:
    """`images` less the files of a kind DALI's decoder does not read (GIF, TGA, 1-bit TIFF, ...: see
    `dali_pipeline.DECODABLE`), named in one warning before the run.

    The list was checked with PIL, which reads more kinds than DALI: left in, each such file would
    fail in the decoder mid-epoch, be hunted down as corrupt, and count toward MAX_BAD_FRACTION (a set
    with 11% GIFs stopped late in its first epoch). A list built without the check has no kinds:
    it is used as it is, and the decoder's failures are found during the run."""
    if not images.kinds:
        return images
    keep = [i for i, kind in enumerate(images.kinds) if decodable(kind)]
    if len(keep) == len(images):
        return images
    out = [i for i, kind in enumerate(images.kinds) if not decodable(kind)]
    counts = Counter(images.kinds[i] for i in out)
    named = [os.path.relpath(images.files[i], images.root) for i in out[:SHOW_LEFT_OUT]]
    more = f" and {len(out) - len(named)} more" if len(out) > len(named) else ""
    log.warning(
        "--loader dali leaves out %d of %d images in %s, of kinds its decoder does not read (%s): %s%s. "
        "To train on them, convert the folder (`moco-fast convert %s DST --format wds` stores every image "
        "as a JPEG) or use --loader torch",
        len(out),
        len(images),
        images.root,
        ", ".join(f"{n} {kind}" for kind, n in counts.most_common()),
        ", ".join(named),
        more,
        images.root,
    )
    if not keep:
        raise DataError(
            f"none of the {len(images)} images in {images.root} is of a kind DALI's decoder reads "
            "(JPEG, PNG, BMP, TIFF, JPEG 2000, WebP, PNM): convert the folder (moco-fast convert "
            "--format wds) or use --loader torch"
        )
    reason = "a kind DALI's decoder does not read ({}): --loader dali leaves it out"
    return images.keeping(keep, [(images.files[i], reason.format(images.kinds[i])) for i in out])


class FolderSource:
    """DALI's external source: one batch of (file path bytes, label, index) per iteration, following
    the epoch permutations of `EpochShardSampler`. Iteration i of a pipeline started at `start_step`
    is global step start_step + i, so a rebuilt pipeline picks up exactly where the old one stopped."""

    def __init__(self, images: ImageList, batch_size: int, seed: int, rank: int, world_size: int):
        self.files, self.labels = images.files, images.labels
        self.batch_size = batch_size
        self.sampler = EpochShardSampler(len(images), seed, rank, world_size)
        self.steps = len(self.sampler) // batch_size
        self.bad: set[int] = set()  # found undecodable during the run
        self.start_step = 0
        self.fed: dict[int, list[int]] = {}  # global step -> indices handed to DALI, not yet consumed
        self._order: tuple[int, list[int]] = (-1, [])

    def epoch_order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._order = (epoch, list(self.sampler))
        return self._order[1]

    def _good(self, order: list[int], j: int) -> int:
        for t in range(len(order)):  # an unreadable file is replaced by the next good one
            k = order[(j + t) % len(order)]
            if k not in self.bad:
                return k
        raise DataError("no image of this rank's share could be decoded")

    def __call__(self, iteration: int):
        step = self.start_step + iteration
        epoch, i = divmod(step, self.steps)
        order = self.epoch_order(epoch)
        idx = [self._good(order, j) for j in range(i * self.batch_size, (i + 1) * self.batch_size)]
        self.fed[step] = idx
        return (
            [path_bytes(self.files[k]) for k in idx],
            [np.array(self.labels[k], np.int64) for k in idx],
            [np.array(k, np.int64) for k in idx],
        )

    def in_flight(self, consumed: int) -> list[list[int]]:
        return [v for s, v in sorted(self.fed.items()) if s >= consumed]


class WdsSource:
    """A shard set: DALI index files (made in a temporary folder when missing) and the map from a
    sample's (shard path, key) to its position in the set."""

    def __init__(self, meta: WdsMeta):
        self.meta = meta
        self.tmp = tempfile.TemporaryDirectory(prefix="moco-fast-wds-")
        shards = meta.shard_paths()
        self.paths = [str(p) for p in shards]
        self.index_paths: list[str] = []
        self.position: dict[str, dict[str, int]] = {}
        self.keys: dict[str, list[str]] = {}
        n = 0
        remade: list[str] = []  # why a shard's own index was not used
        bar = progress(total=len(shards), desc="shard indexes", enabled=len(shards) > 8)
        for i, tar in enumerate(shards):
            # checked against the tar; made again when missing or wrong (numbered: shards in different
            # folders may share a name)
            idx, keys, why = shard_index(tar, Path(self.tmp.name) / f"{i:06d}-{tar.stem}.idx")
            if why:
                remade.append(why)
            self.index_paths.append(str(idx))
            self.keys[str(tar)] = keys
            self.position[str(tar)] = {k: n + i for i, k in enumerate(keys)}
            n += len(keys)
            bar.update(1)
        bar.close()
        if remade:
            more = f"; and {len(remade) - SHOW_LEFT_OUT} more" if len(remade) > SHOW_LEFT_OUT else ""
            log.warning(
                "%d shard index(es) in %s do not match their tars, made again from the tars (in a temporary "
                "folder): %s%s",
                len(remade),
                meta.root,
                "; ".join(remade[:SHOW_LEFT_OUT]),
                more,
            )
        self.num_images = n
        self.dropped = 0  # samples taken out of the indexes during the run
        if n != meta.num_images:
            self._short_shards(n)

    def _short_shards(self, n: int) -> None:
        """The shards hold another number of samples than meta.json says: a shard cut short between
        two samples (an interrupted copy) reads as a shorter shard. Named where meta.json records the
        sizes; a run stops, as on unreadable images, when more than MAX_BAD_FRACTION are missing."""
        meta = self.meta
        short = ""
        if meta.shard_sizes is not None:
            cut = [
                f"{s} holds {len(self.keys[str(p)])} of {want}"
                for s, p, want in zip(meta.shards, meta.shard_paths(), meta.shard_sizes)
                if len(self.keys[str(p)]) < want
            ]
            more = f"; and {len(cut) - SHOW_LEFT_OUT} more" if len(cut) > SHOW_LEFT_OUT else ""
            short = f" ({'; '.join(cut[:SHOW_LEFT_OUT])}{more})" if cut else ""
        missing = meta.num_images - n
        if missing > max(MAX_BAD_MIN, MAX_BAD_FRACTION * meta.num_images):
            raise DataError(
                f"{meta.root} says {meta.num_images} images, the shards hold {n}{short}: more than "
                f"{MAX_BAD_FRACTION:.0%} are missing (a shard cut short by an interrupted copy?); copy the "
                "set again or rewrite it (moco-fast convert --format wds --force)"
            )
        log.warning("%s says %d images, the shards hold %d%s: using %d", meta.root, meta.num_images, n, short, n)

    def labels_and_indices(self, cls) -> np.ndarray:
        """DALI's raw `.cls` batch (CPU) -> int64 2 x N (labels, indices). Host work, no device sync."""
        out = np.empty((2, len(cls)), np.int64)
        for i in range(len(cls)):
            t = cls[i]
            path, _, member = t.source_info().rsplit(":", 2)
            out[1, i] = self.position[path][split_name(member)[0]]
            text = bytes(np.array(t)).strip()
            if not text.isdigit():
                raise DataError(f"{t.source_info()}: the label must be an ASCII integer, got {text[:20]!r}")
            out[0, i] = int(text)
        if out[0].max() >= len(self.meta.classes):
            raise DataError(f"a label in {self.meta.root} is >= the {len(self.meta.classes)} classes of meta.json")
        return out

    def drop(self, path: str, key: str) -> None:
        """Rewrite `path`'s index without sample `key` (its position stays reserved)."""
        i = self.paths.index(path)
        idx = Path(self.index_paths[i])
        lines = idx.read_text().splitlines()
        kept = [line for line in lines[1:] if split_name(line.split()[3])[0] != key]
        new = Path(self.tmp.name) / f"{i:06d}-{Path(path).stem}.{len(kept)}.idx"
        self.dropped += 1
        new.write_text(index_text(kept))
        self.index_paths[i] = str(new)


class DaliLoader(SkipsBadSamples):
    def __init__(self, args: LoaderArgs):
        self.args = args
        self.opts: DaliOptions = parse_loader_options("dali", args.options)
        dev = args.device
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"--loader dali runs on cuda or cpu, not {dev.type}")
        gpu = dev.type == "cuda"
        self.opts.check_device(gpu)
        self.settings = PipelineSettings(
            batch_size=args.batch_size,
            device_id=(dev.index if dev.index is not None else torch.cuda.current_device()) if gpu else None,
            threads=self.opts.threads or max(1, args.workers),
            prefetch=self.opts.prefetch,
            seed=0,  # set per stream in _start
            gpu_decode=gpu and self.opts.decoder != "cpu",
            hw_decoder_load=self.opts.hw_decoder_load,
            half=args.dtype in (torch.float16, torch.bfloat16),
            channels_last=args.channels_last,
        )
        if is_wds_root(args.data):
            self.wds: WdsSource | None = WdsSource(read_meta(args.data))
            self.folder: FolderSource | None = None
            self.splits: DataSplits | None = None
            self.num_images, self.classes = self.wds.num_images, self.wds.meta.classes
        else:
            if "shuffle_buffer" in args.options:  # a folder's order is EpochShardSampler's: it would do nothing
                raise ConfigError(
                    "--loader-option shuffle_buffer is for a shard set (--data holding meta.json); an image "
                    "folder is shuffled whole each epoch: leave it out"
                )
            self.splits = listed_splits(args)
            images = decodable_images(self.splits.train)  # the kNN monitor still reads them all (PIL)
            self.wds, self.folder = None, FolderSource(images, args.batch_size, args.seed, args.rank, args.world_size)
            self.num_images, self.classes = len(images), images.classes
        check_one_batch(self.num_images, args)
        self.steps = self.num_images // args.world_size // args.batch_size
        self.epoch = 0
        self.start_step = 0
        # a shard set's order lives in DALI's reader, which starts at a shard's first sample only
        self.starts_mid_epoch = self.folder is not None
        self._pipe = None
        self._consumed = 0  # global steps taken out of the pipeline stream
        self._stream: tuple[int, PipelineSettings] = (0, self.settings)  # the pipeline's first step, settings
        self._held: deque = deque()  # (CUDA event, DALI outputs) still read by queued GPU work

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        check_start_step(start_step, len(self))
        if start_step and not self.starts_mid_epoch:
            raise ValueError("DALI on a shard set starts an epoch at its first step only")
        self.epoch, self.start_step = epoch, start_step

    def _start(self, step: int) -> None:
        """(Re)build the pipeline so that its first batch is global step `step`."""
        self._pipe = None  # free the old pipeline's threads and buffers first
        s = replace(self.settings, seed=stream_seed(self.args.seed, step, self.args.rank) % (2**31 - 1))
        if self.folder is not None:
            self.folder.start_step = step
            self.folder.fed.clear()
            self._pipe = folder_pipeline(self.folder, self.args.aug, s)
        else:
            a = self.args
            w = self.wds
            self._pipe = wds_pipeline(w.paths, w.index_paths, self.opts.shuffle_buffer, a.rank, a.world_size, a.aug, s)
        try:
            self._pipe.build()  # DALI's shard reader opens the shards and checks the indexes here
        except RuntimeError as e:
            self._pipe = None
            if (error := self._unreadable_shard(str(e))) is None:
                raise
            raise error from e
        self._consumed = step
        self._stream = (step, s)

    def __iter__(self):
        first = self.epoch * self.steps + self.start_step
        # A folder stream must sit at this epoch's first step (a new run, a resume, or an epoch cut
        # short) and then runs on into the next epoch. A shard stream starts afresh each epoch (the
        # reader's shuffle seeded by the epoch's first step): a resumed run reads what an
        # uninterrupted one does, and finding a bad sample replays at most one epoch.
        if self._pipe is None or self._consumed != first or (self.wds is not None and self._stream[0] != first):
            self._start(first)
        for _ in range(self.start_step, self.steps):
            outs = self._run()
            self._consumed += 1
            if self.folder is not None:
                self.folder.fed.pop(self._consumed - 1, None)
            try:
                yield self._to_batch(outs)
            finally:  # also when the consumer stops early: its last step may still be queued
                self._hold(outs)

    def _run(self):
        while True:
            try:
                return self._pipe.run()
            except RuntimeError as e:  # DALI: "Current pipeline object is no longer valid"
                self._pipe = None
                if not self._skip_culprits(str(e)):
                    if (error := self._unreadable_shard(str(e))) is None:
                        raise
                    raise error from e
                bad = len(self.folder.bad) if self.folder is not None else self.wds.dropped
                if bad > max(MAX_BAD_MIN, MAX_BAD_FRACTION * self.num_images):
                    raise DataError(
                        f"{bad} of {self.num_images} images could not be decoded (more than "
                        f"{MAX_BAD_FRACTION:.0%}): check the data set"
                    ) from e
                self._start(self._consumed)

    def _to_batch(self, outs) -> Batch:
        a = self.args
        q, k = (self._view(t) for t in outs[:2])
        if self.folder is not None:
            label, index = (torch.from_dlpack(t.as_tensor()) for t in outs[2:])
        else:
            li = pinned_copy(torch.from_numpy(self.wds.labels_and_indices(outs[2])), a.device)
            label, index = li[0], li[1]
        return Batch(q, k, label, index)

    def _view(self, tl) -> torch.Tensor:
        # DALI's buffer as a torch tensor, no copy. torch.from_dlpack passes torch's current stream,
        # and DALI makes that stream wait for the batch (an event, not a host sync).
        x = torch.from_dlpack(tl.as_tensor())  # N x H x W x 3 (or N x 3 x H x W)
        if self.args.channels_last:
            x = x.permute(0, 3, 1, 2)  # N x 3 x H x W with channels-last strides: a view
        if x.dtype != self.args.dtype:
            x = x.to(self.args.dtype)  # bfloat16: DALI emits float16, one cast kernel keeps the layout
        return x

    def _hold(self, outs) -> None:
        """Keep DALI's output buffers alive until the GPU has run the step that read them.

        Called once the trainer has queued its step: DALI could otherwise reuse a buffer on its own
        stream while the step's kernels are still waiting to read it. Events are polled, not waited on."""
        if self.args.device.type != "cuda":
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.args.device))
        self._held.append((ev, outs))
        while self._held and self._held[0][0].query():
            self._held.popleft()


@register_loader("dali")
def build_dali_loader(args: LoaderArgs) -> DaliLoader:
    return DaliLoader(args)
