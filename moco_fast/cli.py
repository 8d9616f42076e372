"""`moco-fast` (also `python -m moco_fast`): one subcommand per module in moco_fast/commands/.

Errors a user can fix (bad data, contradicting flags, missing files) print as one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

# Each module defines `register(subparsers)`, which adds its parser and sets `func=run(args)`.
COMMANDS = [
    "moco_fast.commands.train",
    "moco_fast.commands.knn",
    "moco_fast.commands.lincls",
    "moco_fast.commands.finetune",
    "moco_fast.commands.sweep",
    "moco_fast.commands.export",
    "moco_fast.commands.convert",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-fast",
        description="Fast MoCo (Momentum Contrast) self-supervised pretraining. "
        "Run `moco-fast COMMAND --help` for the flags of each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


class UserError(Exception):
    """Raised by commands for input a user can fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    from moco_fast.config import ConfigError
    from moco_fast.data import DataError

    return (UserError, DataError, ConfigError, FileNotFoundError, NotADirectoryError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr
    )
    warnings.filterwarnings("default", module="moco_fast")
    try:
        return args.func(args) or 0
    except user_errors() as e:
        print(f"moco-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
