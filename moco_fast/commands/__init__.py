"""The `moco-fast` subcommands, one module each (listed in `cli.COMMANDS`), and the flags that the
evaluation commands (knn, lincls, finetune) share, so that they read and default the same way."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from moco_fast.config import MAX_SEED, ConfigError, check_at_least, check_image_size, read_json_object
from moco_fast.cores import WORKERS_PER_CORE

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
log = logging.getLogger("moco_fast")

AMP_CHOICES = ["auto", "bf16", "fp16", "off"]

# --checkpoint of the evaluations (and export's CHECKPOINT): the files moco_fast.foreign reads too
CHECKPOINT_HELP = (
    "a moco-fast training checkpoint (OUT/checkpoint.pt, or the run folder OUT), an official MoCo checkpoint "
    "(moco_v2_800ep_pretrain.pth.tar: its query encoder's backbone and head), or a torchvision ResNet state dict "
    "(export --format torchvision, torchvision's weights: the backbone alone)"
)
ARCH_HELP = (
    "the architecture of a torchvision state dict (default: the one its tensor shapes fit, among torchvision's "
    "ResNets, ResNeXts, wide ResNets and resnet50w2/w4); with another checkpoint it must match the checkpoint's"
)


def add_eval_runtime_flags(
    p: argparse.ArgumentParser, *, workers: int = 4, amp_help: str | None = None, seed: bool = True
) -> None:
    """--batch-size, --workers, --device, and (when asked) --amp and --seed."""
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    # default None: `workers`, at most the cores (resolve_eval_runtime); 4 DataLoader workers on a 2-core
    # machine made torch print its "suggested max number of worker" warning, with its source line, twice
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"data loading workers; -1: auto (default: {workers}, no more than the cores); at most "
        f"{WORKERS_PER_CORE} a core of the machine, its processes' together, as train's (the default too)",
    )
    p.set_defaults(default_workers=workers)
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (a GPU when there is one)")
    if amp_help:
        p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help=amp_help)
    if seed:
        p.add_argument(
            "--seed", type=int, default=0, help=f"random seed (classifier init, data order, crops), 0..{MAX_SEED}"
        )


def add_epoch_loop_flags(p: argparse.ArgumentParser, command: str) -> None:
    """--eval-every and --resume of lincls and finetune (moco_fast.classifier_epochs)."""
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="N",
        help="evaluate every N epochs as well as after the last, and report the best epoch too (the official "
        "script's figure); 0: after the last only. top1 stays the last epoch's",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue an interrupted run: {command} saves its state after every epoch beside the result "
        f"(OUT with .state.pt for its extension: {command}.json -> {command}.state.pt) and deletes it when done",
    )


# -- argument checks: one-line errors (ConfigError) before any data or checkpoint is read ------------
def require(ok: bool, message: str) -> None:
    """ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def check_device_name(name: str) -> None:
    """ConfigError unless `name` is a device string the commands accept (for export, which does not
    resolve it: the others go through `trainer.resolve_device`)."""
    require(
        re.fullmatch(r"cpu|auto|cuda(:\d+)?", name) is not None,
        f"--device {name!r} is not a device: use cpu, cuda, cuda:N (N a GPU index) or auto",
    )


def resolve_eval_runtime(args: argparse.Namespace) -> torch.device:
    """Checks the flags that `add_eval_runtime_flags` adds (--batch-size, --workers: at most train's
    count a core, --device: an error for a GPU this machine lacks), turns --workers -1 (auto) into a
    count in `args`; returns the device."""
    from moco_fast.cores import available_cores, most_workers
    from moco_fast.distributed import local_world_size
    from moco_fast.trainer import check_workers, resolve_device, resolve_workers

    check_at_least("--batch-size", args.batch_size, 1)
    if args.workers is None:  # nor past the cap: the processes that share the cores (LOCAL_WORLD_SIZE) take it
        args.workers = min(args.default_workers, available_cores(), most_workers(local_world_size()))
    else:  # train's check, of the count typed: the default (one a core) is no flag to name, as auto is not
        require(args.workers >= -1, f"--workers must be -1 (auto) or a count >= 0 (got {args.workers})")
        check_workers(args.workers)
    device = resolve_device(args.device)
    args.workers = resolve_workers(args.workers, device)
    return device


