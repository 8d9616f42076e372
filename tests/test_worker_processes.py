"""A `--gpus` worker is spawned, and a spawned process inherits the "spawn" start method: its
DataLoader workers were spawned each epoch (importing torch again: a 2-step epoch took 11-15 s on
the CPU, 1.9 s now), and tqdm's lock was a named semaphore that the resource tracker reported as
leaked, after the command's last line, when a worker ended without its exit handlers. A worker now
runs with the platform's default start method, as a torchrun worker does.

And a run of workers leaves nothing in the temporary directory (the elastic agent's folders and a
failed worker's error file stayed there, one more each run)."""

import logging
import subprocess
import sys

import pytest
import torch
from distributed_helpers import cli_args

from moco_fast.cli import main

SPAWNED_WORKER = """
import multiprocessing as mp, os, sys, tempfile

import torch
from torch.utils.data import DataLoader

from moco_fast.launch import _reported

STATE = "imported again"


class State(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return STATE


def loads():
    global STATE
    STATE = "the worker's"
    print(next(iter(DataLoader(State(), num_workers=1, collate_fn=lambda b: b[0]))), flush=True)


def bar_then_gone():
    from tqdm import tqdm

    tqdm(total=1, file=sys.stderr, disable=True).close()
    os._exit(138)  # as the stop watch ends a worker, or a SIGKILL: no exit handlers


if __name__ == "__main__":
    reports = tempfile.mkdtemp(dir=os.path.dirname(__file__))  # in the test's tmp_path, not left in /tmp
    p = mp.get_context("spawn").Process(target=_reported, args=(globals()[sys.argv[1]], reports, None))
    p.start()
    p.join()
    print("exit", p.exitcode, flush=True)
"""


@pytest.mark.parametrize("case", ["loads", "bar_then_gone"])
def test_a_spawned_workers_processes_start_as_they_would_alone(tmp_path, case):
    script = tmp_path / "worker.py"
    script.write_text(SPAWNED_WORKER)
    p = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True, timeout=120)
    if case == "loads":  # forked from the worker, with its state: not imported again
        assert p.stdout == "the worker's\nexit 0\n", p.stderr[-2000:]
    else:
        assert p.stdout == "exit 138\n" and "leaked" not in p.stderr, p.stderr[-2000:]


def _returns_its_rank() -> int:
    import os

    return int(os.environ["RANK"])


def _fails() -> int:
    raise RuntimeError("a worker's failure")


@pytest.mark.parametrize("fn", [_returns_its_rank, _fails])
def test_a_run_of_workers_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch, fn):
    # the elastic agent made a torchelastic_* folder there for each run, and a failed worker's
    # traceback stayed in a pytorch-errorfile-*.pickle
    import tempfile

    from moco_fast.launch import WorkerFailed, run_workers

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the workers' too
    monkeypatch.setattr(tempfile, "tempdir", None)  # read again from TMPDIR
    if fn is _fails:
        with pytest.raises(WorkerFailed, match="a worker's failure"):
            run_workers(fn, (), 2)
    else:
        assert run_workers(fn, (), 2) == [0, 1]
    # torch's compiler cache (one for the user, made on a failure's report) is no litter
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_")] == []
    assert tempfile.gettempdir() == str(tmp_path)  # put back


def _returns_its_args(*args: str) -> tuple[str, ...]:
    return args


def test_a_workers_string_arguments_reach_it_as_they_were(tmp_path):
    # the elastic launcher takes each string argument of a worker for a template: a path holding
    # "${local_rank}" reached the worker as "0", and "$$" as "$"
    from moco_fast.launch import run_workers

    paths = (str(tmp_path / "${local_rank}"), "runs/a$$b", "$local_rank")
    assert run_workers(_returns_its_args, paths, 1) == [paths]


WORKER_LOGS = """
import contextlib, logging, sys, types

def train(cfg):  # what a worker's run logs, without the run
    logging.getLogger("a_library").info("a library's INFO")
    logging.getLogger("a_library").warning("a library's warning")
    logging.getLogger("moco_fast").info("moco-fast's INFO")
    logging.getLogger("moco_fast").debug("moco-fast's DEBUG")
    return {}

sys.modules["moco_fast.trainer"] = types.SimpleNamespace(train=train)
from moco_fast.launch import _train_worker

cfg = types.SimpleNamespace(data=types.SimpleNamespace(loader="synthetic", loader_module=None))
_train_worker(cfg, types.SimpleNamespace(taken=contextlib.nullcontext), int(sys.argv[1]))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_workers_log_lines_are_the_commands(tiny_root, tmp_path, monkeypatch, verbose):
    # a `--gpus` worker set its logging up with a copy of main's (cli.log_as_lines) that let other
    # libraries' INFO through, which main's leaves out; and then at INFO whatever main's level was:
    # --verbose's DEBUG lines never came out of the workers. The launcher hands its level to them
    # (2 pretend GPUs, no worker started; what a worker logs at that level, in a process of its own)
    from moco_fast import launch

    handed = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launch, "run_workers", lambda fn, args, n, where=None: handed.append(args) or [{}])
    out = tmp_path / "run"
    args = [*cli_args(tiny_root, out, 1)[:-2], "--device", "auto", "--out", str(out), "--gpus", "2"]
    moco_fast_log = logging.getLogger("moco_fast")
    before = moco_fast_log.level
    try:
        assert main([*(["--verbose"] if verbose else []), *args]) == 0
    finally:
        moco_fast_log.setLevel(before)  # main's, for the tests after this one
    ((_, _, level, _),) = handed
    p = subprocess.run([sys.executable, "-c", WORKER_LOGS, str(level)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    debug = ["DEBUG moco-fast's DEBUG"] if verbose else []
    assert p.stderr.splitlines() == ["WARNING a library's warning", "INFO moco-fast's INFO", *debug]
