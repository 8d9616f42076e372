"""`moco-fast train`'s warnings for flags given that the run does not read: config.json records them
all the same, so without a line a run looks as if they took effect."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("moco_fast")

# what each mechanism does without (--symmetric: trainer.validate warns, as a sweep's setting may carry it)
UNUSED_FLAGS = {
    "memory-bank": {"moco_m": "it has no key encoder"},
    "end-to-end": {
        "moco_k": "its negatives are the other keys of the batch (K = the batch)",
        "moco_m": "its keys come from the query encoder",
    },
}


def warn_unused(args: argparse.Namespace, mechanism: str, shuffle_bn: bool) -> None:
    """One line for each flag given that the mechanism does not read (config.json records it all the
    same): `--mechanism end-to-end --moco-k 4096` trained with the batch's keys without a word, and
    `--no-shuffle-bn --bn-splits 4` with one BN group. Under torchrun every rank runs the command
    with the same flags: rank 0 alone says them (--gpus's workers run no command)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for dest, why in UNUSED_FLAGS.get(mechanism, {}).items():
        if getattr(args, dest, None) is not None:
            flag = "--" + dest.replace("_", "-")
            log.warning("%s %s has no effect with --mechanism %s: %s", flag, getattr(args, dest), mechanism, why)
    if args.bn_splits is not None and not shuffle_bn:
        log.warning(
            "--bn-splits %d has no effect with --no-shuffle-bn: BN normalises each process's whole batch",
            args.bn_splits,
        )
    elif args.bn_splits is not None and (processes := _processes(args)) > 1:
        # split BN is shuffle BN on one device (trainer.validate's splits); across processes the
        # batch is shuffled between them instead
        log.warning(
            "--bn-splits %d has no effect with %d processes: each one's BN normalises its own batch",
            *(args.bn_splits, processes),
        )


def _processes(args: argparse.Namespace) -> int:
    """The processes this command trains with, where the flags and environment say so: --gpus N's
    workers, else torchrun's group (a --resume of a --gpus run given no --gpus may start fewer than
    it had: it is not counted)."""
    from moco_fast.join import env_world_size

    return args.gpus if args.gpus is not None and args.gpus > 1 else env_world_size()
