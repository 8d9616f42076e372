"""Checkpoints that continue a run exactly: written atomically, holding every piece of state."""

from __future__ import annotations

import glob
import logging
import os
import random
import tarfile
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from moco_fast.config import ConfigError, TrainConfig, from_dict
from moco_fast.data import DataError
from moco_fast.durable import fsync_folder_written_in, fsync_open_file

log = logging.getLogger("moco_fast")

CHECKPOINT_NAME = "checkpoint.pt"
# a file name's bytes at most (Linux's NAME_MAX; macOS's too)
NAME_MAX = 255


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only (one per rank)
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    # numpy's global generator takes 0..2**32-1 alone, and its callers add the rank (and the epoch) to
    # --seed, which may be MAX_SEED: rank 1 of `--seed 4294967295` raised numpy's ValueError traceback
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    # The states must be CPU byte tensors, wherever the checkpoint was loaded to.
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints before 2026-11-28 held every device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.cpu())


def file_stamp(path: str | Path) -> list[Any] | None:
    """What tells a checkpoint's content from a checkpoint trained further since (None when there is
    none): the id each of train's saves writes (["save_id", hex]: a copy, `cp -r` or rsync, keeps
    it), or, in a checkpoint without one, the file's [mtime in ns, size]. Reads the file mapped
    (its tensors are not read)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a checkpoint (yet): the file's own stamp
        state = None
    return stamp_of(state, st)


def stamp_of(state: Any, st: os.stat_result) -> list[Any]:
    """file_stamp of a checkpoint already read (`state`), the file's stat taken before reading it."""
    save_id = state.get("save_id") if isinstance(state, dict) else None
    return ["save_id", save_id] if isinstance(save_id, str) else [st.st_mtime_ns, st.st_size]


