"""Random tensors made once on the device: measures the trainer alone, with no data cost."""

from __future__ import annotations

import torch

from . import register_loader
from .base import Batch, LoaderArgs, check_start_step
from .options import parse_loader_options

# what train and bench/throughput.py say of a --data given with --loader synthetic (format: the path)
DATA_UNREAD = "--loader synthetic makes its own images: --data %s is not read"


class SyntheticLoader:
    starts_mid_epoch = True

    def __init__(self, args: LoaderArgs):
        self.args = args
        self.start_step = 0
        self.classes = [str(i) for i in range(10)]
        self.splits = None  # no image folder
        self.num_images = args.batch_size * args.synthetic_steps * args.world_size
        g = torch.Generator(device="cpu").manual_seed(args.seed + args.rank)
        shape = (args.batch_size, 3, args.aug.image_size, args.aug.image_size)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format

        def view() -> torch.Tensor:
            return torch.randn(shape, generator=g).to(args.device, args.dtype).contiguous(memory_format=fmt)

        start = args.rank * args.batch_size
        self.batch = Batch(
            view(),
            view(),
            torch.randint(len(self.classes), (args.batch_size,), generator=g).to(args.device),
            torch.arange(start, start + args.batch_size).to(args.device),
        )

    def __len__(self) -> int:
        return self.args.synthetic_steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        check_start_step(start_step, len(self))
        self.start_step = start_step  # every step's batch is the same: only the count changes

    def __iter__(self):
        for _ in range(self.start_step, len(self)):
            yield self.batch


@register_loader("synthetic")
def build_synthetic_loader(args: LoaderArgs) -> SyntheticLoader:
    parse_loader_options("synthetic", args.options)
    return SyntheticLoader(args)
