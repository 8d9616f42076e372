"""The flocks that keep a second command out of what one is writing: a run folder (`train`, a sweep),
held on the folder itself, and a lock file beside an output (lincls, finetune, convert's DST). Each
names its holder to the one it refuses (a folder's in a hidden file in it, HOLDER_NAME), makes the
folders it needs, and removes those it made and left empty when the command fails before writing; a
forked child (a DataLoader worker) closes its copies, and a `train --gpus N` launcher hands its hold
to its workers (FolderHold). What a run folder holds and who may write it: run_folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moco_fast.cli import UserError

log = logging.getLogger("moco_fast")


class RunFolderBusy(RuntimeError):
    """Another `train` or sweep is writing to the same --out (or another lincls / finetune to the same
    result, another convert to the same DST)."""


# owner_name's length at most: a host name of HOST_NAME_MAX (64) bytes, "-", a PID of Linux's largest
# pid_max (4194304: 7 digits)
OWNER_NAME_MAX = 64 + 1 + 7


def owner_name() -> str:
    """This process, as the names of its temporary files record it: "HOST-PID" (a shared folder may be
    written from several machines, where a PID says nothing)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def owner_of(name: str, prefix: str, suffix: str = "", mktemp: bool = False) -> tuple[str, int] | None:
    """The writer (HOST, PID) that the file or folder `name` records: PREFIX, owner_name, SUFFIX; with
    `mktemp`, PREFIX, owner_name, "." and tempfile's random characters, SUFFIX (mkstemp's and mkdtemp's
    names, whose random characters hold no dot: the last dot ends HOST-PID, whatever dots the host
    name has). The last dash ends HOST, whatever dashes it has (a PID has none). None where `name` is
    no such name: another prefix or suffix, no dash, no host, a PID that is not ASCII digits (a file
    named like one: "²".isdigit() is true, and int() refused it with a traceback where HOST was this
    machine's; int() reads Arabic-Indic digits as another PID). The one reader of the names that
    owner_name writes: convert's temporaries, atomic_write's, the launcher's folders."""
    if not name.startswith(prefix) or not name.endswith(suffix) or len(name) < len(prefix) + len(suffix):
        return None
    owner = name[len(prefix) : len(name) - len(suffix)]
    if mktemp:
        owner, dot, _ = owner.rpartition(".")
        if not dot:
            return None
    host, dash, pid = owner.rpartition("-")
    if not dash or not host or not (pid.isascii() and pid.isdigit()):
        return None
    return host, int(pid)


def ended_here(owner: tuple[str, int] | None) -> bool:
    """Whether `owner` (owner_of a name) is a process of this machine, not this one, that has ended:
    what it left may go. Another machine's, a running process's, or None (no owner_name): no."""
    if owner is None:
        return False
    host, pid = owner
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process; a PID no process can have
        return False
    return False


