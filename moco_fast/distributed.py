"""Guarded torch.distributed helpers: with one process (or none initialised) each is the identity,
so a single CPU process runs the same code path as a multi-GPU job.

Shuffle BN across processes (MoCo, Sec. 3.3): the key encoder sees a batch mixed from all ranks, so
the BN statistics of a key never come from the same images as its query's. The paper gathers every
image on every rank and each rank takes its slice of a random permutation; here each rank instead
sends every other rank only the images that rank needs (one all-to-all), W times fewer bytes for W
ranks. The permutation is drawn from a generator in the same state on every rank, so both versions
compute the same shuffle and the tests check one against the other. See docs/distributed.md.
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moco_fast.join import env_world_size

SHUFFLE_MODES = ("alltoall", "allgather")

log = logging.getLogger("moco_fast")

# torch >= 2.14 renames all_gather_into_tensor (and warns on the old name); 2.11 has only the old.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_world_size() -> int:
    """Processes on this machine (torchrun sets LOCAL_WORLD_SIZE)."""
    return _env_count("LOCAL_WORLD_SIZE", default=1, least=1)


def local_rank() -> int:
    """This process's index among the machine's (torchrun and --gpus set LOCAL_RANK; 0 alone)."""
    return _env_count("LOCAL_RANK", default=0, least=0)


def _env_count(name: str, default: int, least: int) -> int:
    """The count in the environment variable `name` (`default` where unset), or a one-line ConfigError
    for one that is not a count of at least `least` (1: a count of processes; 0: an index among them):
    LOCAL_WORLD_SIZE=x was a ValueError traceback, 0 a ZeroDivisionError
    in the --workers cap, and a negative one a cap of 1 without a word."""
    from moco_fast.config import ConfigError

    text = os.environ.get(name)
    if text is None:
        return default
    if not text.strip().isdecimal() or int(text) < least:  # isdigit takes "²", which int() does not
        raise ConfigError(
            f"{name}={text} is not a {'count of processes' if least else 'process index'} (torchrun sets it; "
            f"a number >= {least}): unset it, or start the processes with torchrun"
        )
    return int(text)


# -- gathering ------------------------------------------------------------------------------------
def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with dim 0 outermost and dense, without a copy for a channels-last batch (N x H x W x C):
    `.contiguous()` would rewrite it as NCHW and hand the encoder the slow layout."""
    return x.permute(0, 2, 3, 1) if _channels_last(x) else x.contiguous()


