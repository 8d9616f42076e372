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
        with open(self.out / "summary.json", "w") as fh:
            json.dump(row, fh, indent=2)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