def lock_temporary(fd: int, path: Path) -> bool:
    """An exclusive flock on `fd`, the temporary file or folder `path` just made (checkpoint.atomic_write's
    file, the `--gpus` launcher's folders: locked_temporary), which its maker keeps while it uses it: the
    kernel lets go of it when the maker ends, in whatever PID namespace, where a HOST-PID says nothing
    (containers that share the host's name and /tmp but not its PIDs, whose live makers ended_here
    takes for ended): free_to_remove. Waits out a remover's look; False where that remover removed
    `path` before it was locked (make another one). True where the file system has no flock (it goes
    unguarded)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held by a remover only while it looks
    except OSError as e:
        log.debug("no lock on %s: %s", path, e)
        return True
    return _still_there(path, fd)


def locked_temporary(make: Callable[[], tuple[int, str] | None], remove: Callable[[str], None]) -> tuple[int, str]:
    """make()'s (descriptor, name) of a new temporary file or folder, locked (lock_temporary); made again
    where a remover in another PID namespace, which took its maker for ended, removed it before it was
    locked, or before make() could open it (make() returns None then: mkdtemp's folder, opened after it
    is made). A stop while it waits for the lock (Ctrl-C) closes it and remove()s it."""
    while True:
        if (made := make()) is None:
            continue
        fd, name = made
        try:
            if lock_temporary(fd, Path(name)):
                return fd, name
        except BaseException:
            os.close(fd)
            remove(name)
            raise
        os.close(fd)


@contextlib.contextmanager
def free_to_remove(path: Path) -> Iterator[bool]:
    """Whether the temporary file or folder `path`, whose maker ended_here takes for ended, is no live
    maker's (lock_temporary): True while this process holds its lock (remove it in the block: a maker
    that made it meanwhile finds it gone once it locks it), False where a maker holds it (one in another
    PID namespace of this machine) or it is gone. Where no lock can tell (a file system without flock, a
    file this user may not read), True: its HOST-PID alone decides, as before makers locked theirs."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK  # a FIFO there: no wait for a writer
    try:
        try:  # for writing: NFS takes a flock as fcntl's lock, whose exclusive one needs that (else EBADF)
            fd = os.open(path, os.O_RDWR | flags)
        # another user's file: a local file system's flock needs it only read; a folder opens only so
        # (on NFS its lock then fails, as its maker's does: HOST-PID decides)
        except (PermissionError, IsADirectoryError):
            fd = os.open(path, os.O_RDONLY | flags)
    except FileNotFoundError:
        yield False
        return
    except OSError:
        yield True
        return
    try:
        yield _try_flock(fd, path) is not False
    finally:
        os.close(fd)


_HELD: set[int] = set()  # the locks (run folders, lock files) this process holds


def _close_held_in_child() -> None:
    # A forked child (a DataLoader worker) would keep the lock alive after its parent died.
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _try_flock(fd: int, what: Path, how: int = fcntl.LOCK_EX) -> bool | None:
    """An exclusive flock on `fd` (or `how`: LOCK_SH) without waiting: True when held, False when
    another process holds it, None on a file system without flock (the run goes unguarded)."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        log.debug("no lock on %s: %s", what, e)
        return None
    return True


_HANDED: set[int] = set()  # the launcher's holds that this worker was handed (FolderHold.taken)


def handed(out: Path) -> bool:
    """Whether this process holds `out` through a hold its launcher handed it."""
    return any(_still_there(out, fd) for fd in _HANDED)


class FolderHold:
    """`train --gpus N`'s hold of its run folder, which its launcher keeps while the workers run and
    hands to each: pickled as the workers are spawned, the lock's descriptor goes with it
    (multiprocessing's DupFd: the worker's copy shares the launcher's lock, as a forked one would).
    The folder is never free between the launcher's check and the worker's run, where another train
    could take it (two runs in one folder, or the workers failing as busy); and it stays held while
    either the launcher or a worker lives."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple:
        from multiprocessing.reduction import DupFd

        return _rebuilt_hold, (DupFd(self.fd),)

    @contextlib.contextmanager
    def taken(self) -> Iterator[None]:
        """In the worker: run_folder.hold_run_folder of the folder yields True (it is held) while in it."""
        _HELD.add(self.fd)
        _HANDED.add(self.fd)
        try:
            yield
        finally:
            _HANDED.discard(self.fd)
            _HELD.discard(self.fd)
            os.close(self.fd)


def _rebuilt_hold(dup: Any) -> FolderHold:
    return FolderHold(dup.detach())  # in the worker: its copy of the launcher's descriptor


HOLDER_NAME = ".moco-fast.holder"  # in a folder held by hold_folder: the command that holds it


@contextlib.contextmanager
def hold_folder(out: Path, command: str) -> Iterator[int | None]:
    """A flock on the folder `out` itself (no lock file), made if missing; yields its descriptor where
    this process holds it (or the file system has no flock), None where another process holds it.
    The holder names itself, `command` ("train"), in a file in `out` for the one it refuses
    (_name_holder, folder_holder): a train refused by a sweep names the sweep, not another train.
    The lock goes with the process; forked processes (DataLoader workers) close their copy.
    The folders created here (`out` and its missing parents) and left empty (the command failed
    before writing) are removed, while still held: a process that opened `out` meanwhile finds it
    gone once it holds it, and holds the folder made again (it held a removed folder, and its first
    file there failed with "No such file or directory"). A process that finds `out` busy removes
    nothing: what was missing when it looked may be the holder's, made since and empty still."""
    fd, held, created = _opened_and_locked(out, out, os.O_RDONLY)
    named = None
    try:  # from here: a stop while it names the holder (Ctrl-C, a SIGTERM) still lets go of `out`
        _HELD.add(fd)
        named = _name_holder(out, command) if held else None
        yield fd if held is not False else None
    finally:
        if named is not None:
            with contextlib.suppress(OSError):
                (out / HOLDER_NAME).unlink()  # while still held, before remove_empty looks
            _HELD.discard(named)
            os.close(named)
        _HELD.discard(fd)
        if held is not False:
            remove_empty(created)
        os.close(fd)


def _name_holder(folder: Path, command: str) -> int | None:
    """Writes `command` into `folder`'s holder file, then flocks it: the descriptor that holds it, or
    None where the holder goes unnamed. A folder's flock is on the folder, where nothing can be
    written; and a holder file may be a killed run's, or held by a moco-fast before holders named
    themselves, which writes none: folder_holder trusts a holder file only while it is locked, and
    this process locks it only once its command is in it. Unnamed where the file cannot be written:
    another user's left there (its command is not this one's), a folder this user may not write in
    (the command says why when it writes there), a link (O_NOFOLLOW: not the file it names)."""
    path = folder / HOLDER_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError:
        return None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, command.encode())
        if _try_flock(fd, path):  # a folder_holder that looks at this instant: unnamed, as before
            _HELD.add(fd)
            return fd
    except OSError:
        pass
    with contextlib.suppress(OSError):
        path.unlink()
    os.close(fd)
    return None


