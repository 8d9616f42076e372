"""The sweep's table: one row per setting as markdown (sweep.md), JSON (sweep.json) and a bar
chart (sweep.png, with matplotlib), each file replaced whole."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from moco_fast.checkpoint import atomic_write, atomic_write_text
from moco_fast.config import ConfigError

TABLE_JSON = "sweep.json"  # marks a sweep's folder (run_folder: no run trains into one)
TABLE_MD, TABLE_PNG = "sweep.md", "sweep.png"
TABLE_FILES = (TABLE_MD, TABLE_PNG)  # the table's other files, written after TABLE_JSON

log = logging.getLogger("moco_fast")


def number_text(v: float) -> str:
    """`{:g}` (0.99, 0, 1e-05: the folder names sweeps have always had, so that they are found again)
    where that reads back as `v`, else the shortest text that does (0.9999999, not the `{:g}` 1 that
    m = 1 also gives): two distinct values never share a folder name or a table cell."""
    short = f"{v:g}"
    return short if float(short) == v else repr(float(v))


COLUMNS = [
    ("mechanism", "mechanism", "{}"),
    ("k", "K", "{}"),
    ("m", "m", "{:g}"),
    ("shuffle_bn", "shuffle BN", "{}"),
    ("epochs", "epochs", "{}"),
    ("loss", "final loss", "{:.3f}"),
    ("pretext_acc", "pretext acc %", "{:.1f}"),
    ("knn_top1", "kNN top-1 % (backbone)", "{:.2f}"),
    ("knn_head_top1", "kNN top-1 % (head)", "{:.2f}"),
    ("random_knn_top1", "kNN % random init", "{:.2f}"),
    ("linear_top1", "linear top-1 %", "{:.2f}"),
    ("wall_s", "time s", "{:.0f}"),
]


def markdown_table(results: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in results)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if isinstance(v, bool):
                v = "on" if v else "off"
            cells.append("-" if v is None else fmt.format(v) if not isinstance(v, str) else v)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    """A bar chart of kNN (and linear) accuracy and pretext accuracy per setting; False without matplotlib.
    The random init's kNN (--knn-baseline) is a bar beside the trained ones, as it is a column of the
    table: what a setting's training gained is read against it (a short run can score below it).
    A setting that diverged is named so under its empty place."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    # a diverged setting has no bar at all: its tick says why, as its row's final loss does
    names = [r["name"] + ("\n(diverged)" if r.get("error") is not None else "") for r in results]
    x = range(len(results))
    series = [
        (k, label)
        for k, label in (
            ("knn_top1", "kNN (backbone)"),
            ("knn_head_top1", "kNN (head)"),
            ("random_knn_top1", "kNN (random init)"),
            ("linear_top1", "linear"),
        )
        if any(r.get(k) is not None for r in results)
    ]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 1.2 * len(results) + 2), 7), sharex=True)
    width = 0.8 / max(len(series), 1)
    for j, (key, label) in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * width  # the group stays centred on its tick
        # a setting without this figure (a grid run without --lincls-epochs) gets no bar, not a 0%
        shown = [(i, r[key]) for i, r in zip(x, results) if r.get(key) is not None]
        ax1.bar([i + offset for i, _ in shown], [v for _, v in shown], width, label=label)
    ax1.set_ylabel("top-1 %")
    ax1.set_title("downstream accuracy per setting")
    if series:  # beside the axes: inside, "best" still hid the bars of a setting near the top
        ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    pretext = [(i, r["pretext_acc"]) for i, r in zip(x, results) if r.get("pretext_acc") is not None]
    ax2.bar([i for i, _ in pretext], [v for _, v in pretext], 0.6, color="gray")
    ax2.set_ylabel("pretext acc % (last epoch)")
    ax2.set_xticks(list(x))
    ax2.set_xlim(-0.5, len(results) - 0.5)  # a setting without bars (the first, the last) keeps its place
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    try:  # atomically, named as itself: a full disk's error names sweep.png, not a temporary file
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    finally:
        plt.close(fig)
    return True


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def shown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the markdown table shows them: K says where it is not the K asked for, and a setting
    that diverged (no figures: the sweep went on without them) says so as its loss."""
    out = []
    for r in rows:
        r = dict(r)
        if r.get("mechanism") == "end-to-end" and r.get("k") is not None:
            r["k"] = f"{r['k']} (batch)"
        elif r.get("k_asked") is not None:
            r["k"] = f"{r['k']} (bank size; {r['k_asked']} asked)"
        if r.get("error") is not None:
            r["loss"] = "diverged"  # the JSON row keeps the whole line, with its epoch and advice
        if isinstance(r.get("m"), float):
            r["m"] = number_text(r["m"])  # 0.9999999, not the `{:g}` 1
        out.append(r)
    return out


def refuse_others_tables(out: Path) -> None:
    """ConfigError where the folder `out` of a sweep's first table holds a sweep.md or sweep.png
    without the sweep.json that a sweep writes before them: the user's files, which the table would
    overwrite (and a machine without matplotlib delete the png)."""
    if (out / TABLE_JSON).is_file():
        return
    for name in TABLE_FILES:
        if (out / name).exists():
            raise ConfigError(
                f"--out {out} holds {name} but no {TABLE_JSON}: not a sweep's table, which the sweep would "
                "overwrite; move it away or choose another --out"
            )


def write_table(rows: list[dict[str, Any]], out: Path, not_run: list[str] = ()) -> None:
    """OUT/sweep.json, sweep.md and (with matplotlib) sweep.png, each replaced whole; sweep.json first:
    a sweep.md or sweep.png without it is not a sweep's (refuse_others_tables). `not_run`: the grid's
    settings that a stopped sweep left unfinished, named under sweep.md's table (where a stderr whose
    reader went away took the stop's line, the table is what is left to read)."""
    write_json(out / TABLE_JSON, rows)
    text = markdown_table(shown(rows)) if rows else ""  # none: a sweep stopped in its first setting
    if not_run:
        text += f"\nNot finished (the sweep stopped; the same sweep command runs them): {', '.join(not_run)}\n"
    atomic_write_text(out / TABLE_MD, text.lstrip("\n"))
    if not rows or not plot(rows, out / TABLE_PNG):
        (out / TABLE_PNG).unlink(missing_ok=True)  # an old plot would not show these rows
