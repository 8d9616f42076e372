"""FFCV backend: `.beton` files (written by `moco-fast convert SRC X.beton --format ffcv`).

The CPU work runs in FFCV's compiled Numba pipeline, in threads: each JPEG is decoded once and cut
into two independent random resized crops with MoCo's scale and ratio (`TwoViewResizedCrop`), and
each view is flipped on its own (`TwoViewFlip`). Colour jitter, grayscale and blur of both views
then run in one batched pass of `moco_fast.kernels.augment_gpu` on the training device (on a CPU
run: the CPU), followed by normalisation into the trainer's dtype and memory format.

Order: the same per-epoch permutation as the torch loader (seeded by `seed` and the epoch), cut into
equal rank shards when `world_size > 1` (FFCV's `distributed=True`; every rank runs the same number
of steps). The crops are drawn by Numba's RNG, which FFCV does not seed.

Differs from torchvision: a crop is resized by FFCV's `resize_crop`, which is OpenCV's INTER_AREA
(checked against cv2.resize, exactly equal), where torchvision uses antialiased bilinear; and the
pixels are the JPEG that `convert` re-encoded (`--jpeg-quality`, default 90), not the source file.

Backend options (`--loader-option KEY=VALUE`):
    os_cache=1          map the file through the OS page cache (best when it fits in RAM, and shared
                        by the processes of a machine); 0: FFCV's own process cache
    batches_ahead=3     batches FFCV prepares ahead of the one in use
    jitter_order=sample ColorJitter order per image as torchvision (sample) or one per batch (batch:
                        cheaper, see kernels/augment_gpu.py)
    decode=once         once: one JPEG decode for both views; twice: FFCV's stock
                        RandomResizedCropRGBImageDecoder and flip, one pipeline per view
The sidecar `X.beton.json` (written by convert) holds the class names; without it classes are the
label numbers. A .beton from another writer needs the field types convert writes: `image` an
RGBImageField, `label` an IntField.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import BasicDecoder, IntDecoder
from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from moco_fast.config import ConfigError
from moco_fast.convert import sidecar_path
from moco_fast.data import DataError

from . import register_loader
from .base import Batch, DeviceAugment, LoaderArgs, parse_options, stream_seed
from .torch_loader import EpochShardSampler

log = logging.getLogger("moco_fast")


# ---- FFCV operations (each declares its output state apart from the code that computes it) -------


class TwoViewResizedCrop(RandomResizedCropRGBImageDecoder):
    """Decode each image once and cut two independent random resized crops: N x 2 x S x S x 3 uint8.

    The code is FFCV's RandomResizedCropRGBImageDecoder with a second crop from the same decoded
    buffer, which halves the decode work of a two-view pipeline."""

    def declare_state_and_memory(self, previous_state):
        state, (_, temp) = super().declare_state_and_memory(previous_state)
        shape = (2, self.output_size[0], self.output_size[1], 3)
        return replace(state, shape=shape), (AllocationQuery(shape, np.dtype("<u1")), temp)

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(self.get_crop_generator)
        scale, ratio = np.array(self.scale), np.array(self.ratio)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == 0:  # jpg
                    buf = temp_storage[dst_ix]
                    imdecode_c(image_data, buf, height, width, height, width, 0, 0, 1, 1, False, False)
                    buf = buf.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:  # raw pixels
                    buf = image_data.reshape(height, width, 3)
                for v in range(2):
                    i, j, h, w = get_crop_c(height, width, scale, ratio)
                    resize_crop_c(buf, i, i + h, j, j + w, destination[dst_ix, v])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class TwoViewFlip(Operation):
    """Flip each view of N x 2 x S x S x 3 horizontally with probability p, independently."""

    def __init__(self, flip_prob: float = 0.5):
        super().__init__()
        self.flip_prob = flip_prob

    def generate_code(self):
        my_range = Compiler.get_iterator()
        p = self.flip_prob

        def flip(images, dst):
            should = np.random.rand(images.shape[0], 2) < p
            for i in my_range(images.shape[0]):
                for v in range(2):
                    if should[i, v]:
                        dst[i, v] = images[i, v, :, ::-1]
                    else:
                        dst[i, v] = images[i, v]
            return dst

        flip.is_parallel = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class SampleIndexDecoder(BasicDecoder):
    """Reads no data: yields each sample's position in the .beton (MoCo's memory bank needs it)."""

    dtype = np.dtype("<i8")

    def generate_code(self):
        def decoder(indices, destination, metadata, storage_state):
            for ix in range(len(indices)):
                destination[ix, 0] = indices[ix]
            return destination[: len(indices)]

        return decoder


class RankShardOrder(TraversalOrder):
    """The torch loader's per-epoch permutation (seed, epoch), this rank's equal shard of it.

    FFCV builds its traversal order by calling the object it is given with the loader; an instance
    returns itself, so the rank and world size come from us, not from torch.distributed."""

    def __init__(self, seed: int, rank: int, world_size: int):
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __call__(self, loader):
        self.sampler = EpochShardSampler(len(loader.indices), self.seed, self.rank, self.world_size)
        return self

    def sample_order(self, epoch: int):
        self.sampler.set_epoch(epoch)
        return np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.sampler))


# ---- options, class names, the loader ---------------------------------------------------------


@dataclass
class FFCVOptions:
    os_cache: bool = True
    batches_ahead: int = 3
    jitter_order: str = "sample"
    decode: str = "once"

    @classmethod
    def parse(cls, options: dict[str, str]) -> FFCVOptions:
        out = parse_options(cls, options, "ffcv")
        if out.jitter_order not in ("sample", "batch"):
            raise ConfigError(f"ffcv loader option jitter_order must be sample or batch, got {out.jitter_order!r}")
        if out.decode not in ("once", "twice"):
            raise ConfigError(f"ffcv loader option decode must be once or twice, got {out.decode!r}")
        if out.batches_ahead < 1:
            raise ConfigError("ffcv loader option batches_ahead must be at least 1")
        return out


def read_classes(beton: Path, labels: np.ndarray) -> list[str]:
    """Class names from the sidecar written by convert; else the label numbers."""
    side = sidecar_path(beton)
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
            classes = [str(c) for c in meta["classes"]]
            if meta.get("num_images") not in (None, len(labels)):
                raise ValueError(f"it describes {meta['num_images']} images, the .beton holds {len(labels)}")
            if len(classes) >= n_labels:
                return classes
            raise ValueError(f"{len(classes)} classes but labels up to {n_labels - 1}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s: %s", side, e)
    return [str(i) for i in range(n_labels)]


class FFCVLoader:
    def __init__(self, args: LoaderArgs):
        if args.data is None:
            raise DataError("--loader ffcv needs --data X.beton (make one with `moco-fast convert SRC X.beton`)")
        path = Path(args.data)
        if not path.is_file():
            raise DataError(f"--loader ffcv: --data must be a .beton file, {path} is not a file")
        self.args = args
        self.opts = FFCVOptions.parse(args.options)
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
        self.num_images = reader.num_samples
        self.classes = read_classes(path, reader.metadata[f"f{names.index('label')}"])
        if self.num_images // args.world_size < args.batch_size:
            raise DataError(
                f"{self.num_images} images give fewer than one batch of {args.batch_size} per process: lower --batch-size"
            )
        self.augment = DeviceAugment(args, self.opts.jitter_order, flip=False)  # FFCV flipped already
        self.ffcv = self._build(path)

    def _pipelines(self) -> dict:
        spec = self.args.aug
        size = (spec.image_size, spec.image_size)
        to = [ToTensor()] + ([ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else [])
        pipes = {
            "label": [IntDecoder(), *to],
            "index": PipelineSpec("label", decoder=SampleIndexDecoder(), transforms=list(to)),
        }
        if self.opts.decode == "once":
            pipes["image"] = [
                TwoViewResizedCrop(size, scale=spec.crop_scale, ratio=spec.crop_ratio),
                TwoViewFlip(spec.flip_prob),
                *to,
            ]
        else:  # FFCV's stock decoder twice on the same field: one pipeline per view
            for name in ("image", "image2"):
                ops = [
                    RandomResizedCropRGBImageDecoder(size, scale=spec.crop_scale, ratio=spec.crop_ratio),
                    RandomHorizontalFlip(spec.flip_prob),
                    *to,
                ]
                pipes[name] = ops if name == "image" else PipelineSpec("image", decoder=ops[0], transforms=ops[1:])
        return pipes

    def _build(self, path: Path) -> Loader:
        a = self.args
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

    def set_epoch(self, epoch: int) -> None:
        self.ffcv.next_epoch = epoch  # FFCV counts its epochs itself, one per __iter__

    def _views(self, out: dict) -> torch.Tensor:
        """uint8 views from FFCV -> float 2N x 3 x S x S in [0, 1] on the device, view 1 then view 2."""
        if self.opts.decode == "once":
            u8 = out["image"]  # N x 2 x S x S x 3
        else:
            u8 = torch.stack((out["image"], out["image2"]), dim=1)
        u8 = u8.to(self.device, non_blocking=True)
        n, _, s, _, _ = u8.shape
        return u8.permute(1, 0, 4, 2, 3).reshape(2 * n, 3, s, s).float().div_(255.0)

    def __iter__(self):
        a = self.args
        epoch = self.ffcv.next_epoch
        g = torch.Generator(device=self.device).manual_seed(stream_seed(a.seed, epoch, a.rank))
        # FFCV sets torch's thread count to its worker count (Compiler.set_num_threads); a CPU run
        # wants its own back once FFCV's thread has started.
        threads = torch.get_num_threads()
        names = list(self.ffcv.pipeline_specs)
        for i, batch in enumerate(self.ffcv):
            if i == 0:
                torch.set_num_threads(threads)
            out = dict(zip(names, batch, strict=True))
            im_q, im_k = self.augment(self._views(out), g)  # from 2N x 3 x S x S in [0, 1]
            # On a GPU they arrive as FFCV's device copies; on the CPU they are FFCV's batch buffers,
            # which it reuses a few batches later: copied, so that a batch held by the caller stays whole.
            label, index = (out[k].view(-1) if out[k].is_cuda else out[k].view(-1).clone() for k in ("label", "index"))
            yield Batch(im_q, im_k, label, index)


@register_loader("ffcv")
def build_ffcv_loader(args: LoaderArgs) -> FFCVLoader:
    return FFCVLoader(args)
