"""Loader-only throughput: FFCV against the torch loader making the same two 224-px MoCo v2 views,
on the same cores, in one run. One table plus JSON (`--json`).

    python bench/ffcv_loader.py                          # ../shared/data/imagenet-sample, 1,000 images
    python bench/ffcv_loader.py --rows torch,ffcv --steps 20 --json bench/results/cpu-ffcv-loader.json

The sample is converted first (into a temporary folder) to a .beton at `--max-resolution` (256 by
default: the size FFCV's ImageNet recipes use for low-resolution training, and enough for 224 crops)
and, for a like-for-like torch row, to a folder of the same 256-px JPEGs. Rows:

    torch           torch loader on the original full-size JPEGs: decode, crop, jitter, gray, blur, flip
    torch-crops     torch loader on the originals doing only the crops and flips (FFCV's CPU share)
    torch-256       the same as torch on the 256-px copies (what a torch user could prepare too)
    torch-crops-256 torch-crops on the 256-px copies: the like-for-like engine comparison
    ffcv            FFCV's Numba pipeline: one decode, two crops, flips (uint8 views, the CPU part)
    ffcv-twice      the same with one decode per view (decode=twice: the stock decoder's work)
    ffcv+aug        the whole FFCV backend: + colour jitter, gray, blur, normalise in one batched pass
                    on the training device (here the CPU; on a GPU machine it runs there)
    aug-sample      only that device pass, on `--device`, for 2 x batch views of 224 px (uint8 in,
    aug-batch       normalised out), with ColorJitter order per image or per batch (no data needed):
                    from FFCV's uint8 N x 2 x S x S x 3 batch as FFCVLoader hands it on
                    (DeviceAugment.from_uint8: its permute-and-reshape copy, float(), div_, the pass)
    aug-*-triton    the same pass in the fused Triton kernels (kernels/augment_triton.py, blur_triton.py;
                    on a GPU, or on the CPU under TRITON_INTERPRET=1 at a crawl), which read FFCV's
                    uint8 N x 2 x S x S x 3 batch itself (DeviceAugment.from_uint8): both rows time
                    the way from the loader's uint8 batch to the trainer's views

Each row warms up (`--warmup` batches, which includes FFCV's Numba compile) and then times at least
`--steps` batches and `--min-seconds`, across epochs when the set is shorter (the torch loader's
workers starting each next epoch's first batch ahead, as in training). `img/s` counts images, each with its two views.
The JSON is written once, after the rows; its `complete` is false when a Ctrl-C stopped them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package

from before_rows import interrupted_before_rows, stopped_before_rows

# torch takes seconds to import: a Ctrl-C here is one line too (torchvision: this bench never imports it)
with interrupted_before_rows(held=("torch",)):
    import torch
    from moco_fast.loaders import LoaderArgs, create_loader
    from moco_fast.loaders.base import listed_splits
    from report import (
        NOT_RUN,
        check_output_path,
        device_info,
        each_warning_once,
        forever,
        format_table,
        ms_text,
        speed_text,
    )

    from moco_fast.augment import MOCO_V2
    from moco_fast.checkpoint import atomic_write_text
    from moco_fast.cli import log_as_lines
    from moco_fast.config import ConfigError, check_at_least
    from moco_fast.convert import ConvertConfig, convert
    from moco_fast.convert_images import load_resized
    from moco_fast.data import IMAGE_EXTENSIONS, DataError, DataSplits

ROWS = ("torch", "torch-crops", "torch-256", "torch-crops-256", "ffcv", "ffcv-twice", "ffcv+aug")
# The device pass alone (the FFCV backend's colour/blur/normalise step) on --device: not in the
# default rows; on a GPU run `--rows aug-sample,aug-batch --device cuda --batch-size 256`. The
# -triton rows: the same pass in the fused Triton kernels (DeviceAugment(kernel="triton")), to time against.
AUG_ROWS = ("aug-sample", "aug-batch", "aug-sample-triton", "aug-batch-triton")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def class_tree(src: Path, dst: Path) -> Path:
    """A folder with class subfolders: `src` itself if it has them, else symlinks grouped by the
    file-name prefix before the first '_' (ImageNet's `n01440764_tench.JPEG`)."""
    if any(p.is_dir() for p in src.iterdir()):
        return src
    for f in sorted(src.iterdir()):
        if f.suffix.lower() in IMAGE_EXTENSIONS:
            (dst / f.name.split("_")[0]).mkdir(parents=True, exist_ok=True)
            (dst / f.name.split("_")[0] / f.name).symlink_to(f.resolve())
    return dst


def resized_tree(src: Path, dst: Path, max_res: int, quality: int) -> Path:
    for f in sorted(src.rglob("*")):
        if f.is_file() or f.is_symlink():
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            load_resized(str(f), max_res).save(out.with_suffix(".jpg"), "JPEG", quality=quality)
    return dst


def timed(batches, warmup: int, steps: int, batch_size: int, min_seconds: float = 0.0) -> dict:
    """Time at least `steps` batches and at least `min_seconds` (fast rows get more batches)."""
    it = batches()
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    while n < steps or time.perf_counter() - t0 < min_seconds:
        next(it)
        n += 1
    dt = time.perf_counter() - t0
    return {"img_per_s": n * batch_size / dt, "ms_per_batch": 1000 * dt / n, "seconds": dt, "batches": n}


def run_row(row: str, roots: dict, a: argparse.Namespace, listings: dict[Path, DataSplits]) -> dict:
    """`listings`: each folder a torch row has read, as listed for it: the row that reads it next
    (torch-crops after torch) takes that listing rather than listing the folder again."""
    spec = MOCO_V2
    data = {"torch": roots["full"], "torch-crops": roots["full"]}.get(row) or (
        roots["small"] if row.startswith("torch") else None
    )
    if row.startswith("torch-crops"):
        spec = replace(spec, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0)
    options = {"decode": "twice"} if row == "ffcv-twice" else {}
    args = LoaderArgs(
        data=str(data or roots["beton"]),
        aug=spec,
        batch_size=a.batch_size,
        device=torch.device("cpu"),
        workers=a.workers,
        seed=0,
        check_images=False,
        eval_split="skip",  # no row evaluates: an ImageNet val/ not yet sorted into classes is no error
        options=options,
        # the epochs the row's batches may cross, as the trainer gives its loader a run's (the torch
        # loader's workers start each next epoch's first batch ahead): timed's --min-seconds leaves
        # the count open, so one that no row reaches
        epochs=sys.maxsize,
    )
    if data is not None:  # a torch row: the folder listed once, as its loader lists it
        if data not in listings:
            listings[data] = listed_splits(args)
        args.splits = listings[data]
    loader = create_loader("torch" if row.startswith("torch") else "ffcv", args)
    t0 = time.perf_counter()
    raw = row in ("ffcv", "ffcv-twice")
    out = timed(
        lambda: forever(loader, (lambda x: x.ffcv) if raw else None), a.warmup, a.steps, a.batch_size, a.min_seconds
    )
    out["warmup_s"] = time.perf_counter() - t0 - out["seconds"]
    return out


def run_aug_row(row: str, a: argparse.Namespace) -> dict:
    """The FFCV backend's device pass alone (its `DeviceAugment`): uint8 views -> augmented,
    normalised views in the trainer's dtype and channels-last."""
    from moco_fast.loaders.base import DeviceAugment, LoaderArgs

    dev = torch.device(a.device)
    if dev.type == "cuda":  # this row's peak, not the highest of the rows before it in the process
        torch.cuda.reset_peak_memory_stats(dev)
    spec, s = MOCO_V2, MOCO_V2.image_size
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    order, kernel = row.removeprefix("aug-").removesuffix("-triton"), "triton" if row.endswith("-triton") else "torch"
    augment = DeviceAugment(LoaderArgs(None, spec, a.batch_size, dev, dtype), order, flip=False, kernel=kernel)
    g = torch.Generator(device=dev).manual_seed(0)
    # FFCV's batch as FFCVLoader hands it to its pass (N x 2 x S x S x 3, permuted to 2 x N x 3 x S x S:
    # a view): the torch pass copies it to floats first (from_uint8), the kernels read it where it lies
    u8 = torch.randint(0, 256, (a.batch_size, 2, s, s, 3), dtype=torch.uint8, device=dev).permute(1, 0, 4, 2, 3)

    def passes():
        while True:
            out = augment.from_uint8(u8, g)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            yield out

    out = timed(passes, a.warmup, a.steps, a.batch_size, a.min_seconds)
    if dev.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


COLUMNS = [("img_per_s", "img/s", speed_text), ("ms_per_batch", "ms/batch", ms_text), ("vs_torch", "x torch", "{:.2f}")]


SETTINGS = {
    "torch": "full-size JPEGs, PIL decode + all MoCo v2 ops in DataLoader workers",
    "torch-crops": "full-size JPEGs, PIL decode + crops + flips only",
    "torch-256": "{res}-px JPEGs, PIL decode + all MoCo v2 ops in DataLoader workers",
    "torch-crops-256": "{res}-px JPEGs, PIL decode + crops + flips only",
    "ffcv": ".beton ({res} px, JPEG q{q}), Numba: 1 decode, 2 crops, flips; uint8 out",
    "ffcv-twice": "as ffcv with the stock decoder once per view",
    "ffcv+aug": "as ffcv + batched jitter/gray/blur/normalise on the CPU (torch)",
    "aug-sample": "device pass only, from FFCV's uint8 batch (copy + float + div_ + pass), ColorJitter order per image",
    "aug-batch": "device pass only, from FFCV's uint8 batch (copy + float + div_ + pass), ColorJitter order per batch",
    "aug-sample-triton": "as aug-sample, in the fused Triton kernels, which read FFCV's uint8 batch",
    "aug-batch-triton": "as aug-batch, in the fused Triton kernels, which read FFCV's uint8 batch",
}


def run_loader_rows(rows: list[str], a: argparse.Namespace, results: list[dict], conversion: dict) -> None:
    """Convert the sample (beton, and 256-px JPEGs when a -256 row asks; its figures go into
    `conversion`), then time each row into `results`."""
    with tempfile.TemporaryDirectory(prefix="ffcv-bench-") as tmp:
        tmp = Path(tmp)
        full = class_tree(Path(a.data), tmp / "full")
        t0 = time.perf_counter()
        beton = tmp / "sample.beton"
        cfg = ConvertConfig(
            str(full), str(beton), max_resolution=a.max_resolution, jpeg_quality=a.jpeg_quality, workers=a.workers
        )
        summary = convert(cfg)
        conversion |= {"images": summary.written, "seconds": time.perf_counter() - t0, "mib": summary.bytes / 2**20}
        small = None
        if any(r.endswith("-256") for r in rows):
            small = resized_tree(full, tmp / "small", a.max_resolution, a.jpeg_quality)
        roots = {"full": full, "small": small, "beton": beton}
        listings: dict[Path, DataSplits] = {}
        for row in rows:
            print(f"running {row} ...", file=sys.stderr)
            try:
                settings = SETTINGS[row].format(res=a.max_resolution, q=a.jpeg_quality)
                r = {"row": row, "name": row, "settings": settings, **run_row(row, roots, a, listings)}
            except Exception as e:  # one failed row must not lose the others
                r = {"row": row, "name": row, "error": f"{type(e).__name__}: {e}"}
            results.append(r)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="image folder (flat ImageNet-style names, or classes)")
    p.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated, from {', '.join(ROWS + AUG_ROWS)} (default: all but the aug-* rows)",
    )
    p.add_argument(
        "--max-resolution", type=int, default=256, help="the .beton's (and copies') longer side (default 256)"
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the .beton and copies (default 90)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    cores = len(os.sched_getaffinity(0))
    p.add_argument("--workers", type=int, default=cores, help=f"processes / threads (default: the cores, {cores})")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing (default 3)")
    p.add_argument("--steps", type=int, default=30, help="timed batches, at least (default 30)")
    p.add_argument("--min-seconds", type=float, default=20.0, help="time each row for at least this long (default 20)")
    p.add_argument("--device", default="cpu", help="where the aug-* rows run: cpu | cuda (default cpu)")
    p.add_argument("--note", default="", help="free text for the JSON (e.g. what else shared the machine)")
    p.add_argument("--json", help="write the results here, a .json file")
    a = p.parse_args(argv)
    log_as_lines(logging.WARNING)  # the data listing's warnings as the CLI writes them, as throughput.py
    with each_warning_once():  # the data is listed by the conversion, and again for the torch rows
        return measure(a)


def measure(a: argparse.Namespace) -> int:
    """The rows, the table and --json; the exit status."""
    rows = [r for r in a.rows.split(",") if r]
    try:  # every value checked before the conversion or any row: one line and exit 2
        check_args(a, rows)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # resolve_device may initialise CUDA, and --data is listed (seconds)
        return stopped_before_rows()

    results: list[dict] = []
    conversion: dict = {}
    interrupted = False
    try:
        for row in (r for r in rows if r in AUG_ROWS):
            print(f"running {row} ...", file=sys.stderr)
            settings = SETTINGS[row] + f" ({a.device})"
            try:
                r = {"row": row, "name": row, "settings": settings, **run_aug_row(row, a)}
            except Exception as e:  # one failed row must not lose the others (triton on a CPU, say)
                r = {"row": row, "name": row, "error": f"{type(e).__name__}: {e}"}
            results.append(r)
        loader_rows = [r for r in rows if r not in AUG_ROWS]
        if loader_rows:
            run_loader_rows(loader_rows, a, results, conversion)
    except KeyboardInterrupt:  # Ctrl-C, or a time box (timeout -s INT): the table of what was measured
        interrupted = True
        done = {r["row"] for r in results}
        results += [{"row": r, "name": r, "error": NOT_RUN} for r in rows if r not in done]
        print("interrupted: the rows not measured are marked", file=sys.stderr)
    base = next((r for r in results if r["row"] == "torch" and "img_per_s" in r), None)
    for r in results:
        if base and "img_per_s" in r:
            r["vs_torch"] = r["img_per_s"] / base["img_per_s"]
    print(format_table(results, COLUMNS, name_key="row"))
    if a.json:
        info = device_info(torch.device(a.device)) | {"cores_used": a.workers}
        doc = {
            "bench": "ffcv_loader",
            "machine": info,
            "note": a.note,
            "settings": {
                "data": a.data,
                "aug": "MoCo v2, 224 px, two views",
                "batch_size": a.batch_size,
                "workers": a.workers,
                "warmup": a.warmup,
                "steps": a.steps,
                "min_seconds": a.min_seconds,
                "max_resolution": a.max_resolution,
                "jpeg_quality": a.jpeg_quality,
            },
            "conversion": conversion or None,
            "rows": results,
            "complete": not interrupted,  # as throughput.py's: false after a Ctrl-C
        }
        atomic_write_text(a.json, json.dumps(doc, indent=1) + "\n")
    if interrupted:
        return 130  # as for Ctrl-C, after the table
    return 0 if all("img_per_s" in r for r in results) else 1


def check_args(a: argparse.Namespace, rows: list[str]) -> None:
    from moco_fast.trainer import resolve_device

    if not rows:
        raise ConfigError("--rows names no row")
    bad = [r for r in rows if r not in ROWS + AUG_ROWS]
    if bad:
        raise ConfigError(f"--rows: unknown rows {bad}; choose from {', '.join(ROWS + AUG_ROWS)}")
    for flag, value, least in (
        ("--batch-size", a.batch_size, 1),
        ("--workers", a.workers, 0),
        ("--warmup", a.warmup, 0),
        ("--steps", a.steps, 1),
        ("--max-resolution", a.max_resolution, MOCO_V2.image_size),
        ("--jpeg-quality", a.jpeg_quality, 1),
    ):
        check_at_least(flag, value, least)
    # one flag a line, with its value: "--min-seconds must be 0 or more and --jpeg-quality at most 100"
    # named both for either
    if not 0 <= a.min_seconds < float("inf"):
        raise ConfigError(f"--min-seconds must be a finite count of seconds, 0 or more (got {a.min_seconds:g})")
    if a.jpeg_quality > 100:
        raise ConfigError(f"--jpeg-quality must be at most 100 (got {a.jpeg_quality})")
    resolve_device(a.device)  # ConfigError: not cpu/cuda, or no GPU
    check_output_path(a.json, "--json", ".json")
    if any(r not in AUG_ROWS for r in rows):
        data = Path(a.data)
        if not data.is_dir():
            raise DataError(f"--data {data}: not a folder (the loader rows convert an image folder)")
        if not any(data.iterdir()):
            raise DataError(f"--data {data} is empty")
        # class_tree takes class folders, or images it groups by name: a folder of neither (a shard
        # set, a folder of .tar files) made no tree, and the conversion ended in a traceback naming
        # the bench's temporary folder ("data folder not found: /tmp/ffcv-bench-.../full")
        if not any(p.is_dir() or p.suffix.lower() in IMAGE_EXTENSIONS for p in data.iterdir()):
            raise DataError(
                f"--data {data} holds no class folders and no image files (the loader rows convert an image "
                "folder: <class>/<images>, or images named <class>_<name>)"
            )


if __name__ == "__main__":
    sys.exit(main())
