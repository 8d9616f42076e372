"""Several processes on the CPU (gloo): cross-rank shuffle BN, DDP against one process, the queue,
torchrun, resume with another world size, and the failures of `--gpus` and of a dying worker.

Workers run through moco_fast.launch.run_workers (PyTorch's elastic launcher), which hands their
return values back to the test. Starting processes costs far more than the work here, so one
launch serves the shuffle and DDP tests, and the model and trainer are imported only where needed
(the workers of the failure tests import this module). GPU variants skip without CUDA.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moco_fast import distributed as dist_utils
from moco_fast.agreement import HeldWarnings
from moco_fast.cli import main
from moco_fast.config import ConfigError, build_config
from moco_fast.join import init_from_env
from moco_fast.launch import WorkerFailed, run_workers
from moco_fast.trainer import validate_device


def _join(device: str) -> torch.device:
    """In a worker: join the group the launcher described; one thread, the CPU is shared."""
    torch.set_num_threads(1)
    init_from_env(device)
    return dist_utils.local_device(torch.device(device))


# -- shuffle BN across ranks ----------------------------------------------------------------------
def _shuffle_run(dev: torch.device, sizes: tuple[int, ...]) -> dict:
    r = dist_utils.rank()
    torch.manual_seed(100 + r)  # per-rank streams, as in training: the plan must not depend on them
    out = {}
    for n in sizes:
        x = (r * n + torch.arange(n, device=dev)).float().view(n, 1).repeat(1, 3)  # row = global image id
        for mode in dist_utils.SHUFFLE_MODES:
            y, plan = dist_utils.batch_shuffle(x, mode)
            reference = dist_utils.all_gather(x)[plan.perm[r * n : (r + 1) * n]]  # the paper's way
            back = dist_utils.batch_unshuffle(y * 2 + 1, plan)  # a per-sample "encoder"
            # Gradients through the exchange (end-to-end keys): d/dp of sum(coef * unshuffle(p * shuffle(x))).
            p = torch.ones((), device=dev, requires_grad=True)
            ys, plan2 = dist_utils.batch_shuffle(x, mode)
            coef = torch.arange(n, device=dev).float().view(n, 1) + 10 * r
            (dist_utils.batch_unshuffle(ys * p, plan2) * coef).sum().backward()
            # Images in channels-last arrive in channels-last (the encoder's fast layout).
            im = x[:, :1, None, None] + torch.randn(n, 3, 4, 4, device=dev).to(memory_format=torch.channels_last)
            im_y, im_plan = dist_utils.batch_shuffle(im, mode)
            im_ok = im_y.is_contiguous(memory_format=torch.channels_last) and torch.equal(
                im_y, dist_utils.all_gather(im)[im_plan.perm[r * n : (r + 1) * n]]
            )
            out[(n, mode)] = {
                "x": x.cpu(),
                "y": y.cpu(),
                "reference": reference.cpu(),
                "back": back.cpu(),
                "perm": plan.perm.cpu(),
                "grad": p.grad.cpu(),
                "expected_grad": (x * coef).sum().cpu(),
                "channels_last_kept": im_ok,
            }
    return {f"{n}/{m}": v for (n, m), v in out.items()}


def check_shuffle(results: list[dict], sizes: tuple[int, ...]) -> None:
    w = len(results)
    for n in sizes:
        for mode in dist_utils.SHUFFLE_MODES:
            per_rank = [res[f"{n}/{mode}"] for res in results]
            perm = per_rank[0]["perm"]
            assert sorted(perm.tolist()) == list(range(w * n)), (n, mode)
            for r, res in enumerate(per_rank):
                assert torch.equal(res["perm"], perm), f"rank {r} drew another permutation"
                assert torch.equal(res["y"], res["reference"]), (n, mode, r)  # all-to-all == gather+slice
                assert torch.equal(res["back"], res["x"] * 2 + 1), (n, mode, r)  # unshuffle undoes it
                assert res["channels_last_kept"], (n, mode, r)
            sizes = dist_utils.split_sizes(n, w)  # the key batch of rank r mixes N / W images of every rank
            for r, res in enumerate(per_rank):
                owners = (res["y"][:, 0] // n).long()
                assert torch.bincount(owners, minlength=w).tolist() == [row[r] for row in sizes], (n, mode, r)
            total = sum(res["grad"] for res in per_rank)
            assert torch.allclose(total, sum(res["expected_grad"] for res in per_rank)), (n, mode)


# -- DDP against one process ----------------------------------------------------------------------
TINY = {
    "model.arch": "resnet18",
    "model.stem": "imagenet",
    "model.dim": 16,
    "moco.k": 32,
    "moco.bn_splits": 2,
    "moco.m": 0.9,
    "runtime.device": "cpu",
}


def _global_batch(n: int, steps: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random 16 px image pairs: the smallest input a ResNet with the ImageNet stem takes (1 x 1 at layer4)."""
    g = torch.Generator().manual_seed(7)
    return [tuple(torch.randn(n, 3, 16, 16, generator=g, dtype=dtype) for _ in range(2)) for _ in range(steps)]


