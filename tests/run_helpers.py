"""What the run-folder test files share (not a test module: pytest does not collect it): the
tiny `moco-fast train` command line, the rows of a run's metrics.jsonl and `forked_commands`, which
runs commands each in a process of its own at the cost of one interpreter's imports."""

import json


def tiny_args(data, out, epochs=1):
    return [
        "train", "--data", str(data), "--preset", "cifar", "--arch", "resnet18", "--stem", "imagenet",
        "--epochs", str(epochs), "--batch-size", "8", "--moco-k", "16", "--bn-splits", "2",
        "--device", "cpu", "--workers", "0", "--out", str(out), "--no-final-knn",
    ]  # fmt: skip


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# One interpreter imports torch and the trainer (most of a `python -m moco_fast train`'s start on 2
# cores), then runs each command in a fork of itself: a process of its own (its exit status, its
# stderr, its exit hooks), without paying the imports again.
FORKED_COMMANDS = """
import json, os, sys
import moco_fast.trainer
from moco_fast.cli import main

codes = []
for i, argv in enumerate(json.loads(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.path.join(sys.argv[2], f"stderr.{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.exit(main(argv))
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


def forked_commands(argvs, logs, prefix=(), timeout=300):
    """(exit status, stderr lines) of `moco-fast ARGV` for each of `argvs` in turn, each in a process
    of its own forked from one that made the imports once, under the command `prefix`; their stderr
    goes through files in the folder `logs`."""
    import subprocess
    import sys

    cmd = [*prefix, sys.executable, "-c", FORKED_COMMANDS, json.dumps([[str(a) for a in v] for v in argvs]), str(logs)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.splitlines()[-1])
    return [(rc, (logs / f"stderr.{i}").read_text().strip().splitlines()) for i, rc in enumerate(codes)]
