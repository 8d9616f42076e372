"""What `moco-fast convert` may write at DST, checked before any image is read.

`--force` replaces only an earlier output of convert of the same kind: an FFCV .beton that its header
shows to be one (version, the `image` and `label` fields that convert writes) with convert's sidecar
beside it (and its file list, where there is one), or a shard-set folder whose meta.json says
`"format": "wds"` and that holds nothing but that set's files. Never SRC, a folder above it or
anything inside it, and never another file: a mistyped DST (notes.txt, a source image) used to be
replaced by 16 MB of .beton. An output is not written where a scan of SRC reads (its train/,
val/, test/; scanned_folder) either: every later scan would meet it there. The checks go through
`commands.check_output` with a `replaces` callback, as every other command's outputs do.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import struct
from pathlib import Path
from typing import NamedTuple

from moco_fast.config import ConfigError, read_json_object
from moco_fast.data import SPLIT_NAMES, DataError
from moco_fast.loaders.wds import META_NAME

log = logging.getLogger("moco_fast")

# FFCV's file layout (ffcv/types.py), read here without importing FFCV (seconds, with Numba): a
# header (HeaderType), then one FieldDescType per field, ..., and the allocation table at the end.
BETON_HEADER = struct.Struct("<HHIQQ")  # version, num_fields, page_size, num_samples, alloc_table_ptr
BETON_VERSION = 2  # ffcv.types.CURRENT_VERSION: what FFCV's Reader accepts
FIELD_DESC_SIZE = 1 + 16 + 1024  # type_id, name (NUL-padded), arguments
ALLOC_ENTRY_SIZE = 3 * 8  # sample_id, ptr, size
CONVERT_FIELDS = ((2, b"image"), (1, b"label"))  # (FFCV type_id, name): RGBImageField, IntField
# One image's record in the table after the field descriptions (ffcv.types.get_metadata_type of the
# two fields, aligned): the image's mode, width, height and data pointer (13 bytes, padded to 16),
# then the label (int64). tests/test_ffcv_errors.py checks it against FFCV's.
SAMPLE_RECORD_SIZE = 24


def sidecar_path(beton: Path) -> Path:
    """The JSON beside a .beton (class names, counts, what was skipped), read by the FFCV loader."""
    return beton.with_name(beton.name + ".json")


# The first line of the file list beside a .beton (names_path): what tells convert's list from a
# user's file of that name, as "format" does in the json.
NAMES_HEADER = "# moco-fast convert: the source file of each image of the .beton, in its order, relative to "
# Ends the header line after SRC's folder, then the beton_fingerprint of the .beton the list names.
NAMES_FINGERPRINT = "\t# of the .beton "


def names_path(beton: Path) -> Path:
    """The file list beside a .beton: NAMES_HEADER + SRC's split folder + NAMES_FINGERPRINT + the
    .beton's fingerprint on the first line, then one source file a line (relative to that folder) in
    the .beton's order, read by the FFCV loader to name an image it skips. Plain text: ImageNet's is
    ~40 MB, where json would be read whole at every start."""
    return beton.with_name(beton.name + ".files.txt")


def names_fingerprint(first_line: str) -> str | None:
    """The beton_fingerprint that a file list's header line records; None in an older convert's list,
    which records none (it is then checked by its count of names only)."""
    _, tag, recorded = first_line.rpartition(NAMES_FINGERPRINT)
    return recorded.strip() if tag else None


def stale(beton: Path) -> str:
    """Why a reader ignores a sidecar or file list that records another .beton's fingerprint."""
    return (
        f"it describes another .beton than {beton.name} (a convert stopped while replacing it): run "
        f"`moco-fast convert` to {beton} again (with --force) to make the set whole"
    )