def _run_steps(model, step_model, cfg, batches, rank: int, world: int, device: torch.device) -> dict:
    from moco_fast.loaders.base import Batch

    from moco_fast.trainer import StepState, make_optimizer, train_step

    opt = make_optimizer(model, cfg, device)
    s = StepState(step_model, opt, torch.amp.GradScaler(device.type, enabled=False), None, device)
    if cfg.moco.mechanism != "moco":  # no queue to carry into a second step
        batches = batches[:1]
    losses = []
    for im_q, im_k in batches:
        n = im_q.shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        b = Batch(im_q[part].to(device), im_k[part].to(device), torch.zeros(n, dtype=torch.long), None)
        loss, _ = train_step(s, b, cfg.moco.m)
        losses.append(dist_utils.all_reduce_mean(loss).cpu())
    keep = ("encoder_q.", "encoder_k.", "queue")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(keep)}
    state = {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}
    grads = {k: p.grad.detach().cpu().clone() for k, p in model.encoder_q.named_parameters()}
    return {"losses": torch.stack(losses), "state": state, "grads": grads}


def _ddp_run(dev: torch.device, cfgs: dict, batches) -> dict:
    from moco_fast.model import MoCo

    r, w = dist_utils.rank(), dist_utils.world_size()
    out = {}
    shuffle = dist_utils.batch_shuffle
    for name, cfg in cfgs.items():
        perms = []  # each step's key permutation, for the one-process reference to replay

        def recording(x, mode="alltoall", perms=perms):
            y, plan = shuffle(x, mode)
            perms.append(plan.perm.cpu())
            return y, plan

        dist_utils.batch_shuffle = recording
        torch.manual_seed(cfg.runtime.seed + r)  # ranks start from different weights and queues
        model = MoCo(cfg.model, cfg.moco, 32).to(dev, batches[0][0].dtype)
        out[name] = _run_steps(model, dist_utils.wrap_ddp(model, dev), cfg, batches, r, w, dev)
        out[name]["perms"] = perms
    dist_utils.batch_shuffle = shuffle
    return out


def _worker(device: str, sizes: tuple[int, ...], cfgs: dict, batches) -> dict:
    dev = _join(device)
    out = {"shuffle": _shuffle_run(dev, sizes), "ddp": _ddp_run(dev, cfgs, batches)}
    dist_utils.destroy()
    return out


SIZES = (8, 5, 1)  # images per rank: an even split, an uneven one, fewer images than ranks


def tiny_cfg(**extra):
    return build_config("cifar", {**TINY, **extra})


class PerRankBN(nn.BatchNorm2d):
    """BatchNorm with statistics from each rank's slice of the global batch, as W processes have."""

    ranks = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.BatchNorm2d.forward(self, part) for part in x.chunk(self.ranks)])


def one_process_reference(cfg, batches, perms=()) -> dict:
    """One process, the global batch; BN statistics per rank's slice. With shuffle BN (`perms`: the
    ranks' key permutations, step by step) the keys are encoded on the permuted global batch, whose
    split BN (bn_splits = 2 = ranks) gives each rank's key batch its own statistics, then put back."""
    from moco_fast.model import MoCo

    torch.manual_seed(cfg.runtime.seed)  # rank 0's start: DDP copies it to every rank
    model = MoCo(cfg.model, cfg.moco, 32).to(batches[0][0].dtype)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = PerRankBN
    steps = iter(perms)

    def replay(x, mode="alltoall"):
        perm = next(steps)
        return x[perm], torch.argsort(perm)

    shuffle, dist_utils.batch_shuffle = dist_utils.batch_shuffle, replay
    try:
        return _run_steps(model, model, cfg, batches, 0, 1, torch.device("cpu"))
    finally:
        dist_utils.batch_shuffle = shuffle


