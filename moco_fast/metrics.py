"""Run logs: one JSON row per epoch in metrics.jsonl, TensorBoard scalars, and a progress bar."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import threading
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.std import TqdmDefaultWriteLock

from moco_fast import bar_lines, closed_stdout
from moco_fast.durable import fsync_contents
from moco_fast.text import plural
from moco_fast.threads import handle_thread_errors

log = logging.getLogger("moco_fast")

METRICS_NAME = "metrics.jsonl"  # a JSON row per epoch
SUMMARY_NAME = "summary.json"  # the final row, with the final evaluation


def share_bar_lock() -> None:
    """tqdm's lock between processes, made as under fork whatever multiprocessing's default, where
    tqdm has made none yet: under another (Python 3.14's forkserver; spawn) it is a named semaphore,
    and a process that ended without its exit handlers (stop_watch's os._exit, a SIGKILL) left the
    resource tracker's "There appear to be 1 leaked semaphore objects to clean up at shutdown" after
    the command's last line. Forked children (DataLoader workers) share it: their lines under their
    parent's bar take it (bar_lines.below_the_parents_bar). A /dev/shm with no room for it: none, as
    tqdm's own does then (a full one is named where workers start). Where a command starts (cli._command,
    a `--gpus` worker: launch._reported), not at import: code that imports moco_fast keeps tqdm's own.
    The process's bars are its own from there on (bar_lines.own_bars)."""
    bar_lines.own_bars()
    if not hasattr(TqdmDefaultWriteLock, "mp_lock"):
        try:
            TqdmDefaultWriteLock.mp_lock = multiprocessing.get_context("fork").RLock()
        except OSError:
            TqdmDefaultWriteLock.mp_lock = None


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0) -> tqdm:
    # stderr guarded: during a training, a reader gone (`2>&1 | head`) is a stop, not this bar's error
    file = closed_stdout.Guarded(sys.stderr)
    return tqdm(
        total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, file=file
    )


def rate(per_s: float) -> str:
    """Images a second as a person reads them: whole numbers, and two digits below 10 (a wide
    network on a CPU makes 0.23 img/s, which ".0f" showed as 0)."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2g}"


def read_rows(out: str | Path) -> list[dict[str, Any]]:
    """The rows of OUT/metrics.jsonl in order (none without the file); a row cut short by a crash
    is left out, with a warning (_lines)."""
    return [row for _, row in _lines(Path(out) / METRICS_NAME) if row is not None]


_WARNED: set[tuple[str, int, str]] = set()  # the lines _lines has warned of (said once per process)


def torn_lines_said() -> set[tuple[str, int, str]]:
    """The lines this process has warned of (_lines), for the processes it starts (train --gpus's
    workers: launch._train_worker), which then do not say them again."""
    return set(_WARNED)


def said_already(lines: set[tuple[str, int, str]]) -> None:
    """Lines that the process which started this one has warned of (torn_lines_said): not said again."""
    _WARNED.update(lines)


def _says_torn_lines() -> bool:
    """Whether this process warns of a torn line: rank 0 of a run alone, as the run's other warnings.
    Every rank reads the file (the CLI's --resume, the run folder's checks), and each said it: a
    torchrun worker before its process group is made, so RANK too, which torchrun sets, where the
    environment describes a group (join.describes_group, as --print-config reads it): a RANK
    without WORLD_SIZE starts no group, and its one process says it."""
    from moco_fast import distributed as dist_utils
    from moco_fast.join import describes_group

    return (not describes_group() or os.environ["RANK"] == "0") and dist_utils.is_main()


def _lines(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """Each line of `path` with its row, None where the line is no JSON object (a row cut short by a
    power loss or a full disk, which MetricsWriter.write ends with its newline): such a line is named
    in a warning, file and line number, once a run (by rank 0: _says_torn_lines)."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            row = None
            said = (str(path), number, line)
            if line.strip() and said not in _WARNED and _says_torn_lines():  # an empty line: nothing lost
                _WARNED.add(said)
                log.warning("%s:%d: not a row (cut short by a crash?), skipped: %r", path, number, line[:60])
        parsed.append((line, row))
    return parsed


