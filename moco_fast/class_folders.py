"""Class folders of one split that are one folder: a link to a sibling (`train/linkcls -> b`), two
links to one folder, or a link outside whose target is a sibling's. Each would list the same images
under two labels without a word."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from moco_fast.data import DataError

log = logging.getLogger("moco_fast")


def check_linked_classes(folder: Path, names: list[str], labelled: bool) -> None:
    """Name class folders of `folder` whose real paths are the same. Only each class folder's
    realpath is read, never its images: a cheap check on a million-image split.

    `labelled` (knn, lincls, finetune: the figure is made of the labels) makes it an error: each
    shared image is counted under each label, and at most one of them can be right. Otherwise
    (train's MoCo loss reads no label; convert, whose .beton trains) it is a warning: the images are
    read twice an epoch, and the run's kNN monitor is off, but the run is not wrong."""
    by_real: dict[str, list[str]] = {}
    for name in names:
        by_real.setdefault(os.path.realpath(folder / name), []).append(name)
    for real, group in by_real.items():
        if len(group) < 2:
            continue
        what = (
            f"class folders {', '.join(str(folder / n) for n in group)} are one folder, {real} (a link): "
            f"its images are listed under {len(group)} labels"
        )
        fix = "remove the link(s) or give each class folder images of its own"
        if labelled:
            raise DataError(f"{what}, and each would be scored under each; {fix}")
        log.warning("%s and read %d times an epoch; %s", what, len(group), fix)