def folder_holder(folder: Path) -> str | None:
    """The command that holds `folder` (hold_folder), as its holder file names it (_name_holder); None
    where the file is not locked (a killed run's, or none: a moco-fast before holders named
    themselves, a holder not at its naming yet) or cannot be read (another user's, not readable).
    The look takes a shared lock: the holder's exclusive one excludes it, another look's does not (an
    exclusive look would be taken for the holder by a second command refused at that instant,
    torchrun's ranks, which would read a killed run's file)."""
    try:
        fd = os.open(folder / HOLDER_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _holder(fd) if _try_flock(fd, folder / HOLDER_NAME, fcntl.LOCK_SH) is False else None
    finally:
        os.close(fd)  # a lock this look took goes with it


def _opened_and_locked(folder: Path, path: Path, flags: int) -> tuple[int, bool | None, list[Path]]:
    """(`path` opened in its made `folder` (open_in_made_folder), _try_flock's answer on it, the folders
    made for it: missing_folders). Where it locked a file or folder that its holder removed meanwhile
    (_still_there), the one there now is opened and locked instead: hold_folder's and hold_lock_file's
    loop, written once. An open that fails (a lock file this user may not read, a link) removes the
    folders it made (remove_empty: those that hold nothing) before its error goes up."""
    created = missing_folders(folder)
    try:
        while True:
            fd = open_in_made_folder(folder, path, flags)
            held = _try_flock(fd, path)
            if held is not True or _still_there(path, fd):
                return fd, held, created
            os.close(fd)  # the one its holder removed
    except OSError:
        remove_empty(created)
        raise


# the times a folder is made again where another command removed it before it was opened (below)
_MAKE_TRIES = 5


def open_in_made_folder(folder: Path, path: Path, flags: int) -> int:
    """os.open(`path`, `flags`) once `folder` (its folder, or `path` itself) is made, with its parents.
    Another command that made the same new folder (two --outs or DSTs in one new folder) and failed
    before writing removes it as its own (remove_empty) where it finds it empty: between this mkdir's
    steps, or between it and the open, that ended in a plain "No such file or directory". The folders
    are made again then, a few times; once this command's folder or lock file is in it, it is not
    empty and stays."""
    for _ in range(_MAKE_TRIES - 1):
        with contextlib.suppress(FileNotFoundError):  # a folder on the way, removed by that command
            folder.mkdir(parents=True, exist_ok=True)
            return os.open(path, flags, 0o666)
    folder.mkdir(parents=True, exist_ok=True)  # the last try: its error is the command's
    return os.open(path, flags, 0o666)


def _still_there(path: Path, fd: int) -> bool:
    """Whether `path` is still the file or folder opened as `fd` (its holder may have removed it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def missing_folders(path: Path) -> list[Path]:
    """What mkdir(parents=True) makes for `path`, the last made first: each leading part of `path` that
    does not exist, but one that ends in "..", which names a folder made before it or one that was
    there (a/../b makes a/ and b/; `path`'s parents, a/.. and a/, missed b's sibling a/)."""
    leading = (Path(*path.parts[: i + 1]) for i in range(len(path.parts)))
    return [p for p in reversed(list(leading)) if p.name != ".." and not p.exists()]


def remove_empty(made: list[Path]) -> None:
    """Removes the folders `made` (missing_folders, the last made first) that are empty: a command that
    failed before it wrote leaves no --out parents behind, and never removes a folder that was there
    before it. One that holds something stays, with the folders above it (rmdir fails there too), but
    not a sibling made on the way (a/ of a/../b)."""
    for folder in made:
        with contextlib.suppress(OSError):  # gone already, or not empty: it holds what was written
            folder.rmdir()


@contextlib.contextmanager
def hold_lock_file(lock: Path, command: str, busy: Callable[[str | None], str]) -> Iterator[None]:
    """An exclusive flock on the hidden file `lock` while the block runs; RunFolderBusy at once when
    another process holds it, its line busy(the holder's command). The holder writes its `command`
    ("lincls") into the file (_write_holder), and the process refused reads it there (_holder): a
    lincls refused by a sweep's classifier names the sweep, not another lincls. The file is made (with
    its folder) if missing and removed when the block ends; only a process killed while holding it
    leaves it, and a later one locks it again. A process that locked a file the holder then removed
    locks the new one. Opened read-only: a lock file another user left in a shared folder still locks.
    Never through a link (_refuse_a_link). The folders made for it and left empty (the command failed
    before writing) are removed."""
    try:
        fd, held, created = _opened_and_locked(lock.parent, lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW)
    except OSError as e:
        _refuse_a_link(lock, e)
        raise
    if held is False:
        holder = _holder(fd)
        os.close(fd)
        raise RunFolderBusy(busy(holder))
    _HELD.add(fd)
    try:
        _write_holder(lock, command)
        yield
    finally:
        _HELD.discard(fd)
        with contextlib.suppress(OSError):  # another user's, in a sticky folder: it stays, harmlessly
            lock.unlink(missing_ok=True)  # while still held
        os.close(fd)
        remove_empty(created)


def _refuse_a_link(lock: Path, e: OSError) -> None:
    """UserError where the lock's open failed (`e`) because `lock` is a link (ELOOP from O_NOFOLLOW):
    another user's, in a shared folder, would have this command lock, or create (a link that points
    nowhere), the file it names, wherever that is."""
    if e.errno == errno.ELOOP and lock.is_symlink():
        raise UserError(f"{lock} is a link, not a lock file: remove the link, then run again") from None


def _write_holder(lock: Path, command: str) -> None:
    """Writes `command` into the lock file this process holds, for the one it refuses (_holder). The
    lock itself stays on the read-only descriptor: a lock file another user left (killed while holding
    it) cannot be opened for writing, and keeps the command that user's run wrote, which a third
    process refused then names instead of this one's. Not through a link: one put at the lock's name
    after it was opened (hold_lock_file refuses one there before) would have the write empty the file
    it names."""
    with contextlib.suppress(OSError):  # a link (ELOOP): the holder goes unnamed
        fd = os.open(lock, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        try:
            os.write(fd, command.encode())
        finally:
            os.close(fd)


def _holder(fd: int) -> str | None:
    """The command that its holder wrote into the lock file open as `fd` (_write_holder); None where it
    names none: a lock from a moco-fast before holders wrote their command, or a holder not at its write
    yet."""
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return text if text.isascii() and text.isalpha() else None