def check_ddp(results: list[dict], cfgs: dict, batches) -> None:
    for name, res in ((n, [r[n] for r in results]) for n in cfgs):
        for key in res[0]["state"]:  # every rank holds the same encoders, queue and pointer
            assert torch.equal(res[0]["state"][key], res[1]["state"][key]), (name, key)
    # Everything runs in float64 except the logits (fp32 by design): a gradient that flows only
    # through the queries' fp32 logits matches to ~1e-12, one that also flows through the keys'
    # (end-to-end) to ~1e-5 of its largest entry. A wrong reduction would be off by O(1).
    # shuffle: the default set-up (cross-rank shuffle BN), replayed with the permutations the ranks drew
    tolerance = {"no_shuffle": 1e-7, "shuffle": 1e-7, "end_to_end": 1e-4}
    for name, tol in tolerance.items():
        got = results[0][name]
        ref = one_process_reference(cfgs[name], batches, got["perms"])
        assert len(got["perms"]) == (len(batches) if name == "shuffle" else 0)
        torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-6, atol=1e-6, msg=name)
        for kind in ("grads", "state"):  # state: both encoders, the queue and its pointer after 2 steps
            for key, v in ref[kind].items():
                largest = v.abs().max().item() if v.numel() else 0.0  # end-to-end's queue is empty
                atol = tol * max(largest, 1.0 if kind == "state" else 0.0)
                torch.testing.assert_close(got[kind][key], v, rtol=0, atol=atol, msg=f"{name} {kind} {key}")


def ddp_case(device: str = "cpu"):
    cfgs = {
        "no_shuffle": tiny_cfg(**{"moco.shuffle_bn": False, "runtime.device": device}),
        "shuffle": tiny_cfg(**{"runtime.device": device}),
        # keys from the query encoder, negatives gathered with gradients from every rank
        "end_to_end": tiny_cfg(**{"moco.mechanism": "end-to-end", "moco.shuffle_bn": False, "runtime.device": device}),
    }
    # float64, so that only the order of sums differs: 4 images per rank; step 2 reads step 1's keys.
    return cfgs, _global_batch(8, steps=2)


@pytest.fixture(scope="module")
def two_cpu_ranks():
    cfgs, batches = ddp_case()
    return run_workers(_worker, ("cpu", SIZES, cfgs, batches), 2), cfgs, batches


@pytest.mark.slow
def test_shuffle_across_ranks_is_undone_and_agreed(two_cpu_ranks):
    results, _, _ = two_cpu_ranks
    check_shuffle([r["shuffle"] for r in results], SIZES)


@pytest.mark.slow
def test_two_processes_match_one_and_share_the_queue(two_cpu_ranks):
    results, cfgs, batches = two_cpu_ranks
    check_ddp([r["ddp"] for r in results], cfgs, batches)


# -- the CLI under torchrun, and resume with another world size -----------------------------------
def cli_args(root, out, epochs: int, batch: int = 8) -> list[str]:
    return [
        "train", "--data", str(root), "--device", "cpu", "--preset", "cifar", "--arch", "resnet18",
        "--stem", "imagenet", "--moco-k", "32", "--bn-splits", "2", "--batch-size", str(batch),
        "--epochs", str(epochs), "--workers", "0", "--out", str(out),
    ]  # fmt: skip


