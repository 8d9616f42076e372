"""The `moco-fast` subcommands, one module each (listed in `cli.COMMANDS`), and the flags that the
evaluation commands (knn, lincls, finetune) share, so that they read and default the same way."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")

AMP_CHOICES = ["auto", "bf16", "fp16", "off"]


def add_eval_runtime_flags(
    p: argparse.ArgumentParser, *, workers: int = 4, amp_help: str | None = None, seed: bool = True
) -> None:
    """--batch-size, --workers, --device, and (when asked) --amp and --seed."""
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--workers", type=int, default=workers, help="data loading workers")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    if amp_help:
        p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help=amp_help)
    if seed:
        p.add_argument("--seed", type=int, default=0)


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
