"""Decoding for `moco-fast convert`, with the checks, and the parallel map that both output formats
run it in: each image is decoded in full, so truncated or corrupt files fail here; grayscale, CMYK
and palette images become RGB; `max_resolution` shrinks an image so that its longer side is at
most that many pixels (JPEGs are decoded at a reduced DCT scale first, which is faster and as sharp).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

from PIL import Image

from moco_fast.image_dataset import to_rgb
from moco_fast.metrics import tqdm


def load_resized(path: str, max_resolution: int | None) -> Image.Image:
    """Decode in full (raises on a truncated file), convert to RGB, shrink the longer side to at most
    `max_resolution` (bicubic, antialiased)."""
    with Image.open(path) as im:
        if max_resolution and im.format == "JPEG" and max(im.size) > max_resolution:
            s = max_resolution / max(im.size)
            # DCT scaling: decode at 1/2, 1/4 or 1/8 size, never below the requested size.
            im.draft("RGB", (math.ceil(im.size[0] * s), math.ceil(im.size[1] * s)))
        im.load()
        img = to_rgb(im)
    if max_resolution and max(img.size) > max_resolution:
        w, h = img.size
        s = max_resolution / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    return img


def exit_with_parent(parent: int) -> None:
    """In a convert's forked worker: ends it (os._exit) within a second of its parent's end. A parent
    killed without warning (SIGKILL: the OOM killer, a preemption) closed none of its queues, and
    its workers, each waiting on a queue whose other end a sibling still holds, were left running
    forever. A thread that polls, not PR_SET_PDEATHSIG: that fires when the forking thread ends."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def parallel_map(fn: Callable, jobs: list, workers: int, desc: str) -> Iterator:
    """fn over jobs in order, in `workers` processes, with a progress bar. Works in windows, so that
    results never pile up in memory faster than the caller consumes them."""
    bar = tqdm(total=len(jobs), desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)
    try:
        if workers <= 1:
            for j in jobs:
                yield fn(j)
                bar.update()
            return
        window = workers * 64
        with ProcessPoolExecutor(
            workers, mp_context=mp.get_context("fork"), initializer=exit_with_parent, initargs=(os.getpid(),)
        ) as ex:
            for start in range(0, len(jobs), window):
                chunk = jobs[start : start + window]
                for r in ex.map(fn, chunk, chunksize=16):
                    yield r
                    bar.update()
    finally:
        bar.close()