@pytest.mark.slow
def test_cli_under_torchrun_then_resume_with_one_process(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_root, tmp_path / "data")
    tiny_root = tmp_path / "data"
    next((tiny_root / "train").iterdir()).joinpath("notes.txt").write_text("not an image")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "moco_fast"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    # the official code's exchange for shuffle BN (the default all-to-all runs in the DDP tests above)
    args = [*cli_args(tiny_root, out, 1), "--shuffle-exchange", "allgather"]
    p = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("finished epoch 1") == 1, p.stdout  # rank 0 alone reports
    assert p.stderr.count("notes.txt: not an image file") == 1, p.stderr  # said once, not once per rank
    assert sorted(f.name for f in out.iterdir() if f.suffix == ".pt" or f.name.startswith(".")) == ["checkpoint.pt"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert 0 <= json.loads((out / "summary.json").read_text())["final_knn_top1"] <= 100  # kNN on rank 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert state["config"]["moco"]["shuffle_exchange"] == "allgather"
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])
    print(f"torchrun, 2 CPU processes, 1 epoch: {time.perf_counter() - t0:.1f} s")

    # Written by 2 processes (global batch 16), continued by 1: same model, queue and optimizer.
    assert main([*cli_args(tiny_root, out, 2, batch=16), "--resume", "--no-final-knn"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    state2 = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state2["world_size"] == 1 and state2["epoch"] == 2
    assert not torch.equal(state2["model"]["encoder_q.head.weight"], state["model"]["encoder_q.head.weight"])


def _cli_worker(argv: list[str]) -> int:
    torch.set_num_threads(1)
    return main(argv)


@pytest.mark.slow
def test_a_resume_with_as_many_ranks_continues_shuffle_bn_exactly(tiny_root, tmp_path):
    # The cross-rank shuffle draws its permutations from a generator shared by the ranks: a resumed
    # run must continue it, not seed a new one, or the resumed run trains on other key batches.
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_workers(_cli_worker, (cli_args(tiny_root, whole, 2),), 2) == [0, 0]
    assert run_workers(_cli_worker, (cli_args(tiny_root, cut, 1),), 2) == [0, 0]
    saved = torch.load(cut / "checkpoint.pt", weights_only=False)["shuffle_generator"]
    assert saved["device"] == "cpu" and saved["state"].numel() > 0
    assert run_workers(_cli_worker, ([*cli_args(tiny_root, cut, 2), "--resume"],), 2) == [0, 0]
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert a["config"]["moco"]["shuffle_bn"] and a["world_size"] == b["world_size"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_a_resume_with_another_world_size_says_how_the_lr_changes(tmp_path, caplog):
    # 2 workers resumed in 1: the linear scaling halved the lr (0.00375 -> 0.001875 there) and only
    # "new random streams" was said. The warning gives both figures and the --lr that keeps the old.
    import logging

    out = tmp_path / "run"
    assert main(synthetic_args(out, "--bn-splits", "2")) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["world_size"] = 2  # as if 2 workers had trained it (global batch 16)
    torch.save(state, out / "checkpoint.pt")
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*synthetic_args(out), "--resume", "--epochs", "2"]) == 0
    assert (
        "--resume: the run was trained by 2 processes, now 1: the global batch goes from 16 to 8, and the lr, "
        "which scales with it, from 0.001875 to 0.0009375 (--lr 0.06 keeps 0.001875)"
    ) in caplog.text


def test_a_resume_with_another_world_size_names_a_fix_that_it_allows(tmp_path, capsys):
    # 2 workers (plain BN) resumed in one process, whose split BN needs --bn-splits 8 to divide a
    # batch of 8 in pieces of 2 or more: the fresh-run message did not say why, nor which value works.
    out = tmp_path / "run"
    assert main(synthetic_args(out, "--bn-splits", "2")) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["world_size"], state["config"]["moco"]["bn_splits"] = 2, 8  # as `--gpus 2 --batch-size 8` had it
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "moco-fast train: error: --batch-size 8 must be a multiple of --bn-splits 8 with at least 2 images per BN "
        "sub-batch: the run was trained by 2 processes, which do not split BN; in one process split BN cuts each "
        "batch of 8 into --bn-splits 8 sub-batches: give --bn-splits 4 (it may change on --resume), or resume "
        "with 2 processes"
    )
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--bn-splits", "4"]) == 0  # it works

    # 1 process resumed by 2: --moco-k cannot change on --resume, so "raise --moco-k" did not help.
    from moco_fast.trainer import validate

    cfg = build_config("v2", {"moco.k": 256, "optim.batch_size": 256})
    with pytest.raises(ConfigError) as e:
        validate(cfg, 2, saved_world=1)
    assert str(e.value) == (
        "--moco-k 256 is smaller than the keys one step enqueues (512): the queue of the checkpoint (trained by 1 "
        "process, now 2) holds 256 keys, and --resume keeps it: lower --batch-size to 128 or less or resume in one "
        "process"
    )
    with pytest.raises(ConfigError, match=r"raise --moco-k or lower --batch-size$"):
        validate(cfg, 2)  # a fresh run may raise --moco-k
    # the checkpoint is read for a fix only where an error needs one (train and --gpus pass a function)
    with pytest.raises(ConfigError) as asked:
        validate(cfg, 2, saved_world=lambda: 1)
    assert str(asked.value) == str(e.value)
    import moco_fast.trainer

    with pytest.MonkeyPatch.context() as m:
        m.setattr(moco_fast.trainer, "saved_world_size", lambda cfg: pytest.fail("read for a run that validates"))
        argv = ["train", "--loader", "synthetic", "--synthetic-steps", "1", "--arch", "resnet18", "--image-size", "16"]
        argv += ["--batch-size", "8", "--bn-splits", "2", "--moco-k", "16", "--epochs", "1", "--device", "cpu"]
        assert main([*argv, "--out", str(tmp_path / "fresh"), "--no-final-knn"]) == 0


