"""What the DALI test files share (not a test module: pytest does not collect it): the specs that
make one property measurable and a DALI loader in CPU-only mode."""

from __future__ import annotations

from dataclasses import replace

import torch
from moco_fast.loaders import LoaderArgs, create_loader

from moco_fast.augment import MOCO_V2

CPU = torch.device("cpu")

COLOUR = MOCO_V2.with_size(32)  # the whole v2 recipe; crop, flip and blur leave a flat image as it is
BLUR = replace(
    MOCO_V2,
    image_size=32,
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    jitter_prob=0.0,
    gray_prob=0.0,
    flip_prob=0.0,
    blur_sigma=(1.5, 1.5),
)
IDENTITY = replace(BLUR, blur_prob=0.0)


def dali_loader(data, spec, device=CPU, batch_size=8, **kw):
    args = LoaderArgs(str(data), spec, batch_size=batch_size, device=device, workers=2, **kw)
    return create_loader("dali", args)
