"""`moco-fast` (also `python -m moco_fast`): one subcommand per module in moco_fast/commands/.

Errors a user can fix (bad data, contradicting flags, missing files) print as one line and exit 2;
anything else is a bug and keeps its traceback. A stop signal or Ctrl-C ends a command with its own
line and exit status; how main's handlers raise or hold it is signals.py's. A stdout that its reader
closed (`| head -1`) ends it quietly, exit status 141 or the failed command's own (closed_stdout.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import re
import shlex
import sys
import threading
import warnings
from collections.abc import Iterator

from moco_fast import __version__, bar_lines, closed_stdout, launched_by_torchrun, shared_memory, signals

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


class CommandParser(argparse.ArgumentParser):
    """A command's parser: a flag or argument it does not take is its own error, under its usage
    ("moco-fast knn: error: unrecognized arguments: --epochs 5"). argparse hands such words up to the
    top-level parser, which printed moco-fast's usage (`COMMAND ...`) and "moco-fast: error:", as if the
    command were the word it did not know."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self.unrecognized(extras, parsed))
        return parsed, extras

    def unrecognized(self, extras: list[str], parsed: argparse.Namespace) -> str:
        """The error's text. A word first among them that is no flag, where the command reads its data
        from --data and none was given, is most likely that data (`moco-fast train /data/x`): the text
        names the flag for it. The namespace says whether --data was given. A number is no path but a
        flag's value given twice (`--epochs 100 200`), as argparse leaves a negative one (`-5`)."""
        text = f"unrecognized arguments: {' '.join(extras)}"
        data = next((a for a in self._actions if "--data" in a.option_strings), None)
        if data is not None and getattr(parsed, data.dest) is None and not _flag_or_number(extras[0]):
            text += f" (a path goes after a flag: --data {shlex.quote(extras[0])})"
        return text


def _flag_or_number(word: str) -> bool:
    if word.startswith("-"):
        return True
    try:
        float(word)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-fast",
        description="Fast MoCo (Momentum Contrast) self-supervised pretraining. "
        "Run `moco-fast COMMAND --help` for the flags of each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"moco-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
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


# torch's CPU allocator's refusal, a RuntimeError: "[enforce fail at alloc_cpu.cpp:127] ... can't
# allocate memory: you tried to allocate 512000000000 bytes. Error code 12 (Cannot allocate memory)"
_CPU_ALLOCATION = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes")


def _out_of_memory(e: BaseException) -> str | None:
    """The one line for an allocation that the machine's memory refused, or None: settings too large
    for it (`--moco-k 1000000000` asked for a queue of 477 GiB), what the machine refuses as a full
    disk is, where the traceback of torch's allocator said no more. Only `e` itself, as
    _environment_error; a GPU's out-of-memory error keeps its traceback (not seen on a CPU-only
    machine), and so does Python's MemoryError: it names neither the size nor what asked for it (a
    setting, or a size a bug computed in a loader), which only its traceback says."""
    if isinstance(e, RuntimeError) and (m := _CPU_ALLOCATION.search(str(e))):
        return (
            f"out of memory: torch could not allocate {int(m[1]) / 2**30:.1f} GiB of CPU memory at once: lower "
            "the setting that asks for it (train's queue is --moco-k x --dim floats, a batch --batch-size images)"
        )
    return None


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
    return _environment_error(e, where) or _out_of_memory(e) or shared_memory.exhausted_line(e)


def interruption(e: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C (or stop signal, see signals.STOP_SIGNALS) behind `e`, also when it struck inside
    code that raised another error on its way out (torch.save's zip writer does: "unexpected pos")."""
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


def say_error(command: str, line: str) -> None:
    """A command's error, its last line (say): "moco-fast COMMAND: error: LINE", as argparse words one
    (a `--gpus` launcher's and its workers' too: launch.py)."""
    say(f"moco-fast {command}: error: {line}")


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
PATH_DESTS = ("data", "out", "checkpoint", "checkpoint_flag", "resume", "src", "dst", "output", "save_model")
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
    # `| head -1`: no traceback, exit status 141 (a command that failed keeps its own)
    return closed_stdout.ended_quietly(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    # The parser imports the commands' modules (tens of ms): under main's handlers, which hold a stop
    # there for the command (signals._Ending), as they do one before its body; before them, a Ctrl-C
    # was a KeyboardInterrupt's traceback
    signals.quiet_at_exit()
    with signals.ending_held(_command), signals.stop_signals_handled(_say_stopped if _in_a_worker() else None):
        parser = build_parser()
        args = parser.parse_args(argv)
        args.empty_flag = empty_flag(parser, args)
        log_as_lines(logging.DEBUG if args.verbose else logging.INFO)
        with warnings_as_lines():
            return _run(args)


def _in_a_worker() -> bool:
    """A process of a job of several (torchrun, or RANK and WORLD_SIZE set by hand)."""
    world = os.environ.get("WORLD_SIZE", "1").strip()  # not a number: the run refuses it (join), in one line
    return (world.isdigit() and int(world) > 1) or launched_by_torchrun()


def _say_stopped(signum: int) -> None:
    """A torchrun worker's line for a stop that stop_watch acts on."""
    with contextlib.suppress(OSError):
        say(signals.stop_line(signals.Terminated(signum)))


def _command(args: argparse.Namespace) -> int:
    """The command itself: a stop that lands in here ends it (signals._on_stop_signal)."""
    signals.raise_held_stop()  # one that main's handlers held before this began: now
    if getattr(args, "empty_flag", None):
        raise UserError(EMPTY_PATH.format(args.empty_flag))
    # tqdm's import (tens of ms): in here, where a Ctrl-C ends the command with its line, not before
    # main's handlers (a traceback); not at cli's own import
    from moco_fast.metrics import share_bar_lock

    share_bar_lock()  # before a bar is drawn or a worker forked
    if threading.current_thread() is threading.main_thread():
        signals.import_holding_signals(getattr(args, "held_imports", signals.HELD_IMPORTS))
    if args.command not in DISTRIBUTED_COMMANDS:
        refuse_torchrun(args.command)
    return args.func(args) or 0


def _run(args: argparse.Namespace) -> int:
    """The command (_command); a user error or a stop ends it with its one line and exit status."""
    try:
        return _command(args)
    except BaseException as e:
        # The command ends here with its line: a stop that comes from now on is held, and dropped
        # (signals._Ending). It raised from the handler, a traceback after (or instead of) the line:
        # torchrun's SIGTERM to the ranks that are still saying the error that ended another, a job's
        # second signal. The line can block for ever (a pipe nobody reads): a stop's line, or one
        # during which a stop came, is given up after a while (blocked_stderr), and one more stop
        # ends the process at once.
        with signals.saying_the_last_line() as bound:
            # A Ctrl-C first: one that struck while torch was being imported leaves it half-imported,
            # and user_errors() imports modules that import torch.
            line = one_line(e, command_paths(args))
            if line is not None:
                say_error(args.command, line)
                return 2
            stop = interruption(e)
            if stop is None:
                raise
            bound()
            with contextlib.suppress(OSError):  # stderr on a terminal that SIGHUP says is gone: EIO
                say(signals.stop_line(stop))
            return signals.exit_status(stop)


if __name__ == "__main__":
    sys.exit(main())
