"""`moco-fast sweep`: the paper's ablations (K, m, mechanism, shuffle BN) as one table."""

from __future__ import annotations

import argparse
from pathlib import Path

from moco_fast.config import ConfigError

EPILOG = """example (the paper's m and shuffle-BN ablations on CIFAR-10, 20 epochs each):
  moco-fast sweep --out runs/sweep --moco-m 0,0.9,0.99 --shuffle-bn on,off -- \\
      --preset cifar --data ../shared/data/cifar10 --epochs 20

Flags after `--` are `moco-fast train` flags for every setting (see `moco-fast train --help`).
Each setting trains in OUT/<setting>/; finished settings are skipped when the sweep runs again,
interrupted ones continue from their checkpoint. The table: OUT/sweep.md, sweep.json, sweep.png."""


def _list(kind):
    def parse(text: str):
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def _onoff(v: str) -> bool:
    table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    if v.lower() not in table:
        raise ValueError(v)
    return table[v.lower()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="a grid over K, m, mechanism and shuffle BN, written as one table",
        description="Runs one MoCo training per setting of the grid (in this process), then kNN accuracy on the "
        "backbone and on the head output, and optionally a linear classifier, and writes one table (markdown, "
        "JSON, PNG plot when matplotlib is installed) of accuracy, final loss and pretext accuracy per setting. "
        "A grid flag left out keeps the base config's value. Settings that would repeat a run are merged "
        "(end-to-end has no K or m; the memory bank has no m).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="sweep folder: one subfolder per setting, plus the table")
    p.add_argument("--moco-k", type=_list(int), help="queue lengths K, e.g. 256,4096")
    p.add_argument("--moco-m", type=_list(float), help="key encoder momenta, e.g. 0,0.9,0.99")
    p.add_argument("--mechanism", type=_list(str), help="moco, memory-bank, end-to-end (comma-separated)")
    p.add_argument("--shuffle-bn", type=_list(_onoff), help="on, off or on,off")
    p.add_argument(
        "--lincls-epochs",
        type=int,
        default=0,
        help="also a linear classifier on cached center-crop features for this many epochs (0: off)",
    )
    p.add_argument("--device", help="cpu | cuda | auto (overrides a --device after --)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="`--` then moco-fast train flags for every setting")
    p.set_defaults(func=run)


def base_config(train_args: list[str]):
    """The TrainConfig that `moco-fast train <train_args>` would run."""
    from moco_fast.commands import train as train_cmd

    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    if any(a == "--out" or a.startswith("--out=") for a in train_args):
        raise ConfigError("give the sweep folder as `moco-fast sweep --out DIR`, not after `--`")
    parser = argparse.ArgumentParser(prog="moco-fast sweep ... --")
    train_cmd.register(parser.add_subparsers(dest="command"))
    return train_cmd.config_from_args(parser.parse_args(["train", *train_args]))


def run(args: argparse.Namespace) -> int:
    from moco_fast.model import MECHANISMS
    from moco_fast.sweep import expand, markdown_table, run_sweep

    base = base_config(args.train_args)
    if args.device:
        base.runtime.device = args.device
    mechanisms = args.mechanism or [base.moco.mechanism]
    bad = [m for m in mechanisms if m not in MECHANISMS]
    if bad:
        raise ConfigError(f"unknown mechanism {bad[0]!r}; choose from {', '.join(MECHANISMS)}")
    settings = expand(
        args.moco_k or [base.moco.k],
        args.moco_m or [base.moco.m],
        mechanisms,
        args.shuffle_bn or [base.moco.shuffle_bn],
    )
    if args.lincls_epochs < 0:
        raise ConfigError("--lincls-epochs must be 0 or more")
    out = Path(args.out)
    results = run_sweep(base, settings, out, args.lincls_epochs)
    print(markdown_table(results), end="")
    print(
        f"table: {out / 'sweep.md'}, {out / 'sweep.json'}"
        + (f", {out / 'sweep.png'}" if (out / "sweep.png").is_file() else "")
    )
    return 0
