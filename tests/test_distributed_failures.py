"""The failures of `--gpus` and of several processes: too many GPUs, a run folder in use, device flags
checked before the data is read, a dying worker or a user error in one ends the job with its rank
and cause (an EIO without a file names the command's --data and --out, as in one process), a manual
launch without its peer or address, the ranks' setup warnings, each worker's OMP threads, a stop
signal to the launcher, and a torchrun worker whose launcher was killed.

The workers of these tests import this module: the model and trainer are imported only where needed
(moco_fast.trainer brings torchvision and torch._dynamo: ~2 s more in each spawned worker).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import cli_args, synthetic_args
from run_helpers import refuses_workers

from moco_fast import distributed as dist_utils
from moco_fast.agreement import HeldWarnings
from moco_fast.cli import main
from moco_fast.config import ConfigError, build_config
from moco_fast.join import init_from_env, join_failed
from moco_fast.launch import WorkerFailed, run_workers


def test_more_gpus_than_the_machine_has_is_one_line(tiny_root, tmp_path, capsys):
    n = max(8, torch.cuda.device_count() + 1)
    out = tmp_path / "never"
    assert main([*cli_args(tiny_root, out, 1)[:-2], "--device", "auto", "--out", str(out), "--gpus", str(n)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--gpus {n}: this machine has" in err[0], err
    assert main([*cli_args(tiny_root, out, 1), "--gpus", "2"]) == 2  # --device cpu
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun" in err[0], err
    assert main([*cli_args(tiny_root, out, 1)[:-2], "--device", "auto", "--out", str(out), "--gpus", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpus must be at least 1" in err[0], err
    if not torch.cuda.is_available():  # asked for one GPU where there is none: not a silent CPU run
        assert main([*cli_args(tiny_root, out, 1)[:-2], "--device", "auto", "--out", str(out), "--gpus", "1"]) == 2
        assert capsys.readouterr().err == "moco-fast train: error: --gpus 1: this machine has 0 CUDA GPUs\n"
        # several: the way to run them on the CPU, which --gpus 2 did not name
        assert main([*cli_args(tiny_root, out, 1)[:-2], "--device", "auto", "--out", str(out), "--gpus", "2"]) == 2
        assert capsys.readouterr().err.endswith(
            "--gpus 2: this machine has 0 CUDA GPUs; for 2 CPU processes use torchrun (gloo): "
            "torchrun --standalone --nproc_per_node 2 -m moco_fast train --device cpu ...\n"
        )
    assert not out.exists()  # nothing started


def test_gpus_checks_the_run_folder_before_starting_workers(tiny_root, tmp_path, capsys, monkeypatch):
    # --gpus N: a folder in use by another train, or holding a run that --resume/--force do not
    # name, is one line before any worker starts (here with 2 pretend GPUs; no worker may start).
    from moco_fast import launch
    from moco_fast.run_folder import hold_run_folder

    started = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launch, "run_workers", lambda *a, **k: started.append(a) or [{}])
    out = tmp_path / "run"
    args = [*cli_args(tiny_root, out, 1)[:-2], "--device", "auto", "--out", str(out), "--gpus", "2"]
    with hold_run_folder(out):  # as another train writing there (a flock: a second open is refused)
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another moco-fast train is writing there" in err[0], err
    out.mkdir()  # (the lock's folder, left empty, went with it)
    (out / "metrics.jsonl").write_text('{"epoch": 3}\n')  # a run that got past its first checkpoint
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume continues the run there, --force replaces it" in err[0], err
    assert not started
    assert main([*args, "--force"]) == 0 and len(started) == 1  # the folder is free: the workers start


def test_gpus_checks_the_workers_against_the_cores_before_starting_workers(tiny_root, tmp_path, capsys, monkeypatch):
    # --gpus N: more --workers than the N workers' share of the cores was refused by each worker in
    # train(), after the launcher had held --out and started them all (here with 2 pretend GPUs)
    from moco_fast import launch

    started = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("moco_fast.trainer.available_cores", lambda: 2)
    monkeypatch.setattr("moco_fast.cores.available_cores", lambda: 2)  # the --workers cap's count
    monkeypatch.setattr(launch, "run_workers", lambda *a, **k: started.append(a) or [{}])
    out = tmp_path / "run"
    args = [*cli_args(tiny_root, out, 1)[:-4], "--device", "auto", "--out", str(out), "--gpus", "2"]
    assert main([*args, "--workers", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and refuses_workers(err[0], "--workers 9 in each of its 2 processes", 2, 8), err
    assert not started and not out.exists()
    assert main([*args, "--workers", "8"]) == 0 and len(started) == 1


def test_gpus_holds_the_run_folder_while_its_workers_run(tiny_root, tmp_path, monkeypatch):
    # The launcher's hold of --out was released before the workers took it again: another train
    # there could take the folder in between (two runs in one folder, or the workers failing as
    # busy). It holds it until they end (here with 2 pretend GPUs; no worker starts).
    from moco_fast import launch
    from moco_fast.run_folder import hold_run_folder

    free = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def workers(fn, args, n, where=None):  # what another train finds as the workers start
        with hold_run_folder(out) as held:
            free.append(held)
        return [{}]

    monkeypatch.setattr(launch, "run_workers", workers)
    out = tmp_path / "run"
    assert main([*cli_args(tiny_root, out, 1)[:-2], "--device", "auto", "--out", str(out), "--gpus", "2"]) == 0
    assert free == [False]
    with hold_run_folder(out) as held:  # and not after they end
        assert held


def _gpus_run_killed_early(tiny_root, tmp_path, monkeypatch, capsys) -> tuple[list[str], Path, list[tuple]]:
    """A `--gpus 2` command (its workers not started: each call's arguments go to the list returned)
    and its --out as a run killed before its first checkpoint left it: its config.json alone."""
    from moco_fast import launch

    started: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launch, "run_workers", lambda *a, **k: started.append(a) or [{}])
    out = tmp_path / "run"
    args = [*cli_args(tiny_root, out, 1)[:-2], "--device", "auto", "--out", str(out), "--gpus", "2"]
    assert main([*args, "--print-config"]) == 0
    out.mkdir()
    (out / "config.json").write_text(capsys.readouterr().out)
    return args, out, started


def test_gpus_leaves_the_line_of_a_run_that_starts_over_to_its_rank_0(tiny_root, tmp_path, monkeypatch, capsys, caplog):
    # --resume of a run stopped before its first checkpoint: the launcher's check of --out said that it
    # starts from scratch, and rank 0's own check (in train, as without --gpus) said it again
    args, _, started = _gpus_run_killed_early(tiny_root, tmp_path, monkeypatch, capsys)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*args, "--resume"]) == 0
    assert len(started) == 1
    assert not [r for r in caplog.records if "starting from scratch" in r.getMessage()]


def test_gpus_resumes_a_run_whose_first_row_came_before_its_first_checkpoint(tiny_root, tmp_path, monkeypatch, capsys):
    # a run killed between its epoch 1 row and that epoch's checkpoint starts over on --resume; the
    # launcher's check of --out (say=False) took its row for a run past its first checkpoint: refused
    args, out, started = _gpus_run_killed_early(tiny_root, tmp_path, monkeypatch, capsys)
    (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 9.0}\n')
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert len(started) == 1


TORN_LINE_WORKER = """
import ast, contextlib, logging, sys, types
from moco_fast.metrics import read_rows

def train(cfg):  # a --gpus worker's rank 0: its checks of --out read metrics.jsonl again
    read_rows(sys.argv[1])
    return {}

sys.modules["moco_fast.trainer"] = types.SimpleNamespace(train=train)
from moco_fast.launch import _train_worker

cfg = types.SimpleNamespace(data=types.SimpleNamespace(loader="synthetic", loader_module=None))
_train_worker(cfg, types.SimpleNamespace(taken=contextlib.nullcontext), logging.INFO, ast.literal_eval(sys.argv[2]))
"""


def test_gpus_says_a_torn_metrics_line_once(tiny_root, tmp_path, monkeypatch, capsys, caplog):
    # the launcher's read of --out (--resume, before a checkpoint) warned of a torn row, and its rank 0
    # (a spawned process) said it again: the launcher hands what it said to the workers
    args, out, started = _gpus_run_killed_early(tiny_root, tmp_path, monkeypatch, capsys)
    (out / "metrics.jsonl").write_text('{"epoch": 1, "lo')  # and its row cut short
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*args, "--resume"]) == 0
    assert len([r for r in caplog.records if "not a row" in r.getMessage()]) == 1  # the launcher's
    ((_, (_, _, _, said), _),) = started
    worker = [sys.executable, "-c", TORN_LINE_WORKER, str(out)]
    p = subprocess.run([*worker, repr(said)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "not a row" not in p.stderr, p.stderr[-2000:]
    p = subprocess.run([*worker, "set()"], capture_output=True, text=True, timeout=120)  # nothing said before it
    assert p.returncode == 0 and "not a row" in p.stderr, p.stderr[-2000:]


def _handed_worker(out: str, hold) -> tuple[bool, bool, bool]:
    # in a worker handed the launcher's hold: the worker's own hold_run_folder (rank 0's, in train),
    # the handed lock taken again on its descriptor (the launcher's lock itself), and a fresh lock
    from moco_fast.run_folder import hold_run_folder

    with hold.taken(), hold_run_folder(Path(out)) as held:
        other = os.open(out, os.O_RDONLY)  # the folder, as another train opens it for its lock
        try:
            return held, _flocks(hold.fd), _flocks(other)
        finally:
            os.close(other)


def _flocks(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@pytest.mark.slow
def test_the_launchers_hold_of_the_run_folder_goes_to_its_workers(tmp_path):
    # Spawned workers (on the CPU) get the launcher's own lock (its descriptor, passed as they
    # start): each holds the folder, where another process's lock on it is refused.
    from moco_fast.run_folder import hold_for_workers

    out = tmp_path / "run"
    with hold_for_workers(out) as hold:
        assert run_workers(_handed_worker, (str(out), hold), 2) == [(True, True, False)] * 2


def test_device_flags_fail_before_the_data_is_read(tmp_path, capsys):
    # --cuda-graph on the CPU and --sync-bn with CPU processes: one line, before the data is touched.
    from moco_fast.trainer import validate_device  # here: the spawned workers import this module

    missing = str(tmp_path / "no-such-data")
    assert main(["train", "--device", "cpu", "--cuda-graph", "--data", missing]) == 2
    assert "--cuda-graph" in capsys.readouterr().err
    cfg = build_config("cifar", {"data.data": missing, "runtime.device": "cpu", "runtime.sync_bn": True})
    with pytest.raises(ConfigError, match="--sync-bn needs CUDA"):
        validate_device(cfg, torch.device("cpu"), world=2)


def test_device_with_an_index_is_refused_with_several_processes(monkeypatch):
    # Under torchrun `--device cuda:1` put every rank on GPU 1 (local_device took the index for all);
    # --gpus already refused it. Checked by the logic alone: the refusal comes before any CUDA call.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it: a WORLD_SIZE alone is one process
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"^--device cuda:1: with 2 processes each takes the GPU of its LOCAL_RANK"):
        dist_utils.local_device(torch.device("cuda", 1))
    assert dist_utils.local_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the GPU it names (needs one to go further)
    if torch.cuda.is_available():
        assert dist_utils.local_device(torch.device("cuda", 0)) == torch.device("cuda", 0)


def _failing_worker(how: str) -> None:
    torch.set_num_threads(1)
    if int(os.environ["RANK"]) == 1:
        if how == "kill":
            os.kill(os.getpid(), 9)
        raise RuntimeError("disk full on rank 1")
    init_from_env("cpu")  # rank 0 waits for rank 1 here, which never comes
    dist.barrier()


@pytest.mark.slow
@pytest.mark.parametrize(("how", "why"), [("raise", "RuntimeError: disk full on rank 1"), ("kill", "signal SIGKILL")])
def test_a_dying_worker_ends_the_job_with_its_rank_and_cause(how, why):
    t0 = time.perf_counter()
    with pytest.raises(WorkerFailed) as e:
        run_workers(_failing_worker, (how,), 2)
    assert "worker rank 1 failed" in str(e.value) and why in str(e.value), str(e.value)
    assert time.perf_counter() - t0 < 120  # ended, not hung


@pytest.mark.slow
def test_a_user_error_in_the_gpus_workers_is_one_line(tmp_path):
    # `--gpus 2` (2 pretend GPUs; the workers run on the CPU): data that the workers find missing
    # printed the launcher's 45-line ERROR log of the worker's traceback and exited 1. Now the
    # CLI's own line, exit 2, as without --gpus.
    fake = "import sys, torch; torch.cuda.device_count = lambda: 2; from moco_fast.cli import main; sys.exit(main())"
    args = [*cli_args(tmp_path / "no-such-data", tmp_path / "run", 1), "--device", "auto", "--gpus", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", fake, *args], capture_output=True, text=True, env=env, timeout=240,
                       cwd=tmp_path)  # fmt: skip
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.splitlines() == [
        # cli_args' --bn-splits, which 2 processes do not use: said once, by the launcher, not by each worker
        "WARNING --bn-splits 2 has no effect with 2 processes: each one's BN normalises its own batch",
        f"moco-fast train: error: data folder not found: {tmp_path / 'no-such-data'}",
    ]


def _eio_worker() -> None:
    # what a read or write of a file already open raises on a failing disk: EIO without a file name
    raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.slow
def test_an_io_error_without_a_file_in_the_gpus_workers_names_the_commands_paths(tiny_root, tmp_path, monkeypatch):
    # One process names --data and --out for a pathless EIO; a --gpus worker's line said only "a file
    # open for reading or writing". The command's paths reach the workers (2 pretend GPUs, no worker
    # started), and a worker's EIO names them (real workers, on the CPU).
    from moco_fast import launch

    paths = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launch, "run_workers", lambda fn, args, n, where=None: paths.append(where) or [{}])
    out = tmp_path / "run"
    assert main([*cli_args(tiny_root, out, 1)[:-2], "--device", "auto", "--out", str(out), "--gpus", "2"]) == 0
    assert paths == [f"--data {tiny_root} and --out {out}"]
    with pytest.raises(launch.WorkerUserError) as e:
        run_workers(_eio_worker, (), 2, where=paths[0])
    assert str(e.value) == (
        f"Input/output error (the disk or the network file system failed; the command reads and writes {paths[0]})"
    )


def test_the_workers_user_errors_name_the_ranks_only_where_they_differ():
    from moco_fast.launch import user_error_text

    assert user_error_text({1: "data folder not found: /x", 0: "data folder not found: /x"}) == (
        "data folder not found: /x"
    )
    assert user_error_text({1: "b", 0: "a"}) == "rank 0: a; rank 1: b"


@pytest.mark.slow
def test_a_manual_launch_whose_peer_never_comes_ends_with_one_line(tmp_path, held_port):
    # RANK=0 WORLD_SIZE=2 by hand, and rank 1 never starts: the join waited the collectives' hour
    # in silence. It says what it waits for, and gives up after its own timeout with one line.
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(held_port),
           "MOCO_FAST_JOIN_TIMEOUT": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "moco_fast", *synthetic_args(tmp_path / "run")], capture_output=True,
                       text=True, env=env, timeout=120, cwd=tmp_path)  # fmt: skip
    port = env["MASTER_PORT"]
    assert p.returncode == 2 and p.stderr.splitlines() == [
        f"INFO waiting for WORLD_SIZE=2 processes to join at 127.0.0.1:{port} (at most 2 s)",
        f"moco-fast train: error: 1 of the 2 processes joined at 127.0.0.1:{port} within 2 s: start all 2 processes "
        "(RANK 0 to 1) with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT, check that every machine reaches rank "
        "0's address and port, or wait longer (MOCO_FAST_JOIN_TIMEOUT=SECONDS)",
    ], p.stderr[-3000:]


def test_a_manual_launch_without_its_address_or_rank_0_is_a_config_error(monkeypatch, held_port):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match=r"^RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT are not: "):
        init_from_env("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(held_port))  # nobody listens there
    monkeypatch.setenv("MOCO_FAST_JOIN_TIMEOUT", "never")
    with pytest.raises(ConfigError, match=r"^MOCO_FAST_JOIN_TIMEOUT=never: give the seconds"):
        init_from_env("cpu")
    monkeypatch.setenv("MOCO_FAST_JOIN_TIMEOUT", "1")
    monkeypatch.setenv("RANK", "one")  # at once, not after a wait for rank 0
    with pytest.raises(ConfigError, match=r"^RANK, WORLD_SIZE and MASTER_PORT must be numbers \(RANK=one, "):
        init_from_env("cpu")
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "rank, world, port, says",
    [
        (
            "2",
            "2",
            None,
            "RANK=2 with WORLD_SIZE=2: the ranks of a group of WORLD_SIZE processes are 0 to WORLD_SIZE - 1",
        ),
        (
            "0",
            "0",
            None,
            "RANK=0 with WORLD_SIZE=0: the ranks of a group of WORLD_SIZE processes are 0 to WORLD_SIZE - 1",
        ),
        ("1", "2", "99999", "MASTER_PORT=99999 is not a port: give a free port of rank 0's machine (1 to 65535)"),
        # port 0: rank 0's store took any port, which rank 1 cannot know (it waited the timeout)
        ("1", "2", "0", "MASTER_PORT=0 is not a port: give a free port of rank 0's machine (1 to 65535)"),
        ("0", "2", "0", "MASTER_PORT=0 is not a port: give a free port of rank 0's machine (1 to 65535)"),
    ],
)
def test_a_manual_launch_outside_its_group_or_ports_is_one_line_at_once(
    monkeypatch, held_port, rank, world, port, says
):
    # RANK=2 WORLD_SIZE=2 waited the join timeout (10 min by default) for a rank 0 nobody started and
    # then blamed the address; WORLD_SIZE=0 and MASTER_PORT=99999 said "must be numbers" (torch's words)
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", port or str(held_port))  # nobody listens there
    monkeypatch.setenv("MOCO_FAST_JOIN_TIMEOUT", "1")
    with pytest.raises(ConfigError) as e:
        init_from_env("cpu")
    assert str(e.value).startswith(says)
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "name, value, says",
    [
        ("LOCAL_WORLD_SIZE", "x", "LOCAL_WORLD_SIZE=x is not a count of processes"),  # was a ValueError traceback
        ("LOCAL_WORLD_SIZE", "0", "LOCAL_WORLD_SIZE=0 is not a count of processes"),  # a ZeroDivisionError
        ("LOCAL_WORLD_SIZE", "-3", "LOCAL_WORLD_SIZE=-3 is not a count of processes"),  # a cap of 1, unsaid
        ("LOCAL_RANK", "x", "LOCAL_RANK=x is not a process index"),
        ("LOCAL_RANK", "\u00b2", "LOCAL_RANK=\u00b2 is not a process index"),  # a digit to isdigit, not to int()
    ],
)
def test_local_process_counts_that_are_not_numbers_are_one_line(
    tiny_root, tmp_path, capsys, monkeypatch, name, value, says
):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"^{says} "):
        dist_utils.local_world_size() if name == "LOCAL_WORLD_SIZE" else dist_utils.local_rank()
    if name == "LOCAL_WORLD_SIZE":  # the --workers cap of an evaluation reads it: one line, not a traceback
        ckpt = tmp_path / "none.pt"
        assert main(["knn", "--checkpoint", str(ckpt), "--data", str(tiny_root), "--device", "cpu"]) == 2
        assert capsys.readouterr().err.startswith(f"moco-fast knn: error: {says} ")
    monkeypatch.setenv(name, "2")  # a real count reads as before
    assert (dist_utils.local_world_size() if name == "LOCAL_WORLD_SIZE" else dist_utils.local_rank()) == 2


def test_a_rank_that_cannot_reach_rank_0_waits_its_timeout_in_silence_and_says_why(monkeypatch, capfd, held_port):
    # torch's client logged each try that failed as a C++ error with its stack (47 lines above the
    # one line) and tried again after a random delay: a join bounded at 3 s gave up after 8 s
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(held_port))  # nobody listens there
    monkeypatch.setenv("MOCO_FAST_JOIN_TIMEOUT", "2")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        init_from_env("cpu")
    took = time.monotonic() - t0
    assert str(e.value).startswith(
        f"rank 1 could not reach rank 0 at 127.0.0.1:{os.environ['MASTER_PORT']} within 2 s (Connection refused): "
        "start all 2 processes (RANK 0 to 1) with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
    )
    assert 2 <= took < 3, took
    assert capfd.readouterr().err == ""  # (the C++ logs write to the file descriptor itself)
    assert not dist.is_initialized()


def test_rank_0_blames_its_port_only_where_it_could_not_listen(monkeypatch):
    # rank 0 starts its store and then connects to it, within the join timeout: a timeout too short
    # for that connection (MOCO_FAST_JOIN_TIMEOUT=0.0001) said "choose a free MASTER_PORT", as a port
    # in use does. The ports are the test's: one it listens at, and MASTER_PORT 0 (the store's, from
    # the system), so that no other process can take them first. Port 0 is refused with several
    # processes (the others could not know it), so the short timeout's join is one process's.
    import socket

    for name, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MOCO_FAST_JOIN_TIMEOUT", "2"),
    ):
        monkeypatch.setenv(name, value)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(ConfigError) as e:
            init_from_env("cpu")
    line = str(e.value)
    assert line.startswith(f"rank 0 could not listen at 127.0.0.1:{port} (The server socket has failed to "), line
    assert line.endswith("): choose a free MASTER_PORT"), line
    monkeypatch.setenv("MASTER_PORT", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MOCO_FAST_JOIN_TIMEOUT", "0.0001")
    with pytest.raises(ConfigError) as e:
        init_from_env("cpu")
    line = str(e.value)
    assert line.startswith(
        "rank 0 could not reach its own store at 127.0.0.1:0 within 0.0001 s (The client socket has timed out "
    ), line
    assert line.endswith(
        "): set MASTER_ADDR to an address of rank 0's machine, or wait longer (MOCO_FAST_JOIN_TIMEOUT=SECONDS)"
    ), line
    assert not dist.is_initialized()
    # a client that connected and then waited past the timeout for its store's answer (seen once in
    # 30 joins at 0.001 s) was said not to have connected
    line = join_failed("wait timeout after 1ms, keys: init/", "0", "2", "127.0.0.1", "0", timedelta(seconds=0.001))
    assert line.startswith("rank 0 could not reach its own store at 127.0.0.1:0 within 0.001 s (wait timeout "), line


JOIN = (
    "import torch.distributed as d; from moco_fast.join import init_from_env as j; "
    "print('joining', flush=True); j('cpu'); d.barrier(); print('ok')"
)


@pytest.mark.slow
def test_a_rank_started_before_rank_0_joins_it_when_it_comes(tmp_path, held_port):
    # rank 1 knocks at rank 0's address until its store is up (join.wait_for_rank_0); the knock is
    # not a client that joined, and neither rank prints a word of it
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(held_port),
           "MOCO_FAST_JOIN_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}  # fmt: skip
    rank_1 = subprocess.Popen([sys.executable, "-c", JOIN], env={**env, "RANK": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # fmt: skip
    try:
        assert rank_1.stdout.readline() == "joining\n"  # it waits for rank 0, which starts now
        rank_0 = subprocess.run([sys.executable, "-c", JOIN], env={**env, "RANK": "0"}, capture_output=True,
                                text=True, timeout=120, cwd=tmp_path)  # fmt: skip
        out, err = rank_1.communicate(timeout=120)
    finally:
        rank_1.kill()
    assert (rank_0.returncode, rank_0.stdout, rank_0.stderr) == (0, "joining\nok\n", ""), rank_0.stderr[-3000:]
    assert (rank_1.returncode, out, err) == (0, "ok\n", ""), err[-3000:]


def _threads_worker() -> tuple[str | None, int]:
    return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


@pytest.mark.slow
def test_a_ranks_setup_warnings_show_only_when_the_ranks_disagree(caplog):
    # Ranks > 0 hold their setup warnings: rank 0 says them when agree() passes; when the setup fails
    # (the ranks see different data) a rank's skipped file is the clue, and it is printed then.
    log = logging.getLogger("moco_fast")
    for show in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            held = HeldWarnings()
            log.warning("skipping a.jpg: not a readable image")
            log.error("an error passes at once")
            assert [r.getMessage() for r in caplog.records] == ["an error passes at once"]
            held.release(show=show)
            log.warning("after the setup")
        shown = ["skipping a.jpg: not a readable image"] if show else []
        assert [r.getMessage() for r in caplog.records] == ["an error passes at once", *shown, "after the setup"]


def test_gpus_workers_get_one_omp_thread_each_as_under_torchrun(monkeypatch, caplog):
    # torchrun sets OMP_NUM_THREADS=1 for several processes a machine where it is not set; --gpus's
    # launcher did not, and 2 workers each ran a thread per core (a CPU epoch: 83.9 s, 11.0 s with 1).
    import logging

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert run_workers(_threads_worker, (), 2) == [("1", 1), ("1", 1)]
    assert caplog.text.count("setting OMP_NUM_THREADS=1 for each of the 2 workers, as torchrun does") == 1
    assert "OMP_NUM_THREADS" not in os.environ  # the launching process's own setting is left as it was


def _sleeping_worker(marker: str) -> None:
    import signal

    def got(signum, frame):  # the signal the launcher ended this worker with
        Path(f"{marker}.{os.environ['RANK']}.got").write_text(signal.Signals(signum).name)
        os._exit(1)

    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, got)
    Path(f"{marker}.{os.environ['RANK']}").touch()  # started: the launcher's handlers are in place
    for _ in range(600):
        if Path(f"{marker}.go").exists():  # told to finish
            return
        time.sleep(0.1)


def _signal_when_started(marker: str, sig: int, then=None) -> None:
    import threading

    def send():
        for _ in range(600):
            if all(Path(f"{marker}.{r}").exists() for r in range(2)):
                break
            time.sleep(0.1)
        os.kill(os.getpid(), sig)
        if then is not None:
            time.sleep(0.5)  # time for the signal to be handled, or ignored
            then()

    threading.Thread(target=send, daemon=True).start()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGUSR1"])
def test_a_stop_signal_to_the_launcher_ends_it_as_without_gpus(name, tmp_path):
    # `--gpus N` runs under PyTorch's launcher, which turns SIGTERM and SIGHUP into its SignalException
    # (a traceback from main) and leaves its own handlers behind; run_workers makes it the CLI's
    # Terminated (exit 128 + the signal) and puts the process's handlers back. SIGHUP was "interrupted"
    # (130); SIGUSR1 and SIGUSR2 (SLURM's warning), which it left alone, reach the workers as they are.
    import signal

    from moco_fast.signals import STOP_SIGNALS, Terminated, _on_stop_signal

    sig, marker = getattr(signal, name), str(tmp_path / "started")
    old = signal.signal(sig, _on_stop_signal)  # the CLI's, should the signal come before the launcher's
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, *STOP_SIGNALS)}
        _signal_when_started(marker, sig)
        stop = None
        try:
            run_workers(_sleeping_worker, (marker,), 2)
        except KeyboardInterrupt as e:  # a plain one would end the pytest session
            stop = e
        assert isinstance(stop, Terminated) and stop.signum == sig, repr(stop)
        assert {s: signal.getsignal(s) for s in (signal.SIGINT, *STOP_SIGNALS)} == before
        assert [Path(f"{marker}.{r}.got").read_text() for r in range(2)] == [name, name]
    finally:
        signal.signal(sig, old)


@pytest.mark.slow
def test_a_launcher_started_by_nohup_keeps_sighup_ignored(tmp_path):
    # PyTorch's launcher handles SIGHUP whatever it was: `nohup moco-fast train --gpus 8` stopped when
    # its terminal closed
    import signal

    marker = str(tmp_path / "started")
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        _signal_when_started(marker, signal.SIGHUP, then=Path(f"{marker}.go").touch)
        try:
            assert run_workers(_sleeping_worker, (marker,), 2) == [None, None]
        except KeyboardInterrupt as e:  # as is, it would end the pytest session
            pytest.fail(f"the SIGHUP that nohup ignores stopped the launcher: {e!r}")
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


@pytest.mark.parametrize("killed", ["after", "before"])
def test_a_torchrun_worker_stops_when_its_launcher_is_killed(tmp_path, killed):
    # torchrun starts its workers in sessions of their own, with no signal for their parent's end: one
    # SIGKILLed left them training on, orphans holding the run folder, to their last epoch. Now each
    # launched worker gets SIGTERM (a stop: its step saved). Here a worker of a launcher killed at once,
    # after the worker set the signal or before (PR_SET_PDEATHSIG then never fires: the worker sees
    # another parent than the one it started under, and sends itself the SIGTERM). Before: also before
    # the worker imported moco_fast.join (torch's import and the CLI's checks, seconds), the package
    # alone imported, as `python -m moco_fast` and the moco-fast script start
    marker = str(tmp_path / "worker")
    worker = (
        "import os, signal, sys, time; import moco_fast; launcher = os.getppid(); "
        "got = lambda s, f: (open(sys.argv[1] + '.got', 'w').write(str(s)), os._exit(0)); "
        "signal.signal(signal.SIGTERM, got); "
        # init_from_env's, once torch is imported (seconds on a loaded machine: the .imported file says when)
        "stop = lambda: (j := __import__('moco_fast.join').join, open(sys.argv[1] + '.imported', 'w').close(), "
        "j.stop_with_the_launcher(moco_fast.STARTED_BY)); "
        "sys.argv[2] == 'after' and stop(); "
        "open(sys.argv[1], 'w').write(str(os.getpid())); "
        "[time.sleep(0.05) for _ in range(600) if os.getppid() == launcher]; "
        "sys.argv[2] == 'before' and stop(); time.sleep(60)"
    )
    launcher = (
        "import subprocess, sys; subprocess.Popen([sys.executable, *sys.argv[1:]], start_new_session=True).wait()"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher, "-c", worker, marker, killed])
    pid = None
    try:
        for _ in range(600):
            if (Path(marker).exists() and Path(marker).read_text()) or proc.poll() is not None:
                break
            time.sleep(0.05)
        pid = int(Path(marker).read_text())
        proc.kill()
        proc.wait()
        for _ in range(2400):  # before: the worker imports moco_fast.join only now (15 s seen on 2 busy cores)
            if Path(f"{marker}.imported").exists():
                break
            time.sleep(0.05)
        for _ in range(200):
            if Path(f"{marker}.got").exists() and Path(f"{marker}.got").read_text():  # made, then written
                break
            time.sleep(0.05)
        assert Path(f"{marker}.got").read_text() == str(int(signal.SIGTERM))
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_launched_worker_sets_the_signal_before_its_join_and_a_manual_one_none(tmp_path, held_port):
    # a launcher gone before its worker joins stops it at once, not at the join's timeout; a manual
    # launch's parent (a shell, a scheduler's step) is no launcher of the group: no signal
    worker = (
        "import ctypes; from moco_fast.config import ConfigError; from moco_fast.join import init_from_env\n"
        "try:\n    init_from_env('cpu')\nexcept ConfigError:\n    pass\n"  # rank 1 never comes
        "v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); print(v.value)"  # 2: PR_GET_PDEATHSIG
    )
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(held_port),
           "MOCO_FAST_JOIN_TIMEOUT": "0.5", "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("TORCHELASTIC_RUN_ID", None)
    said = {}
    for how, extra in (("launched", {"TORCHELASTIC_RUN_ID": "moco-fast-test"}), ("manual", {})):
        out = subprocess.run([sys.executable, "-c", worker], env={**env, **extra}, capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        said[how] = out.stdout.strip()
    assert said == {"launched": str(int(signal.SIGTERM)), "manual": "0"}


DEATH_SIGNAL_WORKER = """
import ctypes, json, sys
from moco_fast import trainer
from moco_fast.cli import build_parser
from moco_fast.commands.train import config_from_args
from moco_fast.config import ConfigError

def signal_now():
    v = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(v))  # 2: PR_GET_PDEATHSIG
    return v.value

