"""`moco-fast sweep`: the paper's ablations (K, m, mechanism, shuffle BN) as one table. The flags
and the grid are read here; moco_fast.sweep runs it."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from moco_fast.cli import EMPTY_PATH, CommandParser, empty_flag, say_error
from moco_fast.closed_stdout import failed_with
from moco_fast.commands import HelpFormatter
from moco_fast.config import ConfigError

log = logging.getLogger("moco_fast")

DESCRIPTION = """\
Runs one MoCo training per setting of the grid (in this process), then kNN
accuracy on the backbone and on the head output, and optionally a linear
classifier on cached features, and writes one table (markdown, JSON, and a PNG
plot when matplotlib is installed) of accuracy, final loss and pretext accuracy
per setting.

A grid flag left out keeps the base config's value (the train flags after
`--`); one given replaces that flag after `--` (a warning says so). Settings
that would repeat a run are merged (end-to-end has no K or m; the memory bank
has no m). The K column says what each query was really contrasted with: for
end-to-end the batch (each query's positive and batch - 1 negatives), for the
memory bank at most the number of training images."""

EPILOG = """\
example (the paper's m and shuffle-BN ablations on CIFAR-10, 20 epochs each):
  moco-fast sweep --out runs/sweep --moco-m 0,0.9,0.99 --shuffle-bn on,off -- \\
      --preset cifar --data ../shared/data/cifar10 --epochs 20

Flags after `--` are `moco-fast train` flags for every setting (see
`moco-fast train --help`). Each setting trains in OUT/<setting>/.

When the sweep runs again, a finished setting is reused only if it was trained
with the same settings (all but --device, --workers, --log-every and other
runtime flags); an interrupted one continues from its checkpoint. A setting
trained with other settings stops the sweep before anything trains: --redo
trains the grid's settings again, or choose another --out. Other kNN or linear
classifier flags only evaluate the finished checkpoint again.

The table (OUT/sweep.md, sweep.json, sweep.png) lists every setting with a
result in OUT, so that several grids can share one folder. A setting whose run
diverges (NaN weights) is a 'diverged' row and the others still train; the
sweep then exits with status 1 (another grid's sweep in OUT keeps the row in
its table, not the status)."""


def grid_list(text: str | None, flag: str, kind, what: str, example: str) -> list | None:
    """A grid flag's comma-separated values (None when the flag was not given); ConfigError for an
    empty list or item (`--moco-k ,` would otherwise run the base config's K) or a bad value."""
    if text is None:
        return None
    items = [v.strip() for v in text.split(",")]
    if not any(items):
        raise ConfigError(f"{flag} {text!r} is an empty list: give values like {example}, or leave {flag} out")
    values = []
    for v in items:
        try:
            values.append(kind(v))
        except ValueError:
            why = "an empty item" if not v else f"{v!r} is not {what}"
            raise ConfigError(f"{flag} expects a comma-separated list like {example} (got {text!r}: {why})") from None
    return values


def _onoff(v: str) -> bool:
    table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    if v.lower() not in table:
        raise ValueError(v)
    return table[v.lower()]


class _Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The description and epilog as written (wrapped here, examples kept), flag defaults shown."""


TRAIN_FLAGS_HINT = (
    "`moco-fast train` flags go after `--`, e.g. moco-fast sweep --out x --moco-k 256,1024 -- --data ROOT"
)


OUT_BEFORE = "give the sweep folder as `moco-fast sweep --out DIR`, not after `--`"
# the sweep's flags that no train flag shares: one after `--` is the sweep's, given in the wrong place
# (--out, which train has too, is OUT_BEFORE's, read by _names)
SWEEP_ONLY = ("--redo", "--lincls-epochs", "--lincls-lr")


def _names(flag: str, words: list[str]) -> bool:
    """Whether a word names `flag` as argparse reads it: whole, with `=VALUE`, or abbreviated (`--ou DIR`,
    `--he`). For --out and --help alone, which no other flag of the sweep or of train begins as."""
    return any(len(name) > 2 and flag.startswith(name) for name in (word.split("=")[0] for word in words))


class _Parser(CommandParser):
    """The sweep's parser: its own flags before `--`, the train flags after it. A flag it does not
    know (a train flag given before `--`) is an error that says where train flags go."""

    def parse_known_args(self, args=None, namespace=None):
        # The words after the first `--` are split off before argparse reads the sweep's flags: a
        # REMAINDER positional took every word from the first flag it did not know, so
        # `sweep --gpus 2 --out X` read `--gpus 2 --out X` as train flags, then said --out was missing
        args = list(sys.argv[1:] if args is None else args)
        cut = args.index("--") if "--" in args else len(args)
        own, after = args[:cut], args[cut + 1 :]
        misplaced = next((flag for flag in SWEEP_ONLY if flag in (w.split("=")[0] for w in after)), None)
        if "-h" in own or _names("--help", own):
            pass  # argparse shows the help, whatever follows `--`
        elif _names("--out", after) and not _names("--out", own):
            self.error(OUT_BEFORE)  # it was 'required'; given before `--` too, base_config refuses it
        elif misplaced:
            self.error(f"{misplaced} is a flag of the sweep, not of its training runs: give it before `--`")
        # argparse's own reading, not CommandParser's: a word before `--` that no flag took is in its
        # extras or in train_args (a path, a train flag's value), and the error names them all
        parsed, extras = argparse.ArgumentParser.parse_known_args(self, args[:cut], namespace)
        stray = extras + parsed.train_args
        if stray:
            self.error(self.unrecognized(sorted(stray, key=args.index), parsed))
        parsed.train_args = after
        return parsed, []

    def unrecognized(self, extras: list[str], parsed: argparse.Namespace) -> str:
        return f"{super().unrecognized(extras, parsed)} ({TRAIN_FLAGS_HINT})"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="a grid over K, m, mechanism and shuffle BN, written as one table",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.__class__ = _Parser  # add_parser makes the subparsers' class, cli.CommandParser
    p.add_argument(
        "--out",
        required=True,
        help="sweep folder, its own (not a training run's): one subfolder per setting, plus the table",
    )
    p.add_argument(
        "--moco-k", help="queue lengths K, e.g. 256,4096 (default: the --moco-k after --, else the preset's)"
    )
    p.add_argument(
        "--moco-m", help="key encoder momenta, e.g. 0,0.9,0.99 (default: the --moco-m after --, else the preset's)"
    )
    p.add_argument(
        "--mechanism",
        help="moco, memory-bank, end-to-end (comma-separated) (default: the --mechanism after --, else moco)",
    )
    p.add_argument("--shuffle-bn", help="on, off or on,off (default: as the train flags after -- say, else on)")
    p.add_argument(
        "--lincls-epochs",
        type=int,
        default=0,
        help="also a linear classifier on cached center-crop features for this many epochs, its lr x0.1 at 60%% "
        "and 80%% of them as lincls' 60,80 of 100 (default 0: off)",
    )
    p.add_argument(
        "--lincls-lr",
        type=float,
        default=30.0,
        help="learning rate of that linear classifier, not scaled with the batch (default: 30, the paper's)",
    )
    p.add_argument(
        "--redo",
        action="store_true",
        help="train every setting of this grid again: its old run folder in OUT is deleted first "
        "(other settings' folders are kept)",
    )
    p.add_argument(
        "--device",
        help="cpu | cuda | cuda:N | auto (overrides a --device after --) (default: the --device after --, else auto)",
    )
    # read by _Parser from the words after `--`; a word before it that lands here is an error
    p.add_argument(
        "train_args", nargs="*", metavar="-- TRAIN_FLAGS", help="moco-fast train flags for every setting, after `--`"
    )
    p.set_defaults(func=run)


# The grid flags and the train flag (its dest) that each replaces in every setting.
GRID_FLAGS = {"moco_k": "--moco-k", "moco_m": "--moco-m", "mechanism": "--mechanism", "shuffle_bn": "--shuffle-bn"}


def base_config(train_args: list[str], grid: tuple[str, ...] = ()):
    """The TrainConfig that `moco-fast train <train_args>` would run (`train_args`: the words after
    `--`). `grid`: the dests of the grid flags given; a train flag after `--` that one replaces is
    named in a warning (it was replaced without a word; a shared base command line under several
    grids is a fair use, so no error)."""
    from moco_fast.commands import train as train_cmd

    parser = _TrainFlags(prog="moco-fast sweep ... --")
    train_cmd.register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["train", *train_args])
    # Read from the parsed flags, not their text: argparse takes an abbreviation (`--forc`, `--ou DIR`,
    # `--print-conf`), which passed a check of the words and was dropped or applied without a word.
    if ns.out is not None:
        raise ConfigError(OUT_BEFORE)
    refused = {
        "resume": ("--resume", "the sweep resumes and replaces runs itself (--redo)"),
        "force": ("--force", "the sweep resumes and replaces runs itself (--redo)"),
        "print_config": (
            "--print-config",
            "`moco-fast train --print-config` with the same flags prints a setting's config",
        ),
    }
    for dest, (flag, why) in refused.items():
        if getattr(ns, dest):
            raise ConfigError(f"{flag} is not a setting of the grid's runs: {why}")
    empty = empty_flag(parser, ns)  # cli's check sees the sweep's own flags: `-- --data ""` read the current folder
    if empty:
        raise ConfigError("after --: " + EMPTY_PATH.format(empty))
    for dest in grid:
        if getattr(ns, dest, None) is not None:
            flag = GRID_FLAGS[dest]
            log.warning("%s after -- is replaced in every setting by the grid's %s", flag, flag)
    return train_cmd.config_from_args(ns)


class _TrainFlags(argparse.ArgumentParser):
    """The parser of the train flags after `--`: a bad one is the sweep's one-line error (argparse
    printed a usage line of a `train` subcommand that the user never typed)."""

    def error(self, message: str):
        raise ConfigError(f"after --: {message} (they are `moco-fast train` flags: see moco-fast train --help)")


def run(args: argparse.Namespace) -> int:
    from moco_fast.model import MECHANISMS
    from moco_fast.sweep import expand, run_sweep
    from moco_fast.sweep_table import TABLE_JSON, TABLE_MD, TABLE_PNG, markdown_table, shown

    # the grid first: a malformed list is an error before the train flags are read
    ks = grid_list(args.moco_k, "--moco-k", int, "an integer", "256,4096")
    ms = grid_list(args.moco_m, "--moco-m", float, "a number", "0,0.9,0.99")
    mechanisms = grid_list(args.mechanism, "--mechanism", str, "a name", "moco,end-to-end")
    shuffle_bns = grid_list(args.shuffle_bn, "--shuffle-bn", _onoff, "on or off", "on,off")
    bad = [m for m in mechanisms or () if m not in MECHANISMS]
    if bad:
        raise ConfigError(f"unknown mechanism {bad[0]!r}; choose from {', '.join(MECHANISMS)}")
    base = base_config(args.train_args, grid=tuple(d for d in GRID_FLAGS if getattr(args, d) is not None))
    if args.device:
        base.runtime.device = args.device
    settings = expand(
        ks or [base.moco.k],
        ms or [base.moco.m],
        mechanisms or [base.moco.mechanism],
        shuffle_bns or [base.moco.shuffle_bn],
    )
    if args.lincls_epochs < 0:
        raise ConfigError("--lincls-epochs must be 0 or more")
    if not 0 < args.lincls_lr < math.inf:  # NaN fails too; inf trained every setting first, then NaN weights
        raise ConfigError(f"--lincls-lr must be a positive number (got {args.lincls_lr})")
    out = Path(args.out)
    rows = run_sweep(base, settings, out, lincls_epochs=args.lincls_epochs, lincls_lr=args.lincls_lr, redo=args.redo)
    grid = {s.name for s in settings}  # another grid's diverged rows are kept, but not this sweep's failure
    diverged = [r["name"] for r in rows if r.get("error") is not None and r["name"] in grid]
    if diverged:  # the grid ran and its table is written, but for them: 1 (2 is a sweep that stopped)
        # said before the table: a stdout whose reader went away (`| head`) ends the command at the
        # table's print (closed_stdout), and the line said after it was lost
        say_error("sweep", f"diverged: {', '.join(diverged)} (sweep.json has each error)")
    status = 1 if diverged else 0
    with failed_with(status):
        print(markdown_table(shown(rows)), end="")
        written = [out / name for name in (TABLE_MD, TABLE_JSON, TABLE_PNG)]
        print("table:", ", ".join(str(path) for path in written if path.is_file()))
    return status
