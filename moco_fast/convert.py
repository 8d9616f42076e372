"""`moco-fast convert`: an image folder -> an FFCV `.beton` or a WebDataset shard set.

Every file is checked: list_images skips files that are not images (by extension or header); then
each image is decoded in full, so truncated or corrupt files are skipped too, each named with its
reason. Grayscale, CMYK and palette images become RGB. `max_resolution` shrinks an image so that
its longer side is at most that many pixels (JPEGs are decoded at a reduced DCT scale first, which
is faster and as sharp).

The output never appears half-written under its final name: it is written under a temporary name
in the same folder and renamed at the end; an existing output is replaced only with `force`, and
only when it is an earlier output of convert (moco_fast/convert_dst.py, checked before any image is
read).

FFCV: the .beton has the fields `image` (RGBImageField) and `label` (IntField), in the folder's
sorted order; `X.beton.json` beside it holds the class names, and `X.beton.files.txt` the source
file of each image (relative to SRC's split folder, one a line in .beton order, after a header line;
the FFCV loader names the file of an image it skips by it). Both record the .beton's fingerprint
(convert_dst.beton_fingerprint), so that a reader tells them from those of the .beton they replace. Its writer runs its own worker
processes and cannot skip a sample, so the images are decoded once to check them and once more to
write them. WebDataset: see moco_fast/convert_wds.py.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from moco_fast.cli import ENVIRONMENT_ERRNOS, STOP_SIGNALS, interruption, os_error_behind
from moco_fast.config import ConfigError
from moco_fast.convert_dst import (
    NAMES_FINGERPRINT,
    NAMES_HEADER,
    beton_fingerprint,
    check_destination,
    names_path,
    sidecar_path,
)
from moco_fast.data import DataError, ImageList, find_classes, list_images, resolve_root, split_dirs, to_rgb
from moco_fast.loaders.wds import META_NAME

log = logging.getLogger("moco_fast")

FORMATS = ("ffcv", "wds")
WRITE_MODES = ("jpg", "raw", "smart", "proportion")


@dataclass
class ConvertConfig:
    src: str
    dst: str
    format: str = "ffcv"
    split: str = "train"  # with a root holding train/ and val/ or test/: which one (classes from train/)
    max_resolution: int | None = None  # longer side, pixels; None: keep
    jpeg_quality: int = 90
    write_mode: str = "jpg"  # ffcv: jpg | raw | smart | proportion (FFCV's RGBImageField modes)
    shard_size: int = 1000  # wds: images per shard
    workers: int = 0  # 0: every core of this machine
    force: bool = False
    seed: int = 0  # wds: the shuffled sample order


@dataclass
class ConvertSummary:
    dst: Path
    written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    bytes: int = 0
    seconds: float = 0.0

    def text(self, show: int = 20) -> str:
        lines = [
            f"wrote {self.written} images to {self.dst} ({self.bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s; "
            f"skipped {len(self.skipped)}"
        ]
        for path, reason in self.skipped[:show]:
            lines.append(f"  skipped {path}: {reason}")
        if len(self.skipped) > show:
            lines.append(f"  ... and {len(self.skipped) - show} more (all listed in the output's json)")
        return "\n".join(lines)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---- decoding, with the checks ------------------------------------------------------------------


def load_resized(path: str, max_resolution: int | None) -> Image.Image:
    """Decode in full (raises on a truncated file), convert to RGB, shrink the longer side to at most
    `max_resolution` (bicubic, antialiased)."""
    with Image.open(path) as im:
        if max_resolution and im.format == "JPEG" and max(im.size) > max_resolution:
            s = max_resolution / max(im.size)
            # DCT scaling: decode at 1/2, 1/4 or 1/8 size, never below the requested size.
            im.draft("RGB", (math.ceil(im.size[0] * s), math.ceil(im.size[1] * s)))
        im.load()
        img = to_rgb(im)
    if max_resolution and max(img.size) > max_resolution:
        w, h = img.size
        s = max_resolution / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    return img


def check_task(job: tuple[str, int | None]) -> tuple[int, int] | str:
    """(width, height) after resizing, or the reason the file cannot be converted."""
    path, max_res = job
    try:
        return load_resized(path, max_res).size
    except Exception as e:  # PIL raises many types for bad files
        return f"cannot decode ({type(e).__name__}: {e})"


def parallel_map(fn: Callable, jobs: list, workers: int, desc: str) -> Iterator:
    """fn over jobs in order, in `workers` processes, with a progress bar. Works in windows, so that
    results never pile up in memory faster than the caller consumes them."""
    bar = tqdm(total=len(jobs), desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)
    try:
        if workers <= 1:
            for j in jobs:
                yield fn(j)
                bar.update()
            return
        window = workers * 64
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            for start in range(0, len(jobs), window):
                chunk = jobs[start : start + window]
                for r in ex.map(fn, chunk, chunksize=16):
                    yield r
                    bar.update()
    finally:
        bar.close()


# ---- input and output ---------------------------------------------------------------------------


def source_images(cfg: ConvertConfig) -> ImageList:
    root = resolve_root(cfg.src, "SRC")
    train_dir, eval_dir = split_dirs(root)
    if cfg.split != "train" and train_dir != root and (root / cfg.split).is_dir():
        eval_dir = root / cfg.split  # split_dirs prefers val/ where both are there
    if cfg.split == "train":
        if eval_dir is not None:
            log.info(
                "%s has %s/ too: convert it with `moco-fast convert %s DST --split %s`",
                root,
                eval_dir.name,
                root,
                eval_dir.name,
            )
        return list_images(train_dir, check=True, workers=max(1, cfg.workers))
    if train_dir == root or eval_dir is None or eval_dir.name != cfg.split:
        raise DataError(f"--split {cfg.split}: {root} has no train/ and {cfg.split}/ folders")
    # numbered as train/ is listed (hidden and empty folders are no classes there either)
    return list_images(eval_dir, classes=find_classes(train_dir), check=True, workers=max(1, cfg.workers))


def _owner() -> str:
    """This process, as temporary names record it: host and PID (a shared folder may be written from
    several machines, where a PID says nothing)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def temp_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.partial-{_owner()}")


