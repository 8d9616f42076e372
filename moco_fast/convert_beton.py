"""`moco-fast convert --format ffcv`: the .beton, written by FFCV's DatasetWriter, and its file list.

The .beton has the fields `image` (RGBImageField) and `label` (IntField), in the folder's sorted
order. FFCV's writer runs its own worker processes and cannot skip a sample, so the images are
decoded once to check them and once more to write them. The writer waits forever for a worker that
died: watched_workers watches them; recorded_write_errors tells a page that the disk refused from
the workers' other errors; start_resource_tracker keeps the tracker of FFCV's shared memory out of
reach of the stop signals. ffcv_writing sets all of it up, for one .beton of a process at a time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moco_fast import bar_lines
from moco_fast.cli import ENVIRONMENT_ERRNOS
from moco_fast.convert_dst import NAMES_FINGERPRINT, NAMES_HEADER, beton_fingerprint
from moco_fast.convert_files import writing
from moco_fast.convert_images import exit_with_parent, load_resized, parallel_map
from moco_fast.data import DataError, ImageList
from moco_fast.signals import STOP_SIGNALS
from moco_fast.threads import kept_ffcv_import_threads

if TYPE_CHECKING:
    from moco_fast.convert import ConvertConfig

log = logging.getLogger("moco_fast")

# FFCV's default page. A sample must fit in one page, and each writer worker leaves its last page
# part-empty: pages sized for one large image cost up to that page per worker (--workers 0: a core).
DEFAULT_PAGE = 8 << 20


def page_need(stored: int) -> int:
    """The page a sample stored in `stored` bytes needs, with room for FFCV's own bytes."""
    return stored * 3 // 2 + 65536


def check_task(job: tuple[str, int | None, int | None]) -> tuple[int, int, int] | str:
    """(width, height, bytes stored in the .beton) after resizing, or the reason the file cannot be
    converted. Stored: the raw pixels, or with `quality` (images that FFCV stores as JPEGs) the JPEG
    that FFCV's field encodes, for an image whose pixels would not fit the default page (the rest fit
    either way): a 6000 x 4000 photo made every page 128 MiB, a 63-image .beton 256 MiB."""
    path, max_res, quality = job
    try:
        img = load_resized(path, max_res)
    except Exception as e:  # PIL raises many types for bad files
        return f"cannot decode ({type(e).__name__}: {e})"
    w, h = img.size
    stored = w * h * 3
    if quality is not None and page_need(stored) > DEFAULT_PAGE:
        import cv2  # imported by convert_ffcv before the fork

        # FFCV's encode_jpeg, without importing FFCV here: its import compiles Numba functions, and a
        # Ctrl-C then is swallowed by llvmlite's callback
        bgr = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
        stored = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality])[1].nbytes
    return w, h, stored


# How long the watch waits, for a worker that a stop signal ended, for the main thread to act on its
# own copy of it (a signal to the process group: SLURM's --signal, a closed terminal) before taking the
# worker's end for a failure: the watch's tick could come first on a loaded machine.
GROUP_STOP_S = 5.0


class BetonSource:
    """What FFCV's writer reads in its worker processes: (H x W x 3 uint8, label).

    The files passed the check pass already; one that fails now anyway (it changed on disk) is
    written black and counted, because FFCV's writer cannot skip a sample."""

    def __init__(self, files: list[str], labels: list[int], max_res: int | None):
        self.files, self.labels, self.max_res = files, labels, max_res
        self.failed = mp.get_context("fork").Value("i", 0)
        self.parent = os.getpid()
        self.quiet = False  # in a worker: Ctrl-C is the main process's to handle (see watched_workers)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        if not self.quiet and os.getpid() != self.parent:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # no KeyboardInterrupt traceback per worker
            self.quiet = True
        try:
            img = np.asarray(load_resized(self.files[i], self.max_res))
        except Exception as e:
            # under the writer's bar, drawn by the parent (this is a worker of FFCV's writer)
            bar_lines.worker_line(
                f"warning: {self.files[i]} failed to decode on the second pass ({e}); written black", sys.stderr
            )
            with self.failed.get_lock():
                self.failed.value += 1
            img = np.zeros((8, 8, 3), np.uint8)
        return img, self.labels[i]