# -- failures -------------------------------------------------------------------------------------
def _per_rank_cli_worker(argvs: list[list[str]]) -> tuple[int, str]:
    """main() with this rank's own command line: its exit status and what it wrote on stderr."""
    import contextlib
    import io

    torch.set_num_threads(1)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argvs[int(os.environ["RANK"])])
    return rc, err.getvalue()


def synthetic_args(out, *extra: str) -> list[str]:
    return [
        "train", "--loader", "synthetic", "--synthetic-steps", "2", "--device", "cpu", "--arch", "resnet18",
        "--image-size", "16", "--dim", "16", "--batch-size", "8", "--moco-k", "32", "--epochs", "1",
        "--workers", "0", "--no-final-knn", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_ranks_with_different_settings_stop_with_one_line(tmp_path):
    # Nothing compared the ranks' settings: a rank with another --moco-k trained "fine" (rank 0's
    # queue was broadcast into it, cut to size). Every rank now stops with the same line.
    out = tmp_path / "run"
    argvs = [synthetic_args(out), synthetic_args(out, "--moco-k", "64", "--moco-t", "0.5")]
    results = run_workers(_per_rank_cli_worker, (argvs,), 2)
    for rc, err in results:
        last = err.strip().splitlines()[-1]
        assert rc == 2 and "Traceback" not in err, err[-3000:]
        assert last == (
            "moco-fast train: error: the ranks were started with different settings: "
            "moco.k: 32 on rank 0, 64 on rank 1; moco.t: 0.2 on rank 0, 0.5 on rank 1: "
            "start every rank with the same flags"
        ), last
    assert not (out / "checkpoint.pt").exists()


def test_what_the_ranks_must_agree_on_is_named_with_each_ranks_value():
    from moco_fast.agreement import by_rank, check_ranks_agree
    from moco_fast.data import DataError

    def report(settings=None, start_epoch=0, num_images=96, steps=6):
        return {"settings": settings or {"moco.k": 256}, "start_epoch": start_epoch, "num_images": num_images,
                "steps": steps}  # fmt: skip

    check_ranks_agree([report()] * 3)  # the same: nothing to say
    check_ranks_agree([report(num_images=5)])  # one rank: nothing to compare
    with pytest.raises(DataError, match=r"^the ranks see different data: 96 images \(6 steps an epoch\) on rank 0, "
                       r"48 images \(3 steps an epoch\) on rank 1: every rank must read the same images"):  # fmt: skip
        check_ranks_agree([report(), report(num_images=48, steps=3)])
    with pytest.raises(ConfigError, match=r"different checkpoints \(epochs \[3, 0\]\)"):
        check_ranks_agree([report(start_epoch=3), report(num_images=48, steps=3)])  # the checkpoint first
    many = {f"f{i}": i for i in range(5)}
    with pytest.raises(ConfigError, match=r"f0: 0 on ranks 0, 1, 1 on rank 2; .*\(and 2 more\)") as e:
        check_ranks_agree([report(many), report(many), report({k: v + 1 for k, v in many.items()})])
    assert "; f3" not in str(e.value)
    assert by_rank([1, 1, 1, 2, 1]) == "1 on ranks 0-2, 4, 2 on rank 3"


@pytest.mark.slow
def test_ranks_with_different_data_stop_instead_of_hanging(tmp_path):
    # Rank 1 with half the images ran half the steps, then waited in the epoch's all-reduce while
    # rank 0 waited in its next step's all-to-all: silent until the one-hour collective timeout.
    # Under torchrun, with a deadline: the processes of a hung job are killed by the pids they wrote.
    from conftest import make_image_root

    big = make_image_root(tmp_path / "big", per_class=16)
    small = make_image_root(tmp_path / "small", per_class=8)
    pids = tmp_path / "pids"
    script = tmp_path / "perrank.sh"
    script.write_text(
        f'#!/bin/sh\necho $$ >> {pids}\nif [ "$RANK" = 1 ]; then data={small}; else data={big}; fi\n'
        f'exec {sys.executable} -m moco_fast "$@" --data "$data"\n'
    )
    script.chmod(0o755)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    args = [str(script), "train", *cli_args(big, out, 1)[3:], "--no-final-knn"]  # the script adds --data
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=180)
    except subprocess.TimeoutExpired:
        for pid in pids.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        pytest.fail("the ranks with different data hung")
    lines = [line for line in p.stderr.splitlines() if "moco-fast train: error:" in line]
    assert p.returncode != 0 and len(lines) == 2, p.stderr[-3000:]
    assert lines[0].endswith(
        "the ranks see different data: 32 images (2 steps an epoch) on rank 0, 16 images (1 step an epoch) on "
        "rank 1: every rank must read the same images (--data on each machine holding the same set)"
    ), lines
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_every_torchrun_rank_stops_at_a_run_folder_in_use(tiny_root, tmp_path):
    # Rank 0 alone takes the folder's lock; the other ranks learn its result (all-gathered) and
    # stop too, instead of waiting in their first collective for a rank 0 that has gone.
    from moco_fast.run_folder import hold_run_folder

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "moco_fast"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with hold_run_folder(out):  # as another train writing there
        p = subprocess.run(cmd + cli_args(tiny_root, out, 1), capture_output=True, text=True, env=env, timeout=180)
        assert p.returncode != 0
        assert p.stderr.count("another moco-fast train is writing there") == 2, p.stderr[-3000:]  # each rank's line
        assert not any(out.iterdir())  # nothing written


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
        assert "--gpus 1: this machine has 0 CUDA GPUs" in capsys.readouterr().err
    assert not out.exists()  # nothing started