def new_save_id() -> str:
    """The `save_id` of a checkpoint save (file_stamp)."""
    return uuid.uuid4().hex


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """write(fh) into a temporary file in the same folder (`.NAME.HOST-PID.XXXXXXXX.tmp`: its writer
    named, remove_ended_writers_temporaries; NAME cut where the whole would pass NAME_MAX, temp_prefix),
    locked from before its first byte until after the rename (folder_locks.lock_temporary), then rename,
    then fsync the folder: a crash never leaves a half-written file under the final name (checkpoints,
    exports, result JSON), and a power loss after the return does not bring the old file back.
    An error before the rename (write's, a full disk met by the file's fsync: a file system that
    cannot fsync at all is skipped, durable.fsync_open_file) or a stop removes the temporary file, the
    old file left in place; one that names no file is raised naming `path`. An error of the folder's
    fsync after the rename (an EIO; durable.fsync_folder skips a folder that cannot be opened or
    fsynced at all) is raised too, naming the folder and saying that the file was written, for it is
    in place by then: the caller learns that a power loss may still bring the old file back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _locked_temporary(path)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would follow the umask
        with os.fdopen(fd, "wb", closefd=False) as fh:  # fd, and its lock, kept until after the rename
            write(fh)
            fh.flush()
            fsync_open_file(fh.fileno(), path)  # skipped where the file system cannot, as durable's others
        os.replace(tmp, path)
        fsync_folder_written_in(path)
    except BaseException as e:
        from moco_fast.cli import interruption, os_error_behind

        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = None if interruption(e) else os_error_behind(e)  # behind it: torch.save's "unexpected pos"
        if cause is not None and not cause.filename:  # a full disk from a write or fsync: name the file
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        raise
    finally:
        os.close(fd)


def _locked_temporary(path: Path) -> tuple[int, str]:
    """mkstemp's (descriptor, name) of atomic_write's temporary file of `path`, locked
    (folder_locks.locked_temporary); made again where a remover in another PID namespace, which took its
    writer for ended, removed it before it was locked."""
    from moco_fast.folder_locks import locked_temporary, owner_name

    def made() -> tuple[int, str]:
        try:
            return tempfile.mkstemp(prefix=f"{temp_prefix(path)}{owner_name()}.", suffix=".tmp", dir=path.parent)
        except OSError as e:  # a folder that may not be written: name the file, not the temporary one
            raise OSError(e.errno, e.strerror, str(path)) from None

    return locked_temporary(made, lambda tmp: Path(tmp).unlink(missing_ok=True))


def temp_prefix(path: Path) -> str:
    """`.NAME.`, which atomic_write's temporary files of `path` start with: NAME cut (whole characters)
    so that `.NAME.HOST-PID.XXXXXXXX.tmp` (mkstemp's 8 random characters) fits NAME_MAX for any
    owner_name. A long name took a temporary name past it (ENAMETOOLONG) once HOST-PID was added to it."""
    from moco_fast.folder_locks import OWNER_NAME_MAX

    room = NAME_MAX - len(".." + "." + "XXXXXXXX" + ".tmp") - OWNER_NAME_MAX
    name = path.name
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return f".{name}."


def temporaries_of(path: Path) -> list[Path]:
    """The temporary files that atomic_write(path) makes, whoever their writer (a long NAME cut as
    temp_prefix cuts it): what a remover holding `path`'s folder removes, and
    remove_ended_writers_temporaries looks at."""
    return sorted(path.parent.glob(glob.escape(temp_prefix(path)) + "*.tmp"))


def remove_ended_writers_temporaries(path: str | Path) -> None:
    """The temporary files of atomic_write(path) whose writer, a process of this machine, has ended (a
    kill, a power loss): by its HOST-PID (folder_locks.ended_here) and by its lock, which a live writer
    holds (folder_locks.free_to_remove: one in another PID namespace of this machine, whose PID this
    process cannot see). Those of a writer still running, or of another machine (flock across machines
    is not to be trusted), are left alone, so that a command need not hold `path` to call it (export).
    One that may not be removed (another user's, in a sticky folder) is a warning: the write goes on, as
    convert's tidy does."""
    from moco_fast.folder_locks import ended_here, free_to_remove, owner_of

    path = Path(path)
    prefix = temp_prefix(path)
    for tmp in temporaries_of(path):
        if not ended_here(owner_of(tmp.name, prefix, ".tmp", mktemp=True)):  # .NAME.HOST-PID.XXXXXXXX.tmp
            continue
        with free_to_remove(tmp) as free:
            if not free:
                continue
            log.info("removing %s, left by a write that was stopped", tmp)
            try:
                tmp.unlink(missing_ok=True)  # while locked
            except OSError as e:
                log.warning("could not remove %s, left by a write that was stopped: %s", tmp, e)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text through `atomic_write` (result JSON, tables, configs)."""
    data = text.encode()
    atomic_write(path, lambda fh: fh.write(data))


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save through `atomic_write`."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's dict, or a one-line DataError. `mmap`: its tensors are mapped, not read (a
    look at its settings costs no read of a finetune state's hundreds of MB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:
        why = not_a_checkpoint(path)
        bad = None if why else damaged_record(path)
        if bad is not None:
            raise Damaged(path, bad) from e
        raise DataError(
            f"{path} is not a moco-fast checkpoint: {why}" if why else f"cannot read checkpoint {path}: {e}"
        ) from e
    if not isinstance(state, dict):
        raise DataError(f"{path} is not a checkpoint (it holds a {type(state).__name__}, not a dict)")
    bad = None if mmap else damaged_record(path)
    if bad is not None:
        raise Damaged(path, bad)
    return state


class Damaged(DataError):
    """A checkpoint whose record `record` fails its checksum; `fix`: how to go on, the line's end (a
    classifier's state says its own: delete it to start over)."""

    def __init__(self, path: Path, record: str, fix: str = "use another copy of it, or start over") -> None:
        self.path, self.record = path, record
        super().__init__(f"{path} is damaged: its record {record} fails its checksum (a disk or copy fault?); {fix}")


def damaged_record(path: Path) -> str | None:
    """The first record of a checkpoint (a zip: torch.save's format) whose CRC-32 does not match its
    bytes, or None. torch.load does not check them: a flipped block loaded as garbage weights (a
    resumed run then "diverged"). A pass over the file, just read, so from the page cache. Records
    saved without a checksum (CRC 0) are not checked."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:  # saved without checksums (torch's compute_crc32 off)
                    continue
                try:
                    with z.open(info) as fh:
                        while fh.read(1 << 24):  # zipfile checks the CRC-32 at the record's end
                            pass
                except zipfile.BadZipFile:
                    return info.filename
    except Exception:  # not a zip, or one zipfile cannot open (torch.load or not_a_checkpoint says so)
        return None
    return None


# torch.save's legacy (non-zip) format: a pickle whose first object is this number (a LONG1)
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + 0x1950A86A20F9469CFC6C.to_bytes(10, "little")


# the files of torch.save's legacy tar format (torch.load's legacy_load); a tar without them, such as a
# WebDataset shard, ended as "cannot read checkpoint shard.tar: "filename 'storages' not found""
_LEGACY_TORCH_TAR = frozenset({"sys_info", "pickle", "tensors", "storages"})


def _first_tar_member(path: Path) -> str | None:
    """The name of a tar's first file (one header read), or None when there is none or it cannot be read."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            member = tar.next()
    except (tarfile.TarError, OSError):
        return None
    return member.name if member is not None else None


def not_a_checkpoint(path: Path) -> str | None:
    """What a file is when its first bytes show that torch.load cannot read it as a checkpoint (JSON,
    other text, a plain pickle such as a detectron2 export, an empty file, a zip without torch's
    data.pkl, a tar without torch's legacy files, any other binary file); None when it may be one
    (torch.load decides: also its legacy tar format and, by the name, safetensors). Cheap: the
    whole file is never read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if not head:
        return "it is empty"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except Exception:  # BadZipFile, OSError; a damaged directory: UnicodeDecodeError, ValueError...
            return "it is a zip file (torch's format) that cannot be opened: cut short or damaged?"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return None
        return "it is a zip file without the data.pkl of torch.save"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # a pickle's PROTO opcode
        if _LEGACY_TORCH_MAGIC in head[:24]:  # after PROTO (and FRAME from protocol 4 on)
            return None
        return "it is a pickle, not a torch checkpoint (a detectron2 .pkl export?)"
    if b"\0" not in head and _is_text(head):
        if head.lstrip()[:1] in (b"{", b"["):
            return "it holds JSON text (a result file such as lincls.json?)"
        return "it is a text file"
    if head[257:262] == b"ustar":  # a tar: torch.load's legacy format, or convert's WebDataset shard
        first = _first_tar_member(path)
        if first is None or first in _LEGACY_TORCH_TAR:  # one tarfile cannot read: torch.load says why
            return None
        return "it is a tar archive, not torch's legacy format (a WebDataset shard?)"
    if path.suffix == ".safetensors":  # torch.load reads it by the name
        return None
    # torch.load's own line for it was "invalid load key, '\xff'."
    return "it is neither torch.save's zip nor a pickle (an image, a compressed file?)"


def _is_text(head: bytes) -> bool:
    """UTF-8 (up to a character cut at the end of `head`) without control characters but whitespace."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            return False
        text = head[: e.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def load_weights(module: torch.nn.Module, weights: dict[str, Any], path: str | Path) -> None:
    """module.load_state_dict, with a one-line error when the checkpoint does not fit the model."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).splitlines()[0].rstrip(":. ")
        raise DataError(f"{path}: the saved weights do not fit the model its config describes ({first})") from None


def find_resume(resume: str | None, out: str | Path) -> Path | None:
    """`--resume` with no path means the last checkpoint in `out`; None when there is none."""
    if resume is None:
        return None
    if resume == "auto":
        p = Path(out) / CHECKPOINT_NAME
        return p if p.is_file() else None
    p = Path(resume)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {p}")
    return p


def saved_config(state: dict[str, Any], path: str | Path) -> TrainConfig:
    """The TrainConfig a training checkpoint records (or foreign.as_training_state's), or a one-line
    DataError naming the file: a value of another type in it (config.from_dict's TypeError) ended in
    a traceback in each command that reads one (knn, lincls, finetune, export, train --resume)."""
    try:
        return from_dict(state["config"])
    except TypeError as e:
        raise DataError(f"{path}: its saved config cannot be read ({e})") from None


def read_config(path: str | Path, arch: str | None = None) -> TrainConfig:
    """The TrainConfig of a checkpoint (a foreign one's as foreign.as_training_state reads it; `arch`:
    --arch), for the checks made before a command builds its model (finetune's --arch and --stem, a
    classifier's default --image-size). Its tensors are mapped, not read: the command reads the
    file's bytes once, where it builds the model (finetune read a ResNet-50 checkpoint with its queue
    and optimizer state, hundreds of MB, twice). Errors as `load`'s and saved_config's."""
    from moco_fast.foreign import as_training_state

    # torch's legacy (non-zip) format cannot be mapped ("mmap can only be used with files saved with
    # ..."): such a file, an older torchvision download, is read. is_zipfile opens the file: a named
    # pipe's open waits for a writer, so only a regular file is looked at (load refuses the others)
    state = load(path, map_location="cpu", mmap=Path(path).is_file() and zipfile.is_zipfile(path))
    return saved_config(as_training_state(state, path, arch, say=False), path)


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    state: dict[str, Any] | None = None,
    arch: str | None = None,
):
    """(MoCo model in eval mode, TrainConfig) from a training checkpoint, an official MoCo checkpoint
    or a torchvision ResNet state dict (foreign.as_training_state; `arch`: --arch, which must match
    the checkpoint's). `state`: the one read already from `path` (converted or not). A backbone
    without a MoCo head has an Identity head (foreign.has_head)."""
    from moco_fast.foreign import HEADLESS, as_training_state
    from moco_fast.model import MoCo

    if state is None:
        state = load(path, map_location="cpu")
    state = as_training_state(state, path, arch)
    cfg = saved_config(state, path)
    if arch is not None and arch != cfg.model.arch:
        raise ConfigError(f"--arch {arch} contradicts the checkpoint, a {cfg.model.arch} (leave --arch out)")
    model = MoCo(cfg.model, cfg.moco, cfg.data.aug.image_size, num_images=state.get("num_images", 0))
    if state.get(HEADLESS):
        model.encoder_q.head = torch.nn.Identity()
    load_weights(model, state["model"], path)
    return model.to(device).eval(), cfg
