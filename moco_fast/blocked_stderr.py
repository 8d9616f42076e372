"""The last line of a command that a stop ends, to a stderr that takes nothing: a pipe nobody reads
(`moco-fast train ... 2>&1 | less` with the pager stopped, a reader that hangs) blocked its write
for ever, and the stop never ended the process (a second one did: signals._Ending). Given
WAIT_S seconds, such a stderr is given up: pointed at /dev/null, where the blocked write, woken by
SIGALRM, is retried by Python (PEP 475) and done at once, without an exception in the code that
wrote it. What the process writes there after (its buffered output at exit) goes there too: nobody
reads it. By then the command has unwound: a training run's stop during its steps saved the step
before it was raised (stops.py), so nothing but the line is lost.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator

# Long enough for a pager that a person resumes, or a slow terminal, to take the line.
WAIT_S = 10.0


@contextlib.contextmanager
def given_up_after() -> Iterator[Callable[[], None]]:
    """Yields start(): from its first call, a stderr that still takes nothing WAIT_S seconds later is
    given up (_give_up). Main thread only (SIGALRM wakes it); the timer ends with the block, and so
    does the waking of a write that blocks (_wake_while_blocked)."""
    sent = threading.Event()  # by _give_up: the SIGALRMs from then on are its own
    timer = threading.Timer(WAIT_S, _give_up, (sent,))
    timer.daemon = True
    done = threading.Event()
    wakes: collections.deque[None] = collections.deque()  # one for each SIGALRM of the waker's not yet handled
    waker = threading.Thread(target=_wake_while_blocked, args=(done, wakes), daemon=True)

    def woken(signum, frame) -> None:
        """SIGALRM: _give_up's and the waker's only end a blocked write, which Python then retries.
        Another is the caller's (signal.alarm, a test's timeout), which goes where it went before. The
        waker's are counted, each taken by one SIGALRM, not flagged from the first on as _give_up's
        are: it sends them while stderr merely takes nothing (no stop), and a flag would take every
        later SIGALRM for its own, the watchdog of a program whose line blocks for ever too. A
        caller's SIGALRM that comes while one of the waker's is still pending merges with it (the
        kernel keeps one pending) and is taken for the waker's: a one-shot watchdog can be lost so,
        a repeating one loses that one tick. deque's pop takes no lock, which a handler run within this one would
        wait for."""
        if sent.is_set():
            return
        try:
            wakes.pop()
        except IndexError:
            _as_before(before, signum, frame)

    before = signal.signal(signal.SIGALRM, woken)

    once = threading.Lock()  # taken by the first start(): one that a stop's handler (signals._Ending)
    # calls within another, between its check and its start, started the timer twice (RuntimeError)

    def start() -> None:
        if once.acquire(blocking=False):
            timer.start()

    waker.start()
    try:
        yield start
    finally:
        done.set()
        timer.cancel()
        for thread in (timer, waker):
            if thread.is_alive():
                thread.join()  # a SIGALRM it sent is handled (woken) before the handler from before is back
        signal.signal(signal.SIGALRM, signal.SIG_DFL if before is None else before)  # None: set outside Python


def _as_before(handler, signum: int, frame) -> None:
    """A signal acted on by the handler it had before (None: set outside Python, as SIG_DFL)."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:  # the default action: SIGALRM's ends the process
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def _wake_while_blocked(done: threading.Event, wakes: collections.deque[None]) -> None:
    """In a thread of its own: SIGALRM to the main thread every WAIT_S that stderr takes nothing. A
    stop whose signal lands just before the main thread's write blocks is seen by Python only once
    the write ends (its handler, which calls start(), runs between bytecodes): on a pipe nobody
    reads, never, and that one stop did not end the command. Woken, the write runs the handlers that
    wait and is retried (PEP 475)."""
    main = threading.main_thread()
    while not done.wait(WAIT_S):
        if not _takes_nothing():
            continue
        wakes.append(None)  # before the signal: the main thread may handle it before pthread_kill returns
        try:
            signal.pthread_kill(main.ident, signal.SIGALRM)
        except OSError:  # it ended meanwhile
            wakes.pop()


def _takes_nothing() -> bool:
    """Whether stderr has no room (a closed stderr has nothing to wait for)."""
    try:
        return 2 not in select.select([], [2], [], 0)[1]
    except (OSError, ValueError):
        return False


def _give_up(sent: threading.Event) -> None:
    """In the timer's thread: stderr (and stdout where it is the same pipe) to /dev/null where stderr
    takes nothing (no room in the pipe), then SIGALRM to each thread, the main thread last: the write
    that blocked may be another thread's (a bar's redraw: tqdm's monitor, FFCV's writer), which holds
    stderr's buffer (and tqdm's lock) while it waits, and the main thread's line waits for it."""
    if not _takes_nothing():  # room: the line went, or goes now; or a closed stderr
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        with contextlib.suppress(OSError):  # a closed stdout: stderr alone
            if os.path.samestat(os.fstat(1), os.fstat(2)):
                os.dup2(null, 1)
        os.dup2(null, 2)
    finally:
        os.close(null)
    sent.set()
    main = threading.main_thread()
    for thread in [t for t in threading.enumerate() if t is not main and t is not threading.current_thread()] + [main]:
        with contextlib.suppress(OSError):  # it ended meanwhile
            signal.pthread_kill(thread.ident, signal.SIGALRM)
