"""A command whose stdout its reader closed (`moco-fast export ... | head -1`, `| grep -q`, a pager
quit early) ends as a Unix tool that SIGPIPE ends: quietly, with exit status 128 + SIGPIPE (141);
one that had failed keeps its own status (ended_quietly, failed_with).
Python ignores SIGPIPE, so the next print raised BrokenPipeError, a traceback; or, where the lines
waited in stdout's buffer, the interpreter's last flush failed ("Exception ignored ... BrokenPipeError",
exit status 120). Each command prints after it has written its files (export, convert, a classifier's
result, a sweep's table), so nothing but the lines is lost. A BrokenPipeError while stdout is still
read (a socket's, a worker's pipe) is another error and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator

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


def closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader is gone: poll reports an error (or a hang-up)
    on it whatever was asked. A file, a terminal, a pipe still read, or a stream with no descriptor
    (a test's capture): False."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
    except (AttributeError, OSError, ValueError):  # no stdout, no descriptor, a platform without poll
        return False
    poll.register(fd, 0)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))


def _discard() -> None:
    """stdout to /dev/null: what is still in its buffer goes there at exit (no second error), as
    Python's docs advise ("Note on SIGPIPE"). The descriptor, not sys.stdout: print() and the
    interpreter's last flush write through the same one."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(null, sys.stdout.fileno())
    finally:
        os.close(null)
