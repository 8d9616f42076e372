"""A stop signal that reaches a `--gpus` worker outside the training steps (here: the per-epoch kNN,
rank 0's alone while the others wait at the barrier) ends the job as a stop: the launcher's one
line, exit status 128 + the signal, the last epoch's checkpoint kept. It killed the worker by the
signal's default action, and the launcher reported "worker rank N failed with signal SIGUSR1"
(exit status 1). A crash stays a crash, though the launcher's SIGTERM now stops the other workers."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import read_until_then_close

from moco_fast.checkpoint import load_model
from moco_fast.cli import main

# `moco-fast train --gpus 2` on the CPU: the launcher sees 2 pretend GPUs, the workers' --device auto
# none. The spawned workers import this file as their __main__, so its patches are theirs too: each
# rank writes its pid at each step; rank 0's kNN of epoch 2 sends SIG to rank WHO, then takes up to
# a minute (a stop ends it: rank 0 gets the launcher's SIGTERM there)
GPUS_2_ON_THE_CPU = """
import os, signal, sys, time
from pathlib import Path

import torch

torch.cuda.device_count = lambda: 2
import moco_fast.trainer as trainer

HERE = Path(__file__).parent
WHO, SIG = os.environ["STOP_RANK"], signal.Signals[os.environ["STOP_SIGNAL"]]
real_step = trainer.train_step


def step(*a, **k):
    (HERE / f"pid.{os.environ['RANK']}").write_text(str(os.getpid()))
    return real_step(*a, **k)


def knn(*a, **k):
    (HERE / "sent").write_text(str(time.time()))
    os.kill(int((HERE / f"pid.{WHO}").read_text()), SIG)
    time.sleep(60)
    return 0.0


trainer.train_step, trainer.knn_top1 = step, knn
if __name__ == "__main__":
    from moco_fast.cli import main

    sys.exit(main())
