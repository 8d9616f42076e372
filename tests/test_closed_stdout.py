"""A command whose stdout's reader is gone (`| head -1`, `| grep -q`) ends quietly with exit status
141, its files written; a BrokenPipeError that is not stdout's keeps its traceback; a training whose
stderr's reader is gone saves, then ends with 141 (closed_stdout.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import read_until_then_close

import moco_fast.commands.export
from moco_fast import closed_stdout
from moco_fast.cli import main


def with_closed_stdout(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """`moco-fast ARGV` with stdout a pipe whose reader closed before it started (`| head -0`): its first
    write to stdout fails, whenever it comes. PYTHONUNBUFFERED unset unless given: a user's stdout is
    buffered, and the failure comes at the flush."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "moco_fast", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            env={**base, **env},
        )
    finally:
        os.close(write)


def test_an_export_to_a_closed_stdout_writes_its_file_and_ends_quietly(tmp_path):
    # The print of "wrote ..." after the export raised BrokenPipeError: a traceback, exit status 1 (or,
    # buffered, "Exception ignored ... BrokenPipeError" at exit, status 120)
    src, out = tmp_path / "r18.pth", tmp_path / "export.pth"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    done = with_closed_stdout(["export", str(src), "--format", "torchvision", "--output", str(out)])
    assert done.returncode == closed_stdout.EXIT_STATUS, done.stderr
    assert done.stderr.splitlines() == [
        f"INFO {src}: torchvision resnet18 state dict: the backbone (it has no MoCo head)"
    ]
    assert closed_stdout.EXIT_STATUS == 141  # 128 + SIGPIPE, as a shell reports a tool that SIGPIPE ended
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(out), strict=False)  # written whole
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_a_print_that_fails_at_once_ends_quietly_too():
    # unbuffered (PYTHONUNBUFFERED, python -u): the print itself raises, in the middle of the command
    done = with_closed_stdout(["train", "--print-config", "--device", "cpu"], PYTHONUNBUFFERED="1")
    assert (done.returncode, done.stderr) == (closed_stdout.EXIT_STATUS, ""), done.stderr


@pytest.fixture
def pipe():
    """(a pipe's read end, a stream on its write end), both closed after the test where still open.
    The test points sys.stdout at the stream itself: pytest's capture sets it again as the test starts."""
    read, write = os.pipe()
    stream = open(write, "w")
    yield read, stream
    with contextlib.suppress(OSError):
        stream.close()
    with contextlib.suppress(OSError):
        os.close(read)


def test_a_pipe_is_closed_once_its_reader_is_gone(pipe, tmp_path, monkeypatch):
    read, stream = pipe
    monkeypatch.setattr(sys, "stdout", stream)
    assert not closed_stdout.closed()
    os.close(read)
    assert closed_stdout.closed()
    with open(tmp_path / "out.txt", "w") as file:  # a file is never closed in this sense
        monkeypatch.setattr(sys, "stdout", file)
        assert not closed_stdout.closed()


def test_a_broken_pipe_while_stdout_is_read_keeps_its_traceback(pipe, monkeypatch):
    # a socket's or a worker's pipe: a bug to see, not a reader that went away
    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(moco_fast.commands.export, "run", broken)
    monkeypatch.setattr(sys, "stdout", pipe[1])
    with pytest.raises(BrokenPipeError):
        main(["export", "x.pt", "--format", "torchvision", "--output", "y.pth"])


def test_a_command_that_failed_keeps_its_exit_status_where_its_lines_are_lost(pipe, monkeypatch):
    # a sweep with diverged settings prints its table, says so on stderr and ends with 1: a reader gone
    # before the last flush turned the 1 into 141, as if the lost lines were all that went wrong
    read, stream = pipe

    def failed(args):
        print("| setting | top-1 |")
        return 1

    monkeypatch.setattr(moco_fast.commands.export, "run", failed)
    monkeypatch.setattr(sys, "stdout", stream)
    os.close(read)
    assert main(["export", "x.pt", "--format", "torchvision", "--output", "y.pth"]) == 1


def test_a_training_whose_stderr_reader_goes_away_saves_and_resumes(tmp_path, caplog):
    # `moco-fast train ... 2>&1 | head`: the progress bar's next write after the reader went away raised
    # BrokenPipeError in the training step, and the run ended (141) without saving the steps since its
    # last checkpoint. It is a stop now: the next sync (--log-every 2) saves the step, then it ends with 141.
    import logging

    args = ["train", "--loader", "synthetic", "--synthetic-steps", "12", "--preset", "cifar", "--arch", "resnet18",
            "--stem", "imagenet", "--epochs", "1", "--batch-size", "8", "--moco-k", "16", "--bn-splits", "2",
            "--device", "cpu", "--workers", "0", "--log-every", "2", "--save-every", "0", "--no-final-knn",
            "--out", str(tmp_path / "run")]  # fmt: skip
    read, write = os.pipe()
    run = subprocess.Popen([sys.executable, "-m", "moco_fast", *args], stdout=write, stderr=write)
    os.close(write)
    read_until_then_close(read, b"epoch 1/1:")  # once the epoch's bar is drawn: a reader gone
    assert run.wait(timeout=300) == closed_stdout.EXIT_STATUS
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert 2 <= state["step"] < 12 and state["epoch"] == 0  # a step of a sync in the epoch, saved
    with caplog.at_level(logging.INFO, "moco_fast"):
        assert main([*args, "--resume"]) == 0
    assert f"resumed from {tmp_path / 'run' / 'checkpoint.pt'} after step {state['step']} of epoch 1" in caplog.text
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"epoch": 1' in rows[0]
