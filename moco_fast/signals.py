"""The stop signals and Ctrl-C around a command: what ends it (Terminated, with its line and exit
status), and the two ways a stop is held instead of raised. main's handlers (stop_signals_handled)
raise a stop in the command's body, and hold one that lands outside it (_Ending: as the command
starts, or says its last line and returns). Over the imports a command makes, a stop is held until
they are in (import_holding_signals). One that lands in a fork, whose hooks would swallow it, is
signalled again after it (_after_the_fork). A stop during the training steps is stops.py's."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import logging  # noqa: F401  (its at-fork hooks first: _forks's go around them)
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

from moco_fast import stop_watch
from moco_fast.blocked_stderr import given_up_after

# The signals that end a command as SIGTERM does: SIGTERM (timeout, docker stop, a scheduler's
# kill), SIGHUP (the terminal or ssh session closed), SIGUSR1 and SIGUSR2 (SLURM's --signal warning
# before a time limit or a preemption). Their default action ends the process at once, leaving
# temporary files and saying nothing.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


# The stops that the process ignores once its command is over and the interpreter ends (quiet_at_exit):
# Ctrl-C, and SLURM's warnings before a time limit. SIGTERM and SIGHUP keep their default action, so
# that an ending that hangs (a library's teardown) can still be ended.
QUIET_AT_EXIT = (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
_quiet_at_exit_registered = False


def quiet_at_exit() -> None:
    """From the last exit hook on, QUIET_AT_EXIT are ignored. As the interpreter ends it puts back
    the default action of each signal that has a Python handler, and then unloads torch (a second or
    more): a Ctrl-C then ended a command that had done its work and said so ("wrote 36 images to
    ...") with exit status 130 and no line, where one a moment before, as the command returned, was
    dropped (_Ending). main registers it as it starts, before the command imports torch and
    multiprocessing, so that their exit hooks run before it and a stop still reaches them. Once."""
    global _quiet_at_exit_registered
    if not _quiet_at_exit_registered:
        _quiet_at_exit_registered = True
        atexit.register(_ignore_quiet_stops)


def _ignore_quiet_stops() -> None:
    for sig in QUIET_AT_EXIT:
        signal.signal(sig, signal.SIG_IGN)


class Terminated(KeyboardInterrupt):
    """A signal of STOP_SIGNALS (`signum`): unwinds like Ctrl-C, so that temporary files go; the
    command ends with stop_line and exit status 128 + signum. A torchrun or `--gpus` worker ends the
    same way (the launcher reads its exit status as a stop: launch.run_workers); during the training
    steps the signal is recorded instead (stops.StopRequests)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signal.Signals(signum)


def stop_line(stop: KeyboardInterrupt) -> str:
    """The line a command stopped by `stop` ends with (its exit status: exit_status)."""
    if not isinstance(stop, Terminated):
        return "interrupted"
    return "terminated" if stop.signum == signal.SIGTERM else f"stopped by {stop.signum.name}"


def exit_status(stop: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended: 130 for Ctrl-C."""
    return 128 + (stop.signum if isinstance(stop, Terminated) else signal.SIGINT)


_MAIN_PID = os.getpid()
_sigchld_before: Callable | int | None = None  # the SIGCHLD handler that a stop replaced, until put back


class _Ending:
    """The stops that main's handlers get outside its command's body (`body`, the code of
    cli._command; _outside_the_command): as the command says its last line and returns, or as it
    starts. They are held, not raised: raised there, a stop's traceback came after the line or
    instead of it, and could block on a full pipe (the body acts on one held before it began:
    raise_held_stop). The first calls `first()` where saying_the_last_line set it (the line's
    give-up, blocked_stderr); one more ends the process at once by its default action: a last line
    to a pipe nobody reads blocks for ever, and held stops could not end it."""

    def __init__(self, body: Callable) -> None:
        self.body = body.__code__
        self.held: list[int] = []
        self.first: Callable[[], None] | None = None

    def hold(self, signum: int) -> None:
        if self.held:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.held.append(signum)
        if self.first is not None and len(self.held) == 1:
            self.first()

    def arm(self, first: Callable[[], None] | None) -> None:
        """first() from now on (None: no more), at once where a stop is held already. Called twice
        where a stop lands between the two steps: first() starts a timer once (given_up_after)."""
        self.first = first
        if first is not None and self.held:
            first()


_ending: _Ending | None = None  # main's, around its handlers (ending_held)


@contextlib.contextmanager
def ending_held(body: Callable) -> Iterator[None]:
    """While in it, a stop that main's handlers (stop_signals_handled, entered in it) get outside
    the command's body, the function `body` (cli._command), is held (_Ending). Main thread only."""
    global _ending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ending, _ending = _ending, _Ending(body)
    try:
        yield
    finally:
        _ending = ending


def _outside_the_command(frame) -> bool:
    """Whether a stop that lands at `frame` (the main thread's, where the handler runs) comes outside
    main's command's body (_Ending.body): it has returned or raised, or not begun. Read from the
    frames that run, not from a flag that the error path would set: a stop could land before it."""
    if _ending is None:  # not main's: a `--gpus` worker's training, a test's
        return False
    while frame is not None:
        if frame.f_code is _ending.body:
            return False
        frame = frame.f_back
    return True


def raise_held_stop() -> None:
    """The stop that main's handlers held before its command's body began (_Ending), raised as the
    body begins: through the handlers, it ends the command there. Main thread only: _ending is the
    main thread's command's, and another thread's command would take its stop."""
    if _ending is not None and _ending.held and threading.current_thread() is threading.main_thread():
        signal.raise_signal(_ending.held.pop())


@contextlib.contextmanager
def saying_the_last_line() -> Iterator[Callable[[], None]]:
    """Around a command's last line: yields bound(), from which on the line is given up after a
    while where stderr takes nothing (blocked_stderr), also called as a stop is held (_Ending).
    Main thread only: elsewhere neither."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    ending = _ending
    with given_up_after() as bound:
        if ending is not None:
            ending.arm(bound)
        try:
            yield bound
        finally:
            if ending is not None:
                ending.arm(None)


# Forks in progress in this process (one item each), from the first of os.fork's before-hooks to the
# last of its after-in-parent ones (ours, registered after logging's, so around them). A stop signal
# that lands in a fork (a DataLoader starting its workers: the kNN's, --loader torch's) runs its
# handler in the first Python code after the fork, logging's hook, and Python ignores what such a
# hook raises ("Exception ignored in: <function _releaseLock>"): the Ctrl-C, or SLURM's SIGTERM, was
# lost and the run went on to exit status 0. The handler hands it to _after_the_fork instead.
# The hooks are C methods of the list, which run no bytecode: a handler runs at a Python function's
# first one, and in a Python hook that counted, one pending as the fork began ran before the count,
# raised there (lost) and left it at -1, every later stop deferred for ever. A fork already in
# progress as this module registers them runs the after-hook alone: it takes the last item if there is
# one (the list's pop raised IndexError there, "Exception ignored in: <built-in method pop ...>").
_forks: list[None] = []
os.register_at_fork(
    before=partial(_forks.append, None),
    after_in_parent=partial(_forks.__delitem__, slice(-1, None)),
    after_in_child=_forks.clear,
)


def _after_the_fork(signum: int) -> None:
    """Signal `signum` again to the main thread once no fork is in progress: a thread waits for the
    forks' ends (their hooks, C methods, wake no one: it looks every millisecond; a fork lasts a few),
    as the handler runs inside one of them (_forks). The signal itself, to the main thread: its
    handler runs at the main thread's next bytecode, out of the hooks by then (or in another fork,
    where it comes back here), and it ends a read or wait that the main thread is blocked in (a
    DataLoader's for its workers' first batch), which _thread.interrupt_main left waiting."""
    main = threading.main_thread().ident

    def deliver() -> None:
        while _forks:
            time.sleep(0.001)
        signal.pthread_kill(main, signum)

    threading.Thread(target=deliver, name="stop-after-fork", daemon=True).start()


def _on_stop_signal(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked worker inherited this handler: die as before
        if signum == signal.SIGINT:  # Python's own handler was there: a KeyboardInterrupt
            signal.default_int_handler(signum, frame)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _forks:  # raised here, it would be lost in os.fork's hooks
        _after_the_fork(signum)
        return
    if signum != signal.SIGINT:  # the stop watch's signals (stop_watch.watching): acted on, or held
        stop_watch.handler_ran()
    if _outside_the_command(frame):
        _ending.hold(signum)
        return
    if signum == signal.SIGINT:
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt
    # A signal to the process group (SLURM, docker stop) ends the DataLoader workers too; torch's SIGCHLD
    # handler would then raise "worker killed by signal" wherever the unwinding is, even at exit (a
    # traceback after "terminated"). Their deaths are expected now: a handler that does nothing (not
    # SIG_DFL, which turns a SIGCHLD already pending into "OSError: Signal 17 ignored due to race
    # condition"; not SIG_IGN, which reaps the children before multiprocessing can join them).
    # The one it replaces (torch's) is put back as the next command starts (_put_back_sigchld).
    global _sigchld_before
    replaced = signal.signal(signal.SIGCHLD, _children_end)
    if replaced is not _children_end:  # a second stop: the first one kept the handler to put back
        _sigchld_before = signal.SIG_DFL if replaced is None else replaced  # None: set outside Python
    raise Terminated(signum)


def _children_end(signum, frame):
    """SIGCHLD after a stop signal: the workers' ends are expected (see _on_stop_signal)."""


@contextlib.contextmanager
def stop_signals_handled(end: Callable[[int], None] | None = None) -> Iterator[None]:
    """While in it, STOP_SIGNALS end the process's command as Terminated (_on_stop_signal), not by
    their default action; one that is ignored stays ignored (`nohup`'s SIGHUP: the command goes on).
    Ctrl-C too, where Python's own handler is in place (a program's own handler stays), as that
    raises it. Outside main's command's body, they are held instead (_Ending).
    In the main thread only (elsewhere: nothing). Also in a torchrun or `--gpus` worker: the default
    action killed one that a stop reached outside the training steps (the kNN, a save, the data scan),
    and the launcher reported a failed worker. A worker that waits for rank 0 (the kNN) waits in
    Python (distributed.barrier), where the handler runs at once; one blocked in native code (a
    collective on a peer that died) is ended by stop_watch after a few seconds, through `end(signum)`
    (a worker's: its line or its note to the launcher; None: no watch, a process of its own)."""
    global _MAIN_PID
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _MAIN_PID = os.getpid()
    _put_back_sigchld()
    previous = {}
    try:  # from the first handler set: a stop that lands while the others are set raises in here
        for sig in (signal.SIGINT, *STOP_SIGNALS):
            handler = signal.getsignal(sig)
            if handler is signal.SIG_IGN or (sig == signal.SIGINT and handler is not signal.default_int_handler):
                continue
            handler = signal.signal(sig, _on_stop_signal)
            previous[sig] = signal.SIG_DFL if handler is None else handler  # None: set outside Python
        with stop_watch.watching(end, _on_stop_signal, STOP_SIGNALS) if end else contextlib.nullcontext():
            yield
    finally:  # every one, where a stop lands in between (set_handlers)
        set_handlers(previous)


def set_handlers(handlers: dict[signal.Signals, Callable | int]) -> None:
    """Each signal's handler set as `handlers` says, every one of them even where a stop lands between
    two: one whose handler is set already raises its stop there (signal.signal runs a pending
    handler before it sets the next), or one whose handler is still to be replaced (a launcher's), and
    the loop ended with the later signals on the handlers they had. That stop goes on once all are
    set. Main thread only, as signal.signal. A second stop while the rest are set ends that too: as
    a repeated Ctrl-C, it stops at once."""
    try:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    finally:  # after a stop between two, the rest; each one set already is set again, to the same
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _put_back_sigchld() -> None:
    """The SIGCHLD handler that an earlier command's stop replaced (torch's, which it sets once per
    process) put back as the next command starts, in a process that went on (a test, a notebook):
    without it, a later DataLoader's dead worker was found by torch's status check alone, 5 s on. Not
    as the stopped command ends: its workers, which a stop to the process group ends too, may die
    after that, and torch's handler raised "DataLoader worker (pid N) is killed by signal:
    Terminated", a traceback at exit after "terminated". gc first: an iterator of the stopped command
    that a reference cycle still holds names its dead workers to torch's handler. Put back once: a
    handler held on (a test's, whose finaliser set the no-op again) was put back by every later command."""
    global _sigchld_before
    if signal.getsignal(signal.SIGCHLD) is _children_end and _sigchld_before is not None:
        gc.collect()
        signal.signal(signal.SIGCHLD, _sigchld_before)
        _sigchld_before = None


# What a command imports before it runs: torch (2 s) and torchvision (1.5 s, whose C++ ops load the
# same way). A command whose parser sets `held_imports` imports only those: `convert` never imports
# torchvision, and holding it would add 1.5 s to its start.
HELD_IMPORTS = ("torch", "torchvision")


@contextlib.contextmanager
def _stops_held() -> Iterator[list[int]]:
    """While in it, Ctrl-C and the STOP_SIGNALS are recorded in the list it yields, not acted on;
    the handlers from before are put back after. Main thread only."""
    held: list[int] = []
    sigs = (signal.SIGINT, *STOP_SIGNALS)
    previous = {sig: signal.getsignal(sig) for sig in sigs}
    try:  # from the first handler set: one that lands while the others are set raises in here
        for sig in sigs:
            signal.signal(sig, lambda signum, frame: held.append(signum))
        yield held
    finally:
        # every one, where a stop lands in between: one left recording would swallow the later stops.
        # None: set outside Python
        set_handlers({sig: signal.SIG_DFL if h is None else h for sig, h in previous.items()})


@contextlib.contextmanager
def stops_held() -> Iterator[None]:
    """While in it, Ctrl-C and the STOP_SIGNALS are held (_stops_held), then the first is acted on as
    it ends, through the handlers in place then (the command's); one held in a block that raises goes
    with its error. For what a stop must not split: an import (import_holding_signals), a temporary
    folder made and its removal registered (launch.run_workers). In another thread it holds nothing:
    no handler can be set there, and a stop runs its handler in the main thread, not in this block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _stops_held() as held:
        yield
    if held:
        signal.raise_signal(held[0])


def import_holding_signals(modules: tuple[str, ...]) -> None:
    """Imports what a command imports (HELD_IMPORTS, or its own `held_imports`; a bench's, in
    bench/before_rows.py) with Ctrl-C and the STOP_SIGNALS held until it is in, then acts on them:
    one that lands in the C++ side of the import (a pybind11 callback) aborted the process (SIGABRT,
    "terminate called after throwing ... KeyboardInterrupt")."""
    with stops_held():
        for name in modules:
            importlib.import_module(name)
