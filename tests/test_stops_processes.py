"""Stops in several processes: a worker's repeated signals, --gpus ranks (gloo on the CPU) that stop
at the same step with rank 0 saving it, and a SIGTERM to a whole process group (as SLURM sends it)
that reaches the DataLoader workers too."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from run_helpers import rows
from test_stops import same_weights

import moco_fast.trainer as trainer
from moco_fast.cli import main
from moco_fast.signals import Terminated

REPEAT_AFTER_THE_STEPS = """
import os, signal
from moco_fast.stops import StopRequests

stops = StopRequests(repeats_wait=True)
with stops.deferred():
    os.kill(os.getpid(), signal.SIGTERM)
    stops.agreed = True  # at the epoch's end: the save comes after the steps
for sig in (signal.SIGTERM, signal.SIGINT):  # the launcher's copy, a second Ctrl-C: during the save
    os.kill(os.getpid(), sig)
print("saved", stops.signum)
"""


def test_a_workers_repeats_after_the_steps_do_not_end_it_before_its_save():
    # a repeat after the steps killed a worker (SIGTERM's default action then; the CLI's handler would stop
    # it now), its epoch-end save cut short and the launcher naming a failed worker, not a stop

    done = subprocess.run([sys.executable, "-c", REPEAT_AFTER_THE_STEPS], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, f"saved {int(signal.SIGTERM)}"), done.stderr[-2000:]


def _stopping_worker(argv: list[str], at: int) -> int:
    """`moco-fast train` in a worker; rank 1 alone sends itself SIGTERM in its `at`-th step (0: none)."""
    torch.set_num_threads(1)
    if at and os.environ["RANK"] == "1":
        real, calls = trainer.train_step, []

        def step(*a, **k):
            calls.append(1)
            out = real(*a, **k)
            if len(calls) == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        trainer.train_step = step
    return main(argv)


def _repeated_worker(argv: list[str]) -> int:
    """`moco-fast train` in a worker: rank 1 gets SIGTERM in its first step, and each rank a repeat of
    it in the epoch-end save that follows (its gather of the random streams)."""
    import moco_fast.checkpoint as ckpt

    torch.set_num_threads(1)
    real_step, real_rng, sent = trainer.train_step, ckpt.rng_state, []

    def step(*a, **k):
        out = real_step(*a, **k)
        if os.environ["RANK"] == "1" and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return out

    def rng_state():
        os.kill(os.getpid(), signal.SIGTERM)
        return real_rng()

    trainer.train_step, ckpt.rng_state = step, rng_state
    return main(argv)


def two_rank_args(root, *flags: str) -> list[str]:
    """`moco-fast train` of 2 epochs on `root` (32 images: 2 steps an epoch with 2 ranks of 8)."""
    return ["train", "--data", str(root), "--device", "cpu", "--preset", "cifar", "--arch", "resnet18",
            "--stem", "imagenet", "--moco-k", "32", "--bn-splits", "2", "--batch-size", "8", "--epochs", "2",
            "--workers", "0", "--save-every", "0", "--no-final-knn", *flags]  # fmt: skip


def _terminated_worker() -> None:
    raise Terminated(signal.SIGUSR1)


@pytest.mark.slow
def test_every_rank_stops_at_the_same_step_and_rank_0_saves_it(tiny_root, tmp_path):
    from moco_fast.launch import run_workers

    # 32 images, 2 ranks of 8: 2 steps an epoch, a sync after each; rank 1's signal in epoch 2's
    # first step stops both there, and the resumed run ends as the whole one. The whole one saves at
    # every sync (--save-every, by rank 0's clock): both ranks take part in each save (its RNG
    # gather), or they would wait in different collectives
    args = two_rank_args(tiny_root, "--log-every", "1")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_workers(_stopping_worker, ([*args, "--out", str(whole), "--save-every", "1e-9"], 0), 2) == [0, 0]
    assert run_workers(_stopping_worker, ([*args, "--out", str(cut)], 3), 2) == [143, 143]
    state = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"], state["world_size"]) == (1, 1, 2)
    assert run_workers(_stopping_worker, ([*args, "--out", str(cut), "--resume"], 0), 2) == [0, 0]
    assert [r["loss"] for r in rows(cut)] == [r["loss"] for r in rows(whole)]
    assert same_weights(whole, cut) == []
    # a worker's stop (exit status 128 + the signal) ends the launcher as that stop, not as a failure
    with pytest.raises(Terminated) as stop:
        run_workers(_terminated_worker, (), 2)
    assert stop.value.signum == signal.SIGUSR1


@pytest.mark.slow
def test_a_repeat_during_a_workers_epoch_end_save_waits_for_it(tiny_root, tmp_path):
    from moco_fast.launch import run_workers

    # 2 steps an epoch and no --log-every sync within it: rank 1's stop is agreed at the epoch's end,
    # saved after the steps; the repeats there killed the workers (WorkerFailed, no checkpoint)
    args = two_rank_args(tiny_root, "--log-every", "10", "--out", str(tmp_path))
    assert run_workers(_repeated_worker, (args,), 2) == [143, 143]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state.get("step")) == (1, None)


STOPPED_WITH_ITS_GROUP = """
import json, os, signal, sys
from moco_fast import trainer
from moco_fast.cli import main

real, calls = trainer.train_step, []

def step(*a, **k):
    out = real(*a, **k)
    calls.append(1)
    if len(calls) == 2:  # as SLURM signals a job: every process, the DataLoader workers too
        os.killpg(0, signal.SIGTERM)
    return out

trainer.train_step = step
sys.exit(main(json.loads(sys.argv[1])))
"""


@pytest.mark.slow
def test_a_sigterm_to_the_process_group_with_dataloader_workers_saves_the_step(tiny_root, tmp_path):
    # the workers, forked while the steps run, record the signal too instead of dying of it (which
    # ended the epoch with "DataLoader worker killed by signal")

    args = ["train", "--data", str(tiny_root), "--device", "cpu", "--preset", "cifar", "--arch", "resnet18",
            "--stem", "imagenet", "--moco-k", "32", "--bn-splits", "2", "--batch-size", "8", "--epochs", "1",
            "--workers", "2", "--log-every", "3", "--no-final-knn", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_WITH_ITS_GROUP, json.dumps(args)],
        capture_output=True, text=True, timeout=300, start_new_session=True,
    )  # fmt: skip
    assert done.returncode == 143, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "terminated", done.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (0, 3)