def _unrows(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return out.permute(0, 3, 1, 2) if _channels_last(like) else out


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks along dim 0 (no gradient); keeps channels-last."""
    if not is_distributed():
        return x
    src = _rows(x)
    out = src.new_empty((world_size() * src.shape[0], *src.shape[1:]))
    _all_gather_single(out, src)
    return _unrows(out, x)


def _exchange(x: torch.Tensor, out_sizes: list[int], in_sizes: list[int]) -> torch.Tensor:
    """x's rows, cut into in_sizes pieces, go to ranks 0..W-1; out_sizes rows come from each."""
    src = _rows(x)
    out = src.new_empty((sum(out_sizes), *src.shape[1:]))
    dist.all_to_all_single(out, src, out_sizes, in_sizes)
    return _unrows(out, x)


class _AllToAll(torch.autograd.Function):
    """The exchange with a gradient: the backward pass is the same exchange reversed.
    (torch.distributed.nn.functional has one, deprecated since torch 2.14 for a private module.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_sizes: list[int], in_sizes: list[int]) -> torch.Tensor:
        ctx.sizes = out_sizes, in_sizes
        return _exchange(x, out_sizes, in_sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_sizes, in_sizes = ctx.sizes
        return _exchange(grad, in_sizes, out_sizes), None, None


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose gradient is the sum, over ranks, of each rank's slice (a
    reduce-scatter, done as an all-to-all plus a sum because gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = world_size()
        n = grad.shape[0] // w
        parts = _AllToAll.apply(grad, [n] * w, [n] * w)  # rank j's gradient for my slice, j = 0..W-1
        return parts.view(w, n, *grad.shape[1:]).sum(0)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks; gradients flow back to each rank's own slice."""
    if not is_distributed():
        return x
    return _AllGather.apply(x)


def all_gather_objects(obj: Any) -> list[Any]:
    """A picklable object from every rank, in rank order (host-side; for checkpoints, not steps)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over the ranks (x itself with one process)."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def barrier(poll_s: float = 0.05) -> None:
    """Waits for every rank, in Python: the ranks wait here while rank 0 runs the kNN alone (minutes),
    and a stop signal's handler (signals.stop_signals_handled) runs only between Python's steps, so one
    that reached a rank blocked in dist.barrier() waited for the kNN's end."""
    if not is_distributed():
        return
    work = dist.barrier(async_op=True)
    try:
        while not work.is_completed():
            time.sleep(poll_s)
    except BaseException:  # a stop: the process ends with the barrier still waiting for the others
        _outlive_the_exit(dist.group.WORLD)
        raise
    work.wait()  # a peer that died: its error


def _outlive_the_exit(group: Any) -> None:
    """Keeps `group` from being destroyed when the process exits. A barrier left waiting keeps gloo's
    worker thread in it until every peer arrives, and torch 2.11's ProcessGroupGloo destructor joins
    that thread: the exit of a rank stopped at the barrier (the interpreter's teardown, after its
    line) waited for rank 0's kNN to end (minutes), and the launcher for it. One reference that is
    never released (CPython's own count, from C): the process's end frees what it holds."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(group))


# -- shuffle BN -----------------------------------------------------------------------------------
@dataclass
class ShufflePlan:
    """How one step's key batch was mixed across ranks, kept to undo it.

    W ranks, N images each. Rank r sends `send[j]` of its images to rank j and receives `recv[j]`
    from rank j (both sum to N). `local` (N,) is the order in which rank r lays out its images
    before cutting them into those W pieces. `perm` (W*N,) is the whole shuffle, the same on every
    rank: key-batch position p (rank p // N, slot p % N) holds global image perm[p] (rank r's i-th
    image is global image r*N + i).
    """

    mode: str
    local: torch.Tensor  # N, int64
    perm: torch.Tensor  # W*N, int64
    send: list[int]
    recv: list[int]


_generators: dict[torch.device, torch.Generator] = {}
_routes: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_resumed: dict[str, Any] | None = None  # a checkpoint's shuffle generator, taken up at the first shuffle


def shuffle_generator_state() -> dict[str, Any] | None:
    """The shared shuffle generator's state (the same on every rank), for the checkpoint: a resumed
    run then draws the permutations the uninterrupted one would have. None before the first shuffle."""
    for device, g in _generators.items():
        return {"device": device.type, "state": g.get_state()}
    return _resumed


def resume_shuffle_generator(saved: dict[str, Any] | None) -> None:
    """Continue the shuffle generator of a checkpoint written by as many ranks (every rank loads the
    same one, so all agree); None (or a state from another device type) seeds a new one."""
    global _resumed
    _resumed = saved


def _shared_generator(device: torch.device) -> torch.Generator:
    """A generator in the same state on every rank: rank 0 draws the seed (from its own, per-run
    seeded RNG) and broadcasts it. Every rank then draws the same numbers, so the permutation never
    has to travel."""
    g = _generators.get(device)
    if g is None and _resumed is not None and _resumed.get("device") == device.type:
        g = torch.Generator(device=device)
        g.set_state(_resumed["state"])
        _generators[device] = g
    if g is None:
        seed = torch.randint(2**62, (1,), dtype=torch.long, device=device)
        dist.broadcast(seed, src=0)
        # Host sync, once per process: the generator is seeded on the host.
        g = torch.Generator(device=device).manual_seed(int(seed.item()))
        _generators[device] = g
    return g


def split_sizes(n: int, w: int) -> list[list[int]]:
    """sizes[r][j]: images rank r sends to rank j. Balanced: every rank sends N and receives N.

    N // W to each rank, and the N % W left over to the next ranks after r in turn, so that any N
    (even N < W) gives every rank a full key batch. Known on the host from N and W alone: the
    all-to-all needs no exchange of counts.
    """
    q, rem = divmod(n, w)
    return [[q + ((j - r) % w < rem) for j in range(w)] for r in range(w)]


def _route(n: int, w: int, device: torch.device) -> torch.Tensor:
    """(W*N,) index into the W x N send layout (row r: rank r's images in send order) that lists,
    for each key-batch position, which sent image lands there. Depends on N and W only: cached."""
    key = (n, w, device)
    if key not in _routes:
        sizes = split_sizes(n, w)
        starts = [[sum(row[:j]) for j in range(w)] for row in sizes]
        route = [r * n + starts[r][j] + t for j in range(w) for r in range(w) for t in range(sizes[r][j])]
        _routes[key] = torch.tensor(route, dtype=torch.long).to(device)
    return _routes[key]


def shuffle_plan(n: int, device: torch.device, mode: str = "alltoall") -> ShufflePlan:
    """Draw this step's cross-rank shuffle (identical on every rank; no communication)."""
    if mode not in SHUFFLE_MODES:
        raise ValueError(f"unknown shuffle mode {mode!r}; choose one of {SHUFFLE_MODES}")
    w, r = world_size(), rank()
    g = _shared_generator(device)
    # Every rank draws every rank's local order, so the generators stay in step.
    local_all = torch.rand(w, n, generator=g, device=device).argsort(dim=1)  # W x N
    offsets = torch.arange(w, device=device).unsqueeze(1) * n
    perm = (local_all + offsets).flatten()[_route(n, w, device)]  # W*N
    sizes = split_sizes(n, w)
    return ShufflePlan(mode, local_all[r], perm, send=sizes[r], recv=[row[r] for row in sizes])


def _all_to_all(x: torch.Tensor, out_sizes: list[int], in_sizes: list[int]) -> torch.Tensor:
    # End-to-end keys need gradients back through the exchange; MoCo keys (no_grad) do not.
    return _AllToAll.apply(x, out_sizes, in_sizes) if x.requires_grad else _exchange(x, out_sizes, in_sizes)


def batch_shuffle(x: torch.Tensor, mode: str = "alltoall") -> tuple[torch.Tensor, ShufflePlan | torch.Tensor]:
    """Shuffle a batch for the key encoder; returns (shuffled, what batch_unshuffle needs).

    x: N x ... on each rank. One process: a permutation of the local batch (split BN then puts
    other samples together). Several: a batch mixed from all ranks (see the module docstring);
    "alltoall" moves N (W-1)/W images per rank, "allgather" (the paper's) N (W-1).
    """
    if not is_distributed():
        idx = torch.randperm(x.shape[0], device=x.device)
        return x[idx], torch.argsort(idx)
    n = x.shape[0]
    plan = shuffle_plan(n, x.device, mode)
    if mode == "allgather":
        r = rank()
        return all_gather(x)[plan.perm[r * n : (r + 1) * n]], plan
    return _all_to_all(x[plan.local], plan.recv, plan.send), plan


def batch_unshuffle(x: torch.Tensor, plan: ShufflePlan | torch.Tensor) -> torch.Tensor:
    """Undo batch_shuffle on the encoder's output (N x C), restoring each rank's own order."""
    if isinstance(plan, torch.Tensor):
        return x[plan]
    n, r = x.shape[0], rank()
    if plan.mode == "allgather":
        gather = all_gather_with_grad if x.requires_grad else all_gather
        inverse = torch.argsort(plan.perm)  # global image -> key-batch position
        return gather(x)[inverse[r * n : (r + 1) * n]]
    back = _all_to_all(x, plan.send, plan.recv)  # N x C in rank r's send order
    return back[torch.argsort(plan.local)]


# -- process group, devices, DDP (joining it: moco_fast/join.py) --------------------------------
def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _generators.clear()
    _routes.clear()
    resume_shuffle_generator(None)


def local_device(device: torch.device) -> torch.device:
    """Each process on a CUDA machine uses the GPU of its LOCAL_RANK (one process alone: the one
    --device names; with several an index is an error), made the current device: what defaults to the current device (the CUDA RNG state a checkpoint
    saves and restores, new CUDA tensors) then means the training GPU."""
    if device.type != "cuda":
        return device
    world = env_world_size()
    if device.index is not None and world > 1:  # every process would take that one GPU
        from moco_fast.config import ConfigError

        raise ConfigError(
            f"--device {device}: with {world} processes each takes the GPU of its LOCAL_RANK, and an index "
            "would put them all on that one; choose the GPUs with CUDA_VISIBLE_DEVICES and give --device cuda"
        )
    idx = device.index if device.index is not None else local_rank()
    torch.cuda.set_device(idx)
    return torch.device("cuda", idx)


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy every buffer (BN statistics, the queue, its pointer, the memory bank) from rank 0."""
    if is_distributed():
        for b in module.buffers():
            dist.broadcast(b, 0)


def wrap_ddp(model: torch.nn.Module, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    """DistributedDataParallel over the parameters that train (the query encoder's).

    DDP registers only parameters with requires_grad, so the momentum encoder is not reduced; at
    construction it broadcasts rank 0's parameters, momentum encoder included. Buffers are copied
    from rank 0 once, here, and never again: the queue and memory bank are the same on every rank
    by construction (every rank writes the same gathered keys), and re-sending them before every
    forward, as DDP does by default, would move K x C x 4 bytes (32 MB for K=65536) per step. BN
    running statistics then stay per rank (each from its own batches); only rank 0's are saved.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moco_fast.config import ConfigError

    if sync_bn:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm runs on GPUs only)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    broadcast_buffers(model)
    # torch >= 2.13 renames broadcast_buffers to forward_sync_buffers (and warns on the old name).
    no_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    )
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # gradients live in the reduction buckets: no copy in/out
        **{no_sync: False},
    )
