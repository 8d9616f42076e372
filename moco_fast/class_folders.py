"""Class folders of one split that are one class twice. Two names that differ only in Unicode form
(refuse_twin_spellings): two classes that look the same in every listing. One folder under two names
(check_linked_classes): a link to a sibling (`train/linkcls -> b`), two links to one folder, a link
outside whose target is a sibling's, or a bind mount of one class folder onto another; each would list
the same images under two labels without a word."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from moco_fast.data import DataError, _nfc

log = logging.getLogger("moco_fast")


def refuse_twin_spellings(folder: Path, names: list[str]) -> None:
    """Two folders of one split whose names differ only in Unicode form would be two classes that
    look the same in every listing: the user must merge or rename them."""
    seen: dict[str, str] = {}
    for n in names:
        if (twin := seen.setdefault(_nfc(n), n)) != n:
            raise DataError(
                f"class folders {folder / twin} and {folder / n} have the same name in two Unicode forms "
                f"({twin!a} and {n!a}): merge them into one folder or rename one"
            )


def folder_identity(path: Path) -> tuple[int, int] | str:
    """What makes two class folders one: the folder's (st_dev, st_ino) after links, which a bind mount
    shares with its source although their real paths differ. Two folders with one real path have one
    (st_dev, st_ino) too. A filesystem that gives no inode number (st_ino 0) would make every folder
    one: there the real path alone is compared."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(path)


def check_linked_classes(folder: Path, names: list[str], labelled: bool) -> None:
    """Name class folders of `folder` that are one folder (folder_identity). One stat per class
    folder, never one per image: a cheap check on a million-image split.

    `labelled` (knn, lincls, finetune: the figure is made of the labels) makes it an error: each
    shared image is counted under each label, and at most one of them can be right. Otherwise
    (train's MoCo loss reads no label; convert, whose .beton trains) it is a warning: the images are
    read twice an epoch, and the run's kNN monitor is off, but the run is not wrong."""
    by_identity: dict[tuple[int, int] | str, list[str]] = {}
    for name in names:
        by_identity.setdefault(folder_identity(folder / name), []).append(name)
    for group in by_identity.values():
        if len(group) < 2:
            continue
        reals = list(dict.fromkeys(os.path.realpath(folder / n) for n in group))
        how = "(a link)" if len(reals) == 1 else "(one device and inode: a bind mount)"
        what = (
            f"class folders {', '.join(str(folder / n) for n in group)} are one folder, {' = '.join(reals)} "
            f"{how}: its images are listed under {len(group)} labels"
        )
        fix = "remove the link(s) or mount(s), or give each class folder images of its own"
        if labelled:
            raise DataError(f"{what}, and each would be scored under each; {fix}")
        log.warning("%s and read %d times an epoch; %s", what, len(group), fix)
