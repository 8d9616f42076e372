"""`moco-fast knn`: weighted kNN accuracy of a checkpoint's features."""

from __future__ import annotations

import argparse
import logging
import math

from moco_fast.commands import (
    ARCH_HELP,
    CHECKPOINT_HELP,
    HelpFormatter,
    add_eval_runtime_flags,
    require,
    resolve_checkpoint,
    resolve_eval_runtime,
)
from moco_fast.config import MAX_IMAGE_SIZE, check_at_least, check_image_size

log = logging.getLogger("moco_fast")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "knn",
        help="weighted kNN accuracy of a checkpoint (k=200, t=0.1)",
        description="Weighted kNN (Wu et al. 2018) on L2-normalised features: the train split is the memory, "
        "val/ the queries (test/ where there is no val/). Prints the two splits used, then top-1.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--arch", help=ARCH_HELP)
    p.add_argument("--data", help="a root with train/ and val/ or test/ (default: the demo set)")
    p.add_argument(
        "--image-size",
        type=int,
        help=f"eval crop size, 8..{MAX_IMAGE_SIZE} (default: the checkpoint's training size; a state dict or an "
        "official checkpoint, which have none: 224, or the CIFAR preset's 32 for a CIFAR stem)",
    )
    p.add_argument("--k", type=int, default=200, help="neighbours (at least 1)")
    p.add_argument("--t", type=float, default=0.1, help="temperature of the neighbour weights (above 0, finite)")
    p.add_argument(
        "--features",
        choices=["backbone", "head", "both"],
        default="backbone",
        help="pooled backbone features, the MoCo head's output, or both (a torchvision state dict has no head)",
    )
    add_eval_runtime_flags(p, workers=2, seed=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moco_fast.backbone import check_arch
    from moco_fast.checkpoint import load_model
    from moco_fast.data import DataError, load_splits
    from moco_fast.foreign import has_head
    from moco_fast.knn import knn_score, warn_if_single_class

    # Every value is checked before the checkpoint or the data is read.
    check_at_least("--k", args.k, 1)
    # inf too, as train's --knn-t: every weight exp(s/t) is then 1, a plain vote that --t never meant
    require(0 < args.t < math.inf, f"--t must be above 0 and finite (got {args.t})")
    if args.image_size is not None:  # None: the checkpoint's training size
        check_image_size(args.image_size)
    check_arch(args.arch)
    device = resolve_eval_runtime(args)
    path = resolve_checkpoint(args.checkpoint)
    model, cfg = load_model(path, device, arch=args.arch)
    names = ["backbone", "head"] if args.features == "both" else [args.features]
    if not has_head(model):  # a torchvision state dict: no MoCo head, no head figures
        require(args.features != "head", f"--features head: {path} has no MoCo head; use --features backbone")
        if args.features == "both":
            log.warning("%s has no MoCo head: backbone figures only", path)
        names = ["backbone"]
    splits = load_splits(args.data, labelled=True)  # a class folder linked to another is an error
    if splits.eval is None:
        raise DataError("kNN needs an eval split: a data root holding train/ and val/ or test/")
    warn_if_single_class(splits.train)
    # a file without a recipe is read at 224 px (foreign.py): an export of a 32 px run can be scored
    # at its own size (the demo set at 224 px costs ~50x the compute of 32 px)
    aug = cfg.data.aug if args.image_size is None else cfg.data.aug.with_size(args.image_size)
    nets = {"backbone": model.backbone(), "head": model.encoder_q}
    for i, name in enumerate(names):
        with torch.no_grad():
            score = knn_score(
                nets[name],
                splits.train,
                splits.eval,
                aug,
                device,
                args.k,
                args.t,
                args.batch_size,
                args.workers,
            )
        if i == 0:
            # which split was scored (val/ before test/), and the images used: the decodable ones, not
            # the listing's count (a truncated JPEG passes its header check and is left out here)
            print(
                f"kNN memory: {score.memory} images of {splits.train.root}; "
                f"queries: {score.queries} of {splits.eval.root}"
            )
        print(f"kNN top-1 ({name}, k={score.k}, t={args.t:g}): {score.top1:.2f}%")
    return 0
