"""Where the step's time goes: a torch.profiler breakdown of a few steps, by phase and by kernel kind.

Phases come from profiler ranges wrapped around the model's own methods for the length of the
profile (forward of the queries, forward of the keys, momentum update, loss, queue, optimizer);
backward is the sum of the autograd engine's ranges (it runs on its own thread on a GPU). Kernel
kinds come from kernel names (convolution/GEMM, batch norm, elementwise, reduction, multi-tensor,
Triton, copies). "gaps" is the wall time per step minus the time some kernel was running: launch
overhead, host syncs and Python, which CUDA graphs and torch.compile exist to remove.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager

import torch

import moco_fast.model as moco_model

KERNEL_KINDS = [  # first match wins
    ("multi-tensor (optimizer, EMA)", r"multi_tensor|foreach|fused_sgd|lerp|momentum_body"),
    ("batch norm", r"batch_?norm|bn_|welford|var_mean"),
    ("convolution / GEMM", r"conv|gemm|xmma|cutlass|wgmma|implicit|dgrad|wgrad|fprop|sm\d\d_|nhwc|cudnn"),
    ("triton (compiled)", r"^triton"),
    ("reduction", r"reduce|softmax|log_softmax|nll|argmax|sum"),
    ("copy / layout", r"copy|memcpy|memset|cat|transpose|fill|index"),
    # GPU kernel names, then CPU op names (on a CPU the aten ops are the work)
    ("elementwise", r"elementwise|vectorized|unrolled|aten::(mul|add|sub|div|clamp|threshold|relu|rsqrt|sqrt|neg)"),
]


def _time(evt, cuda: bool, self_only: bool = False) -> float:
    """Microseconds: device time of an event's kernels on a GPU, CPU time on a CPU."""
    if cuda:
        name = "self_device_time_total" if self_only else "device_time_total"
        return float(getattr(evt, name, getattr(evt, name.replace("device", "cuda"), 0.0)))
    return float(evt.self_cpu_time_total if self_only else evt.cpu_time_total)


@contextmanager
def _ranges(model, optimizer):
    """Profiler ranges around the step's parts, on this model instance only, undone afterwards."""
    labels = {"encode_q": "forward q", "encode_k": "forward k", "momentum_update": "momentum", "enqueue": "queue"}
    saved = []

    def wrap(obj, attr, label):
        fn = getattr(obj, attr)

        def ranged(*a, **k):
            with torch.profiler.record_function(f"## {label}"):
                return fn(*a, **k)

        saved.append((obj, attr, obj.__dict__.get(attr)))
        setattr(obj, attr, ranged)

    for attr, label in labels.items():
        if hasattr(model, attr):
            wrap(model, attr, label)
    wrap(optimizer, "step", "optimizer")
    wrap(moco_model, "info_nce", "loss")
    wrap(moco_model, "info_nce_in_batch", "loss")
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            if obj is moco_model:
                setattr(obj, attr, old)
            elif old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


# Kineto, the profiler's C++ half, reads its log level from this variable when it starts, at the
# process's first profile. A build of torch with CUDA asks the CUDA runtime for the GPUs' properties
# whatever the profile's activities: on a machine without a GPU that logged "ERROR: ...
# gpuGetDeviceCount failed with code 35", and torch 2.14's kineto a "USDT: ... profiler_start" and
# "profiler_stop" line, at every CPU profile. 6, above its highest level (USDT, 5), leaves none;
# on a GPU its lines stay, as they name what a CUDA profile lacks (CUPTI restricted, say).
KINETO_LOG_LEVEL = "KINETO_LOG_LEVEL"
KINETO_SILENT = "6"


@contextmanager
def _kineto_quiet(cuda: bool):
    """Kineto's log silenced for a CPU profile, unless the user set its level."""
    set_here = not cuda and KINETO_LOG_LEVEL not in os.environ
    if set_here:
        os.environ[KINETO_LOG_LEVEL] = KINETO_SILENT
    try:
        yield
    finally:
        if set_here:
            os.environ.pop(KINETO_LOG_LEVEL, None)


