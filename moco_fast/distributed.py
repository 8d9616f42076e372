"""Guarded torch.distributed helpers: with one process (or none initialised) each is the identity,
so a single CPU process runs the same code path as a multi-GPU job.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks along dim 0 (no gradient)."""
    if not is_distributed():
        return x
    out = torch.empty((world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks; gradients flow back to each rank's own slice."""
    if not is_distributed():
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch for the key encoder; returns (shuffled, index that undoes it).

    One process: a permutation of the local batch (split BN then groups other samples together).
    """
    idx = torch.randperm(x.shape[0], device=x.device)
    return x[idx], torch.argsort(idx)


def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    return x[idx_unshuffle]


def init_from_env(device: str = "auto") -> None:
    """Join the process group that torchrun (or `--gpus N`) described in the environment, if any."""
    import os

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)


def local_device(device: torch.device) -> torch.device:
    """Each process on a CUDA machine uses the GPU of its LOCAL_RANK."""
    import os

    if device.type == "cuda" and device.index is None:
        idx = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return device


def wrap_ddp(model: torch.nn.Module, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_world_size() -> int:
    """Processes on this machine (torchrun sets LOCAL_WORLD_SIZE)."""
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))
