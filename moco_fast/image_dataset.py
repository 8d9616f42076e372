"""Decoding an image folder's files safely: any PIL image as 8-bit RGB (`to_rgb`, `load_rgb`), and
`ImageDataset`, which survives a file that fails to decode (a truncated JPEG passes the listing's
header check, moco_fast.data.check_image): training goes on with another image, evaluation leaves it
out, and a run gives up where too many fail (MAX_BAD_FRACTION, which the DALI and FFCV loaders count
against too)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from moco_fast.data import DataError, ImageList

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
    if im.mode == "P" and isinstance(im.info.get("transparency"), bytes):
        # the same pixels as P -> RGB, without PIL's UserWarning (its file:line and source line, in
        # convert's and the torch loader's output, between progress bars) that asks for this step
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode fully and convert to 8-bit RGB (`to_rgb`)."""
    with Image.open(path) as im:
        im.load()  # raises OSError on a truncated file
        return to_rgb(im)


@dataclass(frozen=True)
class Unreadable:
    """What `ImageDataset(..., substitute=False)` returns in place of an image that fails to decode."""

    path: str
    reason: str


# A run gives up when more than this share of its images (and more than MAX_BAD_MIN) cannot be
# decoded (the torch loader: those one worker process found; DALI: all the pipeline found).
MAX_BAD_FRACTION, MAX_BAD_MIN = 0.1, 16


class ImageDataset:
    """A map-style dataset over an ImageList that survives images that fail to decode.

    `__getitem__` returns (transform(image), label, index). A file that fails to decode is reported
    once by name and replaced by the next good one, so that a run goes on (training). With
    `substitute=False` (evaluation: every image counted once) it comes back as (Unreadable(path,
    reason), label, index) instead, without a warning: the caller leaves it out and names it.
    """

    def __init__(self, images: ImageList, transform: Callable | None = None, substitute: bool = True):
        self.images = images
        self.transform = transform
        self.substitute = substitute
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if not self.substitute:
            path = self.images.files[i]
            try:
                img = load_rgb(path)
            except Exception as e:  # PIL raises many types for bad files
                return Unreadable(path, f"{type(e).__name__}: {e}"), self.images.labels[i], i
            return (self.transform(img) if self.transform else img), self.images.labels[i], i
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
                self._give_up_on_many_bad()
                continue
            out = self.transform(img) if self.transform else img
            return out, self.images.labels[j], j
        raise DataError(f"no image in {self.images.root} could be decoded")

    def _give_up_on_many_bad(self) -> None:
        # Against the whole data set, as DALI counts: the files this process found bad are a part of
        # those the data set holds, so a data set under the limit never stops (a share of the images
        # read so far would: bad files sit together in sorted folders, and one walk passes them all).
        bad, n = len(self._bad), len(self.images)
        if bad > max(MAX_BAD_MIN, MAX_BAD_FRACTION * n):
            raise DataError(
                f"{bad} of the {n} images in {self.images.root} could not be decoded (more than "
                f"{MAX_BAD_FRACTION:.0%}): check the data set"
            )
