"""`moco-fast lincls`: the linear classification protocol on a frozen backbone."""

from __future__ import annotations

import argparse
from pathlib import Path

from moco_fast.commands import (
    ARCH_HELP,
    CHECKPOINT_HELP,
    HelpFormatter,
    accuracy_text,
    add_epoch_loop_flags,
    add_eval_runtime_flags,
    check_classifier_args,
    check_output,
    dataclass_from_args,
    eval_images_of,
    resolve_checkpoint,
    resolve_eval_runtime,
    result_of,
)
from moco_fast.config import MAX_IMAGE_SIZE
from moco_fast.text import plural


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lincls",
        help="linear classification on the frozen backbone (the paper's protocol)",
        description="The MoCo linear classification protocol: the backbone is frozen in eval mode, one linear "
        "layer trains on its pooled features (SGD, momentum 0.9, lr 30, weight decay 0, 100 epochs, x0.1 at "
        "epochs 60 and 80). Train views: random resized crop + flip; evaluation: center crop; reports top-1 and "
        "top-5 and writes them as JSON. Image size and normalisation come from the checkpoint's training "
        "recipe (MoCo v2's, 224 px, for an official MoCo checkpoint or a torchvision state dict). At the end "
        "the backbone is compared with the checkpoint and the run fails if it changed.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--arch", help=ARCH_HELP)
    p.add_argument("--data", help="a root with train/ and val/ or test/ class folders (default: the demo set)")
    p.add_argument("--epochs", type=int, default=100, help="training epochs of the linear layer")
    p.add_argument("--lr", type=float, default=30.0, help="not scaled with the batch size (official lincls)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay")
    p.add_argument("--schedule", default="60,80", help="epochs where the lr drops x0.1, or 'cos' for half-cosine")
    p.add_argument(
        "--image-size", type=int, help=f"crop size, 8..{MAX_IMAGE_SIZE} (default: the checkpoint's training size)"
    )
    p.add_argument(
        "--cached-features",
        action="store_true",
        help="extract center-crop features once and train on them (fast, but no augmentation: not the protocol)",
    )
    add_eval_runtime_flags(p, amp_help="autocast of the backbone")
    add_epoch_loop_flags(p, "lincls")
    p.add_argument(
        "--out",
        help="result JSON (default: lincls.json beside the checkpoint; NAME.lincls.json beside a checkpoint file "
        "not named checkpoint.pt, e.g. moco_v2_800ep_pretrain.lincls.json)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moco_fast.backbone import check_arch
    from moco_fast.classifier_epochs import check_state
    from moco_fast.lincls import PROTOCOL, LinclsConfig, run_lincls
    from moco_fast.run_folder import LINCLS_RESULT, hold_output, result_beside

    # Every value is checked, and the result's folder tried, before the checkpoint or the data is read.
    check_classifier_args(args)
    check_arch(args.arch)
    resolve_eval_runtime(args)
    args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    out = args.out or result_beside(args.checkpoint, LINCLS_RESULT)
    args.out = str(check_output(out, "--out", inputs=(args.checkpoint,), replaces=result_of("lincls", PROTOCOL)))
    cfg = dataclass_from_args(LinclsConfig, args)
    with hold_output(Path(args.out), "lincls"):
        loaded = check_state(Path(args.out), cfg, "lincls")  # read here once: the run takes it
        res = run_lincls(cfg, loaded=loaded)
    print(
        f"linear classification: {accuracy_text(res)}  "
        f"({eval_images_of(res)}, {plural(cfg.epochs, 'epoch')}; backbone unchanged)"
    )
    return 0
