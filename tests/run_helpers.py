"""What the run-folder test files share (not a test module: pytest does not collect it): the
tiny `moco-fast train` command line and `moco-fast sweep`'s (test_sweep.py, test_sweep_checks.py),
the rows of a run's metrics.jsonl and `ForkedCommands`, which runs commands each in a process of its
own at the cost of one interpreter's imports, and `read_only_prefix`, a command prefix under which
folders may not be written."""

import json
import os
import re
import shutil
import subprocess

import pytest


def tiny_args(data, out, epochs=1):
    return [
        "train", "--data", str(data), "--preset", "cifar", "--arch", "resnet18", "--stem", "imagenet",
        "--epochs", str(epochs), "--batch-size", "8", "--moco-k", "16", "--bn-splits", "2",
        "--device", "cpu", "--workers", "0", "--out", str(out), "--no-final-knn",
    ]  # fmt: skip


# The base `moco-fast train` flags of the sweep tests: ResNet-18 at 32 px, one epoch of batches of 8.
SWEEP_TRAIN = ["--preset", "cifar", "--arch", "resnet18", "--stem", "imagenet", "--epochs", "1"]
SWEEP_TRAIN += ["--batch-size", "8", "--moco-k", "16", "--bn-splits", "2", "--workers", "0"]
SWEEP_RUN = "moco_K16_m0.99_sbn-on"


def refuses_workers(line: str, workers: str, cores: int, most: int) -> bool:
    """Whether `line` ends with trainer.check_workers' refusal of `workers` ("--workers 9 in each of
    its 2 processes") on `cores` CPU cores, naming `most`: the counts it says, not its reason's words."""
    said = f"{re.escape(workers)}: this machine has {cores} CPU cores, .*: use at most {most} \\(-1: auto\\)$"
    return re.search(said, line) is not None


def sweep_args(out, root, *grid, train=()):
    """`moco-fast sweep` on `root` into `out`: the grid flags, then the base train flags (and `train`)."""
    return ["sweep", "--out", str(out), "--device", "cpu", *grid, "--", "--data", str(root), *SWEEP_TRAIN, *train]


def last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def stub_sweep_runs(monkeypatch) -> list:
    """Replaces a sweep setting's training and evaluation with stand-ins; returns the settings trained."""
    from moco_fast import sweep

    trained = []
    monkeypatch.setattr(sweep, "_train", lambda cfg, listed: trained.append(cfg))
    monkeypatch.setattr(
        sweep, "evaluate_setting", lambda cfg, s, *a: {"name": s.name, "mechanism": s.mechanism, "k": s.k, "m": s.m}
    )
    return trained


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# One interpreter imports torch and the trainer (most of a `python -m moco_fast train`'s start on 2
# cores), then runs each command it reads on stdin in a fork of itself: a process of its own (its
# exit status, its output, its exit hooks, its kill), without paying the imports again.
FORK_SERVER = """
import json, os, signal, sys
import moco_fast.trainer
from moco_fast.cli import main

for line in sys.stdin:
    argv, setup, out = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(f"{out}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        exec(setup)
        sys.exit(main(argv))
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class ForkedCommands:
    """`moco-fast ARGV` in a process of its own, forked from one that made the imports once (under
    the command `prefix`); their output goes through files in the folder `logs`. A context manager:
    the forking interpreter ends with it. A command that runs past `timeout` s fails the test, named,
    after it, its processes and the forking interpreter are killed (a process group of their own)."""

    def __init__(self, logs, prefix=(), timeout=300):
        import subprocess
        import sys

        self.logs, self.timeout, self.count = logs, timeout, 0
        self.server = subprocess.Popen(
            [*prefix, sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its commands and their workers: one group to kill at a timeout
        )

    def __call__(self, argv, setup=""):
        """(exit status, stderr lines) of one command; `setup`: Python run in its process first
        (os, signal and sys imported), e.g. a patch that kills it at some point."""
        import select

        out = self.logs / f"command.{self.count}"
        self.count += 1
        self.server.stdin.write(json.dumps([[str(a) for a in argv], setup, str(out)]) + "\n")
        self.server.stdin.flush()
        ready, _, _ = select.select([self.server.stdout], [], [], self.timeout)
        if not ready:
            # left to run, it went on forking and training after the test, and __exit__ waited on it
            import os
            import signal

            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
            raise AssertionError(f"moco-fast {' '.join(map(str, argv))} ran past {self.timeout} s (killed; {out}.*)")
        rc = int(self.server.stdout.readline())
        return rc, out.with_name(out.name + ".stderr").read_text().strip().splitlines()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stdin.close()
        self.server.wait(self.timeout)
        self.server.stdout.close()


def read_only_prefix(folders: list) -> list[str]:
    """A command prefix under which `folders` (and what they hold) may not be written: mode 555 where
    that binds (not for root, who writes anyway), else read-only bind mounts in a mount namespace of
    the command's own. Skips where neither is possible."""
    for f in folders:
        f.chmod(0o555)
    if not any(os.access(f, os.W_OK) for f in folders):
        return []
    for f in folders:
        f.chmod(0o755)
    mounts = " && ".join(f"mount --bind -o ro '{f}' '{f}'" for f in folders)
    prefix = ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$@"', "sh"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("root here, and no read-only mount can be made (unshare -m, mount --bind -o ro)")
    return prefix