def check_schedule(schedule: str, epochs: int) -> tuple[int, ...] | None:
    """Parses --schedule (ConfigError when malformed) and warns about milestones that --epochs never
    reaches: the lr would never drop there."""
    from moco_fast.lincls import parse_schedule

    steps = parse_schedule(schedule)
    late = [s for s in steps or () if s >= epochs]
    if late:
        log.warning(
            "--schedule %s with --epochs %d: the lr never drops at %s (not below --epochs); %s",
            schedule,
            epochs,
            ",".join(map(str, late)),
            f"give milestones below {epochs}, or --schedule cos" if epochs > 1 else "one epoch has no milestones",
        )
    return steps


def check_classifier_args(args: argparse.Namespace) -> None:
    """--epochs, --lr, --momentum, --weight-decay, --image-size, --eval-every, --seed and --schedule of lincls and
    finetune (a warning for schedule milestones that --epochs never reaches)."""
    require(args.epochs >= 1, f"--epochs must be positive (got {args.epochs})")
    require(args.lr > 0 and math.isfinite(args.lr), f"--lr must be above 0 (got {args.lr})")
    require(0 <= args.momentum < 1, f"--momentum must be in [0, 1) (got {args.momentum})")
    # inf too, as train's: it passed here, and the run diverged at its first epoch's end
    require(0 <= args.weight_decay < math.inf, f"--weight-decay must be 0 or more and finite (got {args.weight_decay})")
    if args.image_size is not None:  # None: the checkpoint's training size
        check_image_size(args.image_size)
    require(args.eval_every >= 0, f"--eval-every must be 0 or more (got {args.eval_every})")
    require(0 <= args.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED} (got {args.seed})")
    check_schedule(args.schedule, args.epochs)


def resolve_checkpoint(path: str | Path, flag: str = "--checkpoint") -> Path:
    """A training checkpoint given as its file or as its run folder (RUN/checkpoint.pt);
    FileNotFoundError (a one-line error, prefixed with `flag` when given) when there is none, and
    DataError when its first bytes show that it is no torch checkpoint (`not_a_checkpoint`)."""
    from moco_fast.checkpoint import CHECKPOINT_NAME, not_a_checkpoint
    from moco_fast.data import DataError

    p = Path(path)
    prefix = f"{flag}: " if flag else ""
    if p.is_dir():
        if not (p / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"{prefix}{p} is a folder without a {CHECKPOINT_NAME}")
        p = p / CHECKPOINT_NAME
    elif not p.is_file():
        raise FileNotFoundError(f"{prefix}checkpoint not found: {p}")
    why = not_a_checkpoint(p)
    if why:
        raise DataError(f"{prefix}{p} is not a moco-fast checkpoint: {why}")
    return p


def check_output(
    path: str | Path,
    flag: str,
    inputs: tuple[str | Path | None, ...] = (),
    replaces: Callable[[Path], str | None] | None = None,
    folder: bool = False,
) -> Path:
    """ConfigError unless a file can be written at `path` (as `atomic_write` does: its folder, created
    if missing, must take new files); an existing folder at `path`, or one of the command's `inputs`
    (the checkpoint it reads), is refused, and so is an existing file that `replaces(path)` says why
    the command would not replace (an earlier output of the same kind: None). With `folder` the
    output is a folder (convert's shard set): an existing file is refused and `replaces` judges an
    existing folder. Writes nothing that stays."""
    p = Path(path)
    if folder:
        require(not p.exists() or p.is_dir(), f"{flag} {p} is a file: give a folder path")
    else:
        require(not p.is_dir(), f"{flag} {p} is a folder: give a file path")
        require_a_file_name(path, flag)
        # atomic_write renames its temporary file over the path: a device (/dev/null), FIFO or socket
        # there would be replaced by a regular file, not written to (as root, even in /dev)
        require(
            not p.exists() or p.is_file(),
            f"{flag} {p} is not a regular file (a device, FIFO or socket): give a file path",
        )
    for given in inputs:
        require(
            given is None or not p.exists() or not os.path.samefile(p, given),
            f"{flag} {p} is the checkpoint this command reads: give another path",
        )
    if replaces is not None and (p.is_dir() if folder else p.is_file()):
        why = replaces(p)
        require(why is None, f"{flag} {p} exists and {why}: give another path, or delete it first")
    check_writable_beside(p, flag)
    return p


def require_a_file_name(path: str | Path, flag: str) -> None:
    """ConfigError where `path`, a file to write that is no existing folder, ends as a folder's path
    does: Path drops a trailing "/" or "/.", and `--output exports/` (or exports/.) would write a file
    named exports, where the ending says that a folder was meant; a last ".." names a folder too. For
    check_output, and convert's .beton, checked before the images are read (convert.validate)."""
    tail = os.path.basename(str(path))
    require(
        tail not in ("", ".", ".."),
        f"{flag} {path} ends with {tail or os.sep}, a folder that does not exist: give a file path "
        f"({os.path.join(path, 'NAME')})",
    )


