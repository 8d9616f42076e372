"""DataLoader workers and /dev/shm: their batches in shared memory, and the one line for a full one.

A DataLoader worker hands each batch to the main process in shared memory (/dev/shm). A container
has 64 MiB of it unless started with --shm-size or --ipc=host, less than a few batches of images.
Where the worker's batch goes into shared memory decides what the user sees: torch's queue moves a
batch there in a feeder thread, which prints its error and drops the batch, and the main process then
waited for it for ever (ignoring SIGTERM too: the trainer acts on a stop between steps). The collate
functions make their output in shared memory themselves (`stack_shared`, `tensor_shared`, as torch's
own default_collate does): the error is raised in the worker's loop, which DataLoader hands to the
main process, and the command ends with `exhausted_line`'s one line. A /dev/shm already full when
the workers start is found before they start (`check_room_to_start`), with the same line; so is one
that fills between that check and the iterator's start. `start_workers` does both, check then start,
at every site that iterates a DataLoader.

torch is imported inside the functions that use it only: cli reads `exhausted_line` for any error, also
one raised before torch was imported.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import warnings
from collections.abc import Iterator, Sequence

from moco_fast.text import plural

SHM = "/dev/shm"

# How every DataLoader's workers start (the training loader, kNN's and the evaluations' passes),
# whatever multiprocessing's default (forkserver from Python 3.14): forked, each is this process's
# child, which torch's watchdog needs (it ends a worker whose parent changed, as when a stop signal to
# the process group ends a fork server), and starts without importing torch again (forkserver: 15-20 s
# more for each kNN pass of a CPU run with 2 workers). They decode on the CPU and never touch CUDA.
WORKER_START = "fork"


def worker_start(workers: int) -> str | None:
    """A DataLoader's multiprocessing_context for `workers`: WORKER_START, none without workers."""
    return WORKER_START if workers > 0 else None


ADVICE = "run the container with --shm-size=8g (or --ipc=host), or use --workers 0"

# torch's messages (c10/ATen's MapAllocator, torch/csrc/DataLoader.cpp) for a shared-memory file it
# could not make ("unable to allocate shared memory(shm) for file </torch_1_2_3>: No space left on
# device (28)"; "unable to write to file <...>" where the file system has no fallocate), and for a
# worker that a bus error killed, which is what writing to a full /dev/shm does. The first names any
# errno: torch before pytorch#176069 (2.11 among them) printed a stale errno for a failed
# posix_fallocate ("Success (0)"), which returns its error instead of setting errno; on a tmpfs its
# one failure in practice is a full one.
_NO_SPACE = re.compile(
    rf"unable to allocate shared memory\(shm\) for file </torch_[^>]*>: |file </torch_[^>]*>: [^\n]*\({errno.ENOSPC}\)"
)
_BUS_ERROR = "killed by signal: Bus error"


def shm_bytes() -> tuple[int, int] | None:
    """(size, free) of the shared-memory file system in bytes; None where there is none."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def size_text(n: int) -> str:
    """Bytes as `df -h` shows them, to a tenth: 64 KiB, 1.5 MiB, 8 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{round(n / scale, 1):g} {unit}"
    return f"{round(n / 1024, 1):g} KiB"


def _shm_text() -> str:
    sizes = shm_bytes()
    return f"{SHM}: {size_text(sizes[0])}" if sizes else f"no {SHM}"


class NoRoomToStart(RuntimeError):
    """A /dev/shm with no room for what a DataLoader's workers start with (check_room_to_start)."""


def exhausted_line(e: BaseException | None) -> str | None:
    """The one line for a DataLoader whose workers ran out of shared memory, from the error the main
    process raises (its cause and context too: torch raises "worker exited unexpectedly" from the bus
    error's), or None for any other error."""
    while e is not None:
        text = str(e)
        if isinstance(e, NoRoomToStart) or _NO_SPACE.search(text):
            return f"DataLoader workers ran out of shared memory ({_shm_text()}): {ADVICE}"
        if _BUS_ERROR in text:
            return (
                f"a DataLoader worker was killed by a bus error, as a full shared memory does ({_shm_text()}): {ADVICE}"
            )
        e = e.__cause__ or e.__context__
    return None


