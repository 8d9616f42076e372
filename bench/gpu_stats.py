"""GPU utilisation, memory-bus utilisation, memory used and power from NVML (pynvml), sampled in a
thread while a benchmark row runs. Without a GPU, or without a usable NVML, it reports nothing and
never fails: the table then has no GPU columns.
"""

from __future__ import annotations

import os
import threading

import torch


def _nvml_handle(pynvml, device: torch.device):
    """NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES may renumber (or name them by UUID)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        if visible[index].isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(visible[index]))
        return pynvml.nvmlDeviceGetHandleByUUID(visible[index])
    return pynvml.nvmlDeviceGetHandleByIndex(index)


class GpuSampler:
    def __init__(self, device: torch.device, period_s: float = 0.05):
        self.period_s = period_s
        self.samples: list[tuple[float, float, float, float]] = []  # util %, mem-bus %, used GiB, W
        self.handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = _nvml_handle(pynvml, device)
        except Exception:  # no nvidia-ml-py, no driver, a container without NVML: no GPU columns
            self.handle = None

    def _sample(self) -> None:
        n, h = self.nvml, self.handle
        try:
            u = n.nvmlDeviceGetUtilizationRates(h)
            used = n.nvmlDeviceGetMemoryInfo(h).used / 2**30
            watts = n.nvmlDeviceGetPowerUsage(h) / 1000
        except Exception:  # a query this GPU does not support: keep what we have
            return
        self.samples.append((u.gpu, u.memory, used, watts))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> GpuSampler:
        if self.handle is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()  # at least one sample, even for a very short row

    def summary(self) -> dict:
        if not self.samples:
            return {}
        k = len(self.samples)
        return {
            "gpu_util_pct": sum(s[0] for s in self.samples) / k,
            "gpu_mem_bus_pct": sum(s[1] for s in self.samples) / k,
            "gpu_mem_used_gib": max(s[2] for s in self.samples),
            "gpu_power_w": sum(s[3] for s in self.samples) / k,
            "gpu_samples": k,
        }
