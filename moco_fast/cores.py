"""The CPU cores this process may run on: the one count behind the defaults of --workers (train, the
evaluations, convert). A module of its own, importing nothing: convert, which never imports
torchvision (signals.HELD_IMPORTS), counts with it too, and trainer imports torchvision's models."""

from __future__ import annotations

import os


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or taskset's cores, not
    the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
