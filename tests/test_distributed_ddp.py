"""Several processes on the CPU (gloo): cross-rank shuffle BN and DDP against one process, the queue
shared; on GPUs, NCCL and the cost of the distributed path (skipped without CUDA).

Workers run through moco_fast.launch.run_workers (PyTorch's elastic launcher), which hands their
return values back to the test. Starting processes costs far more than the work here, so one
launch serves the shuffle and DDP tests, and the model and trainer are imported only where needed.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from moco_fast import distributed as dist_utils
from moco_fast.config import build_config
from moco_fast.join import init_from_env
from moco_fast.launch import run_workers


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
