"""Log records and warnings written while a progress bar is open: each on a line of its own.

A tqdm bar (metrics.progress, convert's, the resident loader's "loading images") keeps its line open
on stderr, without a newline. A line written meanwhile ("saved checkpoint at step N" of --save-every,
a warning) came right after the bar's text, on the bar's line, and the bar's next draw went after it.
Here the bars are cleared first and drawn again after the line, as tqdm.write does it (through its
`external_write_mode`), and only where this process has a bar open: with none (a rank > 0, whose
epoch bar is disabled, or a forked worker, whose inherited bars are its parent's) the line is written
as before, without tqdm's lock. Not tqdm.write itself, nor its logging_redirect_tqdm: they write the text and its
newline apart (the ranks of a job share stderr, and their lines ran together, see cli.say), and take
tqdm's lock, making it where there is none, for every line of every process.

Locks: a line takes tqdm's lock while the bars are cleared and drawn again, as a bar's own draw does.
The stop handlers (cli._on_stop_signal, stops.StopRequests') take neither it nor logging's; cli's
raises in the main thread, wherever it lands, and the unwinding releases both (both are reentrant for
say() after it): bars_cleared lets go of each part of tqdm's lock that it took, where tqdm's own
release assumed both taken. The stop watch's end (stop_watch._end) runs say() on a thread of its
own, waited for at most a second, for a main thread that holds the lock (a write to a blocked stderr).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO

_PID = os.getpid()  # a forked child's bars are its parent's: it writes as before


@contextlib.contextmanager
def bars_cleared(stream: IO[str]) -> Iterator[None]:
    """While in it, this process's open bars that share `stream`'s terminal are cleared; they are
    drawn again after it. Without an open bar (or tqdm never imported): nothing, and no lock."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)  # imported where a command drew a bar
    bars = getattr(tqdm, "_instances", ())  # a disabled bar is not among them
    if tqdm is None or os.getpid() != _PID or not any(hasattr(bar, "start_t") for bar in list(bars)):
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


def between_bars(showwarning: Callable[..., None]) -> Callable[..., None]:
    """warnings.showwarning that shows a warning through `showwarning` with the open bars cleared
    around it. `showwarning` still decides where it goes: catch_warnings(record=True) puts Python's
    own back, so warnings recorded there stay recorded."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        with bars_cleared(sys.stderr if file is None else file):
            showwarning(message, category, filename, lineno, file, line)

    return show
