"""Image folders: finding the splits, listing and checking the files (decoding them safely:
moco_fast.image_dataset).

A data root is either one image folder with class subfolders (training only), or a root holding
`train/` and `val/` or `test/`. Class folders are the non-hidden subfolders that hold image files
(hidden dot-folders such as `.ipynb_checkpoints` are ignored; folders with no image files are named
and left out). Every file is checked when the list is built: files that are not images, broken links
and files in subfolders of a class folder are skipped with a warning naming each of them; grayscale,
CMYK and palette images are converted to RGB on load; an image that fails to decode later (a
truncated JPEG) is reported by name and, in training, replaced by another image so that a run goes
on; evaluation (kNN) leaves it out instead, so that every image is counted once.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from moco_fast.text import plural

log = logging.getLogger("moco_fast")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEMO_ROOT = Path(__file__).parent / "demo_data"
# The folders of a data root: train/, then the eval split, val/ where both it and test/ are there
# (split_dirs; convert --split reads one of them, convert_dst.scanned_folder keeps DST out of them)
SPLIT_NAMES = ("train", "val", "test")


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
    # PIL's "FORMAT/mode" of each file ("JPEG/RGB"), as `check_image` found it; empty when not checked
    kinds: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def keeping(self, keep: list[int], dropped: list[tuple[str, str]]) -> ImageList:
        """The images at positions `keep`, in that order; `dropped` (path, reason) joins what was skipped."""
        return ImageList(
            self.root,
            [self.files[i] for i in keep],
            [self.labels[i] for i in keep],
            self.classes,
            self.skipped + dropped,
            [self.kinds[i] for i in keep] if self.kinds else [],
        )


@dataclass
class DataSplits:
    train: ImageList
    eval: ImageList | None  # val/ or test/, when present
    # load_splits' `check` and `eval_split` that made them: a loader handed this listing
    # (loaders.base.LoaderArgs.splits) tells whether it is the one it would make itself
    checked: bool
    eval_split: str


# What reads a .beton or a shard set given where image folders are read: knn, lincls, finetune and
# convert's SRC have no --loader, and train's and sweep's folder loaders are told which one
TRAINING_READS = "training (train, sweep) reads with --loader"


def resolve_root(data: str | None, name: str = "--data") -> Path:
    root = Path(data) if data else DEMO_ROOT
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        from moco_fast.convert_dst import beton_samples  # imports this module

        # what convert writes for --loader ffcv, by its name or (renamed, another tool's) its header; only
        # a regular file's is read (a named pipe would wait for a writer, and lose what it reads)
        if root.suffix == ".beton" or (root.is_file() and isinstance(beton_samples(root), int)):
            raise DataError(f"{name} {root} is an FFCV .beton, which {TRAINING_READS} ffcv; this reads image folders")
        raise DataError(f"{name} must be a folder of images (class subfolders), got a file: {root}")
    from moco_fast.loaders.wds import is_wds_root  # loaders.wds imports this module

    if is_wds_root(root):  # its listing said "no class subfolders", or lincls "needs an eval split"
        raise DataError(
            f"{name} {root} is a WebDataset shard set, which {TRAINING_READS} dali; this reads image folders"
        )
    return root


def split_dirs(root: Path) -> tuple[Path, Path | None]:
    """(train folder, eval folder or None) for a data root."""
    train, *evals = SPLIT_NAMES
    if (root / train).is_dir():
        for name in evals:
            if (root / name).is_dir():
                return root / train, root / name
        return root / train, None
    return root, None


def check_image(path: str) -> tuple[str, str | None]:
    """(kind, reason): the file's kind as PIL opened it, "FORMAT/mode" ("JPEG/RGB", "GIF/P"; "" when
    PIL cannot open it), and None when the file looks like a readable image, else the reason it is not.

    Reads the header and verifies the file structure (cheap: no full decode). Truncated JPEGs pass
    this check and are caught when decoded (see `image_dataset.load_rgb`). The kind is kept because
    PIL reads more than some decoders do: the DALI loader leaves out, up front, the kinds its decoder
    does not read.
    """
    kind = ""
    try:
        with Image.open(path) as im:
            kind = sys.intern(f"{im.format}/{im.mode}")  # one string per kind, not one per file
            im.verify()
        pixels, limit = im.size[0] * im.size[1], Image.MAX_IMAGE_PIXELS
        if limit and pixels > limit:
            log.warning(
                "%s has %s pixels, over PIL's decompression-bomb limit (%s): read anyway, ~%d MiB a decode; "
                "shrink it (or convert with --max-resolution) to save time and memory",
                path,
                f"{pixels:,}",
                f"{limit:,}",
                pixels * 3 >> 20,
            )
        return kind, None
    except Image.DecompressionBombError as e:  # PIL's guard against files that claim a huge size
        px = re.findall(r"\d+", str(e))
        size = f"{int(px[0]):,} pixels, over PIL's limit of {int(px[1]):,}" if len(px) >= 2 else str(e)
        return kind, f"too large to decode safely ({size}, a guard against decompression bombs): resize it to keep it"
    except Exception as e:  # PIL raises many types for bad files
        return kind, f"not a readable image ({type(e).__name__}: {e})"


def _is_hidden(name: str) -> bool:
    """Dot-names (`.ipynb_checkpoints`, `.git`, `.Trash-1000`, macOS's `._x.jpg`): never classes,
    never read."""
    return name.startswith(".")


def _broken_link(entry: os.DirEntry) -> str | None:
    """The reason a symbolic link cannot be read (its target is missing or loops), else None."""
    if not entry.is_symlink():
        return None
    try:
        os.stat(entry.path)
        return None
    except OSError as e:
        return f"broken symbolic link to {os.readlink(entry.path)} ({e.strerror or type(e).__name__})"


def _list_class(folder: Path, skipped: list[tuple[str, str]]) -> list[str]:
    """Image files directly in one class folder, sorted; everything else is added to `skipped` by name
    with the reason: other extensions, broken links, other non-files, each file in a subfolder (only
    the files directly in `<class>/` are read) and a link to a folder; hidden names are ignored."""
    images: list[str] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _is_hidden(entry.name):  # macOS's ._x.jpg beside x.jpg, .thumbs/, editors' files
            continue
        if reason := _broken_link(entry):  # first: is_dir() raises on a link that loops
            skipped.append((entry.path, reason))
            continue
        if entry.is_dir():
            reason = f"in a subfolder of the class folder {folder.name}/ (only files directly in it are read)"
            if entry.is_symlink():  # named once, not walked (a link to / would list the whole disk)
                skipped.append((entry.path, f"a link to a folder, {reason}"))
                continue
            for sub, dirs, names in os.walk(entry.path):  # links to folders are named, not followed
                shown = [d for d in dirs if not _is_hidden(d)]
                links = [d for d in shown if os.path.islink(os.path.join(sub, d))]
                dirs[:] = sorted(d for d in shown if d not in links)
                skipped += [(os.path.join(sub, n), reason) for n in sorted(names + links)]
            continue
        if not entry.is_file():
            skipped.append((entry.path, "not a regular file"))
            continue
        if not _is_image_file(entry):
            skipped.append((entry.path, "not an image file extension"))
            continue
        images.append(entry.path)
    return images


def _is_image_file(entry: os.DirEntry) -> bool:
    return entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)


def find_classes(folder: Path) -> list[str]:
    """The class names `list_images(folder)` derives, without listing or checking the files: the
    non-hidden subfolders that hold at least one image file (by extension), sorted. An eval split
    listed on its own (`list_images(eval_dir, classes=find_classes(train_dir))`) numbers its labels
    as the training split does."""
    classes = []
    for d in sorted(os.scandir(folder), key=lambda e: e.name):
        if not _is_hidden(d.name) and not _broken_link(d) and d.is_dir():
            with os.scandir(d.path) as it:
                if any(not _is_hidden(e.name) and _is_image_file(e) for e in it):
                    classes.append(d.name)
    return classes


def _nfc(name: str) -> str:
    """A class name as Unicode's composed form: "café" typed on Linux (NFC) and "café" from a macOS
    copy (NFD, e + combining accent) are two spellings of one class, and the splits match by it."""
    return unicodedata.normalize("NFC", name)


def list_images(
    folder: Path, classes: list[str] | None = None, check: bool = True, workers: int = 8, labelled: bool = False
) -> ImageList:
    """List `folder/<class>/<file>`; with `check`, verify each file's header and skip bad ones.

    Hidden names (dot-names) are ignored; image files directly in `folder` are named as skipped. With `classes=None` the classes are the class folders that
    hold at least one image file (by extension, whatever `check`, so that a listing numbers its classes
    the same with or without the check); the others are named in a warning and left out. With `classes`
    given (an eval split listed against the training classes) the labels are indices into that list; a
    folder that is not in it is an error unless it holds no image files (then it is named and ignored).
    Class folders that are one folder (links) are a warning, an error where `labelled` (check_linked_classes).
    """
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    skipped: list[tuple[str, str]] = []
    found: list[str] = []
    loose = tars = 0  # image files and .tar files directly in `folder`
    for d in sorted(os.scandir(folder), key=lambda e: e.name):
        if _is_hidden(d.name):
            continue
        if reason := _broken_link(d):  # perhaps a class folder that moved
            skipped.append((d.path, reason))
        elif d.is_dir():
            found.append(d.name)
        elif _is_image_file(d):  # read by nothing: said, not dropped without a word
            loose += 1
            skipped.append((d.path, f"directly in {folder.name}/, not in a class folder {folder.name}/<class>/"))
        elif d.name.endswith(".tar"):
            tars += 1
    if not found and tars:
        # shards copied without their meta.json read as a folder without classes, which said nothing of it
        from moco_fast.loaders.wds import META_NAME, is_wds_root  # loaders.wds imports this module

        if is_wds_root(folder):  # its meta.json is there: a set met as a split (--data ROOT with ROOT/train/ one)
            raise DataError(
                f"no class subfolders in {folder}: it is a WebDataset shard set, which {TRAINING_READS} dali "
                f"given as --data {folder} itself; this reads image folders (<class>/<image files>)"
            )
        raise DataError(
            f"no class subfolders in {folder}, and {plural(tars, '.tar file')} without a {META_NAME}: a WebDataset "
            f"shard set (for --loader dali) needs the {META_NAME} that `moco-fast convert SRC DST --format wds` "
            "writes beside its shards; an image folder needs <class>/<image files>"
        )
    if not found:
        # a folder of unlabelled images, which pretraining needs no labels for: one class folder will do
        hint = (
            f" (MoCo needs no labels: move its {plural(loose, 'image')} into one subfolder, such as {folder}/images/)"
        )
        raise DataError(
            f"no class subfolders in {folder}: expected {folder}/<class>/<image files>"
            + (hint if loose and classes is None and not labelled else "")
        )
    per_class = {c: _list_class(folder / c, skipped) for c in found}
    # Imported here, not at the top: class_folders imports DataError and _nfc from this module.
    from moco_fast.class_folders import check_linked_classes, refuse_twin_spellings

    named = [c for c in found if per_class[c]]  # an empty twin or link is left out below
    refuse_twin_spellings(folder, named)
    check_linked_classes(folder, named, labelled)
    empty = [c for c in found if not per_class[c]]
    if classes is None:
        classes = named
        if empty:
            log.warning(
                "left out of the classes: %d folder(s) in %s hold no image files: %s",
                len(empty),
                folder,
                ", ".join(empty),
            )
        if not classes:
            raise DataError(f"no image files in any class folder of {folder}")
    else:
        known = {_nfc(k) for k in classes}
        for c in found:
            if _nfc(c) not in known and per_class[c]:
                raise DataError(
                    f"class folder {folder / c} is not among the training classes "
                    "(the training split's folders that hold image files)"
                )
        stray = [c for c in empty if _nfc(c) not in known]  # e.g. the twin of a training folder left out as empty
        if stray:
            log.warning(
                "ignoring folder(s) in %s with no image files, not among the classes: %s", folder, ", ".join(stray)
            )
    index = {_nfc(c): i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for c in found:
        if _nfc(c) in index:
            files += per_class[c]
            labels += [index[_nfc(c)]] * len(per_class[c])
    if check and files:
        from moco_fast.metrics import progress

        bar = progress(total=len(files), desc=f"checking {folder.name}/", enabled=len(files) > 20_000)
        with ThreadPoolExecutor(workers) as pool:
            kinds, reasons = [], []
            for kind, r in pool.map(check_image, files):
                kinds.append(kind)
                reasons.append(r)
                bar.update(1)
        bar.close()
        keep = [i for i, r in enumerate(reasons) if r is None]
        skipped += [(files[i], r) for i, r in enumerate(reasons) if r is not None]
        files, labels, kinds = [files[i] for i in keep], [labels[i] for i in keep], [kinds[i] for i in keep]
    else:
        kinds = []
    for path, reason in skipped:
        log.warning("skipping %s: %s", path, reason)
    if skipped:
        log.warning("skipped %d of %d files in %s", len(skipped), len(skipped) + len(files), folder)
    if not files:
        raise DataError(f"no readable images in {folder}")
    return ImageList(folder, files, labels, classes, skipped, kinds)


EVAL_SPLIT_USES = ("list", "try", "skip")


def load_splits(data: str | None, check: bool = True, eval_split: str = "list", labelled: bool = False) -> DataSplits:
    """The train split and the eval split (val/ or test/ beside train/, else None). `eval_split`:
    "list" it (its errors are errors), "try" (a run whose only use of it is an optional evaluation,
    train's final kNN: an eval split that cannot be read is a warning, and None), or "skip" it (not
    used: a flat ImageNet-style val/ does not stop a run that never evaluates, and is not read).
    `labelled`: the command's figure is made of the labels (list_images)."""
    if eval_split not in EVAL_SPLIT_USES:
        raise ValueError(f"eval_split must be one of {EVAL_SPLIT_USES}, got {eval_split!r}")
    train_dir, eval_dir = split_dirs(resolve_root(data))
    listed = functools.partial(DataSplits, checked=check, eval_split=eval_split)
    if eval_dir is None or eval_split == "skip":
        return listed(list_images(train_dir, check=check, labelled=labelled), None)
    try:
        _refuse_same_folder(train_dir, eval_dir)  # before the training split's listing: it may be long
    except DataError as e:
        _eval_unusable(eval_split, eval_dir, e)
        return listed(list_images(train_dir, check=check, labelled=labelled), None)
    train = list_images(train_dir, check=check, labelled=labelled)
    try:
        evaluated = list_images(eval_dir, classes=train.classes, check=check, labelled=labelled)
        _check_shared_files(train, evaluated)
        from moco_fast.split_copies import warn_of_copies  # it imports ImageList from here

        warn_of_copies(train, evaluated)
        return listed(train, evaluated)
    except DataError as e:
        _eval_unusable(eval_split, eval_dir, e)
        return listed(train, None)


def _eval_unusable(eval_split: str, eval_dir: Path, e: DataError) -> None:
    """An eval split that cannot be used: raised where it is listed ("list"), else a warning."""
    if eval_split == "list":
        raise e
    log.warning("the eval split %s cannot be used (%s): the run goes on without it", eval_dir, e)


def _refuse_same_folder(train_dir: Path, eval_dir: Path) -> None:
    """val/ that is train/ under another name (a link, a bind mount) scores the training images:
    every kNN, lincls and finetune figure would be inflated without a sign."""
    if os.path.samefile(train_dir, eval_dir):
        raise DataError(
            f"the eval split {eval_dir} is the same folder as {train_dir} (a link or a mount of it): scores on "
            f"it would be scores on the training images; make {eval_dir.name}/ a folder of held-out images"
        )


def _file_id(path: str) -> tuple[int, int, int] | None:
    """(st_dev, st_ino, st_nlink) of the file a path reaches (links followed), or None when it
    cannot be read."""
    try:
        st = os.stat(path)
    except OSError:  # gone since the listing: it fails to decode later, and is named there
        return None
    return st.st_dev, st.st_ino, st.st_nlink


def _check_shared_files(train: ImageList, evaluated: ImageList) -> None:
    """Eval images that are training images (the same file through a symbolic or hard link, or a
    class folder linked into both splits) inflate the scores: all of them is an error, some a
    warning with the count and a first one. Only the files' identities are compared, not their
    contents: a copy is another file (found, where it keeps its class folder and name, by
    split_copies.warn_of_copies). The eval files are stat'ed; the training split (a million files
    on ImageNet, maybe on a network file system) only where an eval file has hard links or is
    reached through a symbolic link below its split's folder (itself, a linked class folder), as no
    file of a split of plain files is. (A training image that links to an eval file is not looked for.)"""
    ids = {f: i for f in evaluated.files if (i := _file_id(f)) is not None}
    real_root = os.path.realpath(evaluated.root)

    def linked(f: str, nlink: int) -> bool:
        return nlink > 1 or os.path.realpath(f) != os.path.join(real_root, os.path.relpath(f, evaluated.root))

    if not any(linked(f, i[2]) for f, i in ids.items()):
        return
    train_ids = {i[:2] for f in train.files if (i := _file_id(f)) is not None}
    shared = [f for f, i in ids.items() if i[:2] in train_ids]
    if not shared:
        return
    root, where = evaluated.root, f"{evaluated.root} are training images of {train.root} (links to the same files)"
    if len(shared) == len(evaluated):
        raise DataError(
            f"all {len(shared)} images of the eval split {where}: scores on it would be scores on the training "
            f"images; make {root.name}/ a folder of held-out images"
        )
    log.warning(
        "%d of the %d images of the eval split %s: the scores on it are inflated (first: %s); remove them from "
        "one of the two splits",
        len(shared),
        len(evaluated),
        where,
        shared[0],
    )
