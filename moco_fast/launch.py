"""`moco-fast train --gpus N`: one training worker per GPU on this machine.

The workers are started by PyTorch's elastic launcher, the engine under `torchrun`, so they see the
same environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free local port) and the
trainer runs the same code either way. The launcher watches the workers: when one exits with an
error or a signal, it stops the others and we report which rank failed and why, instead of leaving
the rest waiting forever in a collective. A user error (bad data, contradicting flags) ends the
command with its one line and exit status 2, as it does without --gpus. A stop signal that reached
a worker ends the job as a stop (its line, exit status 128 + the signal) when that worker is the
first to end; one that the launcher stopped after another's crash does not make the crash a stop.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from moco_fast.cli import UserError, log_as_lines, say_error
from moco_fast.config import ConfigError, TrainConfig, check_at_least
from moco_fast.folder_locks import ended_here, free_to_remove, locked_temporary, owner_name, owner_of
from moco_fast.signals import (
    STOP_SIGNALS,
    Terminated,
    exit_status,
    set_handlers,
    stop_signals_handled,
    stops_held,
)

if TYPE_CHECKING:
    from moco_fast.folder_locks import FolderHold
    from moco_fast.resume import SavedRun

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

log = logging.getLogger("moco_fast")


# A worker's exit status for an error a user can fix (cli.one_line), as the CLI's own.
USER_ERROR_EXIT = 2
# The prefixes of run_workers' temporary folders: its workers' reports, and the elastic agent's own.
LAUNCH_FOLDERS = ("moco-fast-workers-", "moco-fast-agent-")
# The loggers that report a failed worker in the launching process: the failure with the worker's
# traceback (ERROR), and the others being stopped (WARNING).
FAILURE_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn")


class WorkerFailed(RuntimeError):
    """A worker process ended with an error; the message names its rank and the cause."""


class WorkerUserError(UserError):
    """A worker stopped at an error a user can fix (bad data, contradicting flags, a run folder in
    use, a diverged run): the CLI prints its message as one line, exit status 2, as without --gpus."""


def under_torchrun() -> bool:
    """True in a process that torchrun (or --gpus's launcher) started, or one of a manual env:// launch
    (RANK, WORLD_SIZE set by hand): it joins a process group. Launched by torchrun or --gpus alone:
    moco_fast.launched_by_torchrun."""
    return any(v in os.environ for v in TORCHRUN_VARS)


def check_local_gpus(cfg: TrainConfig) -> int:
    """The number of workers `--gpus` asks for, or a ConfigError before anything starts."""
    check_gpus_flag(cfg)
    n, have = cfg.runtime.gpus, torch.cuda.device_count()
    if n > have:
        # without a GPU, several processes are torchrun's on the CPU: --gpus 2 named no way to run them
        cpu = f"; for {n} CPU processes use torchrun (gloo): {cpu_processes(n)}" if have == 0 and n > 1 else ""
        raise ConfigError(f"--gpus {n}: this machine has {have} CUDA GPU{'s' if have != 1 else ''}{cpu}")
    return n


def cpu_processes(n: int) -> str:
    """The command that runs `n` training processes on this machine's CPU."""
    return torchrun_command(n, "-m moco_fast train --device cpu ...")


def torchrun_command(n: int, program: str, nodes: int = 1) -> str:
    """The torchrun command that runs `program` (`-m moco_fast train ARGS`, a script) in `n` processes a
    machine: on this one alone (--standalone), or on each of `nodes` machines, whose rendezvous flags
    (--rdzv-endpoint...) it names without their values, which only the launch that started them knows."""
    where = "--standalone" if nodes == 1 else f"--nnodes {nodes} --rdzv-backend c10d --rdzv-endpoint HOST:PORT"
    return f"torchrun {where} --nproc_per_node {n} {program}"


def check_gpus_flag(cfg: TrainConfig) -> None:
    """What check_local_gpus refuses whatever GPUs this machine has (train --print-config)."""
    n = cfg.runtime.gpus
    check_at_least("--gpus", n, 1)
    if under_torchrun():
        raise ConfigError(
            "--gpus starts its own workers: under torchrun leave it out (--nproc_per_node sets the count)"
        )
    if cfg.runtime.device == "cpu" and n == 1:
        raise ConfigError("--gpus 1 asks for a GPU and --device cpu for none: drop --gpus to train on the CPU")
    if cfg.runtime.device == "cpu":
        raise ConfigError(
            f"--gpus {n} starts one worker per GPU; for {n} CPU processes use torchrun (gloo): {cpu_processes(n)}"
        )
    if cfg.runtime.device not in ("auto", "cuda"):
        raise ConfigError(
            f"--gpus uses GPUs 0..{n - 1}: choose them with CUDA_VISIBLE_DEVICES, not --device {cfg.runtime.device}"
        )


def launch_local(cfg: TrainConfig, where: str | None = None, saved: SavedRun | None = None) -> tuple[int, dict]:
    """Train with one worker per GPU; returns (the CLI's exit status, rank 0's last metrics row).
    A user error in the workers is raised as WorkerUserError (one line, exit 2, by the CLI); `where`:
    what the command reads and writes (cli.command_paths), for an error that names no file; saved:
    as train's (the workers read it where a check needs it)."""
    from functools import partial

    from moco_fast.loaders import check_main_reaches_workers
    from moco_fast.metrics import torn_lines_said
    from moco_fast.resume import saved_run
    from moco_fast.run_folder import check_output, hold_for_workers
    from moco_fast.step import check_cuda_graph
    from moco_fast.trainer import check_workers, validate, with_loader_module

    n = check_local_gpus(cfg)
    cfg = with_loader_module(cfg)  # a user's loader: the module that each worker imports (_train_worker)
    check_main_reaches_workers(cfg.data.loader, cfg.data.loader_module)  # once here, not in each worker
    validate(cfg, n, saved or partial(saved_run, cfg))  # contradicting flags fail here once, not in every worker
    check_workers(cfg.data.workers, n)  # the n workers' share of the cores, as each checks it in train()
    # a run in progress there: one line, no workers; else the folder stays held, by this process and
    # the workers it hands the hold to, until they end (no other train takes it in between)
    with hold_for_workers(Path(cfg.runtime.out)) as hold:
        check_output(cfg, say=False)  # rank 0 says what it finds there
        if cfg.runtime.cuda_graph:
            check_cuda_graph(torch.device("cuda"), n)
        level = log.getEffectiveLevel()  # main's (--verbose: DEBUG): a spawned worker has none of its own
        try:
            # the torn metrics.jsonl lines said here (the folder's checks): rank 0 does not say them again
            rows = run_workers(_train_worker, (cfg, hold, level, torn_lines_said()), n, where=where)
        except WorkerFailed as e:
            say_error("train", str(e))
            return 1, {}
    return 0, rows[0]


def _train_worker(cfg: TrainConfig, hold: FolderHold, level: int, said: frozenset | set = frozenset()) -> dict:
    from moco_fast.loaders import import_loader_module
    from moco_fast.metrics import said_already
    from moco_fast.trainer import train

    # as main()'s: moco-fast's from the launcher's level, other libraries' from WARNING (a spawned
    # worker sets its own up)
    log_as_lines(level)
    said_already(said)  # what the launcher warned of (a torn metrics.jsonl line), said once a run
    # a library user's loader: the worker, spawned, knows it where the launcher's script registered it
    # at its top level; else it imports the module that did (launch_local recorded it), or says, in one
    # line, why it cannot (a ConfigError: _reported)
    import_loader_module(cfg.data.loader, cfg.data.loader_module)
    with hold.taken():  # the launcher's hold of the run folder: rank 0 holds it already
        return train(cfg)


def _recorded(call: tuple[Callable[..., Any], str, str | None, tuple]) -> Any:
    """Runs in each worker: `record` writes a bug's text where the launcher reads it (its traceback
    stays); a user error is said through `reports` instead (_reported). call: (fn, reports, where,
    args) as one tuple: the launcher rewrites each string argument of a worker as a template
    (`${local_rank}` and `$$` in a path of the user's changed), but none inside a tuple."""
    from torch.distributed.elastic.multiprocessing.errors import record

    fn, reports, where, args = call
    return record(_reported)(fn, reports, where, *args)


def _reported(fn: Callable[..., Any], reports: str, where: str | None, *args: Any) -> Any:
    """fn(*args), the stop signals ending it as they end one process (signals.stop_signals_handled); a
    user error (cli.one_line; `where` for an EIO without a file, as the CLI's command_paths) is
    written to `reports`/RANK (its stderr where that folder is gone: _report_user_error) and ends the
    worker with USER_ERROR_EXIT, without a traceback: the launcher prints it as the CLI would. A stop
    ends it with its exit status (128 + the signal), written to `reports`/stop.RANK: the launcher takes
    it for a stop (_stopped)."""
    from moco_fast.cli import interruption, one_line, warnings_as_lines
    from moco_fast.metrics import share_bar_lock

    as_a_process_of_its_own()
    share_bar_lock()  # as a command does (cli._command)
    rank = os.environ.get("RANK", "0")
    noted = stop_signals_handled(lambda signum: _note_stop(reports, rank, 128 + signum))
    try:
        with noted, warnings_as_lines():  # the worker's warnings as the CLI prints them (it runs no main())
            return fn(*args)
    except BaseException as e:
        # a stop: one acted on during the steps saved its step first; one elsewhere (the setup, the
        # kNN, a save) saved nothing. No traceback either way
        if (stop := interruption(e)) is not None:
            _stop_ends(reports, rank, exit_status(stop))
        line = one_line(e, where)
        if line is None:
            if (status := _a_peers_stop(reports, rank)) is not None:
                # a collective whose peer stopped and left (gloo: "Connection closed by peer"): the
                # same stop, whichever of the two the launcher sees end first
                _stop_ends(reports, rank, status)
            raise
        _report_user_error(reports, rank, line)
        sys.exit(USER_ERROR_EXIT)  # not an Exception: `record` and spawn let it end the process as it is


def _report_user_error(reports: str, rank: str, line: str) -> None:
    """A worker's user error, written where the launcher reads it (run_workers). Where its folder is
    gone (the orphan of a killed launcher, whose folders the next launch removed:
    remove_killed_launchers_folders), said on the worker's stderr instead, as the CLI says it (the one
    command that launches workers is train): the write ended it with a FileNotFoundError's traceback
    and exit status 1, not its one line and USER_ERROR_EXIT; nobody reads the folder then
    (_note_stop)."""
    try:
        Path(reports, rank).write_text(line)
    except FileNotFoundError:
        say_error("train", line)


def as_a_process_of_its_own() -> None:
    """A spawned worker's multiprocessing start method as the platform's default (fork on Linux), as
    in a torchrun worker or a process started alone: a spawned process inherits "spawn", and then
    (1) each epoch's DataLoader workers started by spawn, each importing torch and this package again
    (a `--gpus 2 --workers 2` CPU run of 2 steps an epoch: 11-15 s an epoch), and (2) tqdm's lock was
    a named semaphore that the resource tracker warned about ("leaked semaphore objects", after the
    command's last line) when a worker ended without its exit handlers (the launcher's SIGTERM during
    its exit, the stop watch's exit, a SIGKILL). The DataLoader's forked workers decode on the CPU
    and never touch the CUDA that their parent uses, as under torchrun. From Python 3.14 the default
    is forkserver: the DataLoader workers fork anyway (shared_memory.WORKER_START), and tqdm's lock is
    made as under fork (metrics.share_bar_lock, after this)."""
    import multiprocessing

    multiprocessing.set_start_method(None, force=True)


def _note_stop(reports: str, rank: str, status: int) -> None:
    """A worker's stop and its exit status, written where the launcher reads it (_stopped). Not where
    its folder is gone: the orphan of a killed launcher, still stopping when the next launch removed
    that launcher's folders (remove_killed_launchers_folders), ended with this write's traceback and
    exit status 1 instead of its stop's; nobody reads the note then."""
    with contextlib.suppress(FileNotFoundError):
        Path(reports, f"stop.{rank}").write_text(str(status))


def _stop_ends(reports: str, rank: str, status: int) -> NoReturn:
    """Ends a worker that stopped, with its exit status (_note_stop)."""
    _note_stop(reports, rank, status)
    sys.exit(status)


def _a_peers_stop(reports: str, rank: str) -> int | None:
    """The exit status of another rank that ended on a stop (_stop_ends), or None."""
    for p in Path(reports).glob("stop.*"):
        if p.name != f"stop.{rank}" and (text := p.read_text()).isdigit():
            return int(text)
    return None


class _QuietOnUserErrors(logging.Filter):
    """Drops the launcher's failure logs (a worker's traceback, "Terminating process ...") once a
    worker has reported a user error, or when a worker had stopped before them: its one line says it
    all, as without --gpus. Only before: the first of those logs comes as the launcher starts ending
    the workers, and a worker it ends (SIGTERM) after another's crash stops too; that crash's
    traceback stays."""

    def __init__(self, reports: str) -> None:
        super().__init__()
        self.reports = Path(reports)
        self.stopped: bool | None = None  # a stop before the first failure log (None: no log yet)

    def filter(self, record: logging.LogRecord) -> bool:
        names = [p.name for p in self.reports.iterdir()]
        if self.stopped is None:
            self.stopped = any(n.startswith("stop.") for n in names)
        return not (self.stopped or any(n.isdigit() for n in names))


def user_error_text(reports: dict[int, str]) -> str:
    """The line for the workers' user errors: their message, with the ranks only where they differ."""
    if len(set(reports.values())) == 1:
        return next(iter(reports.values()))
    return "; ".join(f"rank {r}: {text}" for r, text in sorted(reports.items()))


def run_workers(fn: Callable[..., Any], args: tuple, nprocs: int, where: str | None = None) -> list[Any]:
    """Run fn(*args) in nprocs local processes joined by torch.distributed's environment.

    fn must be importable by name (the workers are spawned). Returns each rank's result; raises
    WorkerUserError with the message of a user error that stopped the workers (cli.one_line, which
    names `where`, what the workers read and write, for an EIO without a file), else WorkerFailed
    naming the first rank that failed, with its exit code or signal and its error.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    remove_killed_launchers_folders()
    # Each step that must be undone registers its undoing before it is done (undoing a step not done
    # yet changes nothing), or with stops held over both (a folder's, whose name comes with it), so
    # that a stop or error at any point (Ctrl-C between the two folders) leaves no folder, lock or
    # setting behind; undone last first: the handlers put back, the folders removed while still
    # locked, then their locks closed.
    with contextlib.ExitStack() as undo:
        # first in, so last out: the launcher's handlers stay until _put_back (below) runs as the
        # undoing begins, and a stop there, after the launch returned, is a stop too
        undo.enter_context(_launchers_signals_as_stops())
        # the workers' user errors, one file a rank
        reports = _held_launchers_folder(undo, LAUNCH_FOLDERS[0])
        # the agent's own folder (its error files, a folder a rank): by default a new torchelastic_* in
        # the temporary directory that nobody removes, one more for each run
        agent_dir = _held_launchers_folder(undo, LAUNCH_FOLDERS[1])
        # The agent's step-by-step INFO lines would bury the training log; the level is put back for a
        # process that goes on (a notebook), whose own setting it is
        agent_log = logging.getLogger("torch.distributed.elastic")
        undo.callback(agent_log.setLevel, agent_log.level)
        agent_log.setLevel(logging.WARNING)
        quiet = _QuietOnUserErrors(reports)
        for name in FAILURE_LOGGERS:
            undo.callback(logging.getLogger(name).removeFilter, quiet)
            logging.getLogger(name).addFilter(quiet)
        # The launcher turns these into its SignalException and ends the workers with the same signal; by
        # default not SIGUSR1 and SIGUSR2 (SLURM's warning before a time limit), which would end it at
        # once and leave the workers running. One that is ignored (SIGHUP under `nohup`) stays ignored.
        handled = [
            s for s in (signal.SIGINT, signal.SIGQUIT, *STOP_SIGNALS) if signal.getsignal(s) is not signal.SIG_IGN
        ]
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nprocs,
            run_id=f"moco-fast-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
            max_restarts=0,  # a failed step is not retried on its own: the user decides (--resume)
            monitor_interval=0.1,
            start_method="spawn",  # CUDA cannot be forked
            signals_to_handle=",".join(s.name for s in handled),
            logs_specs=DefaultLogsSpecs(log_dir=agent_dir),
        )
        # As torchrun: with several workers on a machine, one OpenMP thread each unless the user says
        # otherwise. Each worker's CPU ops (and its data loading) would start a thread per core, and the
        # workers together oversubscribe the cores (a 2-worker CPU run: 83.9 s an epoch, 11.0 s with 1).
        if "OMP_NUM_THREADS" not in os.environ and nprocs >= 2:
            log.warning(
                "setting OMP_NUM_THREADS=1 for each of the %d workers, as torchrun does, so that they do not "
                "overload the machine; set OMP_NUM_THREADS to tune it",
                nprocs,
            )
            undo.callback(os.environ.pop, "OMP_NUM_THREADS", None)  # this process's own is as it was
            os.environ["OMP_NUM_THREADS"] = "1"  # the agent passes it to the workers
        # The launcher installs its own handlers for those: put ours back afterwards, and let each signal
        # end the command as it does without --gpus.
        undo.callback(_put_back, {s: signal.getsignal(s) for s in handled})
        try:
            # start_processes' error files (a failed worker's traceback) are temporary files of this
            # process that nobody removes: they go to agent_dir too
            # the launcher's stop made ours here, so that the undoing below runs under it
            with _launchers_signals_as_stops(), _temporary_files_in(agent_dir):
                results = elastic_launch(config, _recorded)((fn, reports, where, args))
        except ChildFailedError as e:
            said = {int(p.name): p.read_text() for p in Path(reports).iterdir() if p.name.isdigit()}
            if said and e.get_first_failure()[0] in said:
                raise WorkerUserError(user_error_text(said)) from None
            if (stop := _stopped(reports, *e.get_first_failure())) is not None:
                raise stop from None  # the workers stopped on a signal that reached them, not the launcher
            raise WorkerFailed(describe_failure(e)) from None
    return [results[r] for r in sorted(results)]


@contextlib.contextmanager
def _launchers_signals_as_stops() -> Iterator[None]:
    """The launcher's SignalException (its handlers raise it for each signal it handles, from its start
    until run_workers puts the process's own back) raised as the stop it is, as without --gpus: Ctrl-C's
    KeyboardInterrupt, else Terminated, which the CLI ends with its line and exit status 128 + the
    signal (a SignalException is no stop to it: a traceback)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        yield
    except SignalException as e:
        raise (KeyboardInterrupt() if e.sigval == signal.SIGINT else Terminated(e.sigval)) from None


def _put_back(handlers: dict[signal.Signals, Any]) -> None:
    """Each signal's handler as it was (getsignal's None: one not set from Python, left as it is), all
    of them where a stop lands in between (signals.set_handlers): the loop that a stop ended left the
    launcher's on the later signals, whose SignalException then came from a stop after the command
    (a notebook's next cell). In another thread than the main one, none: the launcher sets its
    handlers in the main thread only, and no handler can be set elsewhere (a `--gpus` training that
    cli.main ran in a thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    set_handlers({s: h for s, h in handlers.items() if h is not None})


def _held_launchers_folder(undo: contextlib.ExitStack, prefix: str) -> str:
    """_launchers_folder's folder, removed (while still locked) and its lock closed when `undo` ends.
    A stop is held from the making to the registering (signals.stops_held), then acted on: one between
    the two left the folder and its descriptor. Its lock's wait included: a remover holds the lock only
    while it looks (lock_temporary)."""
    with stops_held():
        lock, folder = _launchers_folder(prefix)
        undo.callback(os.close, lock)
        undo.callback(shutil.rmtree, folder, ignore_errors=True)  # the first of the two, as undone last first
    return folder


def _launchers_folder(prefix: str) -> tuple[int, str]:
    """(a descriptor that holds its lock, the folder): a new temporary folder of run_workers, named
    PREFIX + HOST-PID (owner_name) and locked while the launcher uses it (folder_locks.locked_temporary),
    for remove_killed_launchers_folders."""

    def made() -> tuple[int, str] | None:
        folder = tempfile.mkdtemp(prefix=f"{prefix}{owner_name()}.")
        try:
            return os.open(folder, os.O_RDONLY | os.O_DIRECTORY), folder
        except FileNotFoundError:  # removed at once, by such a remover: locked_temporary makes another
            return None
        except OSError:  # no descriptor left (EMFILE): the folder goes with the error, not left unlocked
            shutil.rmtree(folder, ignore_errors=True)
            raise

    return locked_temporary(made, lambda folder: shutil.rmtree(folder, ignore_errors=True))


def remove_killed_launchers_folders() -> None:
    """The temporary folders (LAUNCH_FOLDERS) of a launcher of this machine that has ended without
    removing them (killed: SIGKILL, a power loss), which run_workers names with their owner
    (folder_locks.owner_name) and locks while it runs (_launchers_folder): one goes where its HOST-PID
    has ended and its lock is free (folder_locks.free_to_remove; HOST-PID alone on a file system
    without flock). A running launcher's (one in another PID namespace of a machine of the same name
    that shares this /tmp, whose PID ended_here takes for ended, holds its lock), another machine's,
    and those of a launcher before they were so named are left alone."""
    for prefix in LAUNCH_FOLDERS:
        for folder in Path(tempfile.gettempdir()).glob(glob.escape(prefix) + "*"):
            # PREFIX + HOST-PID.XXXXXXXX (mkdtemp's)
            if not (folder.is_dir() and ended_here(owner_of(folder.name, prefix, mktemp=True))):
                continue
            with free_to_remove(folder) as free:
                if free:
                    log.debug("removing %s, left by a launcher that was killed", folder)
                    shutil.rmtree(folder, ignore_errors=True)  # while locked


@contextlib.contextmanager
def _temporary_files_in(folder: str) -> Iterator[None]:
    """tempfile's folder for this process, while in it (spawned workers read TMPDIR again)."""
    before, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = before


