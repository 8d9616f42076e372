"""WebDataset shard sets: the folder contract, its `meta.json`, and DALI index files.

A shard set is a folder holding

    meta.json          {"format": "wds", "classes": [...], "num_images": N, "shards": ["shard-000000.tar", ...]}
    shard-000000.tar   members {key}.jpg (the encoded image) and {key}.cls (the label as an ASCII integer)
    shard-000000.idx   optional: DALI's index of the tar (made here, in a temporary folder, when missing)

`--data` pointing at a folder with `meta.json` means a shard set. Sample i of the set is the i-th
sample of the shards taken in the order `meta.json` lists them: that position is the `index` a loader
yields. This module needs no DALI, so the trainer and `moco-fast convert` can use it too.

Each shard and its index are checked when the set is opened (`shard_index`), because DALI's reader
trusts them: a wrong offset in an index fails its build with a C++ assert, a truncated tar fails a
batch mid-epoch, and an index left over from another tar hands it other samples' bytes (decoded as
garbage or skipped as corrupt). An index that does not match its tar is made again from the tar; a
tar that cannot be read, or whose samples are not {key}.jpg + {key}.cls, is a DataError naming it.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from moco_fast.data import DataError

META_NAME = "meta.json"
INDEX_VERSION = "v1.2"  # DALI's index format with member names (tools/wds2idx.py in DALI)
EXTENSIONS = ("jpg", "cls")  # the members of every sample, as the contract above says
TAR_BLOCK = 512  # a tar is 512-byte blocks: a member's header is the block before its data
REWRITE = "rewrite the set (moco-fast convert SRC DST --format wds) or take the shard out of meta.json"


@dataclass(frozen=True)
class WdsMeta:
    root: Path
    classes: list[str]
    num_images: int
    shards: list[str]  # file names relative to root, in sample order
    shard_sizes: list[int] | None = None  # samples per shard, as convert wrote them (None: not recorded)

    def shard_paths(self) -> list[Path]:
        return [self.root / s for s in self.shards]


def is_wds_root(data: str | Path | None) -> bool:
    """A shard set: its meta.json says "format": "wds" (an image folder may hold a meta.json of its
    own), or cannot be read beside .tar files (a damaged set, which read_meta then names)."""
    if data is None or not (Path(data) / META_NAME).is_file():
        return False
    try:
        meta = json.loads((Path(data) / META_NAME).read_text())
    except (OSError, ValueError):
        return any(Path(data).glob("*.tar"))
    return isinstance(meta, dict) and meta.get("format") == "wds"


def refuse_shard_set(data: str | Path | None, loader: str) -> None:
    """A folder loader given a shard set: say what reads it (its listing said "no class subfolders")."""
    if is_wds_root(data):
        raise DataError(
            f"{data} is a WebDataset shard set, which --loader dali reads; --loader {loader} reads image folders"
        )


def beton_file(data: str | Path | None) -> Path:
    """--loader ffcv's --data as a path, or one DataError saying what it is instead (a shard set, a
    folder, nothing) and how to make a .beton. Here, beside the shard-set test it needs, so that a
    check made before any loader is built (bench/throughput.py) needs no FFCV."""
    if data is None:
        raise DataError("--loader ffcv needs --data X.beton (make one with `moco-fast convert SRC X.beton`)")
    path = Path(data)
    if not path.is_file():
        if is_wds_root(path):  # convert's other output: "is a folder" said nothing of it
            raise DataError(
                f"--loader ffcv reads a .beton file, and --data {path} is a WebDataset shard set, which "
                "--loader dali reads (or make a .beton with `moco-fast convert SRC X.beton`)"
            )
        what = "not found" if not path.exists() else "a folder" if path.is_dir() else "not a file"
        raise DataError(
            f"--loader ffcv reads a .beton file, and --data {path} is {what} "
            "(make one with `moco-fast convert SRC X.beton`)"
        )
    return path


def read_meta(root: str | Path) -> WdsMeta:
    """Read and check `root/meta.json`; every problem is one DataError line."""
    root = Path(root)
    path = root / META_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != "wds":
        raise DataError(f'{path}: expected {{"format": "wds", ...}}')
    for key, kind, name in (("classes", list, "a list"), ("num_images", int, "an int"), ("shards", list, "a list")):
        if not isinstance(meta.get(key), kind):
            raise DataError(f"{path}: {key!r} must be {name}")
    if not meta["shards"] or meta["num_images"] < 1:
        raise DataError(f"{path}: no shards or no images")
    # a name that is no string was a TypeError at the first batch (root / 5); a shard listed twice had
    # its samples read twice an epoch without a word (its count matched a num_images edited to it)
    if not all(isinstance(s, str) and s for s in meta["shards"]):
        raise DataError(f"{path}: 'shards' must be a list of file names, got {meta['shards'][:5]}")
    if not meta["classes"]:
        raise DataError(f"{path}: 'classes' is empty: the labels of the shards need their class names")
    seen: dict[Path, str] = {}  # each shard's file: one listed by two names is read twice too
    for s in meta["shards"]:
        if (twin := seen.get(file := (root / s).resolve())) is not None:
            what = f"the shard {s} twice" if twin == s else f"{twin} and {s}, one file"
            raise DataError(f"{path} lists {what}: its samples would be read twice an epoch; list each shard once")
        seen[file] = s
    missing = [s for s in meta["shards"] if not (root / s).is_file()]
    if missing:
        raise DataError(f"{path} lists shards that are not there: {', '.join(missing[:5])}")
    sizes = meta.get("shard_sizes")
    if not (isinstance(sizes, list) and len(sizes) == len(meta["shards"]) and all(type(n) is int for n in sizes)):
        sizes = None  # a set from another writer: the shards are not checked against it
    shards = [str(s) for s in meta["shards"]]
    return WdsMeta(root, [str(c) for c in meta["classes"]], meta["num_images"], shards, sizes)


def split_name(name: str) -> tuple[str, str]:
    """'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg'): the key ends at the first dot of the base name
    (WebDataset's and DALI's rule)."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def index_lines(tar_path: Path) -> list[str]:
    """DALI index lines of one tar, one per sample: 'ext offset size name' per member, in tar order.

    Reads only the tar headers (tarfile seeks past the data). A file that is not an uncompressed tar
    (DALI reads no other), or one cut short, is a DataError naming it."""
    samples: list[list[str]] = []
    last_key = None
    try:
        with tarfile.open(tar_path, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                key, ext = split_name(m.name)
                if not key or key.endswith("/"):  # hidden files such as .DS_Store
                    continue
                if len(m.name.split()) != 1:
                    raise DataError(f"shard {tar_path}: {m.name!r} has white space, which DALI's index cannot hold")
                part = f"{ext} {m.offset_data} {m.size} {m.name}"
                if key != last_key:
                    samples.append([part])
                    last_key = key
                else:
                    samples[-1].append(part)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"shard {tar_path} is not a readable tar ({e}): {REWRITE}") from e
    if not samples:
        raise DataError(f"shard {tar_path}: no samples in this tar: {REWRITE}")
    return [" ".join(s) for s in samples]