def warn_if_short(
    workers: int, ahead: int, batch_bytes: int, what: str, item: tuple[str, str] = ("batch", "batches")
) -> None:
    """One warning where the free shared memory is less than what `workers` DataLoader workers hold
    there at once when they are `ahead` batches each ahead of the main process (its prefetch_factor,
    reached whenever the main process pauses: a save, an evaluation), `batch_bytes` each; for each of
    the machine's processes (`--gpus N`, torchrun), which all share its /dev/shm. Each of them
    finds the same need: the machine's first process (local rank 0) alone says it. `item`: what the
    message calls what a worker makes, one and several (the torch loader's make parts of batches)."""
    from moco_fast.distributed import local_rank, local_world_size

    if local_rank() != 0:
        return
    sizes = shm_bytes()
    processes = local_world_size()
    need = processes * workers * ahead * batch_bytes
    if workers == 0 or sizes is None or sizes[1] >= need:
        return
    whose = f"each of {processes} processes' " if processes > 1 else ""
    warnings.warn(
        f"{SHM} has {size_text(sizes[1])} free of {size_text(sizes[0])}, less than the {size_text(need)} that "
        f"{whose}{plural(workers, 'DataLoader worker')} of {what} hold there "
        f"({plural(ahead, *item)} of {size_text(batch_bytes)} each): the command stops when it fills; "
        f"{ADVICE}",
        stacklevel=2,
    )


def check_room_to_start(loader) -> None:
    """Raises NoRoomToStart where /dev/shm has no room for the semaphores that the iterator of
    `loader` (a DataLoader) makes before it starts its workers; start_workers calls it before
    iterating (a loader checked once when built calls it itself).

    Each semaphore is a file of a page in /dev/shm. On a full one torch's iterator fails at its first
    with a bare OSError ("No space left on device", no file named), and the half-made iterator's
    __del__ prints a traceback. Made here first, through the same multiprocessing context, then
    released: the error comes before the iterator exists. The objects are the iterator's (a result
    queue, a done event, an index queue per worker); a later torch that needed more would only meet
    the ENOSPC it meets today."""
    if loader.num_workers == 0:
        return
    import multiprocessing.util

    import torch.multiprocessing

    # The workers inherit this process's temporary folder (made now if not yet): the sockets through
    # which each passes its batches' shared memory on lie there, removed at this process's exit. Made
    # by each worker, they lay in a pymp-* folder of its own, which a worker killed by a signal left.
    multiprocessing.util.get_temp_dir()

    context = loader.multiprocessing_context or torch.multiprocessing  # what the iterator uses
    try:
        made = [context.Queue(), context.Event(), *(context.Queue() for _ in range(loader.num_workers))]
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise NoRoomToStart(f"{SHM} has no room for the semaphores of {loader.num_workers} DataLoader workers") from e
    del made  # their pages are free again for the iterator's own


def start_workers(loader, check: bool = True) -> Iterator:
    """iter(loader), a DataLoader (or any iterable, with check=False), after check_room_to_start
    unless `check` is False: a persistent loader's workers start at its first iterator only, so that
    its later ones (an epoch each) need no check, nor does one that was checked when it was built.
    Where /dev/shm filled after the check (another process's data), the iterator's own start meets the
    full one, as a bare OSError (ENOSPC, no file named) or torch's "unable to allocate shared memory":
    raised as NoRoomToStart, so that the command ends with exhausted_line's line as when the check
    finds it."""
    if check:
        check_room_to_start(loader)
    try:
        return iter(loader)
    except (OSError, RuntimeError) as e:
        if not (e.errno == errno.ENOSPC if isinstance(e, OSError) else _NO_SPACE.search(str(e))):
            raise
        _end_half_made(e)
        workers = getattr(loader, "num_workers", 0)
        raise NoRoomToStart(f"{SHM} filled up as {plural(workers, 'DataLoader worker')} started") from e


def _end_half_made(e: BaseException) -> None:
    """Ends the DataLoader iterator whose start raised `e` (the `self` of a frame of its traceback):
    the workers it started, and its __del__, which printed a traceback after the command's line
    ("Exception ignored in ... __del__": the attributes it reads were never made)."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    tb = e.__traceback__
    while tb is not None:
        it = tb.tb_frame.f_locals.get("self")
        if isinstance(it, _BaseDataLoaderIter):
            with contextlib.suppress(Exception):  # the same missing attributes; its `finally` ends the workers
                it._shutdown_workers()
            it._shutdown = True  # nothing left for its __del__ to do
            return
        tb = tb.tb_next


def stack_shared(tensors: Sequence):
    """torch.stack(tensors), made in shared memory in a DataLoader worker (see the module's text)."""
    import torch
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = torch.UntypedStorage._new_shared(len(tensors) * first.nbytes, device=first.device)
    out = torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, 0, (len(tensors), *first.shape))
    return torch.stack(tensors, out=out)


def tensor_shared(values: Sequence):
    """torch.tensor(values), moved to shared memory in a DataLoader worker (a few bytes: labels, indices)."""
    import torch
    from torch.utils.data import get_worker_info

    out = torch.tensor(values)
    return out if get_worker_info() is None else out.share_memory_()
