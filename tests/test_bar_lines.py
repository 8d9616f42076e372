"""Log records and warnings written while a progress bar is open stand on lines of their own
(moco_fast.bar_lines): they came right after the bar's text, on the bar's line."""

from __future__ import annotations

import fcntl
import io
import logging
import multiprocessing
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import warnings

import pytest

from moco_fast import bar_lines, cli, knn, signals
from moco_fast.convert_beton import BetonSource
from moco_fast.metrics import progress, share_bar_lock, tqdm

BAR = "epoch 1/2"
SAVED = "INFO saved checkpoint at step 3"
WARNED = "WARNING kNN: k=9 is more than the 8 images"


def segments(text: str) -> list[str]:
    """The text as a terminal draws it, piece by piece: a bar redraws its line after each \\r."""
    return re.split(r"[\r\n]", text)


def on_a_line_of_its_own(text: str, line: str) -> bool:
    parts = segments(text)
    return line in parts and not any(line in p and p != line for p in parts)


def stderr(monkeypatch, caplog) -> io.StringIO:
    """sys.stderr as a StringIO (bars and lines alike write there), Python's own showwarning in place
    of pytest's recording one, and the moco_fast logger at INFO through a LineHandler, as main() sets
    them up. Called in the test, not a fixture: pytest sets its own sys.stderr again after the fixtures."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)

    def showwarning(message, category, filename, lineno, file=None, line=None):  # Python's, which pytest records
        (sys.stderr if file is None else file).write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", showwarning)
    handler = bar_lines.LineHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("moco_fast")
    monkeypatch.setattr(log, "handlers", [handler])
    monkeypatch.setattr(log, "propagate", False)  # pytest's handlers on the root
    caplog.set_level(logging.INFO, "moco_fast")
    return err


def log_and_warn() -> None:
    with cli.warnings_as_lines(), warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.getLogger("moco_fast").info(SAVED.removeprefix("INFO "))
        warnings.warn_explicit(WARNED.removeprefix("WARNING "), UserWarning, knn.__file__, 186)


def test_a_log_line_and_a_warning_under_an_open_bar_stand_on_lines_of_their_own(monkeypatch, caplog):
    err = stderr(monkeypatch, caplog)
    bar = progress(total=10, desc=BAR)
    bar.update(3)
    bar.refresh()
    before = warnings.showwarning
    log_and_warn()
    assert warnings.showwarning is before  # the CLI's only while a command runs
    text = err.getvalue()
    bar.close()
    assert on_a_line_of_its_own(text, SAVED), repr(text)
    assert on_a_line_of_its_own(text, WARNED), repr(text)
    assert not any(BAR in p and ("saved" in p or "kNN" in p) for p in segments(text)), repr(text)
    assert segments(text)[-1].startswith(BAR), repr(text)  # the bar drawn again after them


@pytest.mark.parametrize("bar", ["none", "disabled", "a forked parent's on another file"])
def test_without_a_bar_of_this_process_the_lines_are_written_as_before(monkeypatch, caplog, bar):
    # no bar, a rank > 0's (disabled), or one that a forked worker inherited from its parent, drawn
    # elsewhere: the lines as they are, nothing cleared or drawn
    err = stderr(monkeypatch, caplog)
    if bar == "a forked parent's on another file":
        drawn = tqdm(total=10, desc=BAR, file=io.StringIO())
        monkeypatch.setattr(bar_lines, "_PID", -1)
    else:
        drawn = None if bar == "none" else progress(total=10, desc=BAR, enabled=bar != "disabled")
    start = len(err.getvalue())
    log_and_warn()
    written = err.getvalue()[start:]
    if drawn is not None:
        drawn.close()
    assert written == f"{SAVED}\n{WARNED}\n"


def test_a_command_in_a_child_that_a_program_forked_draws_its_own_bars_again(monkeypatch, caplog):
    # bar_lines told a forked child by the PID at its import: a program that imported moco_fast, then
    # forked a child to run a command, had the child's lines under its own bar written as under a
    # parent's (from the bar's line start) and the bar not drawn again after them
    read, write = os.pipe()
    if (pid := os.fork()) == 0:  # the child: a command's start, a bar, a line
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(60)  # a lock that another thread held at the fork: the child dies, the read ends
        try:
            err = stderr(monkeypatch, caplog)
            share_bar_lock()  # as cli._command does
            bar = progress(total=10, desc=BAR)
            bar.update(3)
            start = len(err.getvalue())
            logging.getLogger("moco_fast").info(SAVED.removeprefix("INFO "))
            os.write(write, err.getvalue()[start:].encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        written = fh.read().decode()
    os.waitpid(pid, 0)
    before, after = written.split(SAVED)
    assert not before.startswith("\n") and BAR in after, repr(written)  # cleared, and drawn again after it


def screen(text: str) -> list[str]:
    """The lines a terminal shows for `text`: \\r goes back to the line's start, ESC[K clears the
    line from there, \\n starts the next line; other characters overwrite what is there."""
    lines, line, col = [], "", 0
    for part in re.split(r"(\r|\n|\x1b\[K)", text):
        if part == "\r":
            col = 0
        elif part == "\n":
            lines, line, col = [*lines, line], "", 0
        elif part == "\x1b[K":
            line = line[:col]
        else:
            line, col = line[:col] + part + line[col + len(part) :], col + len(part)
    return [*lines, line]


END = "@@the end@@"  # written after the test's last draw: what a terminal shows is read up to it


def shown(reader: int) -> str:
    """What the terminal `reader` (a pty's master) was sent, up to END. A pty passes written text on
    to its master a moment later (the kernel's flip buffer): one read right after the write can miss
    the end, and did under load. Each read waits at most 60 s."""
    got = b""
    while END.encode() not in got:
        assert select.select([reader], [], [], 60)[0], f"the terminal showed no {END!r}: {got!r}"
        got += os.read(reader, 1 << 16)
    return got.decode()[: got.decode().index(END)]


def second_pass_fails(source, go) -> None:
    go.wait(60)  # until the parent's bar is drawn
    source[0]


@pytest.mark.parametrize("where", ["a terminal", "a log file"])
@pytest.mark.parametrize("whose", ["a DataLoader worker's", "FFCV's writer worker's"])
def test_a_forked_workers_lines_under_its_parents_bar_stand_on_lines_of_their_own(
    tmp_path, monkeypatch, caplog, where, whose
):
    # A DataLoader worker's warning (an unreadable image) came right after its parent's bar's text,
    # on the bar's line: the worker has no bar to clear, it inherited a copy of its parent's. FFCV's
    # writer opens its bar after it starts its workers: a worker has no copy of it, and its line of a
    # file that failed on the second pass (convert_beton.BetonSource) was printed on the bar's line.
    if where == "a terminal":
        reader, writer = os.openpty()
        fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        out = open(writer, "w")  # closed below, as the log file
    else:
        out = open(tmp_path / "log", "w")
    stderr(monkeypatch, caplog)
    monkeypatch.setattr(sys, "stderr", out)
    logging.getLogger("moco_fast").handlers[0].setStream(out)
    fork = multiprocessing.get_context("fork")
    go = fork.Event()
    if whose == "a DataLoader worker's":
        expected = [SAVED, WARNED]
        go.set()
        bar = progress(total=10, desc=BAR)  # open when the worker forks
        worker = fork.Process(target=log_and_warn)
    else:
        broken = tmp_path / "gone.jpg"
        broken.write_bytes(b"not a jpeg")  # changed on disk since the check pass
        expected = [f"warning: {broken} failed to decode on the second pass"]
        worker = fork.Process(target=second_pass_fails, args=(BetonSource([str(broken)], [0], None), go))
    worker.start()
    if not go.is_set():
        bar = progress(total=10, desc=BAR)  # opened after the worker forked, as FFCV's writer's
    bar.update(3)
    bar.refresh()
    go.set()
    worker.join()
    bar.update(1)
    bar.refresh()  # the parent's next draw
    out.flush()
    if where == "a terminal":
        out.write(END)
        out.flush()
        lines = screen(shown(reader))
    else:
        lines = (tmp_path / "log").read_bytes().decode().split("\n")  # as grep sees the log
    bar.close()
    out.close()
    if where == "a terminal":
        os.close(reader)
    assert worker.exitcode == 0
    # each line the bar's (a log keeps its draw before them) or one of the worker's, whole
    assert [line.split(" (")[0] for line in lines if BAR not in line] == expected, repr(lines)
    assert lines[-1].lstrip("\r").startswith(BAR), repr(lines)  # the parent's next draw, below them


def test_a_line_logged_within_an_epoch_stands_on_a_line_of_its_own(tmp_path, monkeypatch, capsys):
    # through main()'s own logging set-up (root's handler: pytest's are set aside), --save-every's
    # line within an epoch, while its bar is open
    monkeypatch.setattr(logging.root, "handlers", [])
    args = ["train", "--loader", "synthetic", "--synthetic-steps", "4", "--preset", "cifar", "--arch", "resnet18",
            "--stem", "imagenet", "--epochs", "1", "--batch-size", "8", "--moco-k", "32", "--bn-splits", "2",
            "--device", "cpu", "--workers", "0", "--log-every", "2", "--save-every", "1e-9", "--no-final-knn",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(args) == 0
    text = capsys.readouterr().err
    saved = [p for p in segments(text) if "at step 2 of epoch 1" in p]
    assert saved == [f"INFO saved {tmp_path / 'run' / 'checkpoint.pt'} at step 2 of epoch 1"], repr(text)
    assert any(p.startswith("epoch 1/1") for p in segments(text)), repr(text)  # the bar was drawn


class StopLands:
    """The threading part of tqdm's lock, where a stop signal's handler raises as it is taken
    (`where="acquire"`: before it, the multiprocessing part already taken) or let go ("release":
    after it, the multiprocessing part not yet)."""

    def __init__(self, lock, where: str) -> None:
        self.lock, self.where = lock, where

    def acquire(self, *args, **kwargs) -> bool:
        if self.where == "acquire":
            raise signals.Terminated()
        return self.lock.acquire(*args, **kwargs)

    def release(self) -> None:
        self.lock.release()
        if self.where == "release":
            raise signals.Terminated()

    def _is_owned(self) -> bool:
        return self.lock._is_owned()


@pytest.mark.parametrize("where", ["acquire", "release"])
def test_a_stop_that_lands_within_a_line_under_a_bar_ends_it_and_leaves_tqdms_lock_free(monkeypatch, caplog, where):
    # It raised "cannot release un-acquired lock" in place of the stop (reported as a logging error,
    # the command went on), or left the multiprocessing part taken (another thread's bar waited for ever)
    import threading

    import tqdm

    stderr(monkeypatch, caplog)
    bar = progress(total=10, desc=BAR)
    bar.update(3)
    lock = tqdm.tqdm.get_lock()
    parts = list(lock.locks)
    monkeypatch.setattr(lock, "locks", [*parts[:-1], StopLands(parts[-1], where)])
    with pytest.raises(signals.Terminated):
        logging.getLogger("moco_fast").info(SAVED.removeprefix("INFO "))
    monkeypatch.setattr(lock, "locks", parts)
    free = []

    def take_and_let_go() -> None:  # as another thread's bar draw
        taken = [p for p in parts if p.acquire(timeout=2)]
        free.append(len(taken) == len(parts))
        for p in reversed(taken):
            p.release()

    other = threading.Thread(target=take_and_let_go)
    other.start()
    other.join()
    bar.close()
    assert free == [True]


def test_a_bars_process_ended_without_its_exit_handlers_leaves_no_semaphore_under_any_start_method():
    # Python 3.14's default start method on Linux is forkserver: tqdm's lock was then a named
    # semaphore, and a worker that stop_watch ended (os._exit) left the resource tracker's "leaked
    # semaphore objects" warning after the command's last line
    script = """
import multiprocessing, os
multiprocessing.set_start_method("forkserver", force=True)
from moco_fast.metrics import progress, share_bar_lock
share_bar_lock()  # as a command starts (cli._command, a --gpus worker)
bar = progress(2, "steps")
bar.update(2)
bar.close()
os._exit(3)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert "leaked" not in out.stderr, out.stderr


def test_importing_moco_fast_leaves_tqdms_lock_as_tqdm_makes_it():
    # metrics made tqdm's lock between processes as under fork at its import: a process-wide change
    # for code that only imports moco_fast (a notebook, another program's bars)
    script = """
from tqdm.std import TqdmDefaultWriteLock
import moco_fast.metrics, moco_fast.cli
print(hasattr(TqdmDefaultWriteLock, "mp_lock"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout == "False\n", out.stderr
