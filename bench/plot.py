"""A PNG bar chart of a bench/throughput.py result: images/s per row, with a step row's ratio to the
reference and a loader row's to the fastest step row (loader/step).

    python bench/plot.py bench/results/cpu-2core-throughput.json throughput.png

matplotlib is optional (`pip install 'moco-fast[plot]'`): without it, no plot and a one-line note.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is scripts, not a package

from report import speed_text

from moco_fast.checkpoint import atomic_write


def plot_rows(result: dict, path: str | Path) -> bool:
    """Writes the chart to `path`; returns False (and says why) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'moco-fast[plot]')", file=sys.stderr)
        return False
    rows = [r for r in result["rows"] if r.get("img_per_s")]
    if not rows:
        print("no plot: no row has a figure", file=sys.stderr)
        return False
    labels = [f"{r.get('name', r.get('row'))}\n{r.get('settings', '')}" for r in rows]  # row: older ffcv JSON
    values = [r["img_per_s"] for r in rows]
    colors = ["#999999" if r.get("kind") == "reference" else "#3b75af" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.7 * len(rows) + 1.5))
    y = list(range(len(rows)))[::-1]  # first row on top, as in the table
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, labels, fontsize=8)
    for yi, r in zip(y, rows):
        note = f" {speed_text(r['img_per_s'])}"  # as the table: 4.7, not 5, on a CPU
        if r.get("kind") == "loader":  # over a step, not a speed-up (a JSON before loader_over_step: none)
            if r.get("loader_over_step") is not None:
                note += f"  (loader/step {r['loader_over_step']:.2f})"
        elif r.get("vs_reference") is not None and r.get("kind") != "reference":
            note += f"  ({r['vs_reference']:.2f}x ref)"
        ax.text(r["img_per_s"], yi, note, va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.3)
    ax.set_xlabel("images / s per device")
    cfg = result.get("config", {}).get("train", {})
    model, optim, aug = cfg.get("model", {}), cfg.get("optim", {}), cfg.get("data", {}).get("aug", {})
    dev = result.get("device", {})
    ax.set_title(
        f"MoCo {cfg.get('preset', '')} {model.get('arch', '')}, batch {optim.get('batch_size', '?')}, "
        f"{aug.get('image_size', '?')} px on {dev.get('name', dev.get('type', '?'))}",
        fontsize=10,
    )
    fig.tight_layout()
    try:  # atomically: a full disk leaves no half-written PNG under the name
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    finally:
        plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", help="a result JSON of bench/throughput.py (or bench/ffcv_loader.py)")
    p.add_argument("png", help="the chart to write, a .png file")
    a = p.parse_args(argv)
    if Path(a.png).suffix.lower() != ".png":
        print(f"error: {a.png}: name a .png file", file=sys.stderr)
        return 2
    try:
        result = json.loads(Path(a.result).read_text())
        if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
            raise ValueError("it holds no rows")
    except (OSError, ValueError) as e:
        print(f"error: {a.result}: not a bench result ({e})", file=sys.stderr)
        return 2
    try:
        return 0 if plot_rows(result, a.png) else 1
    except OSError as e:
        from moco_fast.cli import one_line

        line = one_line(e)  # a full disk, a folder that may not be written
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