def test_gpus_checks_the_run_folder_before_starting_workers(tiny_root, tmp_path, capsys, monkeypatch):
    # --gpus N: a folder in use by another train, or holding a run that --resume/--force do not
    # name, is one line before any worker starts (here with 2 pretend GPUs; no worker may start).
    from moco_fast import launch
    from moco_fast.run_folder import hold_run_folder

    started = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launch, "run_workers", lambda *a: started.append(a) or [{}])
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


def test_device_flags_fail_before_the_data_is_read(tmp_path, capsys):
    # --cuda-graph on the CPU and --sync-bn with CPU processes: one line, before the data is touched.
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
    assert p.stderr.splitlines() == [f"moco-fast train: error: data folder not found: {tmp_path / 'no-such-data'}"]


def test_the_workers_user_errors_name_the_ranks_only_where_they_differ():
    from moco_fast.launch import user_error_text

    assert user_error_text({1: "data folder not found: /x", 0: "data folder not found: /x"}) == (
        "data folder not found: /x"
    )
    assert user_error_text({1: "b", 0: "a"}) == "rank 0: a; rank 1: b"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_manual_launch_whose_peer_never_comes_ends_with_one_line(tmp_path):
    # RANK=0 WORLD_SIZE=2 by hand, and rank 1 never starts: the join waited the collectives' hour
    # in silence. It says what it waits for, and gives up after its own timeout with one line.
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
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


