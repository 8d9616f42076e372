"""`moco-fast sweep`'s plot of the table (sweep_table.plot): skipped without matplotlib, no bar for a
figure that a setting lacks, and a legend that hides no bar."""

from __future__ import annotations

import pytest


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures that plot() draws, as it closes them (matplotlib needed)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    drawn = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (drawn.append(fig), close(fig)))
    return drawn


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from moco_fast.sweep_table import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot([{"name": "a", "knn_top1": 50.0}], tmp_path / "p.png") is False
    assert not (tmp_path / "p.png").exists()


def test_plot_leaves_out_the_bars_of_figures_a_setting_lacks(tmp_path, figures):
    # two grids in one folder, one with --lincls-epochs: the other's settings have no linear top-1,
    # which is no bar (the markdown's "-"), not a bar of 0%
    from moco_fast.sweep_table import plot

    rows = [
        {"name": "a", "knn_top1": 50.0, "linear_top1": 60.0, "pretext_acc": 40.0},
        {"name": "b", "knn_top1": 55.0, "linear_top1": None, "pretext_acc": None},
    ]
    assert plot(rows, tmp_path / "p.png") is True
    top, bottom = figures[0].axes
    heights = sorted(round(p.get_height(), 3) for p in top.patches)
    assert heights == [50.0, 55.0, 60.0]
    assert [p.get_height() for p in bottom.patches] == [40.0]


def test_plot_legend_hides_no_bar(tmp_path, figures):
    # three settings with kNN near their best: the legend inside the axes ("best") covered the last
    from moco_fast.sweep_table import plot

    rows = [{"name": n, "knn_top1": 46.7, "knn_head_top1": 50.0, "pretext_acc": 12.0} for n in "abc"]
    rows[1]["linear_top1"] = 36.7
    assert plot(rows, tmp_path / "p.png") is True
    fig = figures[0]
    fig.canvas.draw()
    top = fig.axes[0]
    legend = top.get_legend().get_window_extent()
    assert not any(legend.overlaps(p.get_window_extent()) for p in top.patches)


def test_plot_shows_the_random_inits_knn_beside_the_trained_ones(tmp_path, figures):
    # the table's "kNN % random init" column (--knn-baseline) had no bar: a setting that scored below
    # the random init (a short run) looked as good in the plot as one that beat it
    from moco_fast.sweep_table import plot

    rows = [{"name": n, "knn_top1": 12.5, "knn_head_top1": 10.0, "random_knn_top1": 15.0} for n in "ab"]
    rows[1]["random_knn_top1"] = None  # a grid run without --knn-baseline: no bar
    assert plot(rows, tmp_path / "p.png") is True
    top = figures[0].axes[0]
    assert sorted(round(p.get_height(), 3) for p in top.patches) == [10.0, 10.0, 12.5, 12.5, 15.0]
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["kNN (backbone)", "kNN (head)", "kNN (random init)"]


def test_plot_names_a_diverged_setting_under_its_empty_place(tmp_path, figures):
    # a diverged setting (a sweep.json row with its error, no figures) was a bare name without bars,
    # as if it had not been scored, where the table says 'diverged'
    from moco_fast.sweep_table import plot

    rows = [{"name": "b", "error": "the run diverged"}, {"name": "a", "knn_top1": 50.0, "pretext_acc": 40.0}]
    assert plot(rows, tmp_path / "p.png") is True
    bottom = figures[0].axes[1]
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["b\n(diverged)", "a"]
    assert bottom.get_xlim() == (-0.5, 1.5)  # its place is shown (the axes began at a's bars)