@contextlib.contextmanager
def watched_workers(refused=None, output: Path | None = None) -> Iterator[None]:
    """Runs the block while a thread watches the worker processes it starts. FFCV's writer waits
    forever for the samples of a worker that died (the OOM killer, a SIGKILL): when one ends with an
    error, the block is stopped by a DataError that names it, or by the OSError that its write of
    `output` met when `refused` (recorded_write_errors) holds its errno (a full disk). However the
    block ends (that error, Ctrl-C, any other), the workers still running are stopped. A worker that
    a stop signal ended is a failure only where the block goes on for GROUP_STOP_S: a stop to the
    process group ends the workers too, and the block as a stop. The watch needs the main thread (it
    interrupts it with SIGUSR1); elsewhere only the clean-up runs."""
    from multiprocessing import process as mp_process

    before = set(mp_process._children)  # the multiprocessing module's own record of this process's children
    died: list[BaseException] = []
    stop = threading.Event()

    def ours() -> list:
        try:
            return [p for p in list(mp_process._children) if p not in before]
        except RuntimeError:  # the set changed while copied: next time
            return []

    def watch() -> None:
        while not stop.wait(0.5):
            for p in ours():
                code = p.exitcode
                if code not in (None, 0):
                    if code < 0 and -code in STOP_SIGNALS and stop.wait(GROUP_STOP_S):
                        return  # the group's stop, which the block ended with: no failure
                    # a signal: the OOM killer's SIGKILL, most likely; an exit status: an error it printed
                    cause = (
                        f"signal {signal.Signals(-code).name} (out of memory? try fewer --workers)"
                        if code < 0
                        else f"exit status {code} (its error is printed above)"
                    )
                    err = refused.value if refused is not None and code > 0 else 0
                    died.append(
                        OSError(err, os.strerror(err), str(output))
                        if err
                        else DataError(f"an FFCV writer worker (pid {p.pid}) ended with {cause}; nothing was written")
                    )
                    # a real signal: it also wakes a main thread blocked in a read (FFCV's queue.get)
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                    return

    def on_usr1(signum, frame):
        if died and os.getpid() == parent:  # the watch's wake-up
            if not stop.is_set():  # else the block has ended already: its own outcome stands
                raise died[0]
            return
        # Not the watch's: a SIGUSR1 from outside (SLURM's warning before a time limit), also one that
        # a forked worker got. It does what it does without the watch (the CLI: ends the command).
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise DataError("stopped by SIGUSR1")  # not the default's sudden end: the temporaries go

    main = threading.current_thread() is threading.main_thread()
    parent = os.getpid()
    previous = signal.getsignal(signal.SIGUSR1)  # before on_usr1 is in place: it reads it
    previous = signal.SIG_DFL if previous is None else previous  # None: set outside Python
    watcher = threading.Thread(target=watch, daemon=True, name="ffcv-writer-watch")
    if main:
        signal.signal(signal.SIGUSR1, on_usr1)
        watcher.start()
    try:
        yield
    finally:
        stop.set()
        if main:
            watcher.join()
            signal.signal(signal.SIGUSR1, previous)
        for p in ours():
            if p.exitcode is None:  # the block ended before its workers did
                p.terminate()
                p.join(5)


