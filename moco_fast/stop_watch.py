"""A stop signal that a worker's main thread cannot act on.

Python runs a signal's handler in the main thread, between its steps. A torchrun or `--gpus` worker
may sit in native code for long: a rendezvous or a collective that waits for a peer that died (NCCL
waits for its timeout, an hour). The launcher's SIGTERM after another worker's crash, or a user's
stop, then waited for the launcher's SIGKILL after its shutdown timeout (30 s), where the signal's
default action ended the worker at once. Here a thread sees each signal arrive (signal.set_wakeup_fd:
the C-level handler writes its number there, whatever the main thread does); when the main thread
has not run a stop handler within GRACE_S, the thread ends the worker as the handler would have:
`end(signum)` (its line, or its note to the launcher), exit status 128 + the signal, without the
unwinding (a save cut short leaves a temporary file, removed at the next start).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

GRACE_S = 5.0  # well under the launcher's 30 s; a handler runs within milliseconds outside native code
END_S = 1.0  # for `end`'s line or note, on a thread of its own (_end)

_ran = threading.Event()  # a stop handler ran in the main thread: the worker is stopping, as it would alone
_writer: list[socket.socket] = []  # the wakeup socket's end that signals write to, while watching


def handler_ran() -> None:
    """Called by the stop handler (signals._on_stop_signal) as it runs."""
    _ran.set()


@contextlib.contextmanager
def watching(end: Callable[[int], None], handler: object, signums: tuple[int, ...]) -> Iterator[None]:
    """While in it, a signal of `signums` whose Python handler is `handler` and that the main thread
    has not acted on within GRACE_S ends the process from a thread (see the module's docstring).
    Main thread only; inside another `watching`, the outer one watches."""
    if threading.current_thread() is not threading.main_thread() or _writer:
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)  # a signal handler must never block on it
    _ran.clear()
    _writer.append(writer)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    # from here on the fd is put back whatever happens: a stop that lands before the thread starts
    # (its handler raises here) left it set to a socket about to be closed, its number another file's
    try:
        args = (reader, end, handler, frozenset(signums))
        threading.Thread(target=_watch, args=args, name="moco-fast stop watch", daemon=True).start()
        yield
    finally:
        # previous only where the fd is still ours: one that asyncio (add/remove_signal_handler) set or
        # cleared in the meantime stays, and `previous` may since have been closed and its number reused
        # (Python's C handler would write each signal's byte into that file)
        current = signal.set_wakeup_fd(previous)
        if current != writer.fileno():
            signal.set_wakeup_fd(current)
        _writer.clear()
        writer.close()  # the thread reads the end of the stream and ends


def _watch(reader: socket.socket, end: Callable[[int], None], handler: object, signums: frozenset[int]) -> None:
    with reader:
        while data := _received(reader):
            for signum in data:
                if signum not in signums or _ran.is_set() or signal.getsignal(signum) is not handler:
                    continue  # another signal, a stop already acted on, or the steps' own (stops.StopRequests)
                if _ran.wait(GRACE_S) or signal.getsignal(signum) is not handler:
                    continue
                _end(end, signum)


def _end(end: Callable[[int], None], signum: int) -> None:
    """end(signum), then the exit, whatever end does: it runs on a thread of its own, waited for at
    most END_S, as the main thread may hold a lock that it needs (say() closes tqdm's bars under
    tqdm's lock, which a bar's write to a blocked stderr holds), and an error in it (the launcher's
    note on a full /tmp) ended this thread, the worker left to the launcher's SIGKILL."""

    def attempt() -> None:
        with contextlib.suppress(Exception):  # best effort: the exit status says the stop too
            end(signum)

    thread = threading.Thread(target=attempt, name="moco-fast stop watch end", daemon=True)
    thread.start()
    thread.join(END_S)
    # os._exit skips the exit hooks: the torch loader's DataLoader workers, kept across epochs, lived
    # on as orphans until torch's watchdog saw it (up to 5 s), holding the job's stdout and stderr
    end_daemonic_children(grace=0.0)
    os._exit(128 + signum)


def end_daemonic_children(grace: float = 2.0) -> None:
    """At exit, what multiprocessing's own exit hook does, but able to end a worker that ignores
    SIGTERM (loaders/torch_loader.leave_stops_to_the_trainer): that hook sends its daemonic children
    SIGTERM and then waits for them without end, so a process whose workers were still running (an
    iterator held by a traceback or a global at exit) never ended. SIGTERM first; SIGKILL for one
    still alive after `grace` seconds. The torch loader registers it after multiprocessing's hook, so
    it runs before it (atexit: LIFO); _end calls it before os._exit, which skips both."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    for p in children:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _received(reader: socket.socket) -> bytes:
    try:
        return reader.recv(64)
    except OSError:
        return b""


def _in_a_forked_child() -> None:
    # A forked child (a DataLoader worker) would write its own signals to the parent's socket, and
    # the parent's thread would wait for a handler that its main thread never gets to run.
    if _writer:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
            _writer.pop().close()


os.register_at_fork(after_in_child=_in_a_forked_child)
