"""One MoCo training step, plain or captured as a CUDA graph, and its optimizer.

The step never syncs the device to the host: it returns detached device tensors, and the trainer
reads them only every `log_every` steps.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from moco_fast import distributed as dist_utils
from moco_fast.config import ConfigError, TrainConfig
from moco_fast.model import MoCo

# --amp as it runs (auto resolved: trainer.resolve_amp) -> the autocast dtype; None: fp32
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def amp_name(dtype: torch.dtype | None) -> str:
    """The --amp that runs `dtype`: what a checkpoint records as it ran (resume.warn_other_amp)."""
    return next(name for name, d in AMP_DTYPES.items() if d == dtype)


def amp_as_run(amp: str, device_type: str) -> str:
    """--amp as it runs on a device of `device_type`: auto is bf16 on CUDA (no loss scaling needed), off
    (fp32) elsewhere. The one place of that rule: the run's autocast (trainer.resolve_amp), and what a
    classifier's state (classifier_settings.amp_ran) or an old checkpoint (resume.saved_amp) ran in."""
    if amp != "auto":
        return amp
    return "bf16" if device_type == "cuda" else "off"


@dataclass
class StepState:
    model: nn.Module  # MoCo, possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device


def train_step(s: StepState, batch, m: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoCo step. Returns detached (loss, pretext accuracy) device tensors: no host sync.

    With fp16, GradScaler's inf check stays on the device because fused SGD takes `found_inf`.
    """
    autocast = torch.autocast(s.device.type, dtype=s.amp_dtype) if s.amp_dtype else nullcontext()
    with autocast:
        loss, acc = s.model(batch.im_q, batch.im_k, m, batch.index)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    return loss.detach(), acc.detach()


def fast_sgd(params, device: torch.device, **kw) -> torch.optim.SGD:
    """SGD as one fused kernel on CUDA (and GradScaler needs no host sync with it); foreach elsewhere."""
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.SGD(params, **kw, **kind)
    if kw.get("momentum"):
        # Momentum buffers from the start, zero: the first step is the same (0 * m + grad), and there
        # is no first step in which SGD makes them with empty_like and relies on the kernel to fill
        # them, which fused SGD skips when fp16's GradScaler found an overflow (NaN from step 2 on).
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)` for a state that may come from another device (a run
    resumed on the CPU after a GPU, or the other way): the optimizer keeps its own kernel (fused on
    CUDA, foreach elsewhere, as fast_sgd chose; load_state_dict would take the saved run's, and CPU
    fused SGD then pairs a channels-last buffer with a contiguous parameter element by element in
    the wrong order), and each buffer takes its parameter's memory layout."""
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kernel in zip(optimizer.param_groups, kernels, strict=True):
        group.update(kernel)
    for p, st in optimizer.state.items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                st[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)  # p's layout


def make_optimizer(model: MoCo, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.encoder_q.parameters() if p.requires_grad]
    return fast_sgd(params, device, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def momentum_tables() -> list:
    """The Triton momentum kernel's address tables now cached: a captured graph keeps them alive."""
    import sys

    mt = sys.modules.get("moco_fast.kernels.momentum_triton")
    return list(mt._TABLES.values()) if mt is not None else []


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets the learning rate; in place where it is a device tensor (a captured CUDA graph reads it there)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def check_cuda_graph(device: torch.device, world: int = 1) -> None:
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graph captures the step on a CUDA GPU; the device is {device}: drop --cuda-graph")
    if world > 1:
        raise ConfigError("--cuda-graph runs with one process only (DDP's collectives are not captured here)")


class GraphedStep:
    """`train_step` captured once as a CUDA graph and replayed: one launch per step instead of
    hundreds, which removes the launch gaps between small kernels.

    The first `warmup` calls run eagerly on a side stream (cuDNN/cuBLAS set-up, the optimizer's
    momentum buffers, torch.compile), the next call captures the step and every call replays it:
    each batch is trained on exactly once. What a replay cannot change: the batch shape (the loaders
    drop the last partial batch), the momentum `m`, and the tensors' addresses; the batch is copied
    into static buffers, the learning rate lives in a device tensor (`set_lr` fills it), and fp16's
    GradScaler stays on the device (fused SGD takes its inf flag). See docs/performance.md.
    """

    def __init__(self, s: StepState, m: float, warmup: int = 3):
        check_cuda_graph(s.device, dist_utils.world_size())
        self.s, self.m, self.warmup = s, m, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static = None  # Batch of input buffers the graph reads
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None  # (loss, acc) the graph writes
        for g in s.optimizer.param_groups:
            # A device tensor that the replays read (set_lr fills it). A resumed optimizer state brings
            # the saved lr back as a CPU tensor, which fused SGD would read once, at capture, as a constant.
            lr = g["lr"]
            if not (isinstance(lr, torch.Tensor) and lr.device == s.device):
                g["lr"] = torch.tensor(float(lr), device=s.device)
        self.keep: list = []  # what the captured kernels address but nothing else holds (Triton tables)

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.s.device
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                out = train_step(self.s, batch, self.m)
            torch.cuda.current_stream(dev).wait_stream(side)
            for t in out:
                t.record_stream(torch.cuda.current_stream(dev))
            return out
        if self.graph is None:
            self.static = type(batch)(*(t.clone() for t in batch))
            self.graph = torch.cuda.CUDAGraph()
            # Gradients from the graph's own memory pool: backward inside the capture allocates them.
            self.s.optimizer.zero_grad(set_to_none=True)
            # thread_local: the DataLoader's pin-memory thread may call CUDA while we capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.out = train_step(self.s, self.static, self.m)
            self.keep = momentum_tables()
        else:
            for dst, src in zip(self.static, batch):
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.out