def _stopped(reports: str, rank: int, failure: Any) -> KeyboardInterrupt | None:
    """The stop behind the first worker to end (`rank`, its ProcessFailure), or None: its exit status
    128 + a stop signal, SIGINT or SIGPIPE (a stderr whose reader went away, which the worker saved
    at and ended on as a stop: closed_stdout.closed_stderr_stops), that it said it ended with
    (_stop_ends). The launcher picks the first before it ends the others, so a worker that its
    SIGTERM stopped after a crash is not it."""
    said = Path(reports, f"stop.{rank}")
    n = failure.exitcode - 128
    if not said.is_file() or said.read_text() != str(failure.exitcode):
        return None
    if n == signal.SIGINT:
        return KeyboardInterrupt()
    return Terminated(n) if n in (*STOP_SIGNALS, signal.SIGPIPE) else None


def describe_failure(e: Any) -> str:
    """One line from a ChildFailedError: which rank, exit code or signal, the exception's text."""
    rank, failure = e.get_first_failure()
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    message = failure.message
    if isinstance(message, dict):  # written by `record`: {"message": "Error: text", "extraInfo": ...}
        message = message.get("message", "")
    if not message or message.startswith(("To enable traceback", "Signal ")):
        message = "no Python exception (killed or crashed; see its output above)"
    others = sorted(set(e.failures) - {rank})
    also = f" (also failed: rank {', '.join(map(str, others))})" if others else ""
    return f"worker rank {rank} failed with {how}: {message.strip().splitlines()[0]}{also}"