"""


def train_args(root, out, *flags: str) -> list[str]:
    """2 epochs of 32 images, 2 steps an epoch with 2 ranks of 8, the kNN after epoch 2 only."""
    return ["train", "--data", str(root), "--preset", "cifar", "--arch", "resnet18", "--stem", "imagenet",
            "--moco-k", "32", "--bn-splits", "2", "--batch-size", "8", "--epochs", "2", "--workers", "0",
            "--save-every", "0", "--no-final-knn", "--knn-every", "2", "--out", str(out), *flags]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("who", "name"), [("0", "SIGUSR1"), ("1", "SIGTERM")])
def test_a_stop_signal_to_a_worker_during_the_knn_ends_the_job_as_a_stop(tiny_root, tmp_path, who, name):
    # rank 0: in the kNN itself; rank 1: waiting for it at the barrier, which it now waits at in
    # Python (a handler runs at once; in dist.barrier() it ran only when rank 0's kNN ended)
    script, out = tmp_path / "gpus2.py", tmp_path / "run"
    script.write_text(GPUS_2_ON_THE_CPU)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STOP_RANK": who, "STOP_SIGNAL": name}
    p = subprocess.run([sys.executable, str(script), *train_args(tiny_root, out, "--device", "auto", "--gpus", "2")],
                       capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)  # fmt: skip
    ended = time.time()
    sig = signal.Signals[name]
    assert p.returncode == 128 + sig, p.stderr[-3000:]
    line = "terminated" if sig == signal.SIGTERM else f"stopped by {name}"
    assert p.stderr.splitlines()[-1] == line, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "failed" not in p.stderr, p.stderr[-3000:]
    assert ended - float((tmp_path / "sent").read_text()) < 30  # not after the kNN's minute
    # epoch 2's checkpoint, whole (saved before its kNN), and its row, written on the way out; a resume
    # (one process, the same global batch) finds the run finished
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state.get("step"), state["world_size"]) == (2, None, 2)
    load_model(out / "checkpoint.pt")
    resumed = train_args(tiny_root, out, "--device", "cpu", "--batch-size", "16", "--knn-every", "0", "--resume")
    assert main(resumed) == 0
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _crashing_worker(marker: str) -> None:
    """Rank 1 raises once rank 0 waits (in Python, its stop handlers in place: the launcher's SIGTERM
    stops it, exit status 143)."""
    from pathlib import Path

    if os.environ["RANK"] == "1":
        for _ in range(600):
            if Path(marker).exists():
                raise RuntimeError("disk full on rank 1")
            time.sleep(0.05)
    Path(marker).touch()
    time.sleep(60)


@pytest.mark.slow
def test_a_crash_stays_a_crash_when_the_launcher_stops_the_other_workers(tmp_path, caplog):
    # rank 0 ends through its stop handler too, but after the launcher began ending the workers:
    # the crash is the first to end and is reported, its traceback kept
    from moco_fast.launch import WorkerFailed, run_workers

    with caplog.at_level(logging.ERROR), pytest.raises(WorkerFailed) as failed:
        run_workers(_crashing_worker, (str(tmp_path / "waiting"),), 2)
    assert str(failed.value).startswith("worker rank 1 failed with exit code 1: RuntimeError: disk full on rank 1")
    assert "RuntimeError: disk full on rank 1" in caplog.text  # the launcher's log of its traceback


def test_the_launchers_failure_logs_are_quiet_only_for_a_stop_before_them(tmp_path):
    from moco_fast.launch import _QuietOnUserErrors

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, None)
    stopped_first = _QuietOnUserErrors(str(tmp_path / "a"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stop.1").write_text("138")
    assert not stopped_first.filter(record)
    crashed_first = _QuietOnUserErrors(str(tmp_path / "b"))
    (tmp_path / "b").mkdir()
    assert crashed_first.filter(record)  # "Terminating process ...": the launcher ends the others
    (tmp_path / "b" / "stop.0").write_text("143")  # one that its SIGTERM stopped
    assert crashed_first.filter(record)  # the crash's traceback is still shown
    (tmp_path / "b" / "1").write_text("data folder not found: /x")
    assert not crashed_first.filter(record)  # a user error says it in one line


def test_the_first_worker_to_end_is_a_stop_only_if_it_said_so(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from moco_fast.launch import _stopped
    from moco_fast.signals import Terminated

    def failure(exitcode):
        return ProcessFailure(local_rank=1, pid=1, exitcode=exitcode, error_file=str(tmp_path / "none"))

    assert _stopped(str(tmp_path), 1, failure(138)) is None  # 128 + SIGUSR1, but not through our handler
    (tmp_path / "stop.1").write_text("138")
    stop = _stopped(str(tmp_path), 1, failure(138))
    assert isinstance(stop, Terminated) and stop.signum == signal.SIGUSR1
    assert _stopped(str(tmp_path), 1, failure(1)) is None  # a crash after it wrote that
    (tmp_path / "stop.1").write_text("141")  # a stderr whose reader went away: saved, then a stop
    stop = _stopped(str(tmp_path), 1, failure(141))
    assert isinstance(stop, Terminated) and stop.signum == signal.SIGPIPE


# `--gpus 2` on the CPU with 2 pretend GPUs (the workers' --device auto finds none)
GPUS_2 = """
import sys
import torch

torch.cuda.device_count = lambda: 2
if __name__ == "__main__":
    from moco_fast.cli import main

    sys.exit(main())
