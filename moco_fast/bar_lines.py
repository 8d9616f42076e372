"""Log records and warnings written while a progress bar is open: each on a line of its own.

A tqdm bar (metrics.progress, convert's, the resident loader's "loading images") keeps its line open
on stderr, without a newline. A line written meanwhile ("saved checkpoint at step N" of --save-every,
a warning) came right after the bar's text, on the bar's line, and the bar's next draw went after it.
Here the bars are cleared first and drawn again after the line, as tqdm.write does it (through its
`external_write_mode`), and only where this process has a bar open: with none (a rank > 0, whose
epoch bar is disabled) the line is written as before, without tqdm's lock. A forked child (a
DataLoader worker, which warns of an unreadable image) cannot clear and redraw its parent's bar: its
line starts at the start of the bar's line instead (below_the_parents_bar; worker_line for FFCV's
writer's workers, which start before its bar). Not tqdm.write itself,
nor its logging_redirect_tqdm: they write the text and its newline apart (the ranks of a job share stderr, and their lines ran together, see cli.say), and take
tqdm's lock, making it where there is none, for every line of every process.

Locks: a line takes tqdm's lock while the bars are cleared and drawn again, as a bar's own draw does.
The stop handlers (signals._on_stop_signal, stops.StopRequests') take neither it nor logging's;
the CLI's raises in the main thread, wherever it lands, and the unwinding releases both (both are reentrant for
say() after it): bars_cleared lets go of each part of tqdm's lock that it took, where tqdm's own
release assumed both taken. The stop watch's end (stop_watch._end) runs say() on a thread of its
own, waited for at most a second, for a main thread that holds the lock (a write to a blocked stderr).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import IO

from moco_fast import closed_stdout

_PID = os.getpid()  # the process whose bars are its own (own_bars); a forked child's are its parent's


def own_bars() -> None:
    """This process's bars are its own from now on, not a forked parent's (below_the_parents_bar):
    called where a command starts (metrics.share_bar_lock). The PID at this module's import alone
    took a program's child that it forked to run a command (after importing moco_fast) for a
    DataLoader worker: its lines went under its own bar as under a parent's, the bar not drawn again."""
    global _PID
    _PID = os.getpid()


# How long a forked child waits for tqdm's lock before writing its line without it: a parent killed
# (SIGKILL) while drawing its bar leaves the lock taken for ever.
CHILD_LOCK_WAIT_S = 5.0


@contextlib.contextmanager
def bars_cleared(stream: IO[str]) -> Iterator[None]:
    """While in it, this process's open bars that share `stream`'s terminal are cleared; they are
    drawn again after it. Without an open bar (or tqdm never imported): nothing, and no lock."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)  # imported where a command drew a bar
    bars = [bar for bar in list(getattr(tqdm, "_instances", ())) if hasattr(bar, "start_t")]  # not a disabled one
    if tqdm is None or not bars:
        yield
        return
    if os.getpid() != _PID:
        with below_the_parents_bar(stream, tqdm, bars):
            yield
        return
    lock = tqdm.get_lock()
    parts = getattr(lock, "locks", None)  # tqdm's own: a multiprocessing and a threading RLock
    if parts is None:  # another lock (tqdm.set_lock): tqdm's way
        with tqdm.external_write_mode(file=stream):
            yield
        return
    held = any(_owned(part) for part in parts)  # this thread holds it already: its holder lets go of it
    try:
        if not held:
            lock.acquire()
        with tqdm.external_write_mode(file=stream, nolock=True):
            yield
    finally:
        # A stop signal's handler raises where it lands: between the two parts' acquire (one taken, the
        # other not), external_write_mode's release of both raised "cannot release un-acquired lock",
        # which LineHandler reported as a logging error in place of the stop (the command went on);
        # within the release, a part stayed taken, and any other thread's bar (FFCV's writer) waited
        # for it for ever. Each part this line took is let go, also by a second pass where one landed.
        if not held:
            try:
                _let_go(parts)
            except BaseException:
                _let_go(parts)
                raise


@contextlib.contextmanager
def below_the_parents_bar(stream: IO[str], tqdm, bars: list) -> Iterator[None]:
    """In a forked child whose parent had `bars` open when it forked (tqdm's instances, copied by the
    fork), one of them on `stream`: the line written while in it starts at the start of the bar's
    line, not after the bar's text. On a terminal the line is cleared first ("\\r" and ANSI's erase to
    its end, as tqdm's own moves use ANSI), and the parent's next draw of the bar goes below the
    line; in a file (a log) the line starts a new one where the file ends within one (the bar's text
    has no newline); elsewhere (a pipe) the bar's line is open while the bar is, and it always does.
    Under the part of tqdm's lock that is shared with the parent (metrics.share_bar_lock), which the
    parent's draws and lines take: the line never lands between the parts of a draw.

    Not the worker's output piped through the parent, which would clear and redraw: it changed what
    the parent's own stderr showed (and what pytest's capsys captured) for every line of every worker.
    The child's copy of the bars is a hint: the training loader's persistent workers keep the first
    epoch's, and the parent has a bar open whenever they make batches."""
    if not any(_shares(bar, stream) for bar in bars):
        yield
        return
    with _at_the_bars_line_start(stream, tqdm):
        yield


