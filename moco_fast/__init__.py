"""moco-fast: fast MoCo self-supervised pretraining."""

import os

__version__ = "0.1.0"

# This process's parent as moco-fast started in it: the package is the first of moco-fast that a
# torchrun or --gpus worker imports (`python -m moco_fast`, the moco-fast script, a spawned worker's
# function), before torch and the CLI's checks, which take seconds. join.stop_with_the_launcher
# compares it with the parent it finds when it sets the signal for the parent's end: a launcher
# killed in between leaves its worker to another parent. A process forked from one that imported the
# package (a launcher's fork start method) records its own parent, the forking process.
STARTED_BY = os.getppid()


def _started_by_the_forking_process() -> None:
    global STARTED_BY
    STARTED_BY = os.getppid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_started_by_the_forking_process)


def launched_by_torchrun() -> bool:
    """True in a process that torchrun or `--gpus`'s launcher started: torch's elastic agent, the
    engine of both, sets TORCHELASTIC_RUN_ID for its workers. False in one started alone and in a
    manual env:// launch (RANK, WORLD_SIZE... set by hand or by a scheduler), which
    launch.under_torchrun counts as well. Here, not in launch.py beside it: the CLI asks it as it
    starts (cli._in_a_worker), before torch, which launch imports, is in."""
    return "TORCHELASTIC_RUN_ID" in os.environ