def sync_rows(out: str | Path) -> None:
    """fsync(2) of OUT/metrics.jsonl, where there is one: the rows written so far on disk before a
    checkpoint that covers them is (RunCheckpoints.save). Rows are appended without one (a row per
    epoch, each in the page cache only): a power loss after the save kept the checkpoint and lost
    them, and the run resumed from it never writes them again. Once a save, not once a row."""
    path = Path(out) / METRICS_NAME
    if path.is_file():
        fsync_contents(path)


def owes_row(out: str | Path, row: Any) -> bool:
    """Whether OUT/metrics.jsonl lacks the epoch of `row` (a checkpoint's: a run killed in the kNN
    monitor after its epoch's save left it unwritten), which --resume then writes there."""
    return isinstance(row, dict) and all(r.get("epoch") != row.get("epoch") for r in read_rows(out))


class MetricsWriter:
    def __init__(self, out: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.out = Path(out)
        self.tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))
            handle_thread_errors(_raised_again_by_the_writer)
        except ImportError:  # tensorboard is a dependency, but a run must not die without it
            log.warning("tensorboard is not installed: no TensorBoard logs")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        path = self.out / METRICS_NAME
        try:
            with open(path, "ab+") as fh:  # appends, whatever the position read from
                # a last row without its newline (a power loss, a full disk) is ended first: joined
                # to this one, neither could be read
                end = fh.seek(0, os.SEEK_END)
                torn = end > 0 and fh.seek(end - 1) >= 0 and fh.read(1) != b"\n"
                fh.write((b"\n" if torn else b"") + (json.dumps(row) + "\n").encode())
        except OSError as e:
            if e.filename:
                raise
            raise OSError(e.errno, e.strerror, str(path)) from e  # a full disk: name the file
        if self.tb is not None:
            try:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, row.get("epoch", 0))
            except OSError as e:  # its writer thread's error (a full disk), raised here: name the folder
                raise _named(e, self.out / "tb") from e
        log.info("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def write_summary(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from moco_fast.checkpoint import atomic_write_text

        atomic_write_text(self.out / SUMMARY_NAME, json.dumps(row, indent=2) + "\n")

    def keep_epochs(self, last: int, last_row: dict[str, Any] | None = None) -> None:
        """Drop rows of epochs after `last` (the checkpoint a run resumes from), and write that
        epoch's row (`last_row`, which the checkpoint holds) where it is missing: a run that ended
        between its epoch's checkpoint and its row (in the kNN monitor) would otherwise lack it."""
        path = self.out / METRICS_NAME
        if not self.enabled:
            return
        lines = _lines(path)  # a row cut short by a crash (warned of there) and empty lines go too
        kept = [line for line, row in lines if row is not None and row.get("epoch", 0) <= last]
        if len(kept) != len(lines):
            # rows only: a torn line counted as one of the epochs' rows dropped (_lines names it)
            if dropped := sum(row is not None for _, row in lines) - len(kept):
                log.info(
                    "metrics.jsonl: dropped %s after epoch %d (the checkpoint resumed)", plural(dropped, "row"), last
                )
            from moco_fast.checkpoint import atomic_write_text

            # atomically: a kill or a full disk in a rewrite in place would have lost the rows kept
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        if last_row is not None and last_row.get("epoch") == last and owes_row(self.out, last_row):
            log.info("metrics.jsonl: epoch %d's row from the checkpoint (the run ended before writing it)", last)
            self.write(last_row)

    def close(self) -> None:
        if self.tb is not None:
            tb, self.tb = self.tb, None
            try:
                tb.close()
            except OSError as e:
                raise _named(e, self.out / "tb") from e


def _raised_again_by_the_writer(args: threading.ExceptHookArgs) -> bool:
    """TensorBoard's event-file thread keeps its error, and the writer's next call in the training
    loop raises it (MetricsWriter then names the folder, one line): for what the machine refuses (a
    full disk), the thread's own traceback would only say it first, above that line."""
    from moco_fast.cli import ENVIRONMENT_ERRNOS

    e = args.exc_value
    return (
        type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS
    )


def _named(e: OSError, path: Path) -> OSError:
    """`e`, or where it names no file (a write to an open file), the same error naming `path`."""
    return e if e.filename else OSError(e.errno, e.strerror, str(path))
