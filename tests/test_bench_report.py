"""bench/report.py's table and its ratios (x ref for the training rows, loader/step for the loader
rows), and bench/plot.py's labels of them."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import plot  # noqa: E402
from report import add_ratios, format_table, ratio_notes  # noqa: E402


def test_table_leaves_out_gpu_columns_without_figures():
    rows = [
        {"name": "trainer", "kind": "trainer", "settings": "bf16", "img_per_s": 3000.0, "ms_per_step": 85.3},
        {"name": "reference", "kind": "reference", "settings": "fp32", "img_per_s": 1200.0, "ms_per_step": 213.3},
        {"name": "trainer:graph", "kind": "trainer", "img_per_s": None, "error": "RuntimeError: capture failed"},
    ]
    add_ratios(rows)
    assert rows[0]["vs_reference"] == pytest.approx(2.5) and "vs_reference" not in rows[2]
    table = format_table(rows)
    assert "3,000" in table and "2.50" in table and "failed: RuntimeError" in table
    assert "GPU %" not in table and "W" not in table.split("\n")[0].split()
    rows[0].update(gpu_util_pct=97.0, gpu_power_w=612.0)
    header = format_table(rows).split("\n")[0]
    assert "GPU %" in header and header.split()[-1] == "W"


def test_rows_an_interruption_left_are_not_shown_as_failed():
    rows = [
        {"name": "loader", "kind": "loader", "settings": "torch", "img_per_s": 37.6, "ms_per_step": 106.4},
        {"name": "trainer", "kind": "trainer", "img_per_s": None, "error": "not run (interrupted)"},
    ]
    table = format_table(rows)
    assert "not run (interrupted)" in table and "failed" not in table


def table_cells(table: str) -> dict[str, dict[str, str]]:
    """Each row's cells by column header, cut at the dashed line's columns (a blank cell stays "")."""
    lines = table.split("\n")
    spans, start = [], None
    for i, ch in enumerate(lines[1] + " "):
        if ch == "-" and start is None:
            start = i
        elif ch != "-" and start is not None:
            spans.append((start, i))
            start = None
    cut = [[line[a:b].strip() for a, b in spans] for line in lines]
    return {row[0]: dict(zip(cut[0], row)) for row in cut[2:]}


def test_a_step_under_a_millisecond_is_not_shown_as_no_time():
    # A synthetic loader's batch of 16 on a CPU (8.4 us at 1.9M img/s) read "0.0 ms/step"; rows from
    # 1 ms on keep one decimal.
    ms = {"synthetic": 0.0084, "cached": 0.000042, "fast": 0.135, "trainer": 85.25, "reference": 1448.84}
    rows = [{"name": n, "kind": "trainer", "img_per_s": 16 / m * 1000, "ms_per_step": m} for n, m in ms.items()]
    cells = table_cells(format_table(rows))
    shown = {n: cells[n]["ms/step"] for n in ms}
    assert shown == {
        "synthetic": "0.0084",
        "cached": "0.000042",
        "fast": "0.14",
        "trainer": "85.2",
        "reference": "1448.8",
    }


def test_a_step_under_a_millisecond_that_rounds_up_keeps_two_digits():
    # The decimals were counted from the figure before rounding, so one that rounds up to the next
    # decade showed three significant digits ("0.100"), and one just under 1 ms "1.00" above "1.0"
    ms = {"a": 0.0999, "b": 0.00995, "c": 0.99996, "d": 1.0, "e": 0.0046}
    rows = [{"name": n, "kind": "trainer", "img_per_s": 16 / m * 1000, "ms_per_step": m} for n, m in ms.items()]
    cells = table_cells(format_table(rows))
    assert {n: cells[n]["ms/step"] for n in ms} == {"a": "0.10", "b": "0.010", "c": "1.0", "d": "1.0", "e": "0.0046"}


def test_a_loader_rows_ratio_is_over_the_fastest_step_and_not_under_x_ref():
    # A loader row's images/s over the reference step's stood in "x ref" beside the steps' ratios,
    # where 5.31 read as a training speed-up: it has its own column, over the fastest step row.
    rows = [
        {"name": "loader", "kind": "loader", "settings": "torch loader", "img_per_s": 9000.0, "ms_per_step": 28.4},
        {"name": "trainer", "kind": "trainer", "settings": "bf16", "img_per_s": 3000.0, "ms_per_step": 85.3},
        {"name": "trainer:fp16", "kind": "trainer", "settings": "fp16", "img_per_s": 3600.0, "ms_per_step": 71.1},
        {"name": "end-to-end", "kind": "end-to-end", "settings": "bf16", "img_per_s": 2000.0, "ms_per_step": 128.0},
        {"name": "reference", "kind": "reference", "settings": "fp32", "img_per_s": 1000.0, "ms_per_step": 256.0},
    ]
    add_ratios(rows)
    loader = rows[0]
    assert "vs_reference" not in loader and "reference" not in loader
    assert loader["loader_over_step"] == pytest.approx(2.5) and loader["step_row"] == "trainer:fp16"
    assert rows[3]["vs_reference"] == pytest.approx(2.0) and "loader_over_step" not in rows[3]
    cells = table_cells(format_table(rows))
    assert cells["loader"]["x ref"] == "" and cells["loader"]["loader/step"] == "2.50"
    assert cells["trainer"]["x ref"] == "3.00" and cells["trainer"]["loader/step"] == ""
    notes = ratio_notes(rows)
    assert notes[0].startswith("x ref: a training row's") and notes[1].startswith("loader/step: a loader row's")
    assert "over trainer:fp16's, the fastest step row" in notes[1] and "not a training speed-up" in notes[1]
    # no step row (--rows loader,end-to-end): nothing for a loader to be read against, no note for it
    alone = [dict(rows[0]), dict(rows[3])]
    for r in alone:
        for k in ("loader_over_step", "step_row", "vs_reference", "reference"):
            r.pop(k, None)
    add_ratios(alone)
    assert "loader_over_step" not in alone[0] and "loader/step" not in format_table(alone) and ratio_notes(alone) == []


def test_the_x_ref_note_says_same_bn_only_when_each_row_had_its_own_bn_reference():
    # --rows trainer,trainer:noshuffle,reference: the plain-BN row's ratio falls back to the split-BN
    # reference, and the note under the table said "same BN set-up" all the same
    rows = [
        {"name": "trainer", "kind": "trainer", "img_per_s": 3000.0, "shuffle_bn": True},
        {"name": "trainer:noshuffle", "kind": "trainer", "img_per_s": 3600.0, "shuffle_bn": False},
        {"name": "reference", "kind": "reference", "img_per_s": 1000.0, "shuffle_bn": True},
    ]
    add_ratios(rows)
    assert rows[1]["reference"] == "reference"
    note = ratio_notes(rows)[0]
    assert "same BN set-up" not in note and "trainer:noshuffle against another BN set-up" in note
    assert "reference:noshuffle" in note
    rows.append({"name": "reference:noshuffle", "kind": "reference", "img_per_s": 1100.0, "shuffle_bn": False})
    add_ratios(rows)
    assert rows[1]["reference"] == "reference:noshuffle" and "same BN set-up" in ratio_notes(rows)[0]


def test_plot_labels_give_the_speed_as_the_table_does(tmp_path, monkeypatch):
    # The bars' labels rounded to whole images/s: a CPU row of 4.7 img/s read 5 beside the table's 4.7.
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    texts = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, **kw: (texts.append(s), real(self, x, y, s, **kw))[1])
    rows = [
        {"name": "trainer", "kind": "trainer", "settings": "fp32", "img_per_s": 4.7, "ms_per_step": 3405.3},
        {"name": "reference", "kind": "reference", "settings": "fp32", "img_per_s": 2.8, "ms_per_step": 5670.9},
        {"name": "trainer:bf16", "kind": "trainer", "settings": "bf16", "img_per_s": 1234.4, "ms_per_step": 13.0},
    ]
    add_ratios(rows)
    assert plot.plot_rows({"rows": rows}, tmp_path / "p.png")
    assert [t.split("  (")[0].strip() for t in texts] == ["4.7", "2.8", "1,234"]
    table = format_table(rows)
    assert all(t.split("  (")[0].strip() in table for t in texts)
    # a loader row's ratio is over the fastest step, never "x ref" (nor in a JSON from before loader_over_step)
    texts.clear()
    loader = {"name": "loader", "kind": "loader", "settings": "torch loader", "img_per_s": 2468.8}
    old = {**loader, "vs_reference": 881.7, "reference": "reference"}
    add_ratios([*rows, loader])
    assert plot.plot_rows({"rows": [loader, old]}, tmp_path / "l.png")
    assert texts == [" 2,469  (loader/step 2.00)", " 2,469"]
