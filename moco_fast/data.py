"""Image folders: finding the splits, listing and checking the files, decoding them safely.

A data root is either one image folder with class subfolders (training only), or a root holding
`train/` and `val/` or `test/`. Every file is checked when the list is built: files that are not
images are skipped with a warning naming each of them; grayscale, CMYK and palette images are
converted to RGB on load; an image that fails to decode later (a truncated JPEG) is reported by
name and replaced by another image so that a run goes on.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("moco_fast")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEMO_ROOT = Path(__file__).parent / "demo_data"


class DataError(ValueError):
    """Bad data on input: the CLI prints it as one line."""


@dataclass
class ImageList:
    """Files and integer labels of one split, with the class names and what was skipped."""

    root: Path
    files: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class DataSplits:
    train: ImageList
    eval: ImageList | None  # val/ or test/, when present


def resolve_root(data: str | None) -> Path:
    root = Path(data) if data else DEMO_ROOT
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"--data must be a folder of images (class subfolders), got a file: {root}")
    return root


def split_dirs(root: Path) -> tuple[Path, Path | None]:
    """(train folder, eval folder or None) for a data root."""
    if (root / "train").is_dir():
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / "train", root / name
        return root / "train", None
    return root, None


def check_image(path: str) -> str | None:
    """None when the file looks like a readable image, else the reason it is not.

    Reads the header and verifies the file structure (cheap: no full decode). Truncated JPEGs pass
    this check and are caught when decoded (see `load_rgb`).
    """
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as e:  # PIL raises many types for bad files
        return f"not a readable image ({type(e).__name__}: {e})"


def list_images(folder: Path, classes: list[str] | None = None, check: bool = True, workers: int = 8) -> ImageList:
    """List `folder/<class>/<file>`; with `check`, verify each file's header and skip bad ones."""
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    found = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if classes is None:
        classes = found
    if not classes:
        raise DataError(f"no class subfolders in {folder}: expected {folder}/<class>/<image files>")
    index = {c: i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    for c in found:
        if c not in index:
            raise DataError(f"class folder {folder / c} is not among the training classes")
        for entry in sorted(os.scandir(folder / c), key=lambda e: e.name):
            if not entry.is_file():
                continue
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                skipped.append((entry.path, "not an image file extension"))
                continue
            files.append(entry.path)
            labels.append(index[c])
    if check and files:
        from moco_fast.metrics import progress

        bar = progress(total=len(files), desc=f"checking {folder.name}/", enabled=len(files) > 20_000)
        with ThreadPoolExecutor(workers) as pool:
            reasons = []
            for r in pool.map(check_image, files):
                reasons.append(r)
                bar.update(1)
        bar.close()
        keep = [i for i, r in enumerate(reasons) if r is None]
        skipped += [(files[i], r) for i, r in enumerate(reasons) if r is not None]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    for path, reason in skipped:
        log.warning("skipping %s: %s", path, reason)
    if skipped:
        log.warning("skipped %d of %d files in %s", len(skipped), len(skipped) + len(files), folder)
    if not files:
        raise DataError(f"no readable images in {folder}")
    return ImageList(folder, files, labels, classes, skipped)


def load_splits(data: str | None, check: bool = True) -> DataSplits:
    train_dir, eval_dir = split_dirs(resolve_root(data))
    train = list_images(train_dir, check=check)
    ev = list_images(eval_dir, classes=train.classes, check=check) if eval_dir else None
    return DataSplits(train, ev)


HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # one channel, more than 8 bits


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB. Grayscale, CMYK, palette and RGBA convert as PIL does; 16-bit and
    32-bit grayscale are scaled to 0-255 first (PIL's own conversion clips them, which turns a 16-bit
    image almost white): 16-bit modes by 65535 / 255, 32-bit integers by the range their values use
    (8 or 16 bits), floats by 1 when they lie within 0-1, else by 255."""
    if im.mode in HIGH_DEPTH_MODES:
        a = np.asarray(im, dtype=np.float64)
        top = a.max(initial=0)
        if im.mode.startswith("I;16") or (im.mode == "I" and top > 255):
            full = 65535.0
        elif im.mode == "F" and top <= 1:
            full = 1.0
        else:
            full = 255.0
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode fully and convert to 8-bit RGB (`to_rgb`)."""
    with Image.open(path) as im:
        im.load()  # raises OSError on a truncated file
        return to_rgb(im)


class ImageDataset:
    """A map-style dataset over an ImageList that survives images that fail to decode.

    `__getitem__` returns (transform(image), label, index). A file that fails to decode is reported
    once by name and replaced by the next good one, so that a run goes on.
    """

    def __init__(self, images: ImageList, transform: Callable | None = None):
        self.images = images
        self.transform = transform
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        n = len(self.images)
        for step in range(n):
            j = (i + step) % n
            if j in self._bad:
                continue
            try:
                img = load_rgb(self.images.files[j])
            except Exception as e:
                self._bad.add(j)
                warnings.warn(f"skipping unreadable image {self.images.files[j]} ({e}); using another", stacklevel=1)
                continue
            out = self.transform(img) if self.transform else img
            return out, self.images.labels[j], j
        raise DataError(f"no image in {self.images.root} could be decoded")
