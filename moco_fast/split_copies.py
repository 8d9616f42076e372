"""Eval images that are byte copies of training images (a val/ made by copying some of train/'s
files, a split script run twice): each is scored as well as a training image is, and the kNN,
lincls and finetune figures on the eval split are inflated without a sign. Links to one file are
found by data._check_shared_files, which compares the files' identities; a copy is another file.

The check stays cheap on ImageNet's million training images: no file is hashed, and only a pair
with one class folder name and one file name in both splits (train/cat/0001.jpg, val/cat/0001.jpg)
is looked at: their sizes (one stat each), and where those are one, their bytes, read until they
differ. A training file that no eval file names is never touched (ImageNet's val/ names are
ILSVRC2012_val_*, its train/ names n*_*: nothing is read). A copy renamed, put in another class
folder, recompressed or resized is not found.
"""

from __future__ import annotations

import logging
import os

from moco_fast.data import ImageList

log = logging.getLogger("moco_fast")

SHOWN = 3  # copies named in the warning


def copies_of_training_images(train: ImageList, evaluated: ImageList) -> list[tuple[str, str]]:
    """(eval file, training file) for each eval image whose bytes are those of the training image of
    its class folder and file name; one file through two links is none (a link, not a copy)."""
    # the label numbers the class in both splits (an eval split is listed against train's classes)
    named = {(label, os.path.basename(f)): f for f, label in zip(evaluated.files, evaluated.labels)}
    copies = []
    for f, label in zip(train.files, train.labels):
        other = named.get((label, os.path.basename(f)))
        if other is not None and same_bytes(other, f):
            copies.append((other, f))
    return copies


def same_bytes(a: str, b: str, chunk: int = 1 << 20) -> bool:
    """Two files (not one file: a link) of one size and the same bytes; read until they differ.
    False where either cannot be read (the listing's checks name it)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
        if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) or sa.st_size != sb.st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while block := fa.read(chunk):
                if block != fb.read(chunk):
                    return False
    except OSError:
        return False
    return True


def warn_of_copies(train: ImageList, evaluated: ImageList) -> None:
    """A warning naming how many eval images are byte copies of training images, and the first few."""
    copies = copies_of_training_images(train, evaluated)
    if not copies:
        return
    shown = "; ".join(f"{e} = {t}" for e, t in copies[:SHOWN])
    more = f"; and {len(copies) - SHOWN} more" if len(copies) > SHOWN else ""
    log.warning(
        "%d of the %d images of the eval split %s are byte copies of training images of %s (%s%s): the scores "
        "on it are inflated; remove them from one of the two splits",
        len(copies),
        len(evaluated),
        evaluated.root,
        train.root,
        shown,
        more,
    )
