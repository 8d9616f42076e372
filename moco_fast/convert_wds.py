"""Image folder -> WebDataset shard set, the contract that loaders/wds.py and the DALI loader read:

    DST/meta.json          {"format": "wds", "classes": [...], "num_images": N, "shards": [...], ...}
    DST/shard-000000.tar   members {key}.jpg (JPEG, re-encoded at --jpeg-quality) and {key}.cls
                           (the label as ASCII digits); key = the sample's position in the set, 8 digits
    DST/shard-000000.idx   DALI's index of that tar: "v1.2 <samples>", then per sample
                           "<ext> <data offset> <size> <member name>" for each member, in tar order
                           (exactly what DALI's wds2idx tool writes)

Samples are written in a shuffled order (seeded): streaming readers shuffle only within a buffer,
and a folder's class-sorted order would otherwise fill each shard with one class. The index is
written from the offsets known while writing, so the tar is never read back.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import tarfile
from pathlib import Path

from moco_fast.convert import ConvertConfig
from moco_fast.convert_files import writing
from moco_fast.convert_images import load_resized, parallel_map
from moco_fast.data import DataError, ImageList
from moco_fast.loaders.wds import index_text

log = logging.getLogger("moco_fast")


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def encode_task(job: tuple[str, int | None, int]) -> bytes | str:
    """JPEG bytes of the (resized, RGB) image, or the reason it cannot be converted."""
    path, max_res, quality = job
    try:
        img = load_resized(path, max_res)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return buf.getvalue()
    except Exception as e:  # PIL raises many types for bad files
        return f"cannot decode ({type(e).__name__}: {e})"


class ShardWriter:
    """One tar (USTAR, fixed owner and time: the same input gives the same bytes) and its index."""

    def __init__(self, folder: Path, number: int):
        self.name = shard_name(number)
        self.folder = folder
        self.tar = tarfile.open(folder / f"{self.name}.tar", "w", format=tarfile.USTAR_FORMAT)
        self.lines: list[str] = []
        self.count = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        parts = []
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            header = len(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
            offset = self.tar.offset + header  # where the member's data starts
            self.tar.addfile(info, io.BytesIO(data))
            parts.append(f"{ext} {offset} {len(data)} {info.name}")
        self.lines.append(" ".join(parts))
        self.count += 1

    def close(self) -> str:
        self.tar.close()
        (self.folder / f"{self.name}.idx").write_text(index_text(self.lines))
        return f"{self.name}.tar"


def write_shard_set(images: ImageList, folder: Path, cfg: ConvertConfig) -> tuple[int, list[tuple[str, str]], dict]:
    """Write the shards and their indexes into `folder` (created); meta.json is the caller's."""
    folder.mkdir(parents=True)
    order = list(range(len(images)))
    random.Random(cfg.seed).shuffle(order)
    jobs = [(images.files[i], cfg.max_resolution, cfg.jpeg_quality) for i in order]
    shards: list[str] = []
    sizes: list[int] = []
    skipped: list[tuple[str, str]] = []
    writer: ShardWriter | None = None
    written = 0
    try:
        for i, result in zip(order, parallel_map(encode_task, jobs, cfg.workers, "writing shards"), strict=True):
            if isinstance(result, str):
                log.warning("skipping %s: %s", images.files[i], result)
                skipped.append((images.files[i], result))
                continue
            with writing(folder):  # a write to a shard raises without a path
                if writer is None or writer.count == cfg.shard_size:
                    if writer is not None:
                        shards.append(writer.close())
                        sizes.append(writer.count)
                    writer = ShardWriter(folder, len(shards))
                writer.add(f"{written:08d}", [("jpg", result), ("cls", str(images.labels[i]).encode("ascii"))])
            written += 1
    except BaseException:
        if writer is not None:  # a full disk: the open shard is closed (its file goes with the folder)
            with contextlib.suppress(OSError):
                writer.tar.close()
        raise
    if writer is None:
        raise DataError(f"none of the {len(images)} images in {images.root} could be decoded")
    with writing(folder):
        shards.append(writer.close())
    sizes.append(writer.count)
    return written, skipped, {"shards": shards, "shard_sizes": sizes, "seed": cfg.seed}
