"""Run logs: one JSON row per epoch in metrics.jsonl, TensorBoard scalars, and a progress bar."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("moco_fast")


def progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def read_rows(out: str | Path) -> list[dict[str, Any]]:
    """The rows of OUT/metrics.jsonl in order (none without the file); a row cut short by a crash
    is left out."""
    path = Path(out) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class MetricsWriter:
    def __init__(self, out: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.out = Path(out)
        self.tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))
        except ImportError:  # tensorboard is a dependency, but a run must not die without it
            log.warning("tensorboard is not installed: no TensorBoard logs")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row.get("epoch", 0))
        log.info("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def write_summary(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from moco_fast.checkpoint import atomic_write_text

        atomic_write_text(self.out / "summary.json", json.dumps(row, indent=2) + "\n")

    def keep_epochs(self, last: int) -> None:
        """Drop rows of epochs after `last` (the checkpoint a run resumes from): a run stopped
        between writing an epoch's row and its checkpoint would otherwise log that epoch twice."""
        path = self.out / "metrics.jsonl"
        if not self.enabled or not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("epoch", 0) <= last:
                    kept.append(line)
            except ValueError:  # a row cut short by a crash
                pass
        if len(kept) != len(lines):
            log.info(
                "metrics.jsonl: dropped %d rows after epoch %d (the checkpoint resumed)", len(lines) - len(kept), last
            )
            path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# What the evaluation commands and the sweep write beside a run's checkpoint, each named once.
LINCLS_RESULT = "lincls.json"  # `moco-fast lincls`
SWEEP_RESULT = "result.json"  # the sweep's row for the run
SWEEP_LINCLS_RESULT = "sweep_lincls.json"  # the sweep's short linear classifier on cached features
FINETUNE_RESULTS = {"moco": "finetune.json", "scratch": "finetune_scratch.json"}  # by initialisation
RUN_RESULTS = (
    LINCLS_RESULT,
    SWEEP_RESULT,
    SWEEP_LINCLS_RESULT,
    *FINETUNE_RESULTS.values(),
    *(Path(name).with_suffix(".pt").name for name in FINETUNE_RESULTS.values()),  # --save-model's default
)


def clear_run(out: str | Path) -> None:
    """Start over in an old run's folder (`train --force`): its checkpoint, rows, summary and
    TensorBoard logs go, so that nothing of the old run mixes with the new one."""
    import shutil

    out = Path(out)
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json", "config.json", *RUN_RESULTS):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)
