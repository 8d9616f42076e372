"""Ctrl-C before a bench's first row (while torch imports, or while the flags and data are checked)
ends it as an interrupted bench ends: one line and exit status 130, not Python's traceback. Nothing
is written before the first row, so nothing is left half-written. Standard library only: it is
entered before torch is imported."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

LINE = "interrupted before the first row: nothing measured or written"


@contextlib.contextmanager
def interrupted_before_rows() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        print(LINE, file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as for a Ctrl-C during the rows
