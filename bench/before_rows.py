"""Ctrl-C before a bench's first row (while torch imports, or while the flags and data are checked)
ends it as an interrupted bench ends: one line and exit status 130, not Python's traceback. Nothing
is written before the first row, so nothing is left half-written. It is entered before torch is
imported: standard library and moco_fast.cli, which imports no torch."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


def stopped_before_rows() -> int:
    """Says so in one line; the exit status, 128 + SIGINT, as for a Ctrl-C during the rows. A main()
    returns it from its checks (`except KeyboardInterrupt:`), interrupted_before_rows exits with it."""
    print("interrupted before the first row: nothing measured or written", file=sys.stderr)
    return 130


@contextlib.contextmanager
def interrupted_before_rows(held: tuple[str, ...] | None = None) -> Iterator[None]:
    """Around the imports at a bench's top, where no main() is there yet to return from. A Ctrl-C or
    stop signal while `held` (default: the CLI's, torch and torchvision) is imported waits until it is
    in, as in the CLI (signals.import_holding_signals): in torch's C++ side it aborted the process."""
    try:
        from moco_fast.signals import HELD_IMPORTS, import_holding_signals

        import_holding_signals(HELD_IMPORTS if held is None else held)
        yield
    except KeyboardInterrupt:
        sys.exit(stopped_before_rows())