def tidy_after_a_stopped_convert(dst: Path) -> None:
    """What an earlier convert to DST on this machine left when it was killed: its temporary output
    (`.DST.partial-HOST-PID`, and the .beton sidecars') is removed; the previous output it had moved
    aside to replace it (`.DST.old-HOST-PID`) is put back where DST is missing (it is then the only
    copy), else removed. Files of a process still running, or of another machine, are left alone."""
    host = socket.gethostname()
    for name in (dst.name, sidecar_path(dst).name, names_path(dst).name):
        for kind in ("partial", "old"):
            prefix = f".{name}.{kind}-"
            for tmp in dst.parent.glob(glob.escape(prefix) + "*"):
                owner, _, pid = tmp.name[len(prefix) :].rpartition("-")
                if owner != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                    continue
                target = tmp.with_name(name)
                try:
                    if kind == "old" and not (target.exists() or target.is_symlink()):
                        os.replace(tmp, target)
                        log.warning("%s: put back the output that a stopped convert had moved aside", target)
                    else:
                        log.info("removing %s, left by a convert that was stopped", tmp)
                        remove(tmp)
                except OSError as e:
                    log.warning("could not tidy %s: %s", tmp, e)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """The block writes the temporary output `path` (or a file in it): an OSError of ENVIRONMENT_ERRNOS
    or an EIO that it raises without a path (a write to an open file has none: a full disk, a
    file-size limit, a failing disk) is raised again with `path`, which convert then reports as DST.
    Errors without a path from anything else keep none: a semaphore that /dev/shm refuses (EACCES)
    is no write of DST's."""
    try:
        yield
    except OSError as e:
        if e.filename is None and (e.errno in ENVIRONMENT_ERRNOS or e.errno == errno.EIO):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def _final(filename, temporaries: dict[Path, Path]) -> Path | None:
    """The output that an error's `filename` is the temporary of (it is one of `temporaries`, or a file
    in one: a shard of the temporary folder), else None; None for no filename."""
    if not filename:
        return None
    name = os.fsdecode(filename) if isinstance(filename, (str, bytes)) else str(filename)
    for tmp, final in temporaries.items():
        if name == str(tmp) or name.startswith(str(tmp) + os.sep):
            return final
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(tmp: Path, dst: Path, force: bool) -> None:
    """Rename tmp to dst. An existing dst (only with force) is moved aside first and removed after,
    so that dst is never a half-written output."""
    old = None
    if dst.exists() or dst.is_symlink():
        if not force:
            raise FileExistsError(f"{dst} exists: pass --force to replace it")
        old = dst.with_name(f".{dst.name}.old-{_owner()}")
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        remove(old)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- FFCV ---------------------------------------------------------------------------------------


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
            print(f"warning: {self.files[i]} failed to decode on the second pass ({e}); written black", file=sys.stderr)
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
    block ends (that error, Ctrl-C, any other), the workers still running are stopped. The watch
    needs the main thread (it interrupts it with SIGUSR1); elsewhere only the clean-up runs."""
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


def write_beton(tmp: Path, files: list[str], labels: list[int], sizes: list[tuple[int, int]], cfg: ConvertConfig):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    # A sample must fit in one page: pages of 8 MiB (FFCV's default) or the next power of two above
    # the largest raw image, with room for a JPEG that came out larger than its pixels.
    biggest = max(w * h * 3 for w, h in sizes)
    page = max(8 << 20, 1 << math.ceil(math.log2(biggest * 3 // 2 + 65536)))
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
        with watched_workers(refused, tmp), recorded_write_errors(refused):
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
    jobs = [(f, cfg.max_resolution) for f in images.files]
    results = list(parallel_map(check_task, jobs, cfg.workers, "checking"))
    skipped = [(f, r) for f, r in zip(images.files, results, strict=True) if isinstance(r, str)]
    for path, reason in skipped:
        log.warning("skipping %s: %s", path, reason)
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    if not keep:
        raise DataError(f"none of the {len(images)} images in {images.root} could be decoded")
    files = [images.files[i] for i in keep]
    labels = [images.labels[i] for i in keep]
    write_beton(tmp, files, labels, [results[i] for i in keep], cfg)
    with writing(tmp):
        fingerprint = beton_fingerprint(tmp)  # in the sidecar and the file list: they name this .beton
    with writing(names_tmp):
        write_names(names_tmp, files, images.root, fingerprint)
    fields = {"image": "RGBImageField", "label": "IntField"}
    return len(files), skipped, {"fields": fields, "beton_fingerprint": fingerprint}


# ---- the command's work -------------------------------------------------------------------------


def missing_modules(names: list[str]) -> list[str]:
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is None]


def validate(cfg: ConvertConfig) -> None:
    if cfg.format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if cfg.write_mode not in WRITE_MODES:
        raise ConfigError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {cfg.write_mode!r}")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ConfigError(f"--jpeg-quality must be in 1..100, got {cfg.jpeg_quality}")
    if cfg.max_resolution is not None and cfg.max_resolution < 8:
        raise ConfigError(f"--max-resolution must be at least 8 pixels, got {cfg.max_resolution}")
    if cfg.shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {cfg.shard_size}")
    if cfg.format == "ffcv":  # before hours of checking images, not after
        missing = missing_modules(["ffcv", "numba"])
        if missing:
            raise ConfigError(
                f"--format ffcv needs {', '.join(missing)}, which this Python lacks: install the extra with "
                "pip install 'moco-fast[ffcv]' (FFCV builds against pkg-config, libopencv-dev and libturbojpeg0-dev)"
            )


def convert(cfg: ConvertConfig) -> ConvertSummary:
    """Convert as configured; returns what was written and skipped. Raises DataError when nothing
    could be written, FileExistsError when the output exists and `force` is off, ConfigError when
    DST is something that `force` never replaces (check_destination)."""
    validate(cfg)
    if cfg.workers <= 0:
        cfg.workers = default_workers()
    dst = Path(cfg.dst)
    tidy_after_a_stopped_convert(dst)  # first: an output it puts back is an existing DST
    check_destination(resolve_root(cfg.src, "SRC"), dst, cfg.format, cfg.force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    images = source_images(cfg)
    tmp = temp_path(dst)
    temporaries = {tmp: dst}  # each temporary, and the output it becomes
    try:
        if cfg.format == "ffcv":
            names_tmp = temp_path(names_path(dst))
            temporaries[names_tmp] = names_path(dst)
            written, skipped, info = convert_ffcv(images, tmp, names_tmp, cfg)
        else:
            from moco_fast.convert_wds import write_shard_set

            written, skipped, info = write_shard_set(images, tmp, cfg)
        skipped = images.skipped + skipped
        meta = {
            "format": cfg.format,
            "classes": images.classes,
            "num_images": written,
            **info,
            "source": str(images.root),
            "max_resolution": cfg.max_resolution,
            "jpeg_quality": cfg.jpeg_quality,
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
        }
        if cfg.format == "ffcv":
            meta["write_mode"] = cfg.write_mode
            side_tmp = temp_path(sidecar_path(dst))
            temporaries[side_tmp] = sidecar_path(dst)
            with writing(side_tmp):
                side_tmp.write_text(json.dumps(meta, indent=1))
            # An earlier list goes first: killed before the new one is in place, the new .beton has
            # none (the loader then names images by number) rather than one of other files. Killed
            # after the .beton, before its sidecar: the old sidecar records the old .beton's
            # fingerprint, and its readers (the loader, --force) see that it is stale.
            names_path(dst).unlink(missing_ok=True)  # check_destination: an earlier list of convert only
            publish(tmp, dst, cfg.force)
            publish(side_tmp, sidecar_path(dst), cfg.force)  # check_destination: an earlier sidecar only
            publish(names_tmp, names_path(dst), cfg.force)
        else:
            with writing(tmp):
                (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
            publish(tmp, dst, cfg.force)
    except BaseException as e:
        for p in temporaries:
            remove(p)
        refused = None if interruption(e) else os_error_behind(e)
        final = None if refused is None else _final(refused.filename, temporaries)
        if final is not None and (refused.errno in ENVIRONMENT_ERRNOS or refused is e):
            # a full disk met by a write (a tar member's, an FFCV worker's page): DST is what the user
            # named, and the temporary is gone. An error without a path is not DST's unless `writing`
            # gave it DST's temporary.
            raise OSError(refused.errno, refused.strerror, str(final)) from e
        raise
    return ConvertSummary(dst, written, skipped, size_of(dst), time.perf_counter() - start)
