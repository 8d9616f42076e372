"""`moco-fast convert`: an image folder -> an FFCV `.beton` or a WebDataset shard set.

Every file is checked: list_images skips files that are not images (by extension or header); then
each image is decoded in full (moco_fast/convert_images.py), so truncated or corrupt files are
skipped too, each named with its reason.

The output never appears half-written under its final name: it is written under a temporary name
in the same folder and renamed at the end; an existing output is replaced only with `force`, and
only when it is an earlier output of convert (moco_fast/convert_dst.py, checked before any image is
read; the temporaries and their publishing: moco_fast/convert_files.py). A second convert to the
same DST while one runs stops at once (convert_files.holding).

FFCV: the .beton has the fields `image` (RGBImageField) and `label` (IntField), in the folder's
sorted order; `X.beton.json` beside it holds the class names, and `X.beton.files.txt` the source
file of each image (relative to SRC's split folder, one a line in .beton order, after a header line;
the FFCV loader names the file of an image it skips by it). Both record the .beton's fingerprint
(convert_dst.beton_fingerprint), so that a reader tells them from those of the .beton they replace.
The writing: moco_fast/convert_beton.py. WebDataset: see moco_fast/convert_wds.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from moco_fast.cli import ENVIRONMENT_ERRNOS, interruption, os_error_behind
from moco_fast.commands import require_a_file_name
from moco_fast.config import MAX_SEED, ConfigError, check_at_least
from moco_fast.convert_beton import convert_ffcv
from moco_fast.convert_dst import check_destination, names_path, sidecar_path
from moco_fast.convert_files import (
    holding,
    output_of,
    outputs_there,
    publish,
    remove,
    size_of,
    temp_path,
    tidy_after_a_stopped_convert,
    writing,
)
from moco_fast.cores import available_cores, workers_refused
from moco_fast.data import DataError, ImageList, find_classes, list_images, resolve_root, split_dirs
from moco_fast.loaders.wds import META_NAME

log = logging.getLogger("moco_fast")

FORMATS = ("ffcv", "wds")
WRITE_MODES = ("jpg", "raw", "smart", "proportion")


@dataclass
class ConvertConfig:
    src: str
    dst: str
    format: str = "ffcv"
    split: str = "train"  # with a root holding train/ and val/ or test/: which one (classes from train/)
    max_resolution: int | None = None  # longer side, pixels; None: keep
    jpeg_quality: int = 90
    write_mode: str = "jpg"  # ffcv: jpg | raw | smart | proportion (FFCV's RGBImageField modes)
    shard_size: int = 1000  # wds: images per shard
    workers: int = 0  # 0: every core of this machine
    force: bool = False
    seed: int = 0  # wds: the shuffled sample order


@dataclass
class ConvertSummary:
    dst: Path
    written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    bytes: int = 0
    seconds: float = 0.0
    empty_classes: list[str] = field(default_factory=list)  # in the class list, no image written

    def text(self, show: int = 20) -> str:
        lines = [
            f"wrote {self.written} images to {self.dst} ({self.bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s; "
            f"skipped {len(self.skipped)}"
        ]
        for path, reason in self.skipped[:show]:
            lines.append(f"  skipped {path}: {reason}")
        if len(self.skipped) > show:
            lines.append(f"  ... and {len(self.skipped) - show} more (all listed in the output's json)")
        if self.empty_classes:
            lines.append(f"  {empty_classes_text(self.empty_classes)}")
        return "\n".join(lines)


def empty_classes_text(names: list[str]) -> str:
    """What convert says, in its warning and its summary, of classes of which no image was written."""
    return (
        f"no image written of class(es) {', '.join(names)}: every one was skipped (or, in --split, none is "
        "there); they stay in the class list with no samples, numbered as SRC's listing numbers them (so that "
        "labels match its other split and a torch-loader run on SRC)"
    )


# ---- input -------------------------------------------------------------------------------------


def source_images(cfg: ConvertConfig) -> ImageList:
    root = resolve_root(cfg.src, "SRC")
    train_dir, eval_dir = split_dirs(root)
    if cfg.split != "train" and train_dir != root and (root / cfg.split).is_dir():
        eval_dir = root / cfg.split  # split_dirs prefers val/ where both are there
    if cfg.split == "train":
        if eval_dir is not None:
            log.info(
                "%s has %s/ too: convert it with `moco-fast convert %s DST --split %s`",
                root,
                eval_dir.name,
                root,
                eval_dir.name,
            )
        return list_images(train_dir, check=True, workers=max(1, cfg.workers))
    if train_dir != root and eval_dir is not None and eval_dir.name != cfg.split:  # CIFAR-10's is test/
        raise DataError(
            f"--split {cfg.split}: {root} has no {cfg.split}/ folder; its eval split is {eval_dir.name}/: give --split {eval_dir.name}"
        )
    if train_dir == root or eval_dir is None:
        raise DataError(f"--split {cfg.split}: {root} has no train/ and {cfg.split}/ folders")
    # numbered as train/ is listed (hidden and empty folders are no classes there either)
    return list_images(eval_dir, classes=find_classes(train_dir), check=True, workers=max(1, cfg.workers))


# ---- the command's work -------------------------------------------------------------------------


def missing_modules(names: list[str]) -> list[str]:
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is None]


def validate(cfg: ConvertConfig) -> None:
    if cfg.format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if cfg.write_mode not in WRITE_MODES:
        raise ConfigError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {cfg.write_mode!r}")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ConfigError(f"--jpeg-quality must be in 1..100, got {cfg.jpeg_quality}")
    if cfg.max_resolution is not None:
        check_at_least("--max-resolution", cfg.max_resolution, 8)
    # Path drops a last "/" or "/.": `out/` (or out/.) wrote a file `out`. In the words of every
    # command's output file (commands.check_output, which refuses an existing folder itself, later)
    if cfg.format == "ffcv" and not Path(cfg.dst).is_dir():
        require_a_file_name(cfg.dst, "DST")
    if Path(cfg.dst).name in ("", ".."):  # `.`, `..`, `/`: DST's lock, temporary and sidecars are named after it
        raise ConfigError(
            f"DST {cfg.dst} names a folder without its name, and convert writes DST beside itself under a "
            f"temporary name before renaming it into place: give the output's name ({os.path.join(cfg.dst, 'NAME')})"
        )
    if cfg.workers < 0:  # -2 ran on every core as 0 does, where the other commands refuse it
        raise ConfigError(f"--workers must be 0 (every core) or a count, got {cfg.workers}")
    # train's cap: the pool forks every worker at once (--workers 100000: as many processes; past
    # 2**31 an OverflowError traceback from its queue)
    why = workers_refused(cfg.workers, 1, "0: every core", "processes a core only compete with each other for it")
    if why is not None:
        raise ConfigError(why)
    # wds's flags alone: --format ffcv ignores them, with a warning (commands/convert), not an error after it
    if cfg.format == "wds":
        check_at_least("--shard-size", cfg.shard_size, 1)
    if cfg.format == "wds" and not 0 <= cfg.seed <= MAX_SEED:  # -1 shuffled as 1 does (random's abs)
        raise ConfigError(f"--seed must be in 0..{MAX_SEED}, got {cfg.seed}")
    if cfg.format == "ffcv":  # before hours of checking images, not after
        missing = missing_modules(["ffcv", "numba"])
        if missing:
            raise ConfigError(
                f"--format ffcv needs {', '.join(missing)}, which this Python lacks: install the extra with "
                "pip install 'moco-fast[ffcv]' (FFCV builds against pkg-config, libopencv-dev and libturbojpeg0-dev)"
            )


def convert(cfg: ConvertConfig) -> ConvertSummary:
    """Convert as configured; returns what was written and skipped. Raises DataError when nothing
    could be written, FileExistsError when the output exists and `force` is off, ConfigError when
    DST is something that `force` never replaces (check_destination)."""
    validate(cfg)
    if cfg.workers <= 0:
        cfg.workers = available_cores()
    dst = Path(cfg.dst)
    tidy_after_a_stopped_convert(dst)  # first: an output it puts back is an existing DST
    src = resolve_root(cfg.src, "SRC")
    check_destination(src, dst, cfg.format, cfg.force)  # before anything is made: a refused DST leaves none
    there = outputs_there(dst)
    with holding(dst):  # makes DST's folder
        if outputs_there(dst) != there:  # published by another convert that ended since the check
            check_destination(src, dst, cfg.format, cfg.force)
        return _convert(cfg, dst)


def _convert(cfg: ConvertConfig, dst: Path) -> ConvertSummary:
    """convert's work, once DST is checked and held: the images read, written and published."""
    start = time.perf_counter()
    images = source_images(cfg)
    tmp = temp_path(dst)
    temporaries = {tmp: dst}  # each temporary, and the output it becomes
    try:
        if cfg.format == "ffcv":
            names_tmp = temp_path(names_path(dst))
            temporaries[names_tmp] = names_path(dst)
            written, skipped, info = convert_ffcv(images, tmp, names_tmp, cfg)
        else:
            from moco_fast.convert_wds import write_shard_set

            written, skipped, info = write_shard_set(images, tmp, cfg)
        empty = classes_without_images(images, skipped)
        skipped = images.skipped + skipped
        meta = {
            "format": cfg.format,
            "classes": images.classes,
            "classes_without_images": empty,
            "num_images": written,
            **info,
            "source": os.path.abspath(images.root),  # train's last line finds its eval split from any folder
            "max_resolution": cfg.max_resolution,
            "jpeg_quality": cfg.jpeg_quality,
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
        }
        if cfg.format == "ffcv":
            meta["write_mode"] = cfg.write_mode
            side_tmp = temp_path(sidecar_path(dst))
            temporaries[side_tmp] = sidecar_path(dst)
            with writing(side_tmp):
                side_tmp.write_text(json.dumps(meta, indent=1))
            # An earlier list goes first: killed before the new one is in place, the new .beton has
            # none (the loader then names images by number) rather than one of other files. Killed
            # after the .beton, before its sidecar: the old sidecar records the old .beton's
            # fingerprint, and its readers (the loader, --force) see that it is stale.
            names_path(dst).unlink(missing_ok=True)  # check_destination: an earlier list of convert only
            publish(tmp, dst, cfg.force)
            # the sidecar (check_destination: an earlier sidecar only) and the file
            # list: small, flushed without a line of their own (announce)
            publish(side_tmp, sidecar_path(dst), cfg.force, announce=False)
            publish(names_tmp, names_path(dst), cfg.force, announce=False)
        else:
            with writing(tmp):
                (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
            publish(tmp, dst, cfg.force)
    except BaseException as e:
        for p in temporaries:
            remove(p)
        refused = None if interruption(e) else os_error_behind(e)
        final = None if refused is None else output_of(refused.filename, temporaries)
        if final is not None and (refused.errno in ENVIRONMENT_ERRNOS or refused is e):
            # a full disk met by a write (a tar member's, an FFCV worker's page): DST is what the user
            # named, and the temporary is gone. An error without a path is not DST's unless `writing`
            # gave it DST's temporary.
            raise OSError(refused.errno, refused.strerror, str(final)) from e
        raise
    if empty:
        log.warning("%s: %s", dst, empty_classes_text(empty))
    return ConvertSummary(dst, written, skipped, size_of(dst), time.perf_counter() - start, empty)


def classes_without_images(images: ImageList, skipped: list[tuple[str, str]]) -> list[str]:
    """The classes of `images` of which no image is written: all their files failed the listing's
    check or the decode (`skipped`). Kept in the class list (find_classes counts a folder of image
    files whatever they hold): dropped and renumbered, the labels would no longer match the folder's
    other split, converted against these classes, nor a torch-loader run on the folder."""
    failed = {path for path, _ in skipped}
    written = {label for path, label in zip(images.files, images.labels, strict=True) if path not in failed}
    return [name for i, name in enumerate(images.classes) if i not in written]
