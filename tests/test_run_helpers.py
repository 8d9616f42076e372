"""tests/run_helpers.ForkedCommands: a command that hangs fails the test that ran it, named, and
leaves no process behind (it went on running, and the test then waited out the timeout again in
ForkedCommands' exit)."""

import os
import time
from pathlib import Path

import pytest
from run_helpers import ForkedCommands


def test_a_command_past_its_timeout_is_named_and_its_processes_end(tmp_path):
    with ForkedCommands(tmp_path, timeout=2) as run:
        with pytest.raises(AssertionError, match="moco-fast train --help ran past 2 s"):
            run(["train", "--help"], setup="signal.pause()")
        group = run.server.pid
    assert run.server.returncode is not None
    # the forking interpreter's group: the command and all. Killed, but a command whose parent (the
    # forking interpreter) died is a zombie until PID 1 reaps it, and a zombie still counts in
    # killpg(group, 0): the check asks for members that are not zombies, given a few seconds
    deadline = time.monotonic() + 10
    while (alive := _running_in_group(group)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"still running in the command's process group: {alive}"


def _running_in_group(group: int) -> list[int]:
    """The processes of process group `group` that are not zombies (from /proc)."""
    running = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:  # ended while listed
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]  # after "pid (comm) "
        if int(pgrp) == group and state != "Z":
            running.append(int(entry))
    return running