def test_a_manual_launch_without_its_address_or_rank_0_is_a_config_error(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match=r"^RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT are not: "):
        init_from_env("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # nobody listens there
    monkeypatch.setenv("MOCO_FAST_JOIN_TIMEOUT", "never")
    with pytest.raises(ConfigError, match=r"^MOCO_FAST_JOIN_TIMEOUT=never: give the seconds"):
        init_from_env("cpu")
    monkeypatch.setenv("MOCO_FAST_JOIN_TIMEOUT", "1")
    with pytest.raises(
        ConfigError, match=r"^rank 1 could not reach rank 0 at 127\.0\.0\.1:\d+ within 1 s: start all 2"
    ):
        init_from_env("cpu")
    assert not dist.is_initialized()


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

    from moco_fast.cli import STOP_SIGNALS, Terminated, _on_stop_signal

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


# -- GPU: NCCL and the cost of the distributed path -----------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_shuffle_and_ddp_on_two_gpus():
    cfgs, batches = ddp_case("cuda")
    results = run_workers(_worker, ("cuda", (32, 5), cfgs, batches), 2)
    check_shuffle([r["shuffle"] for r in results], (32, 5))
    ddp = [r["ddp"] for r in results]
    for name in cfgs:  # cuDNN is not bitwise the CPU: compare the ranks with each other only
        for key in ddp[0][name]["state"]:
            assert torch.equal(ddp[0][name]["state"][key], ddp[1][name]["state"][key]), (name, key)


def _overhead_worker(steps: int, rounds: int) -> dict:
    """One worker (NCCL, world 1), ms per step of three set-ups of the same step:
    plain: what one GPU runs (split BN, local shuffle); plain_bn: the same with the plain BatchNorm
    the distributed model builds; distributed: that model with the distributed path forced on (DDP,
    all-to-all shuffle, gathered keys). distributed vs plain_bn isolates the distributed machinery."""
    from moco_fast.loaders.base import Batch

    from moco_fast.model import MoCo
    from moco_fast.trainer import StepState, make_optimizer, train_step

    dev = _join("cuda")
    torch.backends.cudnn.benchmark = True
    cfg = build_config("v2", {"optim.batch_size": 64, "runtime.device": "cuda"})
    g = torch.Generator(device=dev).manual_seed(0)
    x = [torch.randn(64, 3, 224, 224, device=dev, generator=g).to(memory_format=torch.channels_last) for _ in range(2)]
    batch = Batch(x[0].bfloat16(), x[1].bfloat16(), torch.zeros(64, dtype=torch.long, device=dev), None)
    real = dist_utils.is_distributed
    forced = {"plain": False, "plain_bn": False, "distributed": True}  # is_distributed() while stepping

    def state(name: str) -> StepState:
        dist_utils.is_distributed = real if name == "plain" else (lambda: True)  # the model reads it at build
        model = MoCo(cfg.model, cfg.moco, 224).to(dev, memory_format=torch.channels_last)
        dist_utils.is_distributed = (lambda: True) if forced[name] else real
        step_model = dist_utils.wrap_ddp(model, dev)
        opt = make_optimizer(model, cfg, dev)
        return StepState(step_model, opt, torch.amp.GradScaler("cuda", enabled=False), torch.bfloat16, dev)

    states = {name: state(name) for name in forced}
    times: dict[str, list[float]] = {k: [] for k in states}
    for _ in range(rounds):  # interleaved, so that clock drift hits all alike
        for name, s in states.items():
            dist_utils.is_distributed = (lambda: True) if forced[name] else real
            for _ in range(5):
                train_step(s, batch, 0.999)
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(s, batch, 0.999)
            torch.cuda.synchronize(dev)
            times[name].append((time.perf_counter() - t0) / steps * 1000)
    dist_utils.is_distributed = real
    dist_utils.destroy()
    return {k: min(v) for k, v in times.items()}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_worker_distributed_path_costs_under_3_percent():
    ms = run_workers(_overhead_worker, (30, 3), 1)[0]
    print(f"ResNet-50 224 px, batch 64, bf16, one GPU, ms/step: {json.dumps(ms)}")
    assert ms["distributed"] <= ms["plain_bn"] * 1.03, ms  # the distributed machinery itself
    assert ms["distributed"] <= ms["plain"] * 1.03, ms  # against what one GPU runs by default
