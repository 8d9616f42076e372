"""`moco-fast finetune`: end-to-end fine-tuning, from MoCo or (--from-scratch) from random init."""

from __future__ import annotations

import argparse

from moco_fast.commands import HelpFormatter, add_eval_runtime_flags, dataclass_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="end-to-end fine-tuning of all layers (with --from-scratch: the random-init baseline)",
        description="Fine-tunes every layer (BatchNorm trainable, per-batch statistics) with a new linear "
        "classifier: the paper's comparison of MoCo initialisation with random initialisation. Run it twice, "
        "with and without --from-scratch, on the same schedule. Train views: random resized crop + flip; "
        "evaluation: center crop; top-1 and top-5 go to a JSON file.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", help="a moco-fast training checkpoint (optional with --from-scratch)")
    p.add_argument("--data", help="a root with train/ and val/ or test/ class folders (default: the demo set)")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="random init of the checkpoint's architecture (or of --arch without a checkpoint)",
    )
    p.add_argument("--arch", default="resnet50", help="with --from-scratch and no checkpoint")
    p.add_argument(
        "--stem", default="auto", choices=["auto", "imagenet", "cifar"], help="with --from-scratch and no checkpoint"
    )
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--lr", type=float, default=0.1, help="for a batch of 256; scaled linearly with --batch-size")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument(
        "--schedule", default="cos", help="'cos' for half-cosine, or epochs where the lr drops x0.1 (30,60,80)"
    )
    p.add_argument("--image-size", type=int, help="crop size (default: the checkpoint's training size; 224 without)")
    add_eval_runtime_flags(p, amp_help="mixed precision")
    p.add_argument("--out", help="result JSON (default: finetune.json / finetune_scratch.json beside the checkpoint)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moco_fast.finetune import FinetuneConfig, run_finetune

    res = run_finetune(dataclass_from_args(FinetuneConfig, args))
    print(
        f"fine-tuning from {res['init']}: top-1 {res['top1']:.2f}%  top-{res['topk']} {res['top5']:.2f}%  "
        f"({res['eval_images']} eval images, {args.epochs} epochs)"
    )
    return 0