"""


@pytest.mark.slow
def test_a_gpus_job_whose_stderr_reader_goes_away_ends_as_a_stop_with_its_checkpoint(tmp_path):
    # `train --gpus 2 ... 2>&1 | head`: each worker saved at its next sync and ended with 141 (a stop,
    # closed_stdout.closed_stderr_stops), but the launcher took 141 for a failed worker: its error line
    # failed on the closed stderr, a traceback and exit status 1. Stdout to a file here: with stdout the
    # same pipe the launcher's closed stdout hid that as 141.
    script, out = tmp_path / "gpus2.py", tmp_path / "run"
    script.write_text(GPUS_2)
    args = ["train", "--loader", "synthetic", "--synthetic-steps", "12", "--preset", "cifar", "--arch", "resnet18",
            "--stem", "imagenet", "--epochs", "1", "--batch-size", "8", "--moco-k", "16", "--device", "auto",
            "--gpus", "2", "--workers", "0", "--log-every", "2", "--save-every", "0", "--no-final-knn",
            "--out", str(out)]  # fmt: skip
    read, write = os.pipe()
    with open(tmp_path / "stdout", "w") as stdout:
        run = subprocess.Popen([sys.executable, str(script), *args], stdout=stdout, stderr=write, cwd=tmp_path,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    os.close(write)
    read_until_then_close(read, b"epoch 1/1:")  # once the epoch's bar is drawn: a reader gone
    assert run.wait(timeout=300) == 128 + signal.SIGPIPE
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert 2 <= state["step"] < 12 and state["epoch"] == 0  # a step of a sync in the epoch, saved
    assert (tmp_path / "stdout").read_text() == ""


def test_an_error_after_a_peers_stop_ends_the_worker_as_that_stop(tmp_path, monkeypatch):
    # rank 0 stopped in the kNN; rank 1's barrier then fails ("Connection closed by peer"). Whichever
    # the launcher sees end first, the job is that stop, without rank 1's traceback
    from moco_fast.launch import _reported

    def barrier_without_rank_0():
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError):  # no stop before it: an error, its traceback kept
        _reported(barrier_without_rank_0, str(tmp_path), None)
    (tmp_path / "stop.0").write_text("138")
    with pytest.raises(SystemExit) as ended:
        _reported(barrier_without_rank_0, str(tmp_path), None)
    assert ended.value.code == 138 and (tmp_path / "stop.1").read_text() == "138"


def test_a_stop_whose_launchers_folder_was_removed_keeps_its_exit_status(tmp_path, monkeypatch):
    # an orphan of a killed launcher, still stopping when the next launch removed that launcher's
    # folders (remove_killed_launchers_folders): its note's write raised FileNotFoundError, and the
    # worker ended with that traceback and exit status 1, not 143 (its checkpoint saved by then)
    from moco_fast.launch import _reported
    from moco_fast.signals import Terminated

    def stopped():
        raise Terminated(signal.SIGTERM)

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as ended:
        _reported(stopped, str(tmp_path / "removed"), None)
    assert ended.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "removed").exists()  # nothing made again for a launcher that is gone


def test_a_user_error_whose_launchers_folder_was_removed_is_said_on_the_workers_stderr(tmp_path, monkeypatch, capsys):
    # the same orphan, at a user error (a full disk, a bad file): its report's write raised
    # FileNotFoundError, and the worker ended with that traceback and exit status 1, not its one line
    # and exit status 2
    from moco_fast.config import ConfigError
    from moco_fast.launch import USER_ERROR_EXIT, _reported

    def bad_input():
        raise ConfigError("--moco-k 10 is not a multiple of the batch size 4")

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as ended:
        _reported(bad_input, str(tmp_path / "removed"), None)
    assert ended.value.code == USER_ERROR_EXIT
    said = capsys.readouterr().err
    assert said == "moco-fast train: error: --moco-k 10 is not a multiple of the batch size 4\n"
    assert not (tmp_path / "removed").exists()


BLOCKED_IN_NATIVE_CODE = """
import ctypes, multiprocessing, os, signal, sys, threading, time
from moco_fast import stop_watch
from moco_fast.signals import stop_signals_handled

stop_watch.GRACE_S = 1.0
case = sys.argv[1]


def end(signum):
    if case == "end fails":  # the launcher's note on a full /tmp
        raise OSError(28, "No space left on device")
    if case == "end hangs":  # say() waiting for tqdm's lock, held by the blocked main thread
        threading.Event().wait()
    print("ended by", signum, flush=True)


with stop_signals_handled(end):
    if case == "fork":  # a forked child's own signal (a DataLoader worker's) is not the parent's
        if os.fork() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        os.wait()
        time.sleep(3)
        print("went on", flush=True)
        sys.exit(0)
    if case == "workers":  # the torch loader's, kept across epochs
        import torch
        from moco_fast.augment import MOCO_CIFAR
        from moco_fast.loaders import LoaderArgs, create_loader

        args = LoaderArgs(sys.argv[2], MOCO_CIFAR, batch_size=8, device=torch.device("cpu"), workers=2, seed=0)
        loader = create_loader("torch", args)
        loader.set_epoch(0)
        list(loader)
        print(*(p.pid for p in multiprocessing.active_children()), flush=True)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    # native code that a signal does not end (a collective on a dead peer): Python's handler waits
    # for it; a CDLL call lets the other threads run, as torch's collectives do
    libc, mutex, cond = ctypes.CDLL(None), ctypes.create_string_buffer(64), ctypes.create_string_buffer(64)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_cond_wait(cond, mutex)  # never signalled