during, run_epoch = [], trainer._run_epoch
trainer._run_epoch = lambda *a, **k: during.append(signal_now()) or run_epoch(*a, **k)
trainer.train(config_from_args(build_parser().parse_args(sys.argv[1:])))
after = signal_now()
open("a-file", "w").close()
try:  # a train that raises once joined: its --out a file
    trainer.train(config_from_args(build_parser().parse_args([*sys.argv[1:], "--out", "a-file"])))
except ConfigError:
    pass
print(json.dumps({"training": during, "after": after, "after an error": signal_now()}))
"""


def test_a_launched_workers_signal_at_its_launchers_end_lasts_while_it_trains(tmp_path, held_port):
    # set before the join, it stayed after train() returned: a script under torchrun that went on after
    # its training was SIGTERMed when torchrun ended later (one process as torchrun starts it; this
    # test's process the launcher)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(held_port), "TORCHELASTIC_RUN_ID": "moco-fast-test", "OMP_NUM_THREADS": "1"}  # fmt: skip
    argv = synthetic_args(tmp_path / "run", "--bn-splits", "2")
    out = subprocess.run([sys.executable, "-c", DEATH_SIGNAL_WORKER, *argv], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    said = json.loads(out.stdout.splitlines()[-1])
    assert said == {"training": [int(signal.SIGTERM)], "after": 0, "after an error": 0}, out.stderr[-3000:]


def _rank_worker() -> str:
    return os.environ["RANK"]


def test_a_launch_removes_the_folders_a_killed_launcher_left(tmp_path, monkeypatch):
    # a `--gpus` launcher SIGKILLed left its folders in the temporary directory, one pair a run; the
    # next launch removes those of an ended launcher of this machine, and no other
    import socket
    import tempfile

    from moco_fast.launch import run_workers

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the launcher's; the worker's is its own
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    owners = {"ended": f"{host}-{ended.stdout.strip()}", "running": f"{host}-{os.getppid()}",
              "elsewhere": f"{host}.other-{ended.stdout.strip()}"}  # fmt: skip
    for owner in owners.values():
        for prefix in ("moco-fast-workers-", "moco-fast-agent-"):
            (tmp_path / f"{prefix}{owner}.ab_c12de" / "0").mkdir(parents=True)
    (tmp_path / "moco-fast-workers-x1y2z3w4").mkdir()  # unnamed: an earlier launcher's, owner unknown
    assert run_workers(_rank_worker, (), 1) == ["0"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        [
            f"{prefix}{owners[k]}.ab_c12de"
            for k in ("running", "elsewhere")
            for prefix in ("moco-fast-workers-", "moco-fast-agent-")
        ]
        + ["moco-fast-workers-x1y2z3w4"]
    )


# holds a flock on the folder argv[1] until its stdin closes: a live launcher in another PID namespace
HOLDS_A_FOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def _an_ended_launchers_folder(tmp_path: Path, prefix: str = "moco-fast-workers-") -> Path:
    """The name of a folder of a launcher of this machine whose HOST-PID has ended (not made)."""
    import socket

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    return tmp_path / f"{prefix}{socket.gethostname()}-{ended.pid}.ab_c12de"


def test_a_launchers_folder_whose_host_pid_has_ended_stays_while_its_lock_is_held(tmp_path, monkeypatch):
    # containers that share a host name and /tmp but not their PIDs: a launcher's live folders were
    # removed by another's launch, which took its HOST-PID for ended
    import tempfile

    from moco_fast.launch import remove_killed_launchers_folders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = _an_ended_launchers_folder(tmp_path)
    (folder / "0").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDS_A_FOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        remove_killed_launchers_folders()
        assert (folder / "0").is_dir()
    finally:
        holder.stdin.close()
        holder.wait()
    remove_killed_launchers_folders()  # its lock gone with its holder
    assert list(tmp_path.iterdir()) == []


def _launchers_folders_locked(temporary: str) -> list[bool]:
    # in the worker: whether each of its launcher's folders is locked by another process (the launcher)
    import fcntl

    held = []
    for folder in sorted(Path(temporary).glob("moco-fast-*")):
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
    return held


def test_a_launcher_holds_its_folders_locked_while_its_workers_run(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the launcher's; the worker's is its own
    assert run_workers(_launchers_folders_locked, (str(tmp_path),), 1) == [[True, True]]
    assert list(tmp_path.iterdir()) == []
    # and let go of as it returns: a library user's launches (a notebook's, each run) kept a descriptor
    # of each removed folder open
    opened = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # listdir's own, closed by now
            opened.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert [name for name in opened if name.startswith(str(tmp_path))] == []


def test_a_launchers_folder_removed_before_it_was_locked_is_made_again(tmp_path, monkeypatch):
    # a remover in another PID namespace took this launcher for ended between mkdtemp and the lock
    import tempfile

    from moco_fast.launch import _launchers_folder

    mkdtemp, made = tempfile.mkdtemp, []

    def removed_at_once(**kwargs):
        folder = mkdtemp(dir=str(tmp_path), **kwargs)
        made.append(folder)
        if len(made) == 1:
            os.rmdir(folder)
        return folder

    monkeypatch.setattr(tempfile, "mkdtemp", removed_at_once)
    fd, folder = _launchers_folder("moco-fast-workers-")
    os.close(fd)
    assert folder == made[1] and [p.name for p in tmp_path.iterdir()] == [Path(folder).name]


def test_a_launchers_folder_that_cannot_be_opened_is_removed_with_the_error(tmp_path, monkeypatch):
    # mkdtemp made it, and its open failed (too many open files: a notebook's leaked descriptors): the
    # folder stayed, unlocked, until a later launch after this process's end
    import errno
    import tempfile

    from moco_fast.launch import _launchers_folder

    real = os.open

    def no_descriptor_left(path, flags, *args, **kwargs):
        if flags & os.O_DIRECTORY:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(os, "open", no_descriptor_left)
    with pytest.raises(OSError, match="Too many open files"):
        _launchers_folder("moco-fast-workers-")
    assert list(tmp_path.iterdir()) == []


def test_a_stop_while_a_launcher_makes_its_second_folder_leaves_neither_folder_nor_lock(tmp_path, monkeypatch):
    # Ctrl-C after the first of the two folders was made and locked, before the launch: that folder
    # and its open descriptor were left, made before the cleanup that removes them took charge
    import tempfile

    from moco_fast import launch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made, opened = launch._launchers_folder, []

    def stopped_at_the_second(prefix):
        if opened:
            raise KeyboardInterrupt
        opened.append(made(prefix))
        return opened[0]

    monkeypatch.setattr(launch, "_launchers_folder", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_workers(_launchers_folders_locked, (str(tmp_path),), 1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(opened[0][0])  # closed


def test_a_stop_between_a_launchers_folder_and_its_undoing_leaves_neither_folder_nor_lock(tmp_path, monkeypatch):
    # Ctrl-C as the folder was made and locked, before run_workers registered its removal: the folder
    # and its open descriptor were left behind
    import tempfile

    from moco_fast import launch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made, opened = launch._launchers_folder, []

    def stopped_once_made(prefix):
        opened.append(made(prefix))
        signal.raise_signal(signal.SIGINT)  # Python's handler: a KeyboardInterrupt at the next bytecode
        return opened[-1]

    monkeypatch.setattr(launch, "_launchers_folder", stopped_once_made)
    # Python's own handler, also under a test run that ignores SIGINT (one started in the background
    # by a non-interactive shell: there the stop was ignored and the launch ran on)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_workers(_launchers_folders_locked, (str(tmp_path),), 1)
    finally:
        signal.signal(signal.SIGINT, before)
    assert len(opened) == 1 and list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(opened[0][0])  # closed


@pytest.mark.parametrize("step", ["log filter", "OMP_NUM_THREADS"])
def test_a_stop_as_a_launcher_sets_a_step_leaves_it_undone(tmp_path, monkeypatch, step):
    # Ctrl-C just after the launcher set its log filter or OMP_NUM_THREADS, before it registered the
    # undoing: the filter stayed on the failure loggers of a process that goes on (a notebook), reading
    # a folder removed since at each log, and OMP_NUM_THREADS=1 stayed in its environment
    import tempfile

    from moco_fast import launch

    class StoppingEnviron(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            if key == "OMP_NUM_THREADS":
                raise KeyboardInterrupt

    def stopping_add_filter(logger, f):
        logger.filters.append(f)
        raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in launch.FAILURE_LOGGERS:  # as they were after the test, whatever it leaves
        monkeypatch.setattr(logging.getLogger(name), "filters", list(logging.getLogger(name).filters))
    if step == "log filter":
        monkeypatch.setattr(logging.Logger, "addFilter", stopping_add_filter)
    else:
        environ = StoppingEnviron(os.environ)
        environ.pop("OMP_NUM_THREADS", None)
        monkeypatch.setattr(os, "environ", environ)
    with pytest.raises(KeyboardInterrupt):
        run_workers(_launchers_folders_locked, (str(tmp_path),), 2)
    assert not any(
        isinstance(f, launch._QuietOnUserErrors) for n in launch.FAILURE_LOGGERS for f in logging.getLogger(n).filters
    )
    assert "OMP_NUM_THREADS" not in os.environ
    assert list(tmp_path.iterdir()) == []


def test_a_stop_while_a_launcher_undoes_its_steps_still_undoes_the_rest(tmp_path, monkeypatch):
    # A second Ctrl-C while the launcher removes its first folder (a SIGTERM ended the launch): the
    # other folder, both locks, the log filters, OMP_NUM_THREADS and the signal handlers were the undoing
    # that a `finally` left behind at the first step that raised. Each folder goes while still locked.
    import shutil
    import tempfile

    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from moco_fast import launch
    from moco_fast.signals import Terminated

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, *launch.STOP_SIGNALS)}
    made, events, removed = launch._launchers_folder, [], shutil.rmtree

    def folder(prefix):
        lock, path = made(prefix)
        events.append(("made", lock, path))
        return lock, path

    def remove(path, **kwargs):
        (lock,) = (lock for event, lock, made_path in events if (event, made_path) == ("made", path))
        os.fstat(lock)  # still open: still locked as it goes
        events.append(("removed", lock, path))
        removed(path, **kwargs)
        if sum(event == "removed" for event, *_ in events) == 1:
            raise KeyboardInterrupt  # the second stop, at the first folder's removal

    def launched(config, fn):
        def start(args):
            assert os.environ["OMP_NUM_THREADS"] == "1"
            signal.signal(signal.SIGTERM, lambda *_: None)  # the launcher's own handler
            raise SignalException("stopped", signal.SIGTERM)

        return start

    monkeypatch.setattr(launch, "_launchers_folder", folder)
    monkeypatch.setattr(launch.shutil, "rmtree", remove)
    monkeypatch.setattr(launcher_api, "elastic_launch", launched)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_workers(_launchers_folders_locked, (str(tmp_path),), 2)
    assert isinstance(stopped.value.__context__, Terminated)  # the launcher's SignalException, as before
    assert list(tmp_path.iterdir()) == []  # both folders
    for _, lock, _ in (e for e in events if e[0] == "made"):
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(lock)  # closed
    assert "OMP_NUM_THREADS" not in os.environ
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert not any(
        isinstance(f, launch._QuietOnUserErrors) for n in launch.FAILURE_LOGGERS for f in logging.getLogger(n).filters
    )


def test_a_launcher_puts_back_its_agents_log_level(tmp_path, monkeypatch):
    # it set torch.distributed.elastic's logger to WARNING (the agent's INFO lines would bury the
    # training log) and left it there: a process that goes on (a notebook) lost its own level
    import tempfile

    import torch.distributed.launcher.api as launcher_api

    agent_log = logging.getLogger("torch.distributed.elastic")
    seen, before = [], agent_log.level

    def launched(config, fn):
        seen.append(agent_log.level)
        return lambda args: {0: "trained"}

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(launcher_api, "elastic_launch", launched)
    agent_log.setLevel(logging.DEBUG)  # the notebook's (setLevel: the loggers' caches cleared too)
    try:
        assert run_workers(_launchers_folders_locked, (str(tmp_path),), 1) == ["trained"]
        assert seen == [logging.WARNING] and agent_log.level == logging.DEBUG
    finally:
        agent_log.setLevel(before)


def test_a_launcher_run_in_a_thread_returns_its_results_and_leaves_no_folder(tmp_path, monkeypatch):
    # cli.main run in a thread (its signal steps are the main thread's only): run_workers set signal
    # handlers there, holding stops over a folder's making or putting the launcher's back, which
    # Python refuses outside the main thread (ValueError), where the launcher had set none
    import tempfile
    import threading

    import torch.distributed.launcher.api as launcher_api

    from moco_fast.signals import STOP_SIGNALS

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(launcher_api, "elastic_launch", lambda config, fn: lambda args: {0: "trained"})
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, *STOP_SIGNALS)}
    ended: dict[str, object] = {}

    def launch():
        try:
            ended["results"] = run_workers(_launchers_folders_locked, (str(tmp_path),), 1)
        except BaseException as e:  # the thread's error, asserted on below
            ended["error"] = e

    thread = threading.Thread(target=launch)
    thread.start()
    thread.join()
    assert ended == {"results": ["trained"]}, ended
    assert list(tmp_path.iterdir()) == []
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_a_stop_after_the_launch_returned_ends_as_a_stop_and_leaves_no_folder(tmp_path, monkeypatch):
    # The launcher's handlers (SignalException) stay until run_workers puts the process's back, as its
    # undoing begins: a SIGTERM there, after elastic_launch returned, went up as SignalException (a
    # traceback from main), not as the stop it is.
    import tempfile

    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler

    from moco_fast import launch
    from moco_fast.signals import Terminated

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, *launch.STOP_SIGNALS)}

    def launched(config, fn):
        def start(args):
            signal.signal(signal.SIGTERM, _terminate_process_handler)  # as the launcher's PContext.start
            return {0: "trained"}

        return start

    put_back = launch._put_back

    def stopped_as_it_puts_back(before):
        try:
            signal.raise_signal(signal.SIGTERM)  # the launcher's handler still in place
        finally:
            put_back(before)

    monkeypatch.setattr(launcher_api, "elastic_launch", launched)
    monkeypatch.setattr(launch, "_put_back", stopped_as_it_puts_back)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run_workers(_launchers_folders_locked, (str(tmp_path),), 1)
    assert isinstance(stopped.value, Terminated) and stopped.value.signum == signal.SIGTERM, repr(stopped.value)
    assert list(tmp_path.iterdir()) == []
    assert {s: signal.getsignal(s) for s in handlers} == handlers


@pytest.mark.parametrize("no_lock", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_on_a_file_system_without_flock_a_launchers_folder_goes_by_its_host_pid(tmp_path, monkeypatch, no_lock):
    # as atomic_write's temporaries: where flock fails the launcher's folders go unguarded, and an
    # ended launcher's go by HOST-PID alone
    import fcntl
    import tempfile

    from moco_fast.launch import _launchers_folder, remove_killed_launchers_folders

    def flock(fd, how):
        raise OSError(no_lock, os.strerror(no_lock))

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = _an_ended_launchers_folder(tmp_path, "moco-fast-agent-")
    (ended / "0").mkdir(parents=True)
    fd, mine = _launchers_folder("moco-fast-workers-")  # made, unlocked
    try:
        remove_killed_launchers_folders()
        assert [p.name for p in tmp_path.iterdir()] == [Path(mine).name]
    finally:
        os.close(fd)


def test_a_process_forked_after_the_packages_import_records_its_own_parent():
    # the parent read as the package was imported was inherited by a process forked from it (a launcher's
    # fork start method): that worker took the forking process for a new parent and stopped itself at its join
    import moco_fast

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: says whether it records its own parent, and ends at once
        os.write(write, b"1" if moco_fast.STARTED_BY == os.getppid() else b"0")
        os._exit(0)
    os.close(write)
    said = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)
    assert said == b"1"