def beton_samples(path: Path) -> int | str:
    """The number of samples in the .beton at `path`, from its header; or, when the header shows that
    it is no .beton that convert writes (FFCV's Reader would refuse it, or its fields differ), what
    it is instead. Reads the first 2 KiB only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(BETON_HEADER.size + len(CONVERT_FIELDS) * FIELD_DESC_SIZE)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if len(head) < BETON_HEADER.size:
        return "it has no FFCV header" if head else "it is empty"
    version, num_fields, page_size, samples, alloc_table = BETON_HEADER.unpack_from(head)
    if version != BETON_VERSION or page_size == 0 or page_size & (page_size - 1):
        return "it has no FFCV header"
    if len(head) < BETON_HEADER.size + len(CONVERT_FIELDS) * FIELD_DESC_SIZE:
        return "it is an FFCV file cut short or damaged"
    starts = range(BETON_HEADER.size, len(head), FIELD_DESC_SIZE)
    fields = tuple((head[at], head[at + 1 : at + 17].rstrip(b"\0")) for at in starts)
    if num_fields != len(CONVERT_FIELDS) or fields != CONVERT_FIELDS:
        return "it is an FFCV file without convert's fields (image, label)"
    if samples < 1 or not BETON_HEADER.size < alloc_table <= size or (size - alloc_table) % ALLOC_ENTRY_SIZE:
        return "it is an FFCV file cut short or damaged"
    return samples


def beton_fingerprint(path: Path) -> str | None:
    """What identifies a .beton that convert wrote, recorded in its sidecar (`"beton_fingerprint"`)
    and its file list (after NAMES_FINGERPRINT): a hash of its tables (header, field descriptions,
    each image's record with its size, label and where its bytes lie, and the allocation table), not
    of the images' bytes (ImageNet: ~60 MB read, not 60 GB). A sidecar or list whose fingerprint
    differs describes another .beton: the set of a convert stopped between publishing its files.
    None when the header is no convert's .beton (beton_samples), or the file cannot be read.

    Kept for the file's version (device, inode, size, modification and change times): a train run
    hashes its .beton once, at the loader's start, and its last line (monitor.converted_from) uses
    that. A file changed or replaced since (a convert --force renamed a new .beton there) is a new
    version and hashed again: its sidecar must describe the .beton there now. (A rewrite in place
    that keeps all five, within one tick of the file system's clock, would not be told apart;
    convert never writes a .beton in place.)"""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _tables_hash(str(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@functools.lru_cache(maxsize=16)
def _tables_hash(path: str, version: tuple[int, ...]) -> str | None:
    """beton_fingerprint of the file at `path` in its `version` (a key of the cache only)."""
    samples = beton_samples(Path(path))
    if isinstance(samples, str):
        return None
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        alloc_table = BETON_HEADER.unpack(fh.read(BETON_HEADER.size))[4]
        fh.seek(0)
        left = BETON_HEADER.size + len(CONVERT_FIELDS) * FIELD_DESC_SIZE + samples * SAMPLE_RECORD_SIZE
        while left > 0 and (chunk := fh.read(min(left, 8 << 20))):
            digest.update(chunk)
            left -= len(chunk)
        fh.seek(alloc_table)
        while chunk := fh.read(8 << 20):  # the allocation table, to the end of the file
            digest.update(chunk)
    return digest.hexdigest()


def unread_why(path: Path) -> str:
    """Why read_json_object found no JSON object in the file at `path`: the OSError's reason where it
    cannot be opened or read (Permission denied: the user's fix differs from a damaged file's), else
    that its text is none."""
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    return "it cannot be read as the JSON object that convert writes"


class SidecarRead(NamedTuple):
    """The sidecar of a .beton, read once (read_sidecar): `meta`, its JSON object (None: it is missing,
    unreadable, or no JSON object), and `ignored`, why a reader ignores the sidecar that is there
    (unreadable, no JSON object, or stale), None where it describes this .beton or is missing."""

    meta: dict | None
    ignored: str | None

    @property
    def stale(self) -> bool:
        """A JSON object that records another .beton's fingerprint (a convert stopped between
        publishing the two)."""
        return self.meta is not None and self.ignored is not None


def refuse_unless_regular(path: Path, beton: Path, what: str) -> None:
    """DataError where `path`, the `what` beside `beton` that a reader opens (its sidecar, its file
    list), is there but no regular file: a named pipe's read waits for a writer (train and convert
    hung), a device's such as /dev/zero never ends. A .beton that is none is refused the same way
    (loaders.wds.beton_file, check_destination)."""
    if path.exists() and not path.is_file():
        raise DataError(
            f"{path}, the {what} of {beton.name}, is not a regular file (a device, FIFO or socket): delete it"
        )


def read_sidecar(beton: Path, fingerprint: str | None = None) -> SidecarRead:
    """convert's sidecar of `beton` (sidecar_path) and whether it describes this .beton: not where it
    is missing, unreadable, no JSON object, or stale (it records another .beton's beton_fingerprint).
    `fingerprint`: this .beton's, where the caller has it; else it is hashed here, and only where the
    sidecar records one (an older convert's does not). One that is no regular file is a DataError
    (refuse_unless_regular)."""
    side = sidecar_path(beton)
    refuse_unless_regular(side, beton, "sidecar")
    meta = read_json_object(side)
    if meta is None:
        return SidecarRead(None, unread_why(side) if side.is_file() else None)  # (none there: nothing to say)
    recorded = meta.get("beton_fingerprint")
    if recorded is not None and recorded != (fingerprint or beton_fingerprint(beton)):
        return SidecarRead(meta, stale(beton))
    return SidecarRead(meta, None)


def sidecar_of(beton: Path, fingerprint: str | None = None, warn: bool = False) -> dict | None:
    """convert's sidecar of `beton` where it describes this .beton (read_sidecar), else None. `warn`:
    a sidecar that is there but ignored is named in one line with why."""
    read = read_sidecar(beton, fingerprint)
    if read.ignored is not None:
        if warn:
            log.warning("ignoring %s: %s", sidecar_path(beton), read.ignored)
        return None
    return read.meta


def beton_of_convert(p: Path) -> str | None:
    """check_output's `replaces` for DST with --format ffcv: a .beton is replaced when it is convert's,
    its header and its sidecar (`"format": "ffcv"`, as many images as the header's samples) both say
    so. Anything else is refused: another file (a source image, notes.txt), and a .beton of another
    tool (ffcv-imagenet's has the same fields; only the sidecar tells them apart). A sidecar of
    convert that read_sidecar finds stale is one that a convert stopped before replacing it (the
    .beton beside it is that convert's): replaced as well, or the set could never be remade; but
    only without a file list, which that convert removed first: beside a list, the .beton was put
    there by something else (another tool's, written over convert's)."""
    samples = beton_samples(p)
    if isinstance(samples, str):
        return f"is not a .beton that convert wrote ({samples})"
    read = read_sidecar(p)
    if read.stale and read.meta.get("format") == "ffcv":
        names = names_path(p)
        if names.exists() or names.is_symlink():
            return (
                f"is a .beton that {sidecar_path(p).name} and {names.name} do not describe (they record another "
                ".beton's fingerprint: another tool's .beton written in its place?)"
            )
        return None
    meta = None if read.ignored is not None else read.meta
    if meta is None or meta.get("format") != "ffcv" or meta.get("num_images") != samples:
        return f"is a .beton without the {sidecar_path(p).name} of convert that describes it (another tool's?)"
    return None


def sidecar_of_convert(p: Path) -> str | None:
    """check_output's `replaces` for the sidecar X.beton.json where DST X.beton is new: an earlier
    sidecar of convert (`"format": "ffcv"`, left when its .beton was deleted) is replaced, another
    file of that name (the user's own) is not."""
    meta = read_json_object(p)
    if meta is not None and meta.get("format") == "ffcv" and isinstance(meta.get("classes"), list):
        return None
    return 'is not a class list that convert wrote (no "format": "ffcv")'


def names_of_convert(p: Path) -> str | None:
    """check_output's `replaces` for the file list X.beton.files.txt: convert's (NAMES_HEADER first)
    is replaced with its .beton or as an earlier one whose .beton is gone; a user's file is not."""
    try:
        with open(p, "rb") as fh:
            first = fh.readline(len(NAMES_HEADER) + 1)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if first.startswith(NAMES_HEADER.encode()):
        return None
    return "is not a file list that convert wrote (its first line is not convert's)"


def empty_folder(p: Path) -> bool:
    """A folder (not a link to one) that holds nothing: a shard set's DST made beforehand (`mkdir -p`),
    which convert writes as a new one (the folder of the set is renamed over it)."""
    if not p.is_dir() or p.is_symlink():
        return False
    with os.scandir(p) as entries:  # closed here, not left to the collector (a ResourceWarning)
        return next(entries, None) is None


def shard_set_of_convert(p: Path) -> str | None:
    """check_output's `replaces` for DST with --format wds: a folder is replaced when its meta.json is
    a shard set's (`"format": "wds"`) and it holds that set's files only (meta.json, the shards it
    lists, their DALI indexes); a file put there since, and any other folder, is not."""
    meta = read_json_object(p / META_NAME)
    shards = meta.get("shards") if meta is not None and meta.get("format") == "wds" else None
    if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
        return f'is not a shard set written by convert (no {META_NAME} with "format": "wds")'
    ours = {META_NAME, *shards, *(str(Path(s).with_suffix(".idx")) for s in shards)}
    others = sorted(name for name in os.listdir(p) if name not in ours)
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        return f"holds files that are not its shard set's ({', '.join(others[:3])}{more})"
    return None


def scanned_folder(src: Path, where: Path) -> Path | None:
    """The folder of SRC that a scan of it reads (data.list_images: class folders and everything in
    them, files beside them) and that holds `where`, else None. A root with train/: its split folders,
    val/ and test/ too where they are not there yet (made for DST, one would become the eval split);
    a root without: SRC itself (a train/ made there would make it such a root). Dot-names are never
    read, nor what is beside train/ in a root (an earlier output there is replaced as anywhere)."""
    if src not in where.parents:
        return None
    parts = where.relative_to(src).parts
    if (src / "train").is_dir():
        if parts[0] not in SPLIT_NAMES:
            return None
        folder, parts = src / parts[0], parts[1:]
    else:
        folder = src
    return None if any(part.startswith(".") for part in parts) else folder


def check_destination(src: Path, dst: Path, fmt: str, force: bool) -> None:
    """ConfigError before any image is read when DST cannot be written or replaced: DST is SRC or a
    folder above it (--force would delete the images), an existing DST inside SRC that is no earlier
    output (a source image, a class folder), a DST (or the sidecar or file list of a DST .beton)
    that --force would replace but is no earlier output of convert of this format (see the
    `replaces` callbacks above), a DST in a folder that a scan of SRC reads (scanned_folder), or a
    folder that does not take new files. Refused with or without --force; an earlier output without
    --force is a FileExistsError."""
    from moco_fast.commands import check_output, refuse_dead_link

    refuse_dead_link(dst, "DST", missing_target=False)  # a link to nothing is replaced with --force, as a file
    s, d = src.resolve(), dst.resolve()
    if d == s or d in s.parents:
        raise ConfigError(f"DST {dst} holds the images it would replace (SRC {src}): choose another DST")
    wds = fmt == "wds"
    exists = (dst.exists() or dst.is_symlink()) and not (wds and empty_folder(dst))
    where = dst.parent.resolve() / dst.name  # a link itself, where its target is d
    ours = shard_set_of_convert if wds else beton_of_convert
    kind = dst.is_dir() if wds else dst.is_file()  # only a file's header is read: a named pipe's would hang
    if exists and (s in d.parents or s in where.parents) and not (kind and ours(dst) is None):
        # (an earlier output beside train/, `convert data data/train.beton`, is replaced as anywhere)
        raise ConfigError(
            f"DST {dst} is inside SRC {src}: convert never replaces a file or folder there; give a path outside SRC"
        )
    if (scanned := scanned_folder(s, where)) is not None:
        # every later scan of SRC would meet the output there: a stray file named at each run, a class
        # folder without images, or a val/ made beside train/ as the eval split
        shown = src / scanned.relative_to(s)
        what = f"would be SRC's split folder {shown}" if scanned == where else f"is inside {shown}"
        away = "outside SRC" if scanned == s else "beside train/ in SRC or outside SRC"
        raise ConfigError(
            f"DST {dst} {what}, which every scan of SRC {src} reads (convert, train, knn): give a path {away}"
        )
    root = s.parent
    if s.name in SPLIT_NAMES and (root / "train").is_dir() and (scanned := scanned_folder(root, where)) is not None:
        # SRC is a split of a root (`convert data/train data/val/x.beton`): train and knn of that
        # root read its val/ and test/ as well, and would meet the output there
        shown = src.parent / scanned.relative_to(root)
        what = f"would be the split folder {shown}" if scanned == where else f"is inside {shown}"
        raise ConfigError(
            f"DST {dst} {what}, which every scan of {src.parent} (SRC's root) reads (convert, train, knn): "
            f"give a path beside {src.name}/ or outside {src.parent}"
        )
    check_output(dst, "DST", replaces=ours if exists else None, folder=wds)
    if exists and not force:
        raise FileExistsError(f"{dst} exists: pass --force to replace it")
    side, names = sidecar_path(dst), names_path(dst)
    if not wds and not exists and (side.exists() or side.is_symlink()):  # with DST, checked by beton_of_convert
        check_output(side, "DST's sidecar", replaces=sidecar_of_convert)
        if not force:
            raise FileExistsError(f"{side} exists (the sidecar of DST {dst}): pass --force to replace it")
    if not wds and (names.exists() or names.is_symlink()):  # a .beton of an older convert has none
        check_output(names, "DST's file list", replaces=names_of_convert)
        if not force:
            raise FileExistsError(f"{names} exists (the file list of DST {dst}): pass --force to replace it")
