"""One threading.excepthook for the threads of libraries whose errors moco-fast handles itself:
FFCV's epoch thread (loaders/ffcv.py) and TensorBoard's event-file writer (metrics.py); and
torch's thread count kept across a library's import that sets it (kept_torch_threads), and Numba's
with it across FFCV's (kept_ffcv_import_threads)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

# Each gets an uncaught thread error first and returns True when it dealt with it.
_HANDLERS: list[Callable[[threading.ExceptHookArgs], bool]] = []


def handle_thread_errors(handler: Callable[[threading.ExceptHookArgs], bool]) -> None:
    """Adds `handler` (once) before the hook that was there (Python's, which prints the traceback,
    or a test runner's); the errors no handler takes go on to that hook."""
    if handler not in _HANDLERS:
        _HANDLERS.append(handler)
    if getattr(threading.excepthook, "moco_fast", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not any(h(args) for h in _HANDLERS):
            previous(args)

    hook.moco_fast = True  # type: ignore[attr-defined]
    threading.excepthook = hook


@contextlib.contextmanager
def kept_torch_threads() -> Iterator[None]:
    """Puts torch's thread count back after the block. FFCV's import sets it to 1 (ffcv.pipeline.compiler
    runs Compiler.set_num_threads(1)): a program that built an FFCV loader or wrote a .beton went on on
    one thread, and so did a CPU run's FFCV loader, which puts back the count it finds when built."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def kept_ffcv_import_threads() -> Iterator[None]:
    """Puts torch's and Numba's thread counts back after the block, which imports FFCV: the import of
    ffcv.pipeline.compiler sets both to 1 (Compiler.set_num_threads(1): numba.set_num_threads and
    torch.set_num_threads). Numba's is read before: a caller's numba.set_num_threads(n), or its
    NUMBA_NUM_THREADS (by default the cores), as the caller would find it without FFCV."""
    import numba  # FFCV's dependency: the block imports it anyway

    numba_threads = numba.get_num_threads()
    try:
        with kept_torch_threads():
            yield
    finally:
        numba.set_num_threads(numba_threads)
