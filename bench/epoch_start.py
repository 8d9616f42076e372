"""How long each epoch of training with the torch loader waits for its first batch, against its
other batches and its wall time: the trainer's loop (set_epoch, then the step on every batch) on the
CPU, with the demo preset's model and batch and the trainer's --workers default, with the workers'
look-ahead into the next epoch (as the trainer runs it: LoaderArgs.epochs) and without.

    python bench/epoch_start.py                                  # the demo set
    python bench/epoch_start.py --data moco_fast/demo_data --data /work/shared/data/cifar10 \
        --images 1280 --repeats 2 --json out.json

A row per data set, look-ahead and repeat, the two settings alternated (a shared machine's load
changes from one minute to the next); epoch 1 (the workers' start) is left out of the figures,
which are medians over the epochs after it. `first batch s`: from set_epoch to the first batch in hand; `other batch
ms`: the median wait for each later batch (next() alone, the step excluded); `epoch s`: the
epoch's wall time, set_epoch to its last step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package

from before_rows import interrupted_before_rows

with interrupted_before_rows():
    import torch
    from moco_fast.loaders import LoaderArgs, create_loader
    from report import check_output_path, device_info, format_table, ms_text, write_json

    from moco_fast.config import ConfigError, build_config, check_at_least, to_dict
    from moco_fast.data import DataError, load_splits
    from moco_fast.model import MoCo
    from moco_fast.trainer import StepState, make_optimizer, resolve_workers, train_step

COLUMNS = [
    ("first_batch_s", "first batch s", "{:.3f}"),
    ("other_batch_ms", "other batch ms", ms_text),
    ("epoch_s", "epoch s", "{:.2f}"),
    ("img_per_s", "img/s", "{:.1f}"),
]


def measure(data: str | None, images: int | None, epochs: int, seed: int, look_ahead: bool) -> dict:
    """One row: `epochs` epochs of the trainer's loop on one data set, the figures of each after the first."""
    device = torch.device("cpu")
    cfg = build_config("demo", {"data.loader": "torch", "data.data": data, "runtime.device": "cpu"})
    splits = load_splits(data, check=False, eval_split="skip")
    if images is not None and images < len(splits.train):  # every k-th image: all classes kept
        keep = list(range(0, len(splits.train), len(splits.train) // images))[:images]
        splits.train = splits.train.keeping(keep, [])
    if len(splits.train) < cfg.optim.batch_size:  # the loader's line would say to lower a --batch-size it has not
        where = "the demo set" if data is None else data
        raise DataError(
            f"{where}: {len(splits.train)} images, fewer than the demo preset's batch of {cfg.optim.batch_size}"
        )
    workers = resolve_workers(cfg.data.workers, device)
    loader = create_loader(
        "torch",
        LoaderArgs(
            data=data,
            aug=cfg.data.aug,
            batch_size=cfg.optim.batch_size,
            device=device,
            channels_last=cfg.runtime.channels_last,
            workers=workers,
            seed=seed,
            epochs=epochs if look_ahead else None,
            check_images=False,
            eval_split="skip",
            splits=splits,
        ),
    )
    model = MoCo(cfg.model, cfg.moco, cfg.data.aug.image_size, loader.num_images)
    s = StepState(model, make_optimizer(model, cfg, device), torch.amp.GradScaler("cpu", enabled=False), None, device)
    epochs_seen = []
    try:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            t0 = time.perf_counter()
            it, waits, first = iter(loader), [], None
            while True:
                w0 = time.perf_counter()
                batch = next(it, None)
                if batch is None:
                    break
                waits.append(time.perf_counter() - w0)
                if first is None:
                    first = time.perf_counter() - t0
                train_step(s, batch, cfg.moco.m)
            epochs_seen.append({"first_batch_s": first, "waits_s": waits, "epoch_s": time.perf_counter() - t0})
            print(
                f"  epoch {epoch + 1}/{epochs}: first batch {first:.3f} s, epoch {epochs_seen[-1]['epoch_s']:.2f} s",
                file=sys.stderr,
            )
    finally:
        loader.close()
    return {
        "name": "demo set" if data is None else f"{data} ({loader.num_images} images)",
        "settings": f"{'look-ahead' if look_ahead else 'none'}, {workers} worker(s), {len(loader)} steps of {cfg.optim.batch_size}",
        "look_ahead": look_ahead,
        **figures(epochs_seen, len(loader) * cfg.optim.batch_size),
        "workers": workers,
        "epochs": epochs_seen,
        "config": to_dict(cfg),
    }


def figures(epochs_seen: list[dict], images: int) -> dict:
    """A row's figures, medians over the epochs after the first (the workers' start), of `images`
    each: `other_batch_ms` is None where an epoch is one step (it has no other batch)."""
    later = epochs_seen[1:]
    waits = [w for e in later for w in e["waits_s"][1:]]
    epoch_s = statistics.median(e["epoch_s"] for e in later)
    return {
        "first_batch_s": statistics.median(e["first_batch_s"] for e in later),
        "other_batch_ms": statistics.median(waits) * 1000 if waits else None,
        "epoch_s": epoch_s,
        "img_per_s": images / epoch_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", action="append", help="an image folder (repeatable; default: the demo set)")
    p.add_argument("--images", type=int, help="train on this many of each folder's images (every k-th)")
    p.add_argument("--epochs", type=int, default=4, help="epochs a data set (default 4; the first is left out)")
    p.add_argument("--repeats", type=int, default=1, help="rows of each data set and setting (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    try:
        check_at_least("--epochs", args.epochs, 2)
        check_at_least("--repeats", args.repeats, 1)
        if args.images is not None:
            check_at_least("--images", args.images, 1)
        check_output_path(args.json, "--json", ".json")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = [(d, ahead) for d in args.data or [None] for _ in range(args.repeats) for ahead in (False, True)]
    result = {"rows": [], "complete": False, "torch": torch.__version__, "args": vars(args)}
    try:
        for d, ahead in runs:
            row = measure(d, args.images, args.epochs, args.seed, ahead)
            row["load_avg_1min"] = os.getloadavg()[0]  # a shared machine's figures are noisy: say how busy
            result["rows"].append(row)
            result["device"] = device_info(torch.device("cpu"))
            if args.json:  # after every row: a run cut short keeps what it measured
                write_json(args.json, result)
        result["complete"] = True
        if args.json:
            write_json(args.json, result)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted after {len(result['rows'])} of {len(runs)} rows", file=sys.stderr)
    print(format_table(result["rows"], COLUMNS))
    loads = ", ".join(f"{r['load_avg_1min']:.1f}" for r in result["rows"])
    print(f"load average (1 min) at each row's end: {loads}")
    return 0 if result["complete"] else 130


if __name__ == "__main__":
    sys.exit(main())
