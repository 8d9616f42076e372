"""Ctrl-C before a bench's first row (while torch imports, or while the flags and data are checked)
ends it as an interrupted bench ends: one line and exit status 130, not Python's traceback. Nothing
is written before the first row, so nothing is left half-written. Standard library only: it is
entered before torch is imported."""

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
def interrupted_before_rows() -> Iterator[None]:
    """Around the imports at a bench's top, where no main() is there yet to return from."""
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(stopped_before_rows())
