"""WebDataset shard sets: the folder contract, its `meta.json`, and DALI index files.

A shard set is a folder holding

    meta.json          {"format": "wds", "classes": [...], "num_images": N, "shards": ["shard-000000.tar", ...]}
    shard-000000.tar   members {key}.jpg (the encoded image) and {key}.cls (the label as an ASCII integer)
    shard-000000.idx   optional: DALI's index of the tar (made here, in a temporary folder, when missing)

`--data` pointing at a folder with `meta.json` means a shard set. Sample i of the set is the i-th
sample of the shards taken in the order `meta.json` lists them: that position is the `index` a loader
yields. This module needs no DALI, so the trainer and `moco-fast convert` can use it too.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from moco_fast.data import DataError

META_NAME = "meta.json"
INDEX_VERSION = "v1.2"  # DALI's index format with member names (tools/wds2idx.py in DALI)


@dataclass(frozen=True)
class WdsMeta:
    root: Path
    classes: list[str]
    num_images: int
    shards: list[str]  # file names relative to root, in sample order

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
    for key, kind in (("classes", list), ("num_images", int), ("shards", list)):
        if not isinstance(meta.get(key), kind):
            raise DataError(f"{path}: {key!r} must be a {kind.__name__}")
    if not meta["shards"] or meta["num_images"] < 1:
        raise DataError(f"{path}: no shards or no images")
    missing = [s for s in meta["shards"] if not (root / s).is_file()]
    if missing:
        raise DataError(f"{path} lists shards that are not there: {', '.join(missing[:5])}")
    return WdsMeta(root, [str(c) for c in meta["classes"]], meta["num_images"], [str(s) for s in meta["shards"]])


def split_name(name: str) -> tuple[str, str]:
    """'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg'): the key ends at the first dot of the base name
    (WebDataset's and DALI's rule)."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def index_lines(tar_path: Path) -> list[str]:
    """DALI index lines of one tar, one per sample: 'ext offset size name' per member, in tar order.

    Reads only the tar headers (tarfile seeks past the data)."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isreg():
                continue
            key, ext = split_name(m.name)
            if not key or key.endswith("/"):  # hidden files such as .DS_Store
                continue
            part = f"{ext} {m.offset_data} {m.size} {m.name}"
            if key != last_key:
                samples.append([part])
                last_key = key
            else:
                samples[-1].append(part)
    if not samples:
        raise DataError(f"{tar_path}: no samples in this tar")
    return [" ".join(s) for s in samples]


def index_text(lines: list[str]) -> str:
    """A DALI index file: its header, then one line per sample."""
    return f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n"


def write_index(tar_path: Path, idx_path: Path) -> list[str]:
    """Write DALI's index of `tar_path` to `idx_path`; returns the sample keys in order."""
    lines = index_lines(tar_path)
    idx_path.write_text(index_text(lines))
    return [split_name(line.split(" ", 4)[3])[0] for line in lines]


def read_index_keys(idx_path: Path) -> list[str] | None:
    """Sample keys of a DALI index file, or None when it is not a v1.2 index (then make a new one)."""
    try:
        lines = idx_path.read_text().splitlines()
    except OSError:
        return None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        return None
    keys = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) < 4:
            return None
        keys.append(split_name(parts[3])[0])
    return keys