"""


@pytest.mark.parametrize("case", ["blocked", "fork", "end fails", "end hangs"])
def test_a_stop_that_the_main_thread_cannot_act_on_ends_a_worker_from_a_thread(tmp_path, case):
    # a worker in a rendezvous or collective on a dead peer ran its handler only when that gave up
    # (NCCL: its timeout; the launcher's SIGKILL came after 30 s), where the default action ended it at
    # once. The exit comes whatever `end` does: an error in it ended the watching thread instead, and
    # one waiting for a lock that the main thread holds kept it waiting
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", BLOCKED_IN_NATIVE_CODE, case], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    if case == "fork":
        assert (p.returncode, p.stdout) == (0, "went on\n"), p.stderr[-2000:]
        return
    said = "ended by 15\n" if case == "blocked" else ""
    assert (p.returncode, p.stdout, p.stderr) == (128 + signal.SIGTERM, said, ""), p.stderr[-2000:]
    assert time.time() - t0 < 20


def test_a_worker_that_the_watch_ends_takes_its_dataloader_workers_with_it(tiny_root):
    # os._exit skips the exit hooks that end them: the torch loader's workers, kept across epochs,
    # lived on as orphans until torch's watchdog saw it (up to 5 s), holding the job's stdout and stderr
    p = subprocess.Popen([sys.executable, "-c", BLOCKED_IN_NATIVE_CODE, "workers", str(tiny_root)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        workers = [int(pid) for pid in p.stdout.readline().split()]
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
        time.sleep(0.2)  # SIGKILL's end is not synchronous
        assert len(workers) == 2 and not [pid for pid in workers if running(pid)]
    finally:
        p.kill()
        p.communicate()


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan that init has not reaped yet counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_wakeup_fd_is_put_back_only_where_it_is_still_the_watchs():
    # asyncio's loop sets its own fd when it adds a signal handler and -1 when it removes the last:
    # restoring the fd from before (since closed, its number maybe another file's) would have Python
    # write each signal's byte there
    from moco_fast import stop_watch

    a, b = socket.socketpair()
    a.setblocking(False)
    before = signal.set_wakeup_fd(a.fileno())
    try:
        with stop_watch.watching(print, object(), (signal.SIGUSR1,)):
            assert signal.set_wakeup_fd(-1) not in (-1, a.fileno())  # the watch's; now cleared
        assert signal.set_wakeup_fd(a.fileno()) == -1  # left cleared
        with stop_watch.watching(print, object(), (signal.SIGUSR1,)):
            pass
        assert signal.set_wakeup_fd(-1) == a.fileno()  # still the watch's at its end: put back
    finally:
        signal.set_wakeup_fd(before)
        a.close()
        b.close()


def test_a_stop_as_the_watch_starts_puts_the_wakeup_fd_back(monkeypatch):
    # the stop handler raises wherever the main thread is: here as the watch's thread starts
    from moco_fast import stop_watch

    class StoppedAsItStarts:
        def __init__(self, **kwargs):
            pass

        def start(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(stop_watch.threading, "Thread", StoppedAsItStarts)
    before = signal.set_wakeup_fd(-1)
    try:
        with pytest.raises(KeyboardInterrupt), stop_watch.watching(print, object(), (signal.SIGUSR1,)):
            pass
        assert signal.set_wakeup_fd(-1) == -1 and not stop_watch._writer
    finally:
        signal.set_wakeup_fd(before)


# rank 1 waits at distributed.barrier for rank 0, which never comes (its kNN), and a stop (here an
# alarm's) ends it there
BARRIER_LEFT = """
import signal, sys, time
import torch.distributed as dist
from moco_fast import distributed

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
print("joined", flush=True)
if rank == 0:
    time.sleep(600)


def stop(signum, frame):
    raise KeyboardInterrupt


signal.signal(signal.SIGALRM, stop)
signal.alarm(1)
try:
    distributed.barrier()
except KeyboardInterrupt:
    sys.exit(3)
"""


def test_a_rank_stopped_at_the_barrier_ends_without_waiting_for_the_others(tmp_path):
    # torch 2.11: its exit (the gloo group's destructor) waited for the barrier, i.e. for rank 0
    script = tmp_path / "barrier.py"
    script.write_text(BARRIER_LEFT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ranks = [subprocess.Popen([sys.executable, str(script), r, port], stdout=subprocess.PIPE, text=True)
             for r in ("0", "1")]  # fmt: skip
    try:
        assert ranks[1].stdout.readline() == "joined\n"
        assert ranks[1].wait(timeout=20) == 3  # the alarm's second and the exit; not rank 0's 600 s
    finally:
        for p in ranks:
            p.kill()
            p.communicate()
