"""The files of `moco-fast convert`'s output: the lock that keeps a second convert to the same DST
out (holding), the temporary name it is written under (in DST's folder, named by host and PID),
publishing it (renamed into place; an existing output moved aside first and removed after), what a
convert that was killed left (tidy_after_a_stopped_convert), and the errors of a write of the
output, named as DST.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from moco_fast.cli import ENVIRONMENT_ERRNOS
from moco_fast.convert_dst import empty_folder, names_path, sidecar_path
from moco_fast.durable import fsync_contents, fsync_folder_written_in
from moco_fast.folder_locks import ended_here, hold_lock_file, owner_name, owner_of

log = logging.getLogger("moco_fast")


def lock_path(dst: Path) -> Path:
    """The lock file of a convert to `dst`: hidden, beside it (never read by a scan of SRC), and apart
    from DST itself, which publishing renames (a lock on the old file or folder would guard nothing)."""
    return dst.with_name(f".{dst.name}.lock")


@contextlib.contextmanager
def holding(dst: Path) -> Iterator[None]:
    """Holds DST's lock (lock_path, made with DST's folder) while a convert writes and publishes it:
    a second convert to the same DST stops at once with one line (RunFolderBusy) instead of
    publishing its files between the first's (a .beton of one beside the sidecar of the other). The
    lock file goes when the convert ends, whether it wrote DST or failed; a convert killed outright
    leaves it (hidden, naming convert), and the next convert to DST locks it again. A DST named
    `NAME.state.pt` shares its lock with a lincls or finetune whose --out is NAME.json beside it (whose
    state that is): the line names the lock's holder."""

    def busy(holder: str | None) -> str:
        return f"DST {dst}: another moco-fast {holder or 'convert'} is writing it now; wait for it to end or choose another DST"

    with hold_lock_file(lock_path(dst), "convert", busy):
        yield


def outputs_there(dst: Path) -> tuple[bool, ...]:
    """Which of DST, its sidecar and its file list are there (a link counts; an empty folder, which
    a shard set is written into, does not): where they differ after the lock is taken from before,
    another convert published DST meanwhile, and convert checks DST again."""
    return tuple(
        (p.exists() or p.is_symlink()) and not empty_folder(p) for p in (dst, sidecar_path(dst), names_path(dst))
    )


def temp_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.partial-{owner_name()}")


def tidy_after_a_stopped_convert(dst: Path) -> None:
    """What an earlier convert to DST on this machine left when it was killed: its temporary output
    (`.DST.partial-HOST-PID`, and the .beton sidecars') is removed; the previous output it had moved
    aside to replace it (`.DST.old-HOST-PID`) is put back where DST is missing (it is then the only
    copy), else removed. Files of a process still running, or of another machine, are left alone."""
    for name in (dst.name, sidecar_path(dst).name, names_path(dst).name):
        for kind in ("partial", "old"):
            prefix = f".{name}.{kind}-"
            for tmp in dst.parent.glob(glob.escape(prefix) + "*"):
                if not ended_here(owner_of(tmp.name, prefix)):
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


def output_of(filename, temporaries: dict[Path, Path]) -> Path | None:
    """The output that an error's `filename` is the temporary of (it is one of `temporaries`, or a file
    in one: a shard of the temporary folder), else None; None for no filename."""
    if not filename:
        return None
    name = os.fsdecode(filename) if isinstance(filename, (str, bytes)) else str(filename)
    for tmp, final in temporaries.items():
        if name == str(tmp) or name.startswith(str(tmp) + os.sep):
            return final
    return None


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish(tmp: Path, dst: Path, force: bool, announce: bool = True) -> None:
    """Rename tmp to dst. An existing dst (only with force) is moved aside first and removed after,
    so that dst is never a half-written output. An empty folder at dst (a shard set's, made
    beforehand) is renamed over: rename(2) replaces an empty folder (one filled since: ENOTEMPTY).
    tmp's files (and folders) are fsynced before the rename, before the old output is moved aside
    (durable.fsync_contents): a power loss after it leaves no output empty or short under its
    final name. DST's folder is fsynced after the rename, before the old output goes: a power loss
    does not bring the old output back, nor leave the folder without either (durable.fsync_folder_written_in:
    its error says that DST was written; the old output, kept, goes at the next convert to DST,
    tidy_after_a_stopped_convert).
    `announce`: a line says the fsync before it (a 140 GB .beton's dirty pages take minutes on a slow
    disk, a pause otherwise silent); convert passes False for the .beton's small sidecars."""
    old = None
    if (dst.exists() or dst.is_symlink()) and not empty_folder(dst):
        if not force:
            raise FileExistsError(f"{dst} exists: pass --force to replace it")
        old = dst.with_name(f".{dst.name}.old-{owner_name()}")
    if announce:
        log.info("flushing %s to disk (fsync) before moving it into place", dst)
    fsync_contents(tmp)
    if old is not None:
        os.replace(dst, old)
    os.replace(tmp, dst)
    fsync_folder_written_in(dst)  # its error says that DST is in place, not a convert that failed
    if old is not None:
        remove(old)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
