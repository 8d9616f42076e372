"""The table, the machine description, the call timer, the endless batch stream, the output-path
check, the result's write and the log lines said once of the bench/ scripts."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from moco_fast.checkpoint import atomic_write_text
from moco_fast.config import ConfigError


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "host_cpus": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}")
        info["multiprocessors"] = p.multi_processor_count
    else:
        info["name"] = _cpu_name()
        info["torch_threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = os.getloadavg()[0]  # a shared machine's figures are noisy: say how busy it was
    return info


def time_calls(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds per call (CUDA events on a GPU, the host clock on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


NOT_RUN = "not run (interrupted)"  # the error of the rows after the one Ctrl-C stopped


def speed_text(img_per_s: float) -> str:
    """Images/s as the table and the plot show it: one decimal below 100 (CPU figures), else whole."""
    return f"{img_per_s:.1f}" if img_per_s < 100 else f"{img_per_s:,.0f}"


def ms_text(ms: float) -> str:
    """Milliseconds per step or batch as the table shows them: one decimal from 1 ms, two significant
    digits below (a synthetic loader's batch of 16 on a CPU takes microseconds: "0.0" read as no time).
    The digits are counted after rounding: 0.0999 is "0.10", not "0.100", and 0.99996 is "1.0"."""
    if 0 < ms < 1:
        ms = float(f"{ms:.2g}")  # two significant digits; may round up to the next decade, or to 1
    if not 0 < ms < 1:
        return f"{ms:.1f}"
    return f"{ms:.{1 - math.floor(math.log10(ms))}f}"


Format = str | Callable[[float], str]  # a str.format pattern, or a function of the value

COLUMNS: list[tuple[str, str, Format]] = [  # (key, header, format)
    ("img_per_s", "img/s", speed_text),
    ("ms_per_step", "ms/step", ms_text),
    ("vs_reference", "x ref", "{:.2f}"),  # trainer, end-to-end and reference rows: see add_ratios
    ("loader_over_step", "loader/step", "{:.2f}"),  # loader rows only
    ("peak_mem_gib", "peak GiB", "{:.1f}"),
    ("gpu_util_pct", "GPU %", "{:.0f}"),
    ("gpu_mem_bus_pct", "mem-bus %", "{:.0f}"),
    ("gpu_mem_used_gib", "GPU GiB", "{:.1f}"),
    ("gpu_power_w", "W", "{:.0f}"),
]


def _fmt(value, fmt: Format) -> str:
    if value is None:
        return ""
    return fmt(value) if callable(fmt) else fmt.format(value)


def format_table(rows: list[dict], columns: list[tuple[str, str, Format]] = COLUMNS, name_key: str = "name") -> str:
    """One table; columns that no row has (GPU figures on a CPU) are left out."""
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    header = ["row", "settings", *(h for _, h, _ in cols)]
    body = []
    for r in rows:
        if r.get("error"):  # in the settings column; a row an interruption left is not a failure
            text = r["error"] if r["error"] == NOT_RUN else f"failed: {r['error']}"
            body.append([r[name_key], text[:100]])
            continue
        body.append([r[name_key], r.get("settings", ""), *(_fmt(r.get(k), f) for k, _, f in cols)])
    widths = [max(len(str(x[i])) for x in [header, *body] if i < len(x)) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(x, widths)))
        for x in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def forever(loader, batches=None):
    """Batches across epochs, as a long run sees them (epoch boundaries included). `batches(loader)`
    picks what to iterate (default: the loader itself)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from (loader if batches is None else batches(loader))
        epoch += 1


def add_ratios(rows: list[dict]) -> None:
    """Each measured trainer, end-to-end and reference row's speed over a reference row of the run:
    the one with the same BN set-up (`shuffle_bn`: split BN, or plain BN with `+noshuffle`) where the
    run has one, else the first; the row names it in `reference`. A loader row gets no such ratio: its
    images/s over a step's read as a speed-up of training. It gets `loader_over_step` instead, over the
    fastest step row (trainer or reference, named in `step_row`; end-to-end holds the loader itself):
    how many times as many images per second as that step takes the loader delivers (above 1 it keeps
    up)."""
    refs: dict[bool, dict] = {}
    for r in rows:
        if r["kind"] == "reference" and r.get("img_per_s"):
            refs.setdefault(r.get("shuffle_bn", True), r)
    first = next(iter(refs.values()), None)
    steps = [r for r in rows if r["kind"] in ("trainer", "reference") and r.get("img_per_s")]
    fastest = max(steps, key=lambda r: r["img_per_s"], default=None)
    for r in rows:
        if not r.get("img_per_s"):
            continue
        if r["kind"] == "loader":
            if fastest is not None:
                r["loader_over_step"] = r["img_per_s"] / fastest["img_per_s"]
                r["step_row"] = fastest["name"]
            continue
        ref = refs.get(r.get("shuffle_bn", True), first)
        if ref is not None:
            r["vs_reference"] = r["img_per_s"] / ref["img_per_s"]
            r["reference"] = ref["name"]


def ratio_notes(rows: list[dict]) -> list[str]:
    """The lines under the table that say what its ratio columns are, for the columns it shows."""
    notes = []
    if any(r.get("vs_reference") is not None for r in rows):
        # add_ratios falls back to the first reference row when none has a row's BN set-up: then the
        # ratio of a +noshuffle row (plain BN) is over split BN, and "same BN set-up" would be untrue
        bn = {r["name"]: r.get("shuffle_bn", True) for r in rows}
        unlike = sorted(
            r["name"]
            for r in rows
            if r.get("vs_reference") is not None and r.get("shuffle_bn", True) != bn.get(r["reference"], True)
        )
        if unlike:
            notes.append(
                "x ref: a training row's img/s over the reference row's (the official-style step); "
                f"{', '.join(unlike)} against another BN set-up: add reference:noshuffle "
                "or reference to --rows to compare like for like"
            )
        else:
            notes.append(
                "x ref: a training row's img/s over the reference row's (the official-style step; same BN set-up)"
            )
    step = next((r["step_row"] for r in rows if r.get("loader_over_step") is not None), None)
    if step is not None:
        notes.append(
            f"loader/step: a loader row's img/s over {step}'s, the fastest step row (above 1 the loader keeps "
            "up; not a training speed-up)"
        )
    return notes


def check_output_path(path: str | None, flag: str, suffix: str) -> None:
    """Before any row runs: an output path that cannot be written (the CLI's `check_output`) or
    that does not end in `suffix` is a one-line error, not a traceback after the first row. A run's
    own file (`--json runs/moco/config.json`, summary.json, lincls.json) is never replaced, as with
    `moco-fast export`; an earlier bench result is."""
    if path is None:
        return
    from moco_fast.commands import check_output
    from moco_fast.run_folder import run_file

    if Path(path).suffix.lower() != suffix:
        raise ConfigError(f"{flag} {path}: name a {suffix} file")
    check_output(path, flag, replaces=run_file)


def write_json(path: str, result: dict) -> None:
    """A bench's result at `path` (its --json, checked by check_output_path), through atomic_write: a
    bench writes it after every row, so that a run cut short keeps what it measured, and a reader
    never meets half a file."""
    atomic_write_text(path, json.dumps(result, indent=2, default=str))


@contextlib.contextmanager
def each_warning_once() -> Iterator[None]:
    """moco-fast's log records, each said once while a bench runs: every loader or end-to-end row
    builds a loader that reads the data anew, and says again what it found (the resident loader
    decodes every image, and names each it cannot decode; DALI names each file its decoder fails on,
    and a shard set's count that its meta.json misstates). throughput.py lists the data once for all
    its rows (check_data); bench/ffcv_loader.py lists it again to convert it."""
    said: set[tuple[int, str]] = set()

    def first_time(record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        fresh = key not in said
        said.add(key)
        return fresh

    log = logging.getLogger("moco_fast")
    log.addFilter(first_time)
    try:
        yield
    finally:
        log.removeFilter(first_time)  # main called in-process (the tests): the logger is the process's
