"""What the ranks of one training job must agree on, checked once, before the first step.

The ranks never compare their settings or data otherwise: a rank with fewer steps per epoch goes on
to the epoch's all-reduce while the others wait in the next step's all-to-all, and both wait until
the collective timeout (an hour) without a word; a rank with another --moco-k finishes "fine" with
a queue that rank 0's broadcast cut to size. So every rank sends, in one all_gather_object, its
resolved settings, the epoch it resumes from and the size of its data, and every rank raises the
same one-line error where they differ, naming what differs and each rank's value.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from moco_fast import distributed as dist_utils
from moco_fast.config import ConfigError, TrainConfig, plain, to_dict
from moco_fast.data import DataError

# Settings a rank may hold on its own: paths that can differ between machines (what they hold is
# compared instead: the data's size, the checkpoint's epoch), the data workers (a per-process
# resource), and the device and precision flags, compared as what they resolve to ("auto" and
# "cuda" pick the same device).
PER_RANK_FIELDS = frozenset(
    {"data.data", "data.workers", "runtime.out", "runtime.resume", "runtime.device", "runtime.amp"}
)

# The settings named in one error; more are counted.
SHOWN = 3

log = logging.getLogger("moco_fast")


class HeldWarnings(logging.Filter):
    """On ranks > 0, from the start of train until agree() passes: their warnings of the setup
    (skipped files, settings) are rank 0's again when the ranks share data and settings, so they are
    held, dropped once agree() passes (`release(show=False)`), and printed when the setup fails
    (`release(show=True)`): the ranks may then see different data, and a rank's skipped file is the
    clue. Errors pass at once."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        log.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        self.records.append(record)
        return False

    def release(self, show: bool) -> None:
        log.removeFilter(self)
        records, self.records = self.records, []
        for r in records if show else ():
            log.handle(r)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{name}."))
        else:
            out[name] = plain(v)
    return out


def job_settings(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, Any]:
    """The resolved config as dotted names, less PER_RANK_FIELDS, plus the device type and autocast
    dtype the run resolved to."""
    flat = {k: v for k, v in _flat(to_dict(cfg)).items() if k not in PER_RANK_FIELDS}
    return {**flat, "device": device.type, "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off"}


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'; [3] -> 'rank 3'."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    text = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs)
    return f"rank{'s' * (len(ranks) > 1)} {text}"


def by_rank(values: list[Any], show=repr) -> str:
    """Each distinct value with the ranks that hold it: "256 on rank 0, 512 on rank 1"."""
    groups: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(show(v), []).append(r)
    return ", ".join(f"{v} on {_ranks(ranks)}" for v, ranks in groups.items())


def check_ranks_agree(reports: list[dict[str, Any]]) -> None:
    """Raise, on every rank alike, where the ranks' reports (rank_report, all-gathered) differ:
    settings first (a different --batch-size also changes the steps), then the checkpoint, then
    the data."""
    if len(reports) < 2:
        return
    settings = [r["settings"] for r in reports]
    names = sorted({k for s in settings for k in s})
    differ = [k for k in names if len({repr(s.get(k)) for s in settings}) > 1]
    if differ:
        more = f" (and {len(differ) - SHOWN} more)" if len(differ) > SHOWN else ""
        shown = "; ".join(f"{k}: {by_rank([s.get(k) for s in settings])}" for k in differ[:SHOWN])
        raise ConfigError(
            f"the ranks were started with different settings: {shown}{more}: start every rank with the same flags"
        )
    starts = [r["start_epoch"] for r in reports]
    if len(set(starts)) > 1:
        raise ConfigError(
            f"--resume: the ranks found different checkpoints (epochs {starts}): "
            "put --out on a file system that every machine sees"
        )
    data = [(r["num_images"], r["steps"]) for r in reports]
    if len(set(data)) > 1:
        raise DataError(
            "the ranks see different data: "
            + by_rank(data, lambda d: f"{d[0]} images ({d[1]} step{'s' * (d[1] != 1)} an epoch)")
            + ": every rank must read the same images (--data on each machine holding the same set)"
        )


def agree(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None, start_epoch: int, loader) -> None:
    """One all_gather_object of what must be the same on every rank, then check_ranks_agree."""
    mine = {
        "settings": job_settings(cfg, device, amp_dtype),
        "start_epoch": start_epoch,
        "num_images": loader.num_images,
        "steps": len(loader),
    }
    check_ranks_agree(dist_utils.all_gather_objects(mine))
