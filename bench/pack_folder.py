"""Pack a folder of many small files into one file, and unpack it: how CIFAR-10 reaches the GPU machine.

A transfer to the GPU machine carries at most 64 MiB. CIFAR-10's 60,000 JPEGs are 55 MB of bytes,
but a tar of them adds a 512-byte header and padding per file (about 45 MB more), and 60,000
separate files travel slowly. This writes the bytes of every file back to back with their offsets
and relative paths (an uncompressed .npz: JPEGs do not compress), so the pack is the data plus
about 2 MB.

    python bench/pack_folder.py pack ../shared/data/cifar10 .devdata/cifar10.npz
    python bench/pack_folder.py unpack .devdata/cifar10.npz /tmp/cifar10      # on the GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from moco_fast.cli import ENVIRONMENT_ERRNOS, one_line
from moco_fast.durable import fsync_contents, fsync_folder_written_in


class PackError(Exception):
    """Input the script cannot use: one line, exit status 2."""


class Interrupted(PackError):
    """Ctrl-C: one line that says whether DST was written, exit status 130."""


def pack(src: Path, dst: Path) -> int:
    if not src.is_dir():
        raise PackError(f"{src} is not a folder")
    if dst.is_dir():
        raise PackError(f"{dst} is a folder: name the .npz file to write")
    tmp = dst.with_name(dst.name + ".part.npz")
    skip = {dst.resolve(), tmp.resolve()}  # a pack written inside the folder is not packed again
    paths = sorted(p for p in src.rglob("*") if p.is_file() and p.resolve() not in skip)
    if not paths:
        raise PackError(f"no files under {src}")
    blobs = [p.read_bytes() for p in paths]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    # bytes (1/4 of numpy's str), as the file system names them (any encoding)
    names = np.array([os.fsencode(p.relative_to(src).as_posix()) for p in paths])
    written = False
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, data=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets, names=names)
        fsync_contents(tmp)  # its bytes durable before the rename puts it in place
        os.replace(tmp, dst)
        written = True
        fsync_folder_written_in(dst)  # the rename made durable; an error says that DST is in place
    except BaseException as e:  # a full disk or Ctrl-C: no half pack left beside DST
        if (line := failed(e, dst, tmp, written)) is None:
            raise
        raise line from None  # DST under /proc was a traceback naming the temporary file
    return len(paths)


def unpack(src: Path, dst: Path) -> int:
    """Into a new (or empty) folder, through DST.part: an unpack that fails (a full disk) or is
    interrupted removes it, and one that was killed leaves no half folder under the final name (the
    next one removes it and starts over; one it cannot remove is refused, not written into). An
    empty DST is replaced by the rename itself, so that one that fails leaves it as it was."""
    if not src.is_file():
        raise PackError(f"{src} is not a file")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise PackError(f"{dst} exists and is not an empty folder: unpack into a new one")
    try:
        with np.load(src) as z:
            data, offsets, names = z["data"], z["offsets"], z["names"]
    except (OSError, ValueError, KeyError) as e:
        raise PackError(f"{src} is not a pack written by this script ({type(e).__name__}: {e})") from None
    decoded = [os.fsdecode(bytes(raw)) for raw in names]
    unsafe = [n for n in decoded if ".." in Path(n).parts or Path(n).is_absolute()]
    if unsafe:  # checked before anything is written
        raise PackError(f"refusing a path outside the destination: {unsafe[0]}")
    tmp = dst.with_name(dst.name + ".part")
    try:
        remove_temporary(tmp)  # left by an unpack that was killed
    except OSError as e:
        # where it stays, the files would be written into it, beside what it holds (or through a link
        # into another folder); nothing there (DST's folder is missing, or is a file): the write says why
        if os.path.lexists(tmp):
            raise PackError(
                f"{tmp}, left by an earlier unpack, cannot be removed ({e.strerror or e}): remove it"
            ) from None
    written = False
    try:
        for i, name in enumerate(decoded):
            out = tmp / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data[offsets[i] : offsets[i + 1]].tobytes())
        fsync_contents(tmp)  # its files durable before the rename puts it in place
        # over an empty DST at once (rename(2) replaces an empty folder): removed first, a rename that
        # then failed left the user without it; one that is no longer empty is refused (ENOTEMPTY)
        os.replace(tmp, dst)
        written = True
        fsync_folder_written_in(dst)  # the rename made durable; an error says that DST is in place
    except BaseException as e:  # a full disk (a traceback) or Ctrl-C: the half folder goes
        if (line := failed(e, dst, tmp, written)) is None:
            raise
        raise line from None
    return len(decoded)


def failed(e: BaseException, dst: Path, tmp: Path, written: bool) -> PackError | None:
    """The one line for `e`, met while DST was written through its temporary `tmp` (a file or folder),
    once `tmp` is removed (and the space it took): Ctrl-C's says whether DST was `written` (renamed into
    place), an OSError's is write_error's; None for another error (a bug: its traceback). A `tmp` that
    cannot be removed (a failing disk that went read-only) is named as left behind."""
    with contextlib.suppress(OSError):  # nothing there where DST's folder could not be made
        remove_temporary(tmp)
    left = f"; {tmp} is left behind: remove it" if os.path.lexists(tmp) else ""
    if isinstance(e, KeyboardInterrupt):
        return Interrupted(f"interrupted: {dst} {'written' if written else 'not written'}{left}")
    return PackError(write_error(e, dst, tmp) + left) if isinstance(e, OSError) else None


def remove_temporary(tmp: Path) -> None:
    """DST's temporary `tmp` removed, a file, folder or link (the link itself: rmtree refuses one), if
    there; an OSError where it cannot be."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    else:
        tmp.unlink(missing_ok=True)


def write_error(e: OSError, dst: Path, tmp: Path) -> str:
    """The one line of `e`, met while DST was written through its temporary `tmp` (a file or folder):
    what the machine refused (a full disk, a failing disk) as convert says it (cli.one_line: "No space
    left on device: DST"), else "cannot write DST (why)". A file that is neither the temporary nor in
    it is named instead of DST (a file where a folder goes); the temporary never is. After the rename
    (durable.fsync_folder_written_in's error) it says that DST was written."""
    name = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes)) else None
    other = name if name and name != str(tmp) and not name.startswith(str(tmp) + os.sep) else None
    if e.errno in ENVIRONMENT_ERRNOS or e.errno == errno.EIO:
        return one_line(OSError(e.errno, e.strerror, other or str(dst)))
    return f"cannot write {dst} ({f'{other}: ' if other else ''}{e.strerror or e})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("src", type=Path, help="pack: the folder; unpack: the .npz")
    p.add_argument("dst", type=Path, help="pack: the .npz to write; unpack: a new folder to fill")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        n = (pack if a.action == "pack" else unpack)(a.src, a.dst)
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the write began (reading SRC, a pack's files)
        print(f"interrupted: {a.dst} not written", file=sys.stderr)
        return 130
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = (a.dst if a.action == "pack" else a.src).stat().st_size
    print(f"{a.action}ed {n} files ({size / 2**20:.1f} MiB pack) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
