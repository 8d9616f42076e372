"""`moco-fast finetune`: end-to-end fine-tuning, from MoCo or (--from-scratch) from random init."""

from __future__ import annotations

import argparse
from dataclasses import replace

from moco_fast.commands import (
    CHECKPOINT_HELP,
    HelpFormatter,
    accuracy_text,
    add_epoch_loop_flags,
    add_eval_runtime_flags,
    check_classifier_args,
    check_output,
    dataclass_from_args,
    eval_images_of,
    network_of,
    require,
    resolve_checkpoint,
    resolve_eval_runtime,
    result_of,
)
from moco_fast.config import MAX_IMAGE_SIZE, SCRATCH_ARCH
from moco_fast.text import plural

DEFAULT_STEM = "auto"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="end-to-end fine-tuning of all layers (with --from-scratch: the random-init baseline)",
        description="Fine-tunes every layer (BatchNorm trainable, per-batch statistics) with a new linear "
        "classifier: the paper's comparison of MoCo initialisation with random initialisation. Run it twice, "
        "with and without --from-scratch, on the same schedule. Train views: random resized crop + flip; "
        "evaluation: center crop; top-1 and top-5 go to a JSON file, the fine-tuned network to a torchvision "
        "ResNet state dict beside it.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP + "; no default: required unless --from-scratch")
    p.add_argument("--data", help="a root with train/ and val/ or test/ class folders (default: the demo set)")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="random init of the checkpoint's architecture (or of --arch without a checkpoint)",
    )
    # None: not given. With --checkpoint the network is the checkpoint's; a different --arch/--stem is an error.
    p.add_argument(
        "--arch",
        help=f"with --from-scratch and no checkpoint (default: {SCRATCH_ARCH}); with --checkpoint it must match "
        "the checkpoint's (a torchvision state dict's, where its tensor shapes do not tell it)",
    )
    p.add_argument(
        "--stem",
        choices=["auto", "imagenet", "cifar"],
        help=f"with --from-scratch and no checkpoint (default: {DEFAULT_STEM}: cifar up to 64 px); "
        "with --checkpoint it must match the checkpoint's",
    )
    p.add_argument("--epochs", type=int, default=90, help="training epochs")
    p.add_argument("--lr", type=float, default=0.1, help="for a batch of 256; scaled linearly with --batch-size")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (BatchNorm and bias included)")
    p.add_argument(
        "--schedule", default="cos", help="'cos' for half-cosine, or epochs where the lr drops x0.1 (30,60,80)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        help=f"crop size, 8..{MAX_IMAGE_SIZE} (default: the checkpoint's training size; 224 without)",
    )
    add_eval_runtime_flags(p, amp_help="mixed precision")
    add_epoch_loop_flags(p, "finetune")
    p.add_argument(
        "--out",
        help="result JSON (default: finetune.json / finetune_scratch.json beside the checkpoint, NAME.finetune.json "
        "beside a checkpoint file not named checkpoint.pt; in the current folder without one)",
    )
    p.add_argument(
        "--save-model",
        help="the fine-tuned network as a torchvision ResNet state dict, fc included "
        "(default: the result JSON's path with .pt)",
    )
    p.add_argument("--no-save-model", action="store_true", help="write only the result JSON (not with --save-model)")
    p.set_defaults(func=run)


def check_arch(args: argparse.Namespace) -> None:
    """ConfigError when --arch or --stem contradicts the checkpoint, whose architecture is what runs."""
    from moco_fast.backbone import resolve_stem
    from moco_fast.checkpoint import read_config

    # an official MoCo checkpoint names its arch; a torchvision state dict's comes from --arch or its shapes
    cfg = read_config(args.checkpoint, args.arch)
    arch, stem = cfg.model.arch, resolve_stem(cfg.model.stem, cfg.data.aug.image_size)
    why = "with --checkpoint the network is the checkpoint's architecture"
    require(
        args.arch in (None, arch),
        f"--arch {args.arch} contradicts the checkpoint, a {arch} ({why}; leave --arch out)",
    )
    require(
        args.stem in (None, "auto", stem),
        f"--stem {args.stem} contradicts the checkpoint, a network with the {stem} stem ({why}; leave --stem out)",
    )


def run(args: argparse.Namespace) -> int:
    from moco_fast.classifier_epochs import check_state, state_path
    from moco_fast.finetune import PROTOCOL, FinetuneConfig, result_path, run_finetune
    from moco_fast.run_folder import hold_output

    # Every value is checked, and the output folders tried, before the checkpoint or the data is read.
    check_classifier_args(args)
    # the model was left unwritten without a word where --save-model named where to write it
    require(
        not (args.no_save_model and args.save_model),
        f"--save-model {args.save_model} and --no-save-model contradict: give one of them",
    )
    resolve_eval_runtime(args)
    if args.checkpoint is None:
        require(args.from_scratch, "--checkpoint is required (or --from-scratch for the random-init baseline)")
    else:
        args.checkpoint = str(resolve_checkpoint(args.checkpoint))
    explicit = args.arch is not None or args.stem is not None
    cfg = replace(
        dataclass_from_args(FinetuneConfig, args),
        arch=args.arch or (SCRATCH_ARCH if args.checkpoint is None else None),  # None: the checkpoint's
        stem=args.stem or DEFAULT_STEM,
    )
    # --out as typed (result_path's Path drops a trailing "/", which check_output refuses)
    out = check_output(
        args.out or result_path(cfg), "--out", inputs=(args.checkpoint,), replaces=result_of("finetune", PROTOCOL)
    )
    model_path = None
    if not args.no_save_model:
        model_path = args.save_model or out.with_suffix(".pt")
        model_path = check_output(model_path, "--save-model", inputs=(args.checkpoint,), replaces=network_of(out))
        require(
            model_path.resolve() != out.resolve(),
            f"--save-model and --out are both {out}: give --save-model another path",
        )
        require(
            model_path.resolve() != state_path(out).resolve(),
            f"--save-model {model_path} is where the run keeps its state between epochs: give another path",
        )
    if cfg.checkpoint is not None and explicit:
        check_arch(args)
    with hold_output(out, "finetune"):
        loaded = check_state(out, cfg, "finetune")  # read here once: the run takes it
        res, _ = run_finetune(cfg, model_path, loaded)
    start = f"the torchvision state dict {args.checkpoint}" if res["init"] == "torchvision" else res["init"]
    print(f"fine-tuning from {start}: {accuracy_text(res)}  ({eval_images_of(res)}, {plural(args.epochs, 'epoch')})")
    if model_path is not None:
        from moco_fast.commands.export import loading_notes

        # the network that ran (res["config"]): a wider ResNet-50 is not in torchvision, its CIFAR stem is wider
        ran = res["config"]
        print(f"wrote {model_path}: the fine-tuned network as a torchvision ResNet state dict (fc included)")
        for line in loading_notes("torchvision", ran["arch"], ran["stem"], res["num_classes"]):
            print(f"note: {line}")
    return 0
