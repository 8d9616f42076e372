"""The CPU cores this process may run on: the one count behind the defaults of --workers (train, the
evaluations, convert). A module of its own, importing nothing: convert, which never imports
torchvision (signals.HELD_IMPORTS), counts with it too, and trainer imports torchvision's models."""

from __future__ import annotations

import os

# The most --workers a core of this machine (all its training processes together): more add no decoding,
# only processes that compete for the cores with the step, and a stop waits for them (--workers 400 on 2
# cores: 90 s, all 400 started and decoding their parts ahead before step 10's sync acted on it). Here,
# not in trainer, for the --workers help texts, which the parsers build without importing torch.
WORKERS_PER_CORE = 8


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or taskset's cores, not
    the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
