"""What the convert test files share (not a test module: pytest does not collect it): the bad
files of the `bad_root` fixture (conftest.py), what a converted set must hold, and a file laid out
as a .beton of convert's without FFCV (fake_beton)."""

from pathlib import Path

import numpy as np
from PIL import Image

BAD = {"trunc.jpg": "cannot decode", "broken.jpg": "not a readable image", "notes.txt": "not an image"}


def expected(root: Path) -> tuple[list[str], list[int], list[tuple[int, int]]]:
    """The good files of train/ in sorted order, their labels and (width, height)."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    files, labels, sizes = [], [], []
    for i, c in enumerate(classes):
        for f in sorted((root / "train" / c).iterdir()):
            if f.name not in BAD:
                files.append(str(f))
                labels.append(i)
                sizes.append(Image.open(f).size)
    return files, labels, sizes


def beton_images(path: Path):
    """(labels, sizes, jpeg bytes) straight from the .beton's tables, without FFCV's JIT."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    img, lab = r.metadata["f0"], r.metadata["f1"]
    sizes = {int(p): int(s) for p, s in zip(r.alloc_table["ptr"], r.alloc_table["size"])}
    raw = path.read_bytes()
    blobs = [raw[int(p) : int(p) + sizes[int(p)]] for p in img["data_ptr"]]
    return lab.tolist(), list(zip(img["width"].tolist(), img["height"].tolist())), blobs


def no_partials(folder: Path):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []


def fake_beton(path: Path, samples: int, seed: int) -> None:
    """A file laid out as FFCV writes convert's fields (header, field descriptions, one record an
    image, the images' bytes, the allocation table), its tables drawn from `seed`: no FFCV needed."""
    from moco_fast.convert_dst import (
        ALLOC_ENTRY_SIZE,
        BETON_HEADER,
        CONVERT_FIELDS,
        FIELD_DESC_SIZE,
        SAMPLE_RECORD_SIZE,
    )

    rng = np.random.default_rng(seed)
    fields = b"".join(bytes([t]) + name.ljust(16, b"\0") + bytes(FIELD_DESC_SIZE - 17) for t, name in CONVERT_FIELDS)
    records = rng.bytes(samples * SAMPLE_RECORD_SIZE) + rng.bytes(4096)  # then the images' bytes
    alloc_table = BETON_HEADER.size + len(fields) + len(records)
    header = BETON_HEADER.pack(2, len(CONVERT_FIELDS), 1 << 21, samples, alloc_table)
    path.write_bytes(header + fields + records + rng.bytes(samples * ALLOC_ENTRY_SIZE))
