"""`moco-fast convert`: an image folder -> an FFCV .beton or WebDataset shards (see moco_fast/convert.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from moco_fast.commands import HelpFormatter, dataclass_from_args
from moco_fast.config import MAX_SEED
from moco_fast.cores import WORKERS_PER_CORE

log = logging.getLogger("moco_fast")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="image folder -> FFCV .beton or WebDataset shards",
        description="Convert an image folder (SRC/<class>/<images>, or a root with train/ and val/ or test/) "
        "into an FFCV .beton (for --loader ffcv) or a WebDataset shard set with DALI indexes (for --loader dali "
        "and streaming). Every file is decoded once to check it: files that are not images and truncated or "
        "corrupt images are skipped and named with the reason; grayscale and CMYK images become RGB. The output "
        "is written under a temporary name and renamed at the end. Exit 0 when images were written.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="image folder with class subfolders, or a root with train/")
    p.add_argument(
        "dst",
        metavar="DST",
        help="output: X.beton (ffcv; class names go to X.beton.json, source file names to X.beton.files.txt) "
        "or a folder (wds); not inside SRC's train/, val/ or test/ (a SRC without train/: not inside SRC; "
        "a SRC that is ROOT/train: not inside ROOT's train/, val/ or test/)",
    )
    p.add_argument("--format", choices=["ffcv", "wds"], default="ffcv", help="output format")
    p.add_argument(
        "--split",
        choices=["train", "val", "test"],
        default="train",
        help="with a root holding train/ and val/ or test/: which split to convert (labels follow train/'s classes)",
    )
    p.add_argument(
        "--max-resolution",
        type=int,
        help="shrink images so the longer side is at most this many pixels (FFCV ImageNet recipes: 256-512); "
        "default: keep the size",
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the stored images (1-100)")
    # None where not given: a flag of the other format is warned of (run), not dropped without a word
    p.add_argument(
        "--write-mode",
        choices=["jpg", "raw", "smart", "proportion"],
        help="ffcv: how images are stored: jpg; raw pixels (fastest to read, ~10x larger); smart: raw up to "
        "256x256 pixels, JPEG above; proportion: half raw, half JPEG at random (default jpg)",
    )
    p.add_argument("--shard-size", type=int, help="wds: images per shard (default 1000)")
    p.add_argument(
        "--seed", type=int, help=f"wds: seed of the shuffled sample order across shards, 0..{MAX_SEED} (default 0)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help=f"processes decoding and encoding (0: every core); at most {WORKERS_PER_CORE} a core",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace DST when it is an earlier output of convert of this format: a .beton with convert's "
        "X.beton.json beside it, or a shard set holding only its own files. Never SRC, anything inside it, or "
        "any other file or folder (refused, with or without --force)",
    )
    # held_imports: it never imports torchvision (signals.HELD_IMPORTS); io_paths: cli.command_paths
    p.set_defaults(func=run, held_imports=("torch",), io_paths=(("SRC", "src"), ("DST", "dst")))


# the flags of one format, which the other ignores
FORMAT_FLAGS = {"ffcv": (("--write-mode", "write_mode"),), "wds": (("--shard-size", "shard_size"), ("--seed", "seed"))}


def run(args: argparse.Namespace) -> int:
    from moco_fast.convert import ConvertConfig, convert

    for fmt, flags in FORMAT_FLAGS.items():
        given = [flag for flag, dest in flags if getattr(args, dest) is not None]
        if given and fmt != args.format:
            log.warning(
                "%s: a --format %s setting, which --format %s ignores%s",
                " and ".join(given),
                fmt,
                args.format,
                " (it stores every image as a JPEG: --jpeg-quality)" if args.format == "wds" else "",
            )
        for _, dest in flags:
            if getattr(args, dest) is None:
                setattr(args, dest, getattr(ConvertConfig, dest))  # the dataclass's default
    cfg = dataclass_from_args(ConvertConfig, args)
    summary = convert(cfg)
    print(summary.text(), file=sys.stdout)
    return 0
