"""tests/run_helpers.ForkedCommands: a command that hangs fails the test that ran it, named, and
leaves no process behind (it went on running, and the test then waited out the timeout again in
ForkedCommands' exit)."""

import os

import pytest
from run_helpers import ForkedCommands


def test_a_command_past_its_timeout_is_named_and_its_processes_end(tmp_path):
    with ForkedCommands(tmp_path, timeout=2) as run:
        with pytest.raises(AssertionError, match="moco-fast train --help ran past 2 s"):
            run(["train", "--help"], setup="signal.pause()")
        group = run.server.pid
    assert run.server.returncode is not None
    with pytest.raises(ProcessLookupError):  # the forking interpreter's group: the command and all
        os.killpg(group, 0)
