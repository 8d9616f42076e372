"""`moco-fast` (also `python -m moco_fast`): one subcommand per module in moco_fast/commands/.

Errors a user can fix (bad data, contradicting flags, missing files) print as one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

from moco_fast import __version__, bar_lines, shared_memory, stop_watch
from moco_fast.blocked_stderr import given_up_after

# Each module defines `register(subparsers)`, which adds its parser and sets `func=run(args)`.
COMMANDS = [
    "moco_fast.commands.train",
    "moco_fast.commands.knn",
    "moco_fast.commands.lincls",
    "moco_fast.commands.finetune",
    "moco_fast.commands.sweep",
    "moco_fast.commands.export",
    "moco_fast.commands.convert",
]


# The commands that run on several processes (under torchrun, or `train --gpus N`). Under torchrun
# every rank would run the others whole, each writing the same files: the second writer of a result
# found the first one's lock ("another moco-fast lincls is writing it now") and left it behind.
DISTRIBUTED_COMMANDS = frozenset({"train"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-fast",
        description="Fast MoCo (Momentum Contrast) self-supervised pretraining. "
        "Run `moco-fast COMMAND --help` for the flags of each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"moco-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


class UserError(Exception):
    """Raised by commands for input a user can fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that end a command with one line and exit status 2 (evaluated only when one is raised)."""
    from moco_fast.config import ConfigError
    from moco_fast.data import DataError
    from moco_fast.divergence import Diverged
    from moco_fast.folder_locks import RunFolderBusy

    return (
        UserError,
        DataError,
        ConfigError,
        Diverged,
        RunFolderBusy,
        FileNotFoundError,
        NotADirectoryError,
        FileExistsError,
    )


def _user_errors_or_none() -> tuple[type[BaseException], ...]:
    """user_errors(), or none where they cannot be imported (an import that a Ctrl-C cut short)."""
    try:
        return user_errors()
    except Exception:
        return ()


# What the machine refuses, not a bug: a full disk or quota, a file-size limit (`ulimit -f`, a
# file system's largest file), a path that may not be written.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS})


def _environment_error(e: BaseException, where: str | None = None) -> str | None:
    """The one line for an OSError of ENVIRONMENT_ERRNOS or an EIO (a failing disk or network file
    system), or None. With its file, the file; an EIO without one (a read or write of a file already
    open) names `where`: what the command reads and writes (command_paths), the most it can say. Only `e`
    itself: an error raised while handling one is another error (checkpoint.atomic_write names the
    file behind torch.save's)."""
    if not isinstance(e, OSError) or (e.errno not in ENVIRONMENT_ERRNOS and e.errno != errno.EIO):
        return None
    text = e.strerror or str(e)
    failed = "the disk or the network file system failed"
    if e.filename:
        return f"{text}: {e.filename}" + (f" ({failed} to read or write it)" if e.errno == errno.EIO else "")
    if e.errno != errno.EIO:  # a full disk's, or a semaphore's that /dev/shm refused: no file of the command's
        return text
    what = f"the command reads and writes {where}" if where else "a file open for reading or writing"
    return f"{text} ({failed}; {what})"


def command_paths(args: argparse.Namespace) -> str | None:
    """What a command reads and writes, from its flags (its parser's `io_paths`: (name, attribute)
    pairs), as an error without a file names it: "SRC data and DST x.beton"; None where not known."""
    named = [
        f"{name} {getattr(args, attr)}" for name, attr in getattr(args, "io_paths", ()) if getattr(args, attr, None)
    ]
    return " and ".join(named) or None


def error_text(e: BaseException) -> str:
    """The one line a user error prints. An error raised in a DataLoader worker comes back wrapped:
    "Caught DataError in DataLoader worker process 0." and the worker's traceback; its own message is
    the traceback's last line, after the exception's name."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        name = f"{type(e).__module__}.{type(e).__qualname__}: "
        for prefix in (name, f"{type(e).__qualname__}: "):
            if last.startswith(prefix):
                return last[len(prefix) :]
    return text


def one_line(e: BaseException, where: str | None = None) -> str | None:
    """The one line that ends a command for `e` (exit status 2): a user error's text, or what the
    machine refused (a full disk, a failing disk; `where`: what the command reads and writes, for an
    error that names no file; a /dev/shm that DataLoader workers filled: shared_memory); None for
    anything else, a bug that keeps its traceback. Also what a `--gpus` worker reports to the
    launcher (launch._recorded)."""
    if not isinstance(e, KeyboardInterrupt) and isinstance(e, _user_errors_or_none()):
        return error_text(e)
    if interruption(e) is not None:
        return None
    return _environment_error(e, where) or shared_memory.exhausted_line(e)


def interruption(e: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C (or stop signal, see STOP_SIGNALS) behind `e`, also when it struck inside code that raised
    another error on its way out (torch.save's zip writer does: "unexpected pos")."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return e
        e = e.__context__
    return None


def os_error_behind(e: BaseException | None) -> OSError | None:
    """The OSError in `e` or behind it (its context): torch.save's zip writer turns a full disk into
    RuntimeError("... unexpected pos ...") raised while handling the OSError."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__context__
    return None


def refuse_torchrun(command: str) -> None:
    """A ConfigError for a command that runs in one process, started by torchrun: before it takes a
    lock or writes a file, so that every rank stops with the same line."""
    from moco_fast.config import ConfigError
    from moco_fast.launch import under_torchrun

    if under_torchrun():
        raise ConfigError(
            f"moco-fast {command} runs in one process: start it without torchrun (every rank would run all "
            "of it, writing the same files; `moco-fast train` is the command that runs on several processes)"
        )


# The signals that end a command as SIGTERM does: SIGTERM (timeout, docker stop, a scheduler's
# kill), SIGHUP (the terminal or ssh session closed), SIGUSR1 and SIGUSR2 (SLURM's --signal warning
# before a time limit or a preemption). Their default action ends the process at once, leaving
# temporary files and saying nothing.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


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
    """The stops that main's handlers get outside its command's body (_outside_the_command): as the
    command says its last line and returns, or as it starts. They are held, not raised: raised
    there, a stop's traceback came after the line or instead of it, and could block on a full pipe
    (the body acts on one held before it began). The first calls `first()` where
    _saying_the_last_line set it (the line's give-up, blocked_stderr); one more ends the process at
    once by its default action: a last line to a pipe nobody reads blocks for ever, and held stops
    could not end it."""

    def __init__(self) -> None:
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


_ending: _Ending | None = None  # main's, around its handlers (_ending_held)


@contextlib.contextmanager
def _ending_held() -> Iterator[None]:
    """While in it, a stop that main's handlers (stop_signals_handled, entered in it) get outside
    the command's body is held (_Ending). Main thread only."""
    global _ending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ending, _ending = _ending, _Ending()
    try:
        yield
    finally:
        _ending = ending


def _outside_the_command(frame) -> bool:
    """Whether a stop that lands at `frame` (the main thread's, where the handler runs) comes outside
    main's command's body (_command): it has returned or raised, or not begun. Read from the frames
    that run, not from a flag that the error path would set: a stop could land before it."""
    if _ending is None:  # not main's: a `--gpus` worker's training, a test's
        return False
    while frame is not None:
        if frame.f_code is _command.__code__:
            return False
        frame = frame.f_back
    return True


def _on_stop_signal(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked worker inherited this handler: die as before
        if signum == signal.SIGINT:  # Python's own handler was there: a KeyboardInterrupt
            signal.default_int_handler(signum, frame)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
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
    finally:
        for sig, handler in previous.items():
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
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def import_holding_signals(modules: tuple[str, ...]) -> None:
    """Imports what a command imports (HELD_IMPORTS, or its own `held_imports`; a bench's, in
    bench/before_rows.py) with Ctrl-C and the STOP_SIGNALS held until it is in, then acts on them:
    one that lands in the C++ side of the import (a pybind11 callback) aborted the process (SIGABRT,
    "terminate called after throwing ... KeyboardInterrupt")."""
    with _stops_held() as held:
        for name in modules:
            importlib.import_module(name)
    if held:
        signal.raise_signal(held[0])  # now, through the handlers the command runs with


def _draws_nothing(*args, **kwargs) -> bool:
    """tqdm's display() for a bar that say() closed."""
    return True


def say(line: str) -> None:
    """The command's last line (an error, `interrupted`) to stderr in one write: print() writes the
    text and its newline apart, and the ranks of a job that share stderr (torchrun, --gpus) ran their
    error lines together. A progress bar that the end cut short is closed first (the epoch's clears
    its line): the line was written after the bar, on the bar's line. A closed bar draws nothing
    more: a thread that was redrawing it (FFCV's writer's, tqdm's monitor) may have seen it open
    just before, and drew it once more after the line, waiting for tqdm's lock while close() held it."""
    tqdm = sys.modules.get("tqdm")  # imported where a command drew a bar
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        with contextlib.suppress(ValueError, OSError):  # its stream closed or gone: nothing to clear
            bar.close()
        bar.display = _draws_nothing  # this bar only; tqdm's update and refresh draw through it
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _ours(filename: str) -> bool:
    """Whether a warning was raised in moco-fast's own code (the package, its loaders and kernels)."""
    roots = [os.path.dirname(__file__)]
    roots += [
        os.path.dirname(m.__file__) for n in ("moco_fast.loaders", "moco_fast.kernels") if (m := sys.modules.get(n))
    ]
    return any(os.path.abspath(filename).startswith(os.path.join(r, "")) for r in roots)


def _warning_as_a_line(fmt):
    """warnings.formatwarning for the CLI: moco-fast's own warnings read as its log lines do
    ("WARNING kNN: k=1000 is more than ..."), without Python's "knn.py:186: UserWarning:" prefix and
    the source line after it, which looked like part of a traceback; other libraries' keep `fmt`.
    (The format, not a showwarning that prints: warnings recorded by catch_warnings(record=True) stay
    recorded; warnings_as_lines' showwarning hands each to the one before it.)"""

    def formatwarning(message, category, filename, lineno, line=None):
        return f"WARNING {message}\n" if _ours(filename) else fmt(message, category, filename, lineno, line)

    return formatwarning


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """While in it, moco-fast's own warnings print as one line each (_warning_as_a_line), and a warning
    shown while a progress bar is open goes on a line of its own (bar_lines.between_bars): around a
    command (main), and around a `--gpus` worker's training (launch._reported), which runs no main().
    On leaving, what it set is put back, and only that: its format, its showwarning and its filters,
    each where it is still its own. Not warnings.catch_warnings, which put back every filter: one
    that a library's import added during the command (once per process) was gone for the rest of a
    process that goes on (a test, a notebook)."""
    before = warnings.formatwarning, warnings.showwarning
    filters = list(warnings.filters)
    ours = _warning_as_a_line(before[0]), bar_lines.between_bars(before[1])
    warnings.formatwarning, warnings.showwarning = ours
    # moco-fast's own warnings are shown (once per place) whatever the caller's filters: PYTHONWARNINGS=ignore
    warnings.filterwarnings("default", module="moco_fast")
    # PIL's DecompressionBombWarning, at each open of an image over its pixel limit, names no file:
    # data.check_image names each such image once. Here, not at import: code that imports moco_fast
    # keeps PIL's warning (and over twice the limit PIL raises, which no filter hides).
    warnings.filterwarnings("ignore", r"Image size \(\d+ pixels\) exceeds limit", RuntimeWarning, r"PIL\.Image")
    set_here = warnings.filters[:2]
    try:
        yield
    finally:
        if warnings.formatwarning is ours[0]:
            warnings.formatwarning = before[0]
        if warnings.showwarning is ours[1]:
            warnings.showwarning = before[1]
        for own in set_here:
            if own not in filters:  # else it was there before the command: it stays
                with contextlib.suppress(ValueError):  # gone already (warnings.resetwarnings)
                    warnings.filters.remove(own)
        # The filters' version moves on, as at any change of them (catch_warnings' exit does it, and
        # puts back the list it found, this one): a warning that "default" showed once during the
        # command is marked in its module's registry, and a caller's filter under ours ("error",
        # "always") skipped it for the rest of the process.
        with warnings.catch_warnings():
            pass


# the commands' path flags and arguments (their argparse dest)
PATH_DESTS = ("data", "out", "checkpoint", "resume", "src", "dst", "output", "save_model")
EMPTY_PATH = "{} is empty: give a path (an unset shell variable?)"


def empty_flag(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The path flag (or SRC, DST...) of the command given as an empty string, or None. `--out "$RUN"`
    with RUN unset made the current folder the run folder (train wrote its checkpoint, config.json and
    tb/ there, --force cleared its run files), `--checkpoint ""` read ./checkpoint.pt."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[args.command]._actions:
        value = getattr(args, action.dest, None)
        if action.dest in PATH_DESTS and isinstance(value, str) and not value.strip():
            return max(action.option_strings, key=len) if action.option_strings else (action.metavar or action.dest)
    return None


def log_as_lines(level: int) -> None:
    """Log records to stderr as moco-fast's lines: "WARNING skipping ...", "INFO saved checkpoint ...",
    moco-fast's own from `level`, other libraries' from WARNING (torch's import sets its own levels, but
    one cut short by Ctrl-C does not, and its exit hooks logged at INFO after "interrupted"). A record
    written while a progress bar is open goes on a line of its own (bar_lines.LineHandler). For the
    CLI (main), a `--gpus` worker (launch._train_worker) and the benches that list --data (bench/throughput.py, bench/ffcv_loader.py), whose
    listing warns as train's does: without it, logging's last resort wrote the bare message."""
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(message)s", handlers=[bar_lines.LineHandler(sys.stderr)]
    )
    logging.getLogger("moco_fast").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    # The parser imports the commands' modules (tens of ms): under main's handlers, which hold a stop
    # there for the command (_Ending), as they do one before its body; before them, a Ctrl-C was a
    # KeyboardInterrupt's traceback
    with _ending_held(), stop_signals_handled(_say_stopped if _in_a_worker() else None):
        parser = build_parser()
        args = parser.parse_args(argv)
        args.empty_flag = empty_flag(parser, args)
        log_as_lines(logging.DEBUG if args.verbose else logging.INFO)
        with warnings_as_lines():
            return _run(args)


def _in_a_worker() -> bool:
    """A process of a job of several (torchrun, or RANK and WORLD_SIZE set by hand)."""
    world = os.environ.get("WORLD_SIZE", "1").strip()  # not a number: the run refuses it (join), in one line
    return (world.isdigit() and int(world) > 1) or "TORCHELASTIC_RUN_ID" in os.environ


def _say_stopped(signum: int) -> None:
    """A torchrun worker's line for a stop that stop_watch acts on."""
    with contextlib.suppress(OSError):
        say(stop_line(Terminated(signum)))


def _command(args: argparse.Namespace) -> int:
    """The command itself: a stop that lands in here ends it (_on_stop_signal)."""
    # One that main's handlers held before this began: now. Main thread only: _ending is the main
    # thread's command's, and another thread's command would take its stop
    if _ending is not None and _ending.held and threading.current_thread() is threading.main_thread():
        signal.raise_signal(_ending.held.pop())
    if getattr(args, "empty_flag", None):
        raise UserError(EMPTY_PATH.format(args.empty_flag))
    # tqdm's import (tens of ms): in here, where a Ctrl-C ends the command with its line, not before
    # main's handlers (a traceback); not at cli's own import
    from moco_fast.metrics import share_bar_lock

    share_bar_lock()  # before a bar is drawn or a worker forked
    if threading.current_thread() is threading.main_thread():
        import_holding_signals(getattr(args, "held_imports", HELD_IMPORTS))
    if args.command not in DISTRIBUTED_COMMANDS:
        refuse_torchrun(args.command)
    return args.func(args) or 0


def _run(args: argparse.Namespace) -> int:
    """The command (_command); a user error or a stop ends it with its one line and exit status."""
    try:
        return _command(args)
    except BaseException as e:
        # The command ends here with its line: a stop that comes from now on is held, and dropped
        # (_Ending). It raised from the handler, a traceback after (or instead of) the line: torchrun's
        # SIGTERM to the ranks that are still saying the error that ended another, a job's second
        # signal. The line can block for ever (a pipe nobody reads): a stop's line, or one during
        # which a stop came, is given up after a while (blocked_stderr), and one more stop ends the
        # process at once.
        with _saying_the_last_line() as bound:
            # A Ctrl-C first: one that struck while torch was being imported leaves it half-imported,
            # and user_errors() imports modules that import torch.
            line = one_line(e, command_paths(args))
            if line is not None:
                say(f"moco-fast {args.command}: error: {line}")
                return 2
            stop = interruption(e)
            if stop is None:
                raise
            bound()
            with contextlib.suppress(OSError):  # stderr on a terminal that SIGHUP says is gone: EIO
                say(stop_line(stop))
            return exit_status(stop)


@contextlib.contextmanager
def _saying_the_last_line() -> Iterator[Callable[[], None]]:
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


if __name__ == "__main__":
    sys.exit(main())