def result_of(command: str, protocol: str) -> Callable[[Path], str | None]:
    """check_output's `replaces` for a result JSON: an earlier result of `command` (its "protocol")
    is replaced, anything else (a run's config.json or metrics.jsonl, another command's result, the
    sweep's short linear classifier's) is not."""

    def why_not(p: Path) -> str | None:
        from moco_fast.run_folder import SWEEP_LINCLS_RESULT, SWEEP_RESULT

        if p.name in (SWEEP_RESULT, SWEEP_LINCLS_RESULT):
            return "is the sweep's"
        obj = read_json_object(p)
        if obj is not None and obj.get("protocol") == protocol:
            return None
        return f"is not an earlier {command} result"

    return why_not


def network_of(result: Path) -> Callable[[Path], str | None]:
    """check_output's `replaces` for finetune's --save-model: the network that the earlier finetune
    result at `result` names as its "model" is replaced; any other file (torchvision's weights, an
    export, a checkpoint) is not."""

    def why_not(p: Path) -> str | None:
        obj = read_json_object(result)
        named = obj.get("model") if obj is not None else None
        if isinstance(named, str) and os.path.exists(named) and os.path.samefile(named, p):
            return None
        return f"is not the network of an earlier finetune result at {result}"

    return why_not


def check_writable_beside(p: Path, flag: str) -> None:
    """ConfigError unless new files can be made beside `p` (in its folder, or in the nearest existing
    folder above it, which must take the folders to create). Writes nothing that stays."""
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest existing ancestor: the one that must take the new folders
    require(folder.is_dir(), f"{flag} {p}: {folder} is not a folder")
    why = write_refused(folder)
    require(why is None, f"{flag} {p}: cannot write in {folder} ({why})")


def refuse_dead_link(p: Path, flag: str, missing_target: bool = True) -> None:
    """ConfigError for a `p` that no stat reaches through symbolic links: a loop of them (pathlib's
    resolve raised a RuntimeError traceback, mkdir "[Errno 40]"), a folder above it that is a link to
    nothing (mkdir of its parents said only "[Errno 17] File exists: 'FOLDER'") and, with
    `missing_target`, `p` itself a link to nothing (the same); nothing where `p` is there or plainly
    missing."""
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(
                f"{flag} {p} leads into a loop of symbolic links: remove the link or give another path"
            ) from None
        dead = next((q for q in (p, *p.parents) if q.is_symlink() and not q.exists()), None)
        if dead is None or (dead == p and not missing_target):
            return
        where = f"{p} is" if dead == p else f"{p} lies in {dead},"
        raise ConfigError(
            f"{flag} {where} a symbolic link to {os.readlink(dead)}, which does not exist: make its target first, "
            "or remove the link"
        ) from None


def write_refused(folder: Path) -> str | None:
    """Why no new file can be made in `folder` ("Permission denied", "Read-only file system"), or
    None. It tries, so mode bits, ACLs, a read-only mount and root's rights all count as they will
    for the real file. Writes nothing that stays."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".moco-fast-write-check.", dir=folder)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(probe)
    return None


def accuracy_text(res: dict) -> str:
    """The accuracy of a lincls or finetune result: top-1 X%  top-K Y% with K = min(5, classes); top-1
    alone where K is every class (5 or fewer: it printed "top-3 100.00%", true of any network); the
    best epoch with --eval-every."""
    text = f"top-1 {res['top1']:.2f}%"
    text += f"  top-{res['topk']} {res['top5']:.2f}%" if res["topk"] < res["num_classes"] else ""
    if "best_epoch" in res:  # --eval-every
        text += f"  (best epoch {res['best_epoch']}: top-1 {res['best_top1']:.2f}%)"
    return text


def eval_images_of(res: dict) -> str:
    """The evaluation of a lincls or finetune result: "60 eval images of val/" (the split's folder: a
    root with both val/ and test/ is scored on val/, and the line did not say which)."""
    from moco_fast.text import plural

    return f"{plural(res['eval_images'], 'eval image')} of {Path(res['eval_split']).name}/"


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """A command's dataclass config from its parsed flags: each field from the flag of that name."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (None, False, []) and where
    the help text already gives it: no more `--data DATA ... (default: None)`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in help_text:
            return help_text
        return super()._get_help_string(action)
