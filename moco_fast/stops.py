"""Stops at a step boundary, and the saves within an epoch: what the ranks agree on at the training
loop's host syncs (every --log-every steps, and the epoch's end).

While the steps run, the first stop signal (signals.STOP_SIGNALS) or Ctrl-C is recorded, not
raised: a step cut in two would leave nothing to save. The loop reads the record at its next host
sync (or the epoch's end), the ranks agree on it there (one all-reduce, only there), the trainer
saves the step and raises the stop as the CLI's handler (signals._on_stop_signal) would have
(Terminated or KeyboardInterrupt: same line, same exit status).
A second one in a process of its own acts at once, as without this. A worker of torchrun or
`--gpus` records repeats too, until it ends (its save at the epoch's end and its unwinding come
after the steps): the launcher passes on the signal that the whole job got (a terminal's Ctrl-C,
SLURM's signal to every process), a second copy of the same stop; the launcher ends a worker that
has not stopped within its shutdown timeout (30 s) with SIGKILL. Outside the steps (the data scan,
the kNN, a save) a first one stops a worker at once, as it stops one process
(signals.stop_signals_handled), and the launcher ends the others.
A stderr whose reader went away (closed_stdout.closed_stderr_stops) is taken for a SIGPIPE recorded
at the next sync: saved, then ended with SIGPIPE's status (141).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

import torch

from moco_fast import closed_stdout
from moco_fast import distributed as dist_utils
from moco_fast.signals import STOP_SIGNALS, Terminated


class StopRequests:
    """The stop signal recorded while the steps run (`signum`, None: none yet)."""

    def __init__(self, repeats_wait: bool = False) -> None:
        self.signum: int | None = None
        self.agreed = False  # the ranks agreed on it at a sync point: the trainer raises it after its save
        self.repeats_wait = repeats_wait  # a launcher's worker: see the module's docstring

    @contextlib.contextmanager
    def deferred(self, raise_on_leaving: bool = True) -> Iterator[StopRequests]:
        """While in it, the stop signals and Ctrl-C are recorded in `signum` (those ignored stay
        ignored: `nohup`'s SIGHUP). The first one puts the handlers back in a process of its own, so
        that a second stops at once; a launcher's worker records the repeats, after it too. Leaving
        it with a signal recorded that no sync point agreed on (it came after the epoch's final
        agreement, run_epoch's last act in here) raises it, as without deferring; with
        `raise_on_leaving` False the caller acts on `signum` itself (the epoch's end save: the
        epoch's row is written first)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous: dict[int, object] = {}

        def record(signum, frame):
            if self.signum is None:
                self.signum = signum
            if not self.repeats_wait:
                _put_back(previous)

        for sig in (signal.SIGINT, *STOP_SIGNALS):
            handler = signal.getsignal(sig)
            if handler is signal.SIG_IGN or handler is None:  # None: set outside Python, left alone
                continue
            previous[sig] = handler
            signal.signal(sig, record)
        try:
            yield self
        finally:
            # A launcher's worker with a stop recorded keeps recording repeats until it ends: after the
            # steps (the epoch's end save, the unwinding) a repeat (the launcher's copy, a second
            # Ctrl-C) would stop it at once (the CLI's handler), its save cut short. The launcher's SIGKILL
            # after its timeout ends one that hangs.
            if self.signum is None or not self.repeats_wait:
                _put_back(previous)
        if raise_on_leaving and self.signum is not None and not self.agreed:
            raise self.error()

    def error(self) -> KeyboardInterrupt:
        """The exception the CLI's handler raises for the recorded signal."""
        assert self.signum is not None
        return KeyboardInterrupt() if self.signum == signal.SIGINT else Terminated(self.signum)


def _put_back(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    previous.clear()


_now = time.monotonic  # the clock a test may replace


class SaveClock:
    """--save-every: rank 0's clock says when a save within an epoch is due (the ranks agree at a
    sync point, `agree_at_sync`). 0 minutes: never (saves at epoch ends and stops only)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.last = _now()

    def due(self) -> bool:
        return bool(self.seconds) and dist_utils.is_main() and _now() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = _now()


def agree_at_sync(stops: StopRequests, clock: SaveClock, device: torch.device) -> tuple[int | None, bool]:
    """(the stop signal any rank recorded, None: none; whether rank 0's clock asks for a save). One
    all-reduce of two numbers with several processes: called only where the loop syncs the host."""
    if stops.signum is None and closed_stdout.stderr_gone():  # a reader gone: saved, then ended as a stop
        stops.signum = signal.SIGPIPE
    mine = [stops.signum or 0, int(clock.due())]
    if dist_utils.world_size() > 1:
        # on the device: NCCL reduces device tensors; .tolist() is a host sync, at a sync point
        mine = dist_utils.all_reduce_max(torch.tensor(mine, dtype=torch.int64, device=device)).tolist()
    signum, due = mine
    if signum:
        stops.signum = stops.signum or signum  # another rank's: this rank stops with it
        stops.agreed = True
    return (signum or None), bool(due)
