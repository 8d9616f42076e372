"""How a run ends on a signal: Ctrl-C and SIGTERM end it with their exit status (also inside a
checkpoint's write), SIGHUP, SIGUSR1 and SIGUSR2 as SIGTERM does, each command holds Ctrl-C over
the imports it makes, SIGTERM stops the watch on DataLoader workers, a stopped command puts back the
SIGCHLD handler it replaced, and a stop that lands in a fork's hooks is not lost. A stop as a
command says its last line: test_last_line_stops.py."""

import json
import os
import sys
from functools import partial

import pytest
from run_helpers import tiny_args

from moco_fast import cli, signals
from moco_fast.cli import main


def test_ctrl_c_and_sigterm_end_with_their_exit_status(monkeypatch, capsys, tmp_path, request):
    import signal

    import moco_fast.commands.export as export

    def zip_writer_error(args):  # torch.save's writer raises this when Ctrl-C strikes inside it
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None

    def sigterm(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    argv = ["export", "ckpt", "--format", "torchvision", "--output", "x.pth"]
    from moco_fast.signals import STOP_SIGNALS

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    # Python's own Ctrl-C handler, as in a terminal: a job started in the background by a shell
    # without job control (`make test &`) inherits SIGINT ignored, and the command rightly keeps it so
    request.addfinalizer(partial(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT)))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(export, "run", zip_writer_error)
    assert main(argv) == 130 and "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(export, "run", sigterm)
    assert main(argv) == 143 and "terminated" in capsys.readouterr().err
    # Ctrl-C while torch was being imported: the modules that name the user errors import torch,
    # which is half-imported now; the command still ends as interrupted, without a traceback.
    import moco_fast.cli

    def torch_cut_short(args):
        try:
            raise KeyboardInterrupt  # in torch's import
        except KeyboardInterrupt:
            raise AttributeError("partially initialized module 'torch' has no attribute 'cuda'") from None

    def user_errors():
        raise AttributeError("partially initialized module 'torch' has no attribute 'cuda'")

    # Ctrl-C while torch is imported is held until the import is done (in torch's C++ side it aborted
    # the process), then ends the command as interrupted before it runs
    ran = []
    (tmp_path / "held_import_probe.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nDONE = True\n"
    )
    with monkeypatch.context() as m:
        m.syspath_prepend(str(tmp_path))
        m.setattr(signals, "HELD_IMPORTS", ("held_import_probe",))
        m.setattr(export, "run", lambda args: ran.append(1))
        assert main(argv) == 130 and capsys.readouterr().err.strip() == "interrupted"
        assert sys.modules.pop("held_import_probe").DONE and not ran  # the import ran to its end
    with monkeypatch.context() as m:
        m.setattr(moco_fast.cli, "user_errors", user_errors)
        for run in (lambda args: (_ for _ in ()).throw(KeyboardInterrupt), torch_cut_short):
            m.setattr(export, "run", run)
            assert main(argv) == 130 and capsys.readouterr().err.strip() == "interrupted"
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before  # main put the process's handlers back
    # a torchrun worker stops as one process does (train: the one command that runs under torchrun); it
    # kept the default action, which killed it outside the steps and the launcher reported a failed worker
    import moco_fast.commands.train as train

    seen = []
    monkeypatch.setattr(train, "run", lambda args: seen.append({s: signal.getsignal(s) for s in STOP_SIGNALS}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    # (a signal that the test run was started ignoring, nohup's SIGHUP, stays ignored)
    handled = {s: signal.SIG_IGN if h is signal.SIG_IGN else signals._on_stop_signal for s, h in before.items()}
    assert main(["train"]) == 0 and seen == [handled]
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


STOPPED_IN_A_SAVE = """
import json, os, pathlib, shutil, signal, sys, torch
from moco_fast import checkpoint, trainer
from moco_fast.cli import main

argv, run = json.loads(sys.argv[1]), pathlib.Path(sys.argv[2])
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as from a terminal, also where the tests run under nohup
real_save, sig, times = torch.save, None, 1

def save_then_signal(obj, fh, *a, **k):  # the signal lands inside a checkpoint's write
    fh.write(b"half a checkpoint")
    for _ in range(times):
        os.kill(os.getpid(), sig)
    fh.seek(0)  # ignored: the save goes on
    fh.truncate()
    real_save(obj, fh, *a, **k)

def resumed(name):  # each run resumes its own copy of the run that finished epoch 1
    out = run.parent / name
    shutil.copytree(run, out)
    at = argv.index("--out") + 1
    rc = main([*argv[:at], str(out), *argv[at + 1:], "--resume", "--epochs", "2"])
    saved = checkpoint.load(out / "checkpoint.pt")["epoch"]
    return {"rc": rc, "epoch saved": saved, "temporaries": [p.name for p in out.glob(".*.tmp")]}

torch.save = save_then_signal
# the epoch's steps are not what is tested (and take seconds each on a loaded machine)
trainer._run_epoch = lambda step, loader, cfg, epoch, lr, *rest: {"epoch": epoch + 1, "loss": 1.0, "lr": lr, "img_per_s": 1.0}
done = {}
for name in sys.argv[3:]:
    sig = getattr(signal, name)
    done[name] = resumed(name)
    done[name + " handler put back"] = signal.getsignal(sig) == signal.SIG_DFL
sig, times = signal.SIGUSR1, 2  # a second stop in the save ends it at once
done["twice"] = resumed("twice")
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup` starts it: the run goes on
sig, times = signal.SIGHUP, 1
done["nohup"] = resumed("nohup")
print(json.dumps(done))
"""


def test_hup_usr1_and_usr2_end_a_run_as_sigterm_does(run, tiny_root):
    # SIGHUP (the terminal or ssh session closed), SIGUSR1/SIGUSR2 (SLURM's --signal warning before a
    # time limit) ended the run at once: the checkpoint's temporary stayed, and nothing was said. Each
    # lands inside the save at epoch 2's end, which it lets finish (the epoch's steps are kept): one
    # line, 128 + the signal, no temporary. A second one in the save ends it at once: epoch 1's
    # checkpoint is kept, no temporary.
    import signal
    import subprocess

    names = ["SIGHUP", "SIGUSR1", "SIGUSR2"]
    argv = [json.dumps(tiny_args(tiny_root, run)), str(run), *names]
    done = subprocess.run([sys.executable, "-c", STOPPED_IN_A_SAVE, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got == {
        **{n: {"rc": 128 + getattr(signal, n), "epoch saved": 2, "temporaries": []} for n in names},
        **{f"{n} handler put back": True for n in names},
        "twice": {"rc": 128 + signal.SIGUSR1, "epoch saved": 1, "temporaries": []},
        "nohup": {"rc": 0, "epoch saved": 2, "temporaries": []},  # a SIGHUP that was ignored stays ignored
    }
    lines = [line for line in done.stderr.splitlines() if line.startswith(("stopped", "Traceback"))]
    assert lines == [*(f"stopped by {n}" for n in names), "stopped by SIGUSR1"], done.stderr[-2000:]


def test_each_command_holds_ctrl_c_over_the_imports_it_makes(tmp_path):
    # Every command but convert imports torchvision, whose C++ ops load like torch's: a Ctrl-C held
    # over torch's import alone could still land in there. convert never imports it (holding it would
    # cost 1.5 s at its start), which a process of its own shows.
    import subprocess

    from moco_fast.cli import build_parser
    from moco_fast.signals import HELD_IMPORTS

    argv = {
        "train": [],
        "knn": ["--checkpoint", "c"],
        "lincls": ["--checkpoint", "c"],
        "finetune": ["--checkpoint", "c"],
        "export": ["c", "--format", "torchvision", "--output", "x"],
        "sweep": ["--out", "o"],
        "convert": ["a", "b", "--format", "wds"],
    }
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(argv)  # a new command is added here too
    for command, rest in argv.items():
        held = getattr(build_parser().parse_args([command, *rest]), "held_imports", HELD_IMPORTS)
        assert held[0] == "torch" and ("torchvision" in held) == (command != "convert"), command
    (tmp_path / "src" / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (24, 16), (200, 10, 10)).save(tmp_path / "src" / "a" / "0.jpg")
    code = (
        "import sys; from moco_fast.cli import main; "
        f"rc = main(['convert', {str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, '--format', 'wds']); "
        "print(rc, 'torchvision' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stderr


CTRL_C_IN_AN_IMPORT = """
import os, signal, sys

class CtrlCInAnImport:  # a Ctrl-C as the module named starts to be imported; then the import goes on
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, also under a test run that ignores it
sys.meta_path.insert(0, CtrlCInAnImport())
from moco_fast.cli import main
sys.exit(main(["export", "ckpt", "--format", "torchvision", "--output", "x.pth"]))
"""


@pytest.mark.parametrize("module", ["tqdm", "moco_fast.commands.export"])
def test_ctrl_c_while_main_imports_ends_the_command_with_its_line(module):
    # main imported tqdm (tens of ms), and its parser the commands' modules (build_parser, 70 ms),
    # before its handlers and the command's: a Ctrl-C then ended the process with a traceback. The
    # command imports tqdm now, and main's handlers hold a stop during the parse for the command,
    # which ends as interrupted before it runs.
    import subprocess

    script = [sys.executable, "-c", CTRL_C_IN_AN_IMPORT, module]
    done = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (130, "interrupted\n"), done.stderr[-2000:]


def test_sigterm_stops_the_watch_on_dataloader_workers():
    # SIGTERM to the process group ends the DataLoader workers with the main process, so SIGTERM and
    # SIGCHLD arrive together. torch's SIGCHLD handler, left in place, raised "DataLoader worker ...
    # killed by signal: Terminated" with a traceback after "terminated" (seen with `lincls --workers
    # 2` and `kill -TERM -PGID`); SIG_DFL in its place printed "Signal 17 ignored due to race
    # condition". Both signals pending at once, in a process of its own:
    import subprocess
    import sys

    code = """
import os, signal
from moco_fast import signals

def torch_like(signum, frame):
    raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

signal.signal(signal.SIGCHLD, torch_like)
signal.signal(signal.SIGTERM, signals._on_stop_signal)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # the child has ended: SIGCHLD is pending
os.kill(os.getpid(), signal.SIGTERM)
try:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGCHLD})
    for _ in range(100000):
        pass
except signals.Terminated:
    print("terminated")
for _ in range(100000):
    pass
os.waitpid(pid, 0)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "terminated" and run.stderr == "", run.stderr


def test_a_stopped_command_leaves_sigchld_to_its_workers_deaths_and_the_next_command_puts_it_back(
    monkeypatch, capsys, request
):
    # The stop handler puts a no-op on SIGCHLD (see the test above). Put back as the command ended, a
    # worker that the stop ended after that raised torch's "killed by signal" (a traceback at exit,
    # seen with lincls --workers 2 and kill -TERM -PGID); never put back, a process that goes on (a
    # test, a notebook) no longer had torch's handler, set once per process, for later DataLoaders.
    import signal
    import time

    import moco_fast.commands.export as export

    def torch_like(signum, frame):
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    request.addfinalizer(partial(signal.signal, signal.SIGCHLD, signal.getsignal(signal.SIGCHLD)))
    monkeypatch.setattr(signals, "_sigchld_before", signals._sigchld_before)
    signal.signal(signal.SIGCHLD, torch_like)
    argv = ["export", "ckpt", "--format", "torchvision", "--output", "x.pth"]
    worker = {}

    def stopped(args):
        read, write = os.pipe()
        if (pid := os.fork()) == 0:  # a worker that ends after the command: at its pipe's end
            os.close(write)
            os.read(read, 1)
            os._exit(0)
        os.close(read)
        worker.update(pid=pid, write=write)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export, "run", stopped)
    assert main(argv) == 143 and "terminated" in capsys.readouterr().err
    os.close(worker["write"])
    os.waitpid(worker["pid"], 0)
    time.sleep(0.2)  # SIGCHLD's handler runs here
    seen = []
    monkeypatch.setattr(export, "run", lambda args: seen.append(signal.getsignal(signal.SIGCHLD)))
    assert main(argv) == 0 and seen == [torch_like]


def test_the_sigchld_handler_a_stop_replaced_is_put_back_once(monkeypatch, capsys, request):
    # Held on after it was put back, a handler came back with any later command that found the no-op
    # again: the test above's raising stand-in for torch's, whose finaliser set the no-op back, then
    # raised in the tests after it (pytest's INTERNALERROR in the whole suite).
    import signal

    import moco_fast.commands.export as export

    def held(signum, frame):
        pass

    request.addfinalizer(partial(signal.signal, signal.SIGCHLD, signal.getsignal(signal.SIGCHLD)))
    monkeypatch.setattr(signals, "_sigchld_before", signals._sigchld_before)
    signal.signal(signal.SIGCHLD, held)
    argv = ["export", "ckpt", "--format", "torchvision", "--output", "x.pth"]
    monkeypatch.setattr(export, "run", lambda args: os.kill(os.getpid(), signal.SIGTERM))
    assert main(argv) == 143 and signal.getsignal(signal.SIGCHLD) is signals._children_end
    monkeypatch.setattr(export, "run", lambda args: None)
    assert main(argv) == 0 and signal.getsignal(signal.SIGCHLD) is held
    signal.signal(signal.SIGCHLD, signals._children_end)  # as a finaliser that restores an earlier no-op
    assert main(argv) == 0 and signal.getsignal(signal.SIGCHLD) is signals._children_end


def test_a_command_in_another_thread_leaves_a_stop_held_for_the_main_threads(monkeypatch):
    # signals._ending is the main thread's command's: a cli.main in another thread at the same time took
    # the stop held for it (and raised it from there: delivered to the main thread, as the command's
    # body ran or after it).
    import signal
    import threading

    import moco_fast.commands.export as export

    raised, got = [], []
    monkeypatch.setattr(signal, "raise_signal", raised.append)
    monkeypatch.setattr(export, "run", lambda args: None)
    argv = ["export", "ckpt", "--format", "torchvision", "--output", "x.pth"]
    with signals.ending_held(cli._command):
        signals._ending.held.append(signal.SIGTERM)  # as main's handler holds a stop before its command's body
        other = threading.Thread(target=lambda: got.append(main(argv)))
        other.start()
        other.join()
        assert (got, raised, signals._ending.held) == ([0], [], [signal.SIGTERM])


def test_a_stop_that_lands_in_a_fork_is_not_lost_in_its_hooks(monkeypatch, request):
    # A Ctrl-C or SIGTERM during a fork (a DataLoader starting its workers: the final kNN's) ran its
    # handler in logging's after-fork hook, whose KeyboardInterrupt Python ignores: the run went on
    # to exit status 0. Here the signal lands in that hook, as the parent releases logging's lock.
    import logging
    import signal
    import time

    class Lock:  # logging's module lock, which raises the signal as the fork's parent releases it
        def __init__(self):
            self.lock, self.armed = logging._lock, False

        def acquire(self, *args):
            return self.lock.acquire(*args)

        def release(self):
            self.lock.release()
            if self.armed:
                self.armed = False
                signal.raise_signal(signal.SIGINT)

        def _at_fork_reinit(self):
            self.lock._at_fork_reinit()

    request.addfinalizer(partial(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT)))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lock = Lock()
    monkeypatch.setattr(logging, "_lock", lock)
    with pytest.raises(KeyboardInterrupt), signals.stop_signals_handled():
        lock.armed = True
        if (pid := os.fork()) == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        for _ in range(500):  # the stop comes at the main thread's next bytecodes, once the fork is out
            time.sleep(0.01)
    assert not lock.armed


def test_a_stop_pending_as_a_fork_begins_is_not_lost_and_leaves_later_stops_alone(request):
    # A stop pending as os.fork ran its hooks ran its handler in the first Python code there: the hook
    # that counted the forks, before its count. Raised there, it was lost, and the count ended at -1:
    # every later stop waited for the end of a fork that was not in progress. Here a before-hook that
    # runs ahead of signals' (registered after it) and runs no bytecode leaves SIGINT pending, once.
    import _thread
    import collections
    import signal
    import time

    request.addfinalizer(partial(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT)))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    once = map(_thread.interrupt_main, [signal.SIGINT])  # the hook stays registered: a no-op after once
    os.register_at_fork(before=partial(collections.deque(maxlen=0).extend, once))

    def fork_and_wait():
        if (pid := os.fork()) == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        for _ in range(500):  # the stop comes at the main thread's next bytecodes, once the fork is out
            time.sleep(0.01)

    with signals.stop_signals_handled():
        with pytest.raises(KeyboardInterrupt):
            fork_and_wait()
        with pytest.raises(KeyboardInterrupt):  # a later one, outside any fork
            signal.raise_signal(signal.SIGINT)
            time.sleep(5)
    assert not signals._forks


# signals imported while a fork is in progress (here from a before-hook of that fork; a fork in another
# thread as well): its after-hook runs without its before-hook
IMPORTED_IN_A_FORK = """
import logging, os

os.register_at_fork(before=lambda: __import__("moco_fast.signals"))
if (pid := os.fork()) == 0:
    os._exit(0)
os.waitpid(pid, 0)
from moco_fast import signals
print(len(signals._forks))
"""


def test_a_fork_in_progress_as_signals_is_imported_ends_quietly():
    # The after-hook was the list's pop, which raised IndexError in os.fork's hooks on the empty list:
    # "Exception ignored in: <built-in method pop of list object ...>" and a traceback on stderr.
    import subprocess

    done = subprocess.run([sys.executable, "-c", IMPORTED_IN_A_FORK], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "0\n", "")


def test_a_stop_that_lands_in_a_fork_wakes_the_main_thread_blocked_after_it(request):
    # A stop handed back after a fork as _thread.interrupt_main did sets it pending and wakes nothing:
    # a main thread then blocked in a read or a wait (a DataLoader's for its workers' first batch, a
    # pool's for its results) went on waiting, where the signal itself ends the wait. The read here
    # waits for the stop, or for a watchdog's byte after 60 s (then the stop did not wake it).
    import _thread
    import collections
    import signal
    import threading

    request.addfinalizer(partial(signal.signal, signal.SIGINT, signal.getsignal(signal.SIGINT)))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    once = map(_thread.interrupt_main, [signal.SIGINT])  # the hook stays registered: a no-op after once
    os.register_at_fork(before=partial(collections.deque(maxlen=0).extend, once))
    r, w = os.pipe()
    request.addfinalizer(partial(os.close, r))
    request.addfinalizer(partial(os.close, w))
    woke = []

    def wake() -> None:  # recorded before the byte: the read it ends may reach the assert first
        woke.append(None)
        os.write(w, b"x")

    watchdog = threading.Timer(60, wake)
    request.addfinalizer(watchdog.cancel)
    with signals.stop_signals_handled(), pytest.raises(KeyboardInterrupt):
        if (pid := os.fork()) == 0:
            os._exit(0)
        watchdog.start()
        os.read(r, 1)
    os.waitpid(pid, 0)
    assert woke == []


@pytest.mark.parametrize("block", ["stops_held", "stop_signals_handled", "launch._put_back"])
def test_a_stop_while_handlers_are_put_back_leaves_none_of_those_they_replace(block, monkeypatch):
    # Each puts handlers back one signal after another: a stop that landed after one was put back (its
    # handler raised it there) ended the loop, and the later signals kept the handler being replaced:
    # stops_held's recording one, which swallowed every later stop of the command; the launcher's
    # (run_workers, after the launch), whose SignalException a later stop raised (a notebook's)
    import signal

    from moco_fast import launch
    from moco_fast.signals import Terminated

    def ours(signum, frame):
        raise Terminated(signum)

    def launchers(signum, frame):
        raise AssertionError("the launcher's handler ran")

    real = signal.signal
    sigs = (signal.SIGUSR1, signal.SIGUSR2)
    before = {s: signal.getsignal(s) for s in sigs}
    raised: list[int] = []

    def stop_lands(sig, handler):  # the stop comes as the first of ours is put back: its handler raises it
        previous = real(sig, handler)
        if handler is ours and not raised:
            raised.append(sig)
            signal.raise_signal(sig)
        return previous

    def put_back():
        if block == "launch._put_back":
            for s in sigs:
                signal.signal(s, launchers)  # as the launcher's start sets them
            launch._put_back(dict.fromkeys(sigs, ours))
        else:
            with getattr(signals, block)():  # ours before it, put back as it ends
                pass

    try:
        for s in sigs:
            real(s, ours)
        with monkeypatch.context() as m:
            m.setattr(signal, "signal", stop_lands)
            with pytest.raises(Terminated) as stopped:
                put_back()
        assert raised == [signal.SIGUSR1] and stopped.value.signum == signal.SIGUSR1
        assert [signal.getsignal(s) for s in sigs] == [ours, ours]
    finally:
        for s, h in before.items():
            real(s, signal.SIG_DFL if h is None else h)