def profile_breakdown(
    step_fn, model, optimizer, device: torch.device, steps: int = 3, unprofiled_ms: float | None = None
) -> dict:
    """Runs `step_fn()` `steps` times under the profiler (after it was warmed up); figures per step.
    The profiler slows the host side: with `unprofiled_ms` (the same step timed without it) the gaps
    are counted against that wall time, not the profiled one."""
    cuda = device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    # acc_events: one cycle, so the same events; without it torch 2.11 warned at every profile that
    # "Profiler clears events at the end of each cycle" (a UserWarning with its source line)
    profiler = torch.profiler.profile(activities=acts, acc_events=True)
    with _ranges(model, optimizer), _kineto_quiet(cuda), profiler as prof:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step_fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1000 / steps
    events = prof.key_averages()
    phases: dict[str, float] = {}
    kernels: dict[str, float] = {}
    top = []
    busy_us = 0.0
    for e in events:
        if e.key.startswith("## "):
            phases[e.key[3:]] = phases.get(e.key[3:], 0.0) + _time(e, cuda)
        elif e.key.startswith("autograd::engine::evaluate_function"):
            phases["backward"] = phases.get("backward", 0.0) + _time(e, cuda)
        is_kernel = cuda and str(getattr(e, "device_type", "")).endswith("CUDA")
        if not cuda and e.key.startswith("aten::"):
            is_kernel = True  # on a CPU the ops are the work
        if not is_kernel:
            continue
        us = _time(e, cuda, self_only=True)
        busy_us += us
        kind = next((k for k, pat in KERNEL_KINDS if re.search(pat, e.key, re.IGNORECASE)), "other")
        kernels[kind] = kernels.get(kind, 0.0) + us
        top.append((us, e.key, e.count))
    busy_ms = busy_us / 1000 / steps
    top.sort(reverse=True)
    if cuda and busy_us == 0:
        # CUPTI gave the profiler no kernel (profiling restricted to admins, say): every figure
        # below would be zero and the whole step would read as gaps
        return {"error": "the profiler recorded no CUDA kernel (is CUPTI restricted on this machine?)"}
    return {
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "busy_ms_per_step": busy_ms,
        "unprofiled_ms_per_step": unprofiled_ms,
        "gaps_ms_per_step": max(0.0, (unprofiled_ms or wall_ms) - busy_ms) if cuda else None,
        "phases_ms": {k: v / 1000 / steps for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "kernels_ms": {k: v / 1000 / steps for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])},
        "top": [
            {"name": n[:120], "ms_per_step": us / 1000 / steps, "calls_per_step": c / steps} for us, n, c in top[:15]
        ],
    }


def format_breakdown(b: dict) -> str:
    if "error" in b:
        return f"no profile: {b['error']}"
    unit = "device" if b.get("gaps_ms_per_step") is not None else "CPU"
    lines = [f"wall {b['wall_ms_per_step']:.1f} ms/step profiled; {unit} busy {b['busy_ms_per_step']:.1f} ms/step"]
    if b.get("unprofiled_ms_per_step"):
        lines[0] += f"; {b['unprofiled_ms_per_step']:.1f} ms/step without the profiler"
    if b.get("gaps_ms_per_step") is not None:
        lines[0] += f"; gaps (launch, sync, Python) {b['gaps_ms_per_step']:.1f} ms/step"
    lines.append(
        "by phase (ms/step, nested kernels included): " + ", ".join(f"{k} {v:.2f}" for k, v in b["phases_ms"].items())
    )
    lines.append("by kernel kind (ms/step): " + ", ".join(f"{k} {v:.2f}" for k, v in b["kernels_ms"].items()))
    lines += [f"  {t['ms_per_step']:8.2f} ms  x{t['calls_per_step']:<5.0f} {t['name']}" for t in b["top"][:8]]
    return "\n".join(lines)