@contextlib.contextmanager
def recorded_write_errors(refused) -> Iterator[None]:
    """FFCV's writer workers write the .beton's pages themselves: one whose write met a full disk (a
    quota, a file-size limit) printed its traceback and ended with status 1, which watched_workers
    could only name as "out of memory?". For the block, their work function records the errno of
    such an error (ENVIRONMENT_ERRNOS, raised where FFCV's page allocator opens or writes the .beton)
    in `refused` (a shared int), and the worker ends quietly with status 1. Any other error is not
    the output's to report (an EIO, a full disk met by something else): the worker prints it and
    ends, as before."""
    import ffcv.memory_allocator as allocator
    import ffcv.writer as fw

    work = fw.worker_job_indexed_dataset

    def recording(*args):
        try:
            work(*args)
        except OSError as e:
            frames = traceback.walk_tb(e.__traceback__)
            if e.errno not in ENVIRONMENT_ERRNOS or all(f.f_code.co_filename != allocator.__file__ for f, _ in frames):
                raise
            refused.value = e.errno
            sys.exit(1)

    fw.worker_job_indexed_dataset = recording
    try:
        yield
    finally:
        fw.worker_job_indexed_dataset = work


def start_resource_tracker() -> None:
    """Starts multiprocessing's resource tracker, the process that unlinks shared memory left behind
    (FFCV's writer makes some), with the STOP_SIGNALS blocked: it ignores SIGINT and SIGTERM itself,
    but a SIGHUP or SIGUSR1 to the process group (a closed terminal, SLURM) ended it, and the one
    started in its place printed a KeyError traceback for memory it had not seen registered."""
    from multiprocessing import resource_tracker

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the tracker inherits the mask
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # one that came meanwhile is acted on now


@contextlib.contextmanager
def _forked_writer_workers() -> Iterator[None]:
    """While in it, FFCV's writer starts its workers, and makes their queues and counters, through
    the fork context whatever multiprocessing's default: under forkserver (Python 3.14's default) the
    convert failed with "Can't pickle local object" (recorded_write_errors' work function, set in this
    process for its forked workers) and with the fork context's counters that its workers share."""
    import ffcv.memory_allocator
    import ffcv.writer

    fork = mp.get_context("fork")
    parent = os.getpid()

    class Process(fork.Process):  # FFCV's workers end with this process, even a SIGKILLed one
        def run(self) -> None:
            exit_with_parent(parent)
            super().run()

    names = ((ffcv.writer, "Process"), (ffcv.writer, "Queue"), (ffcv.writer, "Value"), (ffcv.memory_allocator, "Value"))
    plain = [getattr(module, name) for module, name in names]
    for module, name in names:
        setattr(module, name, Process if name == "Process" else getattr(fork, name))
    try:
        yield
    finally:
        for (module, name), value in zip(names, plain, strict=True):
            setattr(module, name, value)


# FFCV's writer is set up through globals of its modules (recorded_write_errors, _forked_writer_workers,
# _labelled_bar) and watched through this process's children (watched_workers): one .beton of a
# process is written at a time. Two at once (threads of a program that converts) each swapped the
# globals within the other's swap, and the second to end put the first's values back for good (and
# the first to end stopped the other's workers as its own).
_ONE_WRITER = threading.Lock()


@contextlib.contextmanager
def ffcv_writing(refused, output: Path) -> Iterator[None]:
    """While in it, FFCV's writer runs as a convert runs it (watched_workers, for `refused` and
    `output`; recorded_write_errors; forked workers; a labelled bar), for one .beton of this process
    at a time (_ONE_WRITER): another convert's write waits for it."""
    with _ONE_WRITER, watched_workers(refused, output), recorded_write_errors(refused):
        with _forked_writer_workers(), _labelled_bar():
            yield


@contextlib.contextmanager
def _labelled_bar() -> Iterator[None]:
    """FFCV's writer draws its bar without a label or unit ("45%|####  | 450/1000"), after convert's
    own "checking" bar: while in it, the bar says what it counts, as convert's others do."""
    import ffcv.writer

    plain = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(plain, desc="writing .beton", unit="img", dynamic_ncols=True, file=sys.stderr)
    try:
        yield
    finally:
        ffcv.writer.tqdm = plain


