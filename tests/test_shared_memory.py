"""DataLoader workers out of shared memory (/dev/shm), as in a container started without --shm-size:
one line naming /dev/shm and what to do, never a traceback or a hang (moco_fast/shared_memory.py).

The runs under a small /dev/shm mount a tmpfs of their own in a mount namespace (`unshare -m`, as
root); where that is not permitted they skip. Without the fix they hang: they fail at their timeout."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import warnings

import pytest
from run_helpers import tiny_args

from moco_fast import shared_memory
from moco_fast.cli import one_line
from moco_fast.shared_memory import ADVICE


def under_small_shm(size: str, argv: list[str], filled_kib: int = 0) -> list[str]:
    """argv run with a /dev/shm of `size` (tmpfs's size=, e.g. 64k) of its own, `filled_kib` of it
    taken by a file (dd stops where it is full)."""
    fill = f"dd if=/dev/zero of=/dev/shm/fill bs=1k count={filled_kib} 2>/dev/null; " if filled_kib else ""
    mount = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && {fill}exec "$@"'
    return ["unshare", "-m", "sh", "-c", mount, "sh", *argv]


@pytest.fixture(scope="module")
def small_shm() -> None:
    try:
        done = subprocess.run(under_small_shm("64k", ["true"]), capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs on /dev/shm in a mount namespace here (unshare -m needs root)")


def run_small_shm(argv: list[str], timeout: int = 90, filled_kib: int = 0) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of argv under a 64 KiB /dev/shm (`filled_kib` of it taken); a
    hang is ended and fails the test."""
    proc = subprocess.Popen(
        under_small_shm("64k", argv, filled_kib),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s (a batch dropped: a hang):\n{err[-3000:]}")
    return proc.returncode, out, err


FULL = f"DataLoader workers ran out of shared memory (/dev/shm: 64 KiB): {ADVICE}"


def test_train_with_its_workers_out_of_shared_memory_ends_with_one_line(small_shm, tiny_root, tmp_path):
    # one view of a batch (8 x 3 x 64 x 64 bytes, 96 KiB) does not fit in the 64 KiB; a batch of 8
    # is not cut into parts (torch_loader.MIN_PART)
    argv = [*tiny_args(tiny_root, tmp_path / "run"), "--loader", "torch", "--workers", "2", "--image-size", "64"]
    status, _, err = run_small_shm([sys.executable, "-m", "moco_fast", *argv])
    assert (status, err.splitlines()[-1].strip()) == (2, f"moco-fast train: error: {FULL}"), err[-3000:]
    assert "Traceback" not in err
    # the warning at the start, before the first batch
    # 2 workers x 4 batches x 8 x (2 views of 3 x 64 x 64 bytes + 2 int64) = 1.5 MiB
    assert "WARNING /dev/shm has " in err and "less than the 1.5 MiB that 2 DataLoader workers of --loader torch" in err
    assert "(4 batches of 192.1 KiB each)" in err


def test_train_where_dev_shm_is_full_before_its_workers_start_ends_with_one_line(small_shm, tiny_root, tmp_path):
    # the iterator's first semaphore finds no room: torch's bare OSError ("No space left on device")
    # and its half-made iterator's __del__ traceback ("Exception ignored in ...") without the check
    argv = [*tiny_args(tiny_root, tmp_path / "run"), "--loader", "torch", "--workers", "2"]
    status, _, err = run_small_shm([sys.executable, "-m", "moco_fast", *argv], filled_kib=64)
    assert (status, err.splitlines()[-1].strip()) == (2, f"moco-fast train: error: {FULL}"), err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


EVAL_LOADER = """
import sys
from pathlib import Path
from moco_fast.cli import one_line
from moco_fast.data import list_images
from moco_fast.knn import eval_batches
from moco_fast.lincls import image_batches

images = list_images(Path(sys.argv[1]))
try:
    if sys.argv[2] == "eval":
        batches = eval_batches(images, 64, 8, 2, "kNN features")
    else:
        batches = image_batches(images, 64, True, 8, 2, seed=0)
    next(iter(batches))
    print("read a batch")
except RuntimeError as e:
    print(one_line(e))
"""


@pytest.mark.parametrize("which", ["eval", "train"])
def test_evaluation_loaders_out_of_shared_memory_raise_the_line(small_shm, tiny_root, which):
    # eval: kNN's and lincls/finetune's evaluation passes (collate_decodable); train: lincls/finetune's
    # training loader (collate_labeled). One view of a batch (8 x 3 x 64 x 64 bytes) does not fit.
    _, out, err = run_small_shm([sys.executable, "-c", EVAL_LOADER, str(tiny_root / "train"), which])
    assert out.splitlines() == [FULL], err[-3000:]
    # the warning before it: 2 workers x 2 batches x 8 x (3 x 64 x 64 bytes + an int64) = 384.2 KiB
    loader = "kNN features" if which == "eval" else "the classifier's training loader"
    assert f"less than the 384.2 KiB that 2 DataLoader workers of {loader} hold there" in err, err[-3000:]


@pytest.mark.parametrize(("which", "filled_kib"), [("eval", 64), ("eval", 32), ("train", 64)])
def test_evaluation_loaders_where_dev_shm_is_full_before_their_workers_start(small_shm, tiny_root, which, filled_kib):
    # 64: full; 32: 8 pages free, fewer than the 14 semaphores (a page each) of 2 workers' start
    argv = [sys.executable, "-c", EVAL_LOADER, str(tiny_root / "train"), which]
    _, out, err = run_small_shm(argv, filled_kib=filled_kib)
    assert out.splitlines() == [FULL], err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


FILLED_AFTER_THE_CHECK = """
import multiprocessing, os, sys, torch
from pathlib import Path
import moco_fast.lincls, moco_fast.shared_memory
from moco_fast.augment import MOCO_V2
from moco_fast.cli import one_line
from moco_fast.data import list_images
from moco_fast.knn import eval_batches
from moco_fast.lincls import image_batches, progress_iter
from moco_fast.loaders import LoaderArgs, create_loader

root, which, pages_left = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
# where the check is looked up: start_workers' own (kNN's pass, the torch loader), lincls' when it builds
module = moco_fast.lincls if which == "train" else moco_fast.shared_memory
check = module.check_room_to_start

def check_then_fill(loader):  # the check passes; then another process takes /dev/shm but `pages_left`
    check(loader)
    fd = os.open("/dev/shm/fill", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError:
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - pages_left * 4096))
    os.close(fd)

module.check_room_to_start = check_then_fill
if which == "eval":
    batches = eval_batches(list_images(root / "train"), 64, 8, 2, "kNN features")
elif which == "train":  # iterated by lincls/finetune through progress_iter
    batches = progress_iter(image_batches(list_images(root / "train"), 64, True, 8, 2, seed=0), "train")
else:
    args = LoaderArgs(data=str(root), aug=MOCO_V2, batch_size=4, device=torch.device("cpu"), workers=2, seed=0)
    batches = create_loader("torch", args)
try:
    next(iter(batches))
    print("read a batch")
except (OSError, RuntimeError) as e:
    print(one_line(e))
for worker in multiprocessing.active_children():  # told to end (torch 2.11 does not wait for them)
    worker.join(timeout=5)
print("workers left:", len(multiprocessing.active_children()))
"""


@pytest.mark.parametrize(("which", "pages_left"), [("eval", 0), ("eval", 12), ("train", 0), ("torch", 0)])
def test_dev_shm_filled_between_the_check_and_the_workers_start_ends_with_the_line(
    small_shm, tiny_root, which, pages_left
):
    # The iterator's start met the full /dev/shm itself: a bare "No space left on device" (no file,
    # no advice) and the half-made iterator's __del__ traceback; 12 pages left: one of its workers
    # had started (its __del__ ended it, where it got that far)
    argv = [sys.executable, "-c", FILLED_AFTER_THE_CHECK, str(tiny_root), which, str(pages_left)]
    _, out, err = run_small_shm(argv)
    assert out.splitlines() == [FULL, "workers left: 0"], err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


NO_ROOM = [
    OSError(errno.ENOSPC, "No space left on device"),  # a semaphore's, as multiprocessing raises it
    RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2_3>: No space left on device (28)"),
]


@pytest.mark.parametrize("error", NO_ROOM, ids=["OSError", "torch"])
@pytest.mark.parametrize("which", ["eval", "train", "torch"])
def test_the_iterator_s_start_out_of_shared_memory_is_no_room_to_start(tiny_root, monkeypatch, which, error):
    # As where the mount namespace of the test above is not permitted: the check passes (there is room
    # here), then the DataLoader's iterator fails to start as on a /dev/shm filled meanwhile
    import torch
    from moco_fast.loaders import LoaderArgs, create_loader
    from torch.utils.data import DataLoader

    from moco_fast.augment import MOCO_V2
    from moco_fast.data import list_images
    from moco_fast.knn import eval_batches
    from moco_fast.lincls import image_batches, progress_iter

    def fails(self):
        raise error

    monkeypatch.setattr(DataLoader, "__iter__", fails)
    if which == "eval":
        batches = eval_batches(list_images(tiny_root / "train"), 32, 8, 1, "kNN features")
    elif which == "train":  # iterated by lincls/finetune through progress_iter
        batches = progress_iter(image_batches(list_images(tiny_root / "train"), 32, True, 8, 1, seed=0), "train")
    else:
        args = LoaderArgs(data=str(tiny_root), aug=MOCO_V2, batch_size=4, device=torch.device("cpu"), workers=1)
        batches = create_loader("torch", args)
    with pytest.raises(shared_memory.NoRoomToStart) as raised:
        next(iter(batches))
    assert one_line(raised.value).startswith("DataLoader workers ran out of shared memory (/dev/shm")


def test_other_errors_of_the_iterator_s_start_are_left_as_they_are():
    class Refused:
        def __iter__(self):
            raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        shared_memory.start_workers(Refused(), check=False)


BUS_ERROR = """
import os, signal
from torch.utils.data import DataLoader, Dataset
from moco_fast.cli import one_line


class BusError(Dataset):  # a worker that dies as one writing to a full /dev/shm does (SIGBUS)
    def __len__(self):
        return 4

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGBUS)


try:
    next(iter(DataLoader(BusError(), num_workers=1)))
except RuntimeError as e:
    print(one_line(e))
"""


def test_a_worker_killed_by_a_bus_error_is_named_with_dev_shm():
    # torch's own error, raised in the main process by its SIGCHLD handler ("exited unexpectedly" from
    # it). In a process of its own, as a command runs: in this one, a test's stop may have replaced
    # that handler (signals._on_stop_signal), and then torch reports no signal, only "exited unexpectedly".
    p = subprocess.run([sys.executable, "-c", BUS_ERROR], capture_output=True, text=True, timeout=120)
    size = shared_memory.size_text(shared_memory.shm_bytes()[0])
    expected = (
        f"a DataLoader worker was killed by a bus error, as a full shared memory does (/dev/shm: {size}): {ADVICE}"
    )
    assert p.stdout.splitlines() == [expected], p.stderr[-3000:]


@pytest.mark.parametrize(
    "text",
    [
        # torch's (c10/ATen MapAllocator) where posix_fallocate fails, and where it falls back to writing
        "unable to allocate shared memory(shm) for file </torch_23638_836510378_7>: No space left on device (28)",
        "unable to write to file </torch_6_7_8>: No space left on device (28)",
        # torch 2.11's: posix_fallocate's error was lost, errno printed as it was before (pytorch#176069)
        "unable to allocate shared memory(shm) for file </torch_14955_2313084393_0>: Success (0)",
        "unable to allocate shared memory(shm) for file </torch_1_2_3>: Resource temporarily unavailable (11)",
    ],
)
def test_torch_messages_for_a_full_dev_shm_are_recognised(text):
    wrapped = RuntimeError(
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        f'  File "x.py", line 1, in collate\nRuntimeError: {text}\n'
    )
    assert one_line(wrapped).startswith("DataLoader workers ran out of shared memory (/dev/shm: ")


@pytest.mark.parametrize(
    "e",
    [
        RuntimeError("unable to write to file </data/x.bin>: No space left on device (28)"),  # not torch's shm
        RuntimeError("unable to open shared memory object </torch_1_2_3> in read-write mode: Too many open files (24)"),
        RuntimeError("DataLoader worker (pid 12) is killed by signal: Segmentation fault. "),
    ],
)
def test_other_errors_are_not_taken_for_a_full_dev_shm(e):
    assert shared_memory.exhausted_line(e) is None


def test_the_warning_comes_where_the_workers_hold_more_than_is_free(monkeypatch):
    monkeypatch.setattr(shared_memory, "shm_bytes", lambda: (64 << 20, 60 << 20))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        shared_memory.warn_if_short(2, 4, (15 << 20) // 2, "--loader torch")  # 60 MiB: fits
        shared_memory.warn_if_short(0, 4, 1 << 30, "--loader torch")  # no workers: nothing in /dev/shm
        shared_memory.warn_if_short(2, 4, (15 << 20) // 2 + 1, "--loader torch")
    assert [str(w.message) for w in seen] == [
        "/dev/shm has 60 MiB free of 64 MiB, less than the 60 MiB that 2 DataLoader workers of --loader torch hold "
        f"there (4 batches of 7.5 MiB each): the command stops when it fills; {ADVICE}"
    ]


def test_the_warning_counts_the_workers_of_each_process_on_the_machine(monkeypatch):
    # `--gpus 2` or torchrun: both processes' workers fill the one /dev/shm
    monkeypatch.setattr(shared_memory, "shm_bytes", lambda: (64 << 20, 60 << 20))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        shared_memory.warn_if_short(2, 4, (15 << 20) // 4, "--loader torch")  # 2 x 30 MiB: fits
        shared_memory.warn_if_short(2, 4, (15 << 20) // 2, "--loader torch")
    assert [str(w.message) for w in seen] == [
        "/dev/shm has 60 MiB free of 64 MiB, less than the 120 MiB that each of 2 processes' 2 DataLoader workers "
        f"of --loader torch hold there (4 batches of 7.5 MiB each): the command stops when it fills; {ADVICE}"
    ]


@pytest.mark.parametrize(("local_rank", "warned"), [("0", 1), ("1", 0)])
def test_the_warning_is_said_once_per_machine(monkeypatch, local_rank, warned):
    # every process of `--gpus 2` or torchrun finds the same need: the one of local rank 0 says it
    monkeypatch.setattr(shared_memory, "shm_bytes", lambda: (64 << 20, 60 << 20))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        shared_memory.warn_if_short(2, 4, 15 << 20, "--loader torch")
    assert len(seen) == warned


KILLED_WORKERS = """
import os, signal, time
import torch
from torch.utils.data import DataLoader, Dataset
from moco_fast.shared_memory import check_room_to_start, stack_shared


class Images(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.zeros(3, 8, 8)


loader = DataLoader(Images(), batch_size=4, num_workers=2, collate_fn=stack_shared)
check_room_to_start(loader)
it = iter(loader)
next(it)  # each worker has passed a batch's shared memory on, through a socket of its own
time.sleep(1)
for w in it._workers:
    os.kill(w.pid, signal.SIGKILL)
    w.join()
print("killed")
"""


def test_workers_killed_by_a_signal_leave_no_folder_in_the_temporary_directory(tmp_path):
    # A worker's socket for passing shared memory on (multiprocessing's resource_sharer) lay in a
    # pymp-* folder of its own, which a worker killed by a signal never removed.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", KILLED_WORKERS], capture_output=True, text=True, timeout=120, env=env)
    assert p.stdout.splitlines() == ["killed"], p.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("site", ["knn", "lincls"])
def test_the_evaluations_workers_are_forked_under_any_start_method(tiny_root, monkeypatch, site):
    # Python 3.14's default start method on Linux is forkserver: each kNN pass's workers (and the
    # classifier's) imported torch again, 15-20 s more a pass on a CPU run, and were a fork server's
    # children (WORKER_START)
    import multiprocessing

    from moco_fast.data import load_splits
    from moco_fast.knn import eval_batches
    from moco_fast.lincls import image_batches

    default = multiprocessing.context._default_context
    monkeypatch.setattr(default, "_actual_context", multiprocessing.get_context("forkserver"))
    images = load_splits(str(tiny_root)).train
    if site == "knn":
        batches = eval_batches(images, 32, 4, 1, "kNN").loader
    else:
        batches = image_batches(images, 32, True, 4, 1, seed=0)
    it = iter(batches)
    next(it)
    workers = multiprocessing.active_children()
    parents = [int(open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[1]) for p in workers]
    it._shutdown_workers()
    assert workers and parents == [os.getpid()] * len(workers)