def index_text(lines: list[str]) -> str:
    """A DALI index file: its header, then one line per sample."""
    return f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n"


def members(line: str) -> list[tuple[str, int, int, str]] | None:
    """One index line -> (ext, data offset, size, member name) per member; None when malformed."""
    parts = line.split()
    if not parts or len(parts) % 4:
        return None
    out = []
    for i in range(0, len(parts), 4):
        ext, offset, size, name = parts[i : i + 4]
        if not (offset.isdigit() and size.isdigit()):
            return None
        out.append((ext, int(offset), int(size), name))
    return out


def index_keys(lines: list[str]) -> list[str]:
    return [split_name(line.split(maxsplit=4)[3])[0] for line in lines]


def read_index(idx_path: Path) -> list[str] | None:
    """The sample lines of a DALI index file, or None when it is not a v1.2 index with one
    well-formed line per sample (then make a new one)."""
    try:
        lines = idx_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        return None
    if any(members(line) is None for line in lines[1:]):
        return None
    return lines[1:]


def index_mismatch(tar_path: Path, lines: list[str]) -> str | None:
    """Why `lines` (an index) do not describe the tar at `tar_path`, or None when they do.

    Every member is checked against the tar's size and block grid (what DALI asserts, in C++, when
    it builds its reader or reaches the member), which costs nothing; the tar headers of the first,
    middle and last samples are read (a few 512-byte reads per shard, where reading them all would
    cost as much as indexing the tar again), which tells an index left over from another tar."""
    if not lines:
        return "it lists no samples"
    size = tar_path.stat().st_size
    for line in lines:
        parts = members(line)
        key = split_name(parts[0][3])[0]
        for ext, offset, length, name in parts:
            if split_name(name) != (key, ext):
                return f"the line of sample {key} lists {name} as {ext!r}"
            if offset < TAR_BLOCK or offset % TAR_BLOCK:
                return f"{name} at offset {offset}, not at a {TAR_BLOCK}-byte tar block after a header"
            if offset + length > size:
                return f"{name} at {offset}-{offset + length} lies past the end of the tar ({size} bytes)"
    n = len(lines)
    try:
        with open(tar_path, "rb") as f:
            for i in sorted({0, n // 2, n - 1}):
                for _, offset, length, name in members(lines[i]):
                    f.seek(offset - TAR_BLOCK)
                    try:
                        h = tarfile.TarInfo.frombuf(f.read(TAR_BLOCK), "utf-8", "surrogateescape")
                    except tarfile.HeaderError:
                        return f"no tar header before {name} (offset {offset})"
                    # a name of 100 characters or more is held elsewhere (a PAX or GNU record): size only
                    if (h.name != name and len(name) < 100) or h.size != length:
                        return f"the tar holds {h.name} ({h.size} bytes) where the index puts {name} ({length} bytes)"
    except OSError as e:  # indexing the tar again will name it
        return f"the tar cannot be read ({e})"
    return None


def check_samples(tar_path: Path, lines: list[str]) -> None:
    """Every sample of the shard holds the members of EXTENSIONS (DALI's reader would stop the run
    at the first that does not, as an "Underful sample"); else a DataError naming the shard."""
    lacking = []
    for line in lines:
        parts = members(line)
        if not set(EXTENSIONS) <= {ext for ext, *_ in parts}:
            lacking.append(parts)
    if lacking:
        first = lacking[0]
        key, held = split_name(first[0][3])[0], ", ".join(name for *_, name in first)
        if len(lacking) == 1 and first == members(lines[-1]):
            # tarfile reads a tar that ends between two members as a whole one: a copy interrupted
            # inside the last sample read as a set of other members
            raise DataError(
                f"shard {tar_path} is cut short inside its last sample (sample {key} holds only {held}; "
                f"an interrupted copy?): {REWRITE}"
            )
        need = " + ".join(f"{{key}}.{e}" for e in EXTENSIONS)
        raise DataError(
            f"shard {tar_path}: {len(lacking)} of its {len(lines)} samples are not the {need} of a shard set "
            f"(sample {key} holds {held}): {REWRITE}"
        )


def shard_index(tar_path: Path, scratch: Path) -> tuple[Path, list[str], str | None]:
    """(the index DALI is to read `tar_path` with, its sample keys, why the shard's own index was not
    used or None).

    The shard's own index (`shard.idx` beside `shard.tar`) is used when it matches the tar
    (`index_mismatch`); else the tar is indexed again into `scratch`. A tar that is empty or cannot be
    read, or whose samples are not those of the contract, is a DataError naming it."""
    try:
        size = tar_path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read shard {tar_path}: {e}") from e
    if size == 0:
        raise DataError(f"shard {tar_path} is empty (0 bytes): {REWRITE}")
    own = tar_path.with_suffix(".idx")
    why = None
    if own.is_file():
        lines = read_index(own)
        why = "not a v1.2 index with one line per sample" if lines is None else index_mismatch(tar_path, lines)
        if why is None:
            check_samples(tar_path, lines)
            return own, index_keys(lines), None
    lines = index_lines(tar_path)  # a tar cut short, or not a tar: a DataError
    check_samples(tar_path, lines)
    scratch.write_text(index_text(lines))
    return scratch, index_keys(lines), why and f"{own}: {why}"