def write_beton(tmp: Path, files: list[str], labels: list[int], stored: list[int], cfg: ConvertConfig):
    if "ffcv.fields" not in sys.modules:
        # FFCV's import compiles Numba code (its image field's typed dict) and imports torch: ~5 s on
        # a CPU between the checking bar and the writing one, without a word, as if convert hung
        log.info("starting FFCV's writer (its import compiles Numba code: a few seconds)")
    with kept_ffcv_import_threads():  # FFCV's import sets them to 1
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

    # A sample must fit in one page: pages of 8 MiB (FFCV's default) or the next power of two above
    # the largest sample as stored (check_task), with room for a JPEG larger than its pixels.
    page = max(DEFAULT_PAGE, 1 << math.ceil(math.log2(page_need(max(stored)))))
    fields = {
        "image": RGBImageField(
            write_mode=cfg.write_mode,
            max_resolution=cfg.max_resolution,
            jpeg_quality=cfg.jpeg_quality,
            smart_threshold=256 * 256 * 3,  # smart: images above 256x256 pixels stored as JPEG
        ),
        "label": IntField(),
    }
    source = BetonSource(files, labels, cfg.max_resolution)
    start_resource_tracker()
    writer = DatasetWriter(str(tmp), fields, page_size=page, num_workers=cfg.workers)
    for step in ("prepare", "finalize"):  # FFCV's own writes of the .beton in this process (header, tables)
        setattr(writer, step, writing(tmp)(getattr(writer, step)))
    refused = mp.get_context("fork").Value("i", 0)  # the errno of a write a worker could not make
    try:
        with ffcv_writing(refused, tmp):
            writer.from_indexed_dataset(source)
    except BaseException:
        sm = getattr(writer, "metadata_sm", None)  # FFCV unlinks its shared memory only when it finishes
        if sm is not None:
            with contextlib.suppress(OSError):
                sm.close()
                sm.unlink()
        raise
    if source.failed.value:
        raise DataError(f"{source.failed.value} images failed to decode while writing (they changed on disk?)")


def write_names(path: Path, files: list[str], root: Path, fingerprint: str) -> None:
    """The file list (names_path): NAMES_HEADER, `root` and the `fingerprint` of its .beton, then each
    file relative to `root`, a line each. A newline in a name is written as the two characters \\n
    (the list names files to a reader, nothing parses it back into paths); bytes that are not UTF-8
    are written as they are."""

    def line(name: str) -> str:
        return name.replace("\n", "\\n") + "\n"

    prefix = os.path.join(root, "")  # the listing's files start with it: slicing, not relpath (10 s for ImageNet)

    def relative(f: str) -> str:
        return f[len(prefix) :] if f.startswith(prefix) else os.path.relpath(f, root)

    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
        fh.write(NAMES_HEADER + str(root).replace("\n", "\\n") + NAMES_FINGERPRINT + line(fingerprint))
        fh.writelines(line(relative(f)) for f in files)


def convert_ffcv(
    images: ImageList, tmp: Path, names_tmp: Path, cfg: ConvertConfig
) -> tuple[int, list[tuple[str, str]], dict]:
    # jpg and smart store an image above 256 x 256 pixels (every one past the default page) as a JPEG
    quality = cfg.jpeg_quality if cfg.write_mode in ("jpg", "smart") else None
    if quality is not None:
        import cv2  # noqa: F401  here, not in each worker process that needs it
    jobs = [(f, cfg.max_resolution, quality) for f in images.files]
    results = list(parallel_map(check_task, jobs, cfg.workers, "checking"))
    skipped = [(f, r) for f, r in zip(images.files, results, strict=True) if isinstance(r, str)]
    for path, reason in skipped:
        log.warning("skipping %s: %s", path, reason)
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    if not keep:
        raise DataError(f"none of the {len(images)} images in {images.root} could be decoded")
    files = [images.files[i] for i in keep]
    labels = [images.labels[i] for i in keep]
    write_beton(tmp, files, labels, [results[i][2] for i in keep], cfg)
    with writing(tmp):
        fingerprint = beton_fingerprint(tmp)  # in the sidecar and the file list: they name this .beton
    with writing(names_tmp):
        write_names(names_tmp, files, images.root, fingerprint)
    fields = {"image": "RGBImageField", "label": "IntField"}
    return len(files), skipped, {"fields": fields, "beton_fingerprint": fingerprint}
