"""The CPU cores this process may run on: the one count behind the defaults of --workers (train, the
evaluations, convert) and the most workers they take (`workers_refused`). A module of its own, importing
nothing but text.py: convert, which never imports torchvision (signals.HELD_IMPORTS), counts with it
too, and trainer imports torchvision's models."""

from __future__ import annotations

import os

from moco_fast.text import plural

# The most --workers a core of this machine (all its training processes together): more add no decoding,
# only processes that compete for the cores with the step, and a stop waits for them (--workers 400 on 2
# cores: 90 s, all 400 started and decoding their parts ahead before step 10's sync acted on it). Here,
# not in trainer, for the --workers help texts, which the parsers build without importing torch.
WORKERS_PER_CORE = 8


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or taskset's cores, not
    the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def most_workers(processes: int) -> int:
    """The most --workers each of this machine's `processes` processes may start: their share of
    WORKERS_PER_CORE a core."""
    return max(1, WORKERS_PER_CORE * available_cores() // processes)


def in_each(processes: int) -> str:
    """What follows a --workers count that each of this machine's `processes` starts, in the lines
    that name it (workers_refused, a resumed run's lowered count): nothing for one process."""
    return f" in each of its {processes} processes" if processes > 1 else ""


# Why more workers a core do not help, in train's and the evaluations' refusal (workers_refused's `why`).
LOADING_WORKERS = (
    "data-loading workers a core only compete with each other and the step for them "
    "(a stop waits until they have all started)"
)


def workers_refused(
    workers: int, processes: int, auto: str, why: str = LOADING_WORKERS, flag: str = "--workers"
) -> str | None:
    """The one line refusing a --workers count past most_workers(processes), or None: `auto` names the
    command's automatic count ("-1: auto"), `why` says what more workers a core would do; `flag`: the
    setting that gave the count (DALI's --loader-option threads)."""
    most = most_workers(processes)
    if workers <= most:
        return None
    return (
        f"{flag} {workers}{in_each(processes)}: this machine has {plural(available_cores(), 'CPU core')}, "
        f"and more than {WORKERS_PER_CORE} {why}: use at most {most} ({auto})"
    )
