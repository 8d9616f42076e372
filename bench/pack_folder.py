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
import os
import sys
import time
from pathlib import Path

import numpy as np


def pack(src: Path, dst: Path) -> int:
    if not src.is_dir():
        raise SystemExit(f"error: {src} is not a folder")
    paths = sorted(p for p in src.rglob("*") if p.is_file())
    if not paths:
        raise SystemExit(f"error: no files under {src}")
    blobs = [p.read_bytes() for p in paths]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    names = np.array([p.relative_to(src).as_posix().encode() for p in paths])  # bytes: 1/4 of numpy's str
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part.npz")
    np.savez(tmp, data=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets, names=names)
    os.replace(tmp, dst)
    return len(paths)


def unpack(src: Path, dst: Path) -> int:
    with np.load(src) as z:
        data, offsets, names = z["data"], z["offsets"], z["names"]
    for i, raw in enumerate(names):
        name = raw.decode()
        out = dst / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise SystemExit(f"error: refusing a path outside the destination: {name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data[offsets[i] : offsets[i + 1]].tobytes())
    return len(names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("src", type=Path, help="pack: the folder; unpack: the .npz")
    p.add_argument("dst", type=Path, help="pack: the .npz to write; unpack: the folder to fill")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    n = (pack if a.action == "pack" else unpack)(a.src, a.dst)
    size = (a.dst if a.action == "pack" else a.src).stat().st_size
    print(f"{a.action}ed {n} files ({size / 2**20:.1f} MiB pack) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