def worker_line(line: str, stream: IO[str]) -> None:
    """`line` from a forked worker whose parent draws a bar on `stream` that the worker has no copy
    of: FFCV's writer opens its bar ("writing .beton") after it starts its workers. Written as
    below_the_parents_bar writes a line, from the start of the bar's line."""
    from tqdm import tqdm  # imported already: FFCV's writer draws its bar with it

    with _at_the_bars_line_start(stream, tqdm):
        stream.write(line + "\n")


@contextlib.contextmanager
def _at_the_bars_line_start(stream: IO[str], tqdm) -> Iterator[None]:
    """While in it, a forked child writes from the start of its parent's bar's line (_line_start),
    under the part of tqdm's lock shared with the parent (below_the_parents_bar)."""
    shared = [part for part in getattr(tqdm.get_lock(), "locks", ()) if hasattr(part, "_semlock")]
    taken = [part for part in shared if part.acquire(timeout=CHILD_LOCK_WAIT_S)]
    try:
        stream.write(_line_start(stream))
        yield
        stream.flush()
    finally:
        for part in reversed(taken):
            part.release()


def _shares(bar, stream: IO[str]) -> bool:
    """Whether `bar` draws where `stream` writes: tqdm's rule (external_write_mode), in which
    stdout and stderr share a terminal."""
    return bar.fp == stream or all(f in (sys.stdout, sys.stderr) for f in (stream, bar.fp))


def _line_start(stream: IO[str]) -> str:
    """What a forked child writes before its line under its parent's bar (below_the_parents_bar)."""
    try:
        if stream.isatty():
            return "\r\x1b[K"
        stream.flush()
        fd = stream.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "\n"
        if st.st_size == 0:
            return ""
        # the file's last byte, read through a descriptor of its own: stderr's may be write-only (2>log)
        with open(f"/proc/self/fd/{fd}", "rb") as fh:
            fh.seek(st.st_size - 1)
            return "" if fh.read(1) == b"\n" else "\n"
    except (OSError, ValueError):  # no descriptor (a StringIO), or no /proc: a new line, in case
        return "\n"


def _let_go(parts: list) -> None:
    """Releases each part of tqdm's lock that this thread holds."""
    for part in reversed(parts):
        if _owned(part):
            part.release()


def _owned(lock) -> bool:
    """Whether this thread holds `lock`, a threading RLock or a multiprocessing one."""
    semlock = getattr(lock, "_semlock", None)
    return semlock._is_mine() if semlock is not None else lock._is_owned()


class LineHandler(logging.StreamHandler):
    """logging's StreamHandler (a record in one write), with the open bars cleared around it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with bars_cleared(self.stream):
                super().emit(record)
        except Exception:  # a bar's stream gone: as the write's own errors, never the caller's
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """logging's report of a failed write (StreamHandler.emit calls it too), but for stderr's
        reader gone during a training, a stop (closed_stdout.stderr_went_away): no report."""
        error = sys.exc_info()[1]
        if isinstance(error, BrokenPipeError) and closed_stdout.stderr_went_away(self.stream):
            return
        super().handleError(record)


def between_bars(showwarning: Callable[..., None]) -> Callable[..., None]:
    """warnings.showwarning that shows a warning through `showwarning` with the open bars cleared
    around it. `showwarning` still decides where it goes: catch_warnings(record=True) puts Python's
    own back, so warnings recorded there stay recorded."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        with bars_cleared(sys.stderr if file is None else file):
            showwarning(message, category, filename, lineno, file, line)

    return show
