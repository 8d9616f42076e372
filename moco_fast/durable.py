"""fsync(2) of what a rename puts in place (fsync_contents; fsync_open_file, of a file its writer
holds open) and of the folder it is renamed in (fsync_folder; fsync_folder_written_in, whose error
says that the file is in place): checkpoint.atomic_write, convert's publish, bench/pack_folder.py and
metrics.jsonl before each checkpoint (metrics.sync_rows), each skipping alike a file system that cannot
fsync. Torch-free, as the package's import is
(STARTED_BY, moco_fast/__init__.py): pack_folder.py, which carries CIFAR-10 to the GPU machine,
needs these and no torch (seconds to import)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """fsync(2) of `folder`, which makes a rename in it durable (POSIX). Skipped where it cannot be
    done: no O_DIRECTORY (Windows), a folder that may not be read, a file system that does not fsync
    folders (EINVAL, ENOTSUP, EBADF)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    _fsync(fd, folder)


def fsync_folder_written_in(path: Path) -> None:
    """fsync_folder of `path`'s folder, once `path` is renamed into it: an error is raised naming the
    folder and saying that `path` was written (atomic_write, convert's publish, bench/pack_folder.py).
    Alone, "Input/output error: FOLDER" read as a write that had failed, the old file in place, where
    the new one is."""
    try:
        fsync_folder(path.parent)
    except OSError as e:
        written = f"{e.strerror} flushing the folder to disk after {path.name} was written in it"
        raise OSError(e.errno, written, e.filename) from e


def fsync_contents(path: Path) -> None:
    """fsync(2) of the file `path`, or of each file in the folder `path` (its subfolders too) and of
    each folder: what a rename is to put in place made durable before it, so that a power loss after
    the rename cannot leave it empty or short under its final name (convert's publish, and
    bench/pack_folder.py); and metrics.jsonl, appended to in place, before a checkpoint that covers its
    rows (metrics.sync_rows). Each file is opened read-only by its path (its writer may hold it open
    still), which flushes the file's dirty pages on Linux; nothing is read back. Links and other
    files that are no regular file are left alone. An error is raised with the file's path (a full
    disk met by the write-back), as is one of a folder that cannot be listed (os.walk's default
    skips it: its files would go unsynced, unsaid)."""
    if not path.is_dir() or path.is_symlink():
        if stat.S_ISREG(os.lstat(path).st_mode):
            _fsync(os.open(path, os.O_RDONLY), path)
        return
    for folder, _, names in os.walk(path, topdown=False, onerror=_raise):  # each folder after the files in it
        for name in names:
            file = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(file).st_mode):
                _fsync(os.open(file, os.O_RDONLY), file)
        fsync_folder(Path(folder))


def _raise(e: OSError) -> None:
    raise e


def fsync_open_file(fd: int, path: str | Path) -> None:
    """fsync(2) of `fd`, open on `path` (left open): an error is raised with the path, but for a file
    that cannot be fsynced (EINVAL, ENOTSUP, EBADF: a file system that does not, some FUSE mounts; a
    folder on some), which is skipped: raised, it failed every write to such a file system, which
    offers no fsync to wait for. atomic_write's temporary file (its writer holds it), and the files and
    folders of fsync_contents and fsync_folder."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise OSError(e.errno, e.strerror, str(path)) from e


def _fsync(fd: int, path: str | Path) -> None:
    """fsync_open_file, then `fd` closed."""
    try:
        fsync_open_file(fd, path)
    finally:
        os.close(fd)
