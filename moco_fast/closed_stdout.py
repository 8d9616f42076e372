"""A command whose stdout its reader closed (`moco-fast export ... | head -1`, `| grep -q`, a pager
quit early) ends as a Unix tool that SIGPIPE ends: quietly, with exit status 128 + SIGPIPE (141);
one that had failed keeps its own status (ended_quietly, failed_with).
Python ignores SIGPIPE, so the next print raised BrokenPipeError, a traceback; or, where the lines
waited in stdout's buffer, the interpreter's last flush failed ("Exception ignored ... BrokenPipeError",
exit status 120). Each command prints after it has written its files (export, convert, a classifier's
result, a sweep's table), so nothing but the lines is lost. A BrokenPipeError while stdout is still
read (a socket's, a worker's pipe) is another error and keeps its traceback.

A training run's stderr whose reader closed (`moco-fast train ... 2>&1 | head`) ended the run at its
next progress-bar write in the same way, without saving the steps since its last checkpoint. During
a training (closed_stderr_stops) it is a stop instead: stderr goes to /dev/null, and the run saves
at its next progress update and ends as a stop signal ends it (stops.agree_at_sync), status 141.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator
from typing import IO

EXIT_STATUS = 128 + signal.SIGPIPE


def ended_quietly(command: Callable[[], int]) -> int:
    """command()'s exit status, its output flushed while its pipe is known; EXIT_STATUS where stdout
    is closed, unless the command had ended with its own failure (a sweep's diverged settings: 1), which
    it said on stderr and which the lost lines do not replace. Flushed also as --help, --version or a
    parse error exits (SystemExit)."""
    status = 0
    try:
        try:
            status = command()
        except SystemExit:
            _flush()
            raise
        _flush()
        return status
    except BrokenPipeError as error:
        if not closed():
            raise
        _discard()
        return status or getattr(error, "failed_status", 0) or EXIT_STATUS


@contextlib.contextmanager
def failed_with(status: int) -> Iterator[None]:
    """Around the lines a command prints after it has failed with `status` (and said so on stderr): a
    closed stdout that ends it there ends it with `status`, as one at the last flush does (ended_quietly),
    not with EXIT_STATUS. 0: nothing failed, nothing changes."""
    try:
        yield
    except BrokenPipeError as error:
        if status:
            error.failed_status = status
        raise


def _flush() -> None:
    if sys.stdout is not None:  # None: started with stdout closed (`>&-`), where print writes nothing
        sys.stdout.flush()


def closed(stream: IO[str] | None = None) -> bool:
    """Whether stdout (or `stream`) is a pipe (or socket) whose reader is gone: poll reports an error
    (or a hang-up) on it whatever was asked. A file, a terminal, a pipe still read, or a stream with no
    descriptor (a test's capture): False."""
    try:
        fd = (sys.stdout if stream is None else stream).fileno()
        poll = select.poll()
    except (AttributeError, OSError, ValueError):  # no stdout, no descriptor, a platform without poll
        return False
    poll.register(fd, 0)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))


def _discard(stream: IO[str] | None = None) -> None:
    """stdout (or `stream`) to /dev/null: what is still in its buffer goes there at exit (no second
    error), as Python's docs advise ("Note on SIGPIPE"). The descriptor, not sys.stdout: print() and
    the interpreter's last flush write through the same one."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(null, (sys.stdout if stream is None else stream).fileno())
    finally:
        os.close(null)


_training = 0  # closed_stderr_stops' depth: a sweep's settings train one after another, each in it
# a write to stderr found its reader gone while _training (stderr_went_away). Kept for the rest of the
# process, as stderr stays /dev/null's: a reader gone after a training's last sync (its final kNN) stops
# the next training at its first sync, which found no error to stop on (a sweep stops before its next
# setting: stderr_lost)
_stderr_gone = False


@contextlib.contextmanager
def closed_stderr_stops() -> Iterator[None]:
    """While in it (trainer.train), a write to stderr that fails because its reader is gone (a progress
    bar's, through Guarded; a log line's, bar_lines.LineHandler) ends nothing: stderr is pointed at
    /dev/null and stderr_gone() is True, which the training loop takes for a stop at its next sync
    (stops.agree_at_sync: it saves the step, then ends as a stop signal ends it, with SIGPIPE's
    status, 141); one gone after a training's last sync stops the next training at its first.
    Outside it such a write raises as before, and the command ends quietly."""
    global _training
    _training += 1
    try:
        yield
    finally:
        _training -= 1


def stderr_gone() -> bool:
    """Whether a training's stderr lost its reader (closed_stderr_stops)."""
    return _stderr_gone


def stderr_lost() -> bool:
    """Between trainings (a sweep, before its next setting): whether stderr's reader is gone, marked
    by a training (stderr_gone) or found closed now (it went while no training wrote to it: a sweep
    setting's evaluation, whose failed log lines logging drops). One found closed is pointed at
    /dev/null and marked, as stderr_went_away does during a training."""
    global _stderr_gone
    if _stderr_gone:
        return True
    if sys.stderr is None or not closed(sys.stderr):
        return False
    _discard(sys.stderr)
    _stderr_gone = True
    return True


def stderr_went_away(stream: IO[str]) -> bool:
    """For a BrokenPipeError of a write to `stream` (stderr, or a bar's stream): whether it is a
    training's stderr whose reader is gone (closed_stderr_stops); then it is pointed at /dev/null, so
    that its later writes (and the buffer's) are taken without an error, and the stop is recorded."""
    global _stderr_gone
    if not _training or not closed(stream):
        return False
    _discard(stream)
    _stderr_gone = True
    return True


class Guarded:
    """`stream` (stderr, where metrics.progress draws its bars) whose writes and flushes that fail for
    a reader gone during a training are taken (stderr_went_away): tqdm's bar raised the BrokenPipeError
    in the training step that updated it. Compares equal to `stream`, as tqdm's own wrapper of it does
    (a line clears the bars on its stream: bar_lines._shares, tqdm's external_write_mode)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __getattr__(self, name: str):
        if name == "_stream":  # not set yet (a copy's): no recursion
            raise AttributeError(name)
        return getattr(self._stream, name)

    def __eq__(self, other: object) -> bool:
        return self._stream == getattr(other, "_stream", other)

    def __hash__(self) -> int:
        return hash(self._stream)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            if not stderr_went_away(self._stream):
                raise
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            if not stderr_went_away(self._stream):
                raise
